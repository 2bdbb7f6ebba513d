"""Worker settings: environment parsing, defaults that follow each other, errors that hide secrets."""

from __future__ import annotations

import pytest

from outbox.settings import DEFAULT_SOCKUDO_URL, Settings, SettingsError


def test_defaults_match_the_compose_app_and_sqlite():
    settings = Settings.from_env({})
    assert settings.database_url == "sqlite:///outbox.db"
    assert settings.sockudo_url == DEFAULT_SOCKUDO_URL
    assert settings.batch_size == 100 == settings.server_batch_limit


def test_batch_size_follows_a_smaller_server_limit():
    settings = Settings.from_env({"OUTBOX_SERVER_BATCH_LIMIT": "10"})
    assert settings.batch_size == 10


def test_batch_size_above_the_server_limit_is_refused_naming_both_variables():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"OUTBOX_SERVER_BATCH_LIMIT": "10", "OUTBOX_BATCH_SIZE": "50"})
    assert "OUTBOX_BATCH_SIZE" in str(info.value)
    assert "OUTBOX_SERVER_BATCH_LIMIT" in str(info.value)


def test_flags_override_the_environment():
    settings = Settings.from_env({"OUTBOX_BATCH_SIZE": "20"}, batch_size=30, in_flight=None)
    assert settings.batch_size == 30
    assert settings.in_flight == 4


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("OUTBOX_BATCH_SIZE", "ten", "OUTBOX_BATCH_SIZE must be an integer"),
        ("OUTBOX_LEASE_SECONDS", "soon", "OUTBOX_LEASE_SECONDS must be a number"),
        ("OUTBOX_IN_FLIGHT", "0", "in_flight must be at least 1"),
        ("OUTBOX_POLL_INTERVAL", "-1", "poll_interval must be positive"),
    ],
)
def test_malformed_values_are_named(variable, value, words):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    assert words in str(info.value)


def test_a_lease_shorter_than_two_request_timeouts_is_refused():
    with pytest.raises(SettingsError, match="lease"):
        Settings.from_env({"OUTBOX_LEASE_SECONDS": "15", "OUTBOX_REQUEST_TIMEOUT": "10"})


def test_a_malformed_sockudo_url_error_never_shows_the_secret():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"SOCKUDO_URL": "http://key:s3cr3t-value@host:6001/wrong/path"})
    assert "s3cr3t-value" not in str(info.value)
    assert "key:***@host" in str(info.value)


def test_repr_hides_the_url_and_master_key():
    settings = Settings.from_env(
        {
            "SOCKUDO_URL": "http://key:s3cr3t-value@host:6001/apps/1",
            "SOCKUDO_ENCRYPTION_MASTER_KEY_BASE64": "A" * 43 + "=",
        }
    )
    assert "s3cr3t-value" not in repr(settings)
    assert "AAAA" not in repr(settings)
    assert settings.masked_sockudo_url == "http://key:***@host:6001/apps/1"
