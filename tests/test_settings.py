"""Worker settings: environment parsing, defaults that follow each other, errors that hide secrets."""

from __future__ import annotations

import pytest

from outbox.settings import DEFAULT_SOCKUDO_URL, SPECS, Settings, SettingsError

#: The settings that are numbers: each has a range.
NUMERIC = [spec for spec in SPECS if spec.kind in (int, float)]


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
        ("OUTBOX_IN_FLIGHT", "0", "OUTBOX_IN_FLIGHT must be between 1 and 1000, got 0"),
        ("OUTBOX_POLL_INTERVAL", "-1", "OUTBOX_POLL_INTERVAL must be positive, got -1"),
    ],
)
def test_malformed_values_are_named(variable, value, words):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    assert words in str(info.value)


def test_a_negative_retention_is_refused_not_read_as_forever():
    # "-1 means forever" elsewhere; here it would set the cutoff in the future and delete the
    # whole published log.
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"OUTBOX_RETENTION_SECONDS": "-1"})
    assert str(info.value) == (
        "OUTBOX_RETENTION_SECONDS must be 0 (keep forever) or positive, got -1"
    )
    with pytest.raises(SettingsError, match="OUTBOX_RETENTION_SECONDS must be 0"):
        Settings(retention_seconds=-0.5)  # built in code, not from the environment
    assert Settings.from_env({"OUTBOX_RETENTION_SECONDS": "0"}).retention_seconds == 0
    assert Settings.from_env({"OUTBOX_RETENTION_SECONDS": "3600"}).retention_seconds == 3600


def test_every_numeric_setting_has_a_range():
    assert {spec.name for spec in NUMERIC} == {spec.name for spec in SPECS if spec.bounds}
    assert len(NUMERIC) >= 15


@pytest.mark.parametrize("spec", NUMERIC, ids=lambda spec: spec.variable)
def test_every_numeric_setting_refuses_what_is_out_of_range_naming_its_variable(spec):
    if spec.kind is float:
        refused = ["-1", "nan", "inf", "-inf", "1e300"]
        if spec.name != "retention_seconds":
            refused.append("0")
    else:
        refused = ["-1", "99999999999999999999"]  # 20 digits: past any column or counter
        if spec.name != "metrics_port":
            refused.append("0")
    for value in refused:
        with pytest.raises(SettingsError) as info:
            Settings.from_env({spec.variable: value})
        assert str(info.value).startswith(f"{spec.variable} must be "), value
        with pytest.raises(SettingsError) as info:
            Settings(**{spec.name: float(value) if spec.kind is float else int(value)})
        assert str(info.value).startswith(f"{spec.variable} must be "), value


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "OUTBOX_POLL_INTERVAL",
            "inf",
            "OUTBOX_POLL_INTERVAL must be at most 3600 (an hour), got inf",
        ),
        ("OUTBOX_LEASE_SECONDS", "nan", "OUTBOX_LEASE_SECONDS must be a number, got nan"),
        (
            "OUTBOX_RETENTION_SECONDS",
            "4e9",
            "OUTBOX_RETENTION_SECONDS must be at most 3153600000 (100 years), got 4000000000",
        ),
        (
            "OUTBOX_BACKOFF_MAX",
            "1e9",
            "OUTBOX_BACKOFF_MAX must be at most 86400 (a day), got 1000000000",
        ),
        ("OUTBOX_SERVER_BATCH_LIMIT", "0", "OUTBOX_SERVER_BATCH_LIMIT must be between 1 and 10000"),
    ],
)
def test_range_errors_say_what_is_accepted(variable, value, message):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({variable: value})
    assert str(info.value).startswith(message)


def test_errors_between_two_settings_name_both_variables():
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"OUTBOX_BACKOFF_MIN": "10", "OUTBOX_BACKOFF_MAX": "5"})
    assert str(info.value) == "OUTBOX_BACKOFF_MIN (10) must not exceed OUTBOX_BACKOFF_MAX (5)"
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"OUTBOX_LEASE_SECONDS": "15", "OUTBOX_REQUEST_TIMEOUT": "10"})
    assert str(info.value) == (
        "OUTBOX_LEASE_SECONDS (15) must be at least twice OUTBOX_REQUEST_TIMEOUT (10)"
    )


@pytest.mark.parametrize(
    ("flag", "value", "variable"),
    [
        ("--retention-seconds", "-1", "OUTBOX_RETENTION_SECONDS"),
        ("--poll-interval", "inf", "OUTBOX_POLL_INTERVAL"),
        ("--lease-seconds", "nan", "OUTBOX_LEASE_SECONDS"),
        ("--in-flight", "0", "OUTBOX_IN_FLIGHT"),
        ("--max-attempts", "99999999999999999999", "OUTBOX_MAX_ATTEMPTS"),
    ],
)
def test_a_worker_flag_gets_its_variables_check_and_names_both(
    flag, value, variable, capsys, monkeypatch, tmp_path
):
    from outbox.cli import main

    database = tmp_path / "outbox.db"
    monkeypatch.delenv("OUTBOX_DATABASE_URL", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--database-url", f"sqlite:///{database}", "worker", "--once", flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"argument {flag}: {variable} must be " in err, err
    assert not database.exists()  # refused before the worker opened anything


@pytest.mark.parametrize(
    ("url", "chosen", "expected"),
    [
        ("http://k:s@127.0.0.1:6001/apps/1", "auto", "h11"),
        ("https://k:s@sockudo.example:443/apps/1", "auto", "httpx"),
        ("http://k:s@127.0.0.1:6001/apps/1", "httpx", "httpx"),
        ("http://k:s@127.0.0.1:6001/apps/1", "h11", "h11"),
    ],
)
def test_the_http_client_is_h11_for_plain_http_unless_chosen(url, chosen, expected):
    settings = Settings.from_env({"SOCKUDO_URL": url, "OUTBOX_HTTP_CLIENT": chosen})
    assert settings.transport == expected


def test_an_unknown_http_client_or_h11_over_tls_is_refused():
    with pytest.raises(SettingsError, match="OUTBOX_HTTP_CLIENT must be one of auto, h11, httpx"):
        Settings.from_env({"OUTBOX_HTTP_CLIENT": "curl"})
    with pytest.raises(SettingsError, match="plain http:// only"):
        Settings.from_env(
            {"SOCKUDO_URL": "https://k:s@sockudo.example/apps/1", "OUTBOX_HTTP_CLIENT": "h11"}
        )


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


#: Secrets as people paste them: base64 (``/``, ``+``, ``=``), URL-reserved characters, ``@``, ``%``.
AWKWARD_SECRETS = ["ab/cd+ef==", "s?cret", "se#cret", "p@ss:word", "100%/?#@", "sp ace"]


@pytest.mark.parametrize("secret", AWKWARD_SECRETS)
def test_a_sockudo_secret_with_reserved_characters_is_parsed_and_masked(secret):
    settings = Settings.from_env({"SOCKUDO_URL": f"http://key:{secret}@host:6001/apps/7"})
    assert settings.sockudo_config().secret == secret
    assert settings.sockudo_config().app_id == "7"
    assert settings.masked_sockudo_url == "http://key:***@host:6001/apps/7"
    assert secret not in repr(settings)


@pytest.mark.parametrize("secret", AWKWARD_SECRETS)
@pytest.mark.parametrize(
    "template",
    [
        "http://key:{s}@host:6001/wrong/path",
        "ftp://key:{s}@host/apps/1",
        "http://key:{s}@host:notaport/apps/1",
        "http://key:{s}@/apps/1",
    ],
)
def test_malformed_sockudo_urls_never_show_an_awkward_secret(secret, template):
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"SOCKUDO_URL": template.format(s=secret)})
    assert secret not in str(info.value)
    assert "***" in str(info.value)


@pytest.mark.parametrize("password", ["dbpass", "db/pa?ss#", "p@ss"])
def test_repr_of_settings_hides_the_database_password(password):
    from urllib.parse import quote

    url = f"postgresql://user:{quote(password, safe='')}@db.example/outbox"
    settings = Settings.from_env({"OUTBOX_DATABASE_URL": url})
    text = repr(settings)
    assert password not in text and quote(password, safe="") not in text
    assert "user:***@db.example" in text


@pytest.mark.parametrize(
    "url",
    [
        "postgresql//user:s3cr/et@host/db",
        "postgres ql://user:s3cr/et@host/db",
        "postgresql://user:s3cr/et@host:port/db",
        "mongodb://user:s3cr/et@host/db",
    ],
)
def test_a_mistyped_database_url_is_never_echoed_with_its_password(url, capsys, monkeypatch):
    from outbox.cli import main

    monkeypatch.delenv("OUTBOX_DATABASE_URL", raising=False)
    code = main(["--database-url", url, "status"])
    err = capsys.readouterr().err
    assert code in (1, 2)
    assert "s3cr" not in err, err
    assert err.startswith("outbox: error: ")


def test_an_overlong_table_name_is_refused():
    with pytest.raises(SettingsError, match="OUTBOX_TABLE"):
        Settings.from_env({"OUTBOX_TABLE": "t" * 41})


def test_metrics_port_and_log_format():
    settings = Settings.from_env({"OUTBOX_METRICS_PORT": "9464", "OUTBOX_LOG_FORMAT": "json"})
    assert (settings.metrics_port, settings.metrics_host, settings.log_format) == (
        9464,
        "127.0.0.1",
        "json",
    )
    assert Settings.from_env({}).metrics_port is None  # off by default
    with pytest.raises(SettingsError, match="OUTBOX_METRICS_PORT must be between 0 and 65535"):
        Settings.from_env({"OUTBOX_METRICS_PORT": "70000"})
    with pytest.raises(SettingsError, match="OUTBOX_METRICS_PORT must be an integer"):
        Settings.from_env({"OUTBOX_METRICS_PORT": "http"})
    with pytest.raises(SettingsError, match="OUTBOX_LOG_FORMAT must be one of text, json"):
        Settings.from_env({"OUTBOX_LOG_FORMAT": "xml"})


def test_psycopg_connections_get_the_url_parameters_as_sqlalchemy_reads_them():
    """The worker's own psycopg connections (LISTEN, the hot path) see a space in a query value
    and special characters in the password as they are, not as a URI's ``+``."""
    from psycopg.conninfo import conninfo_to_dict
    from sqlalchemy.engine import make_url

    from outbox.connections import libpq_conninfo

    url = make_url(
        "postgresql+psycopg://app:p%40ss%20w%3Ard@db.example:6543/orders"
        "?options=-csearch_path%3Dx%20-cwork_mem%3D64MB&sslmode=require"
    )
    assert conninfo_to_dict(libpq_conninfo(url)) == {
        "host": "db.example",
        "port": "6543",
        "user": "app",
        "password": "p@ss w:rd",
        "dbname": "orders",
        "options": "-csearch_path=x -cwork_mem=64MB",
        "sslmode": "require",
    }
