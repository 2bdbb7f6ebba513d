"""A Sockudo-faithful HTTP test server: signed publish API, idempotency, delivery record, faults,
and the rest of the API (channel state, history, versioned messages, annotations), each switchable.

See docs/test-server.md. In-process: ``TestServer``; as a subprocess: ``TestServerProcess``
(``python -m outbox.testing.server``) driven through ``RemoteTestServer``.
"""

from .config import ServerConfig
from .http import TestServer
from .remote import RemoteTestServer, TestServerProcess
from .state import Delivery

__all__ = ["Delivery", "RemoteTestServer", "ServerConfig", "TestServer", "TestServerProcess"]
