"""Running the console: ``nvr-guard web`` loads the config, builds the app and serves it with
uvicorn (TLS from web.tls_cert/tls_key; plain HTTP only on loopback, for a reverse proxy)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from typing import Any

from nvr_guard.config import Config
from nvr_guard.config.types import is_loopback, listen_parts
from nvr_guard.errors import InvalidInput
from nvr_guard.web.app import Console
from nvr_guard.web.gateway import Gateway
from nvr_guard.web.guard import PER_CLIENT, GuardedH11Protocol
from nvr_guard.web.notify import Notifier
from nvr_guard.wire import ControlClient

log = logging.getLogger(__name__)


def password_checker(config: Config) -> Any:
    """``login(user, password, client)`` through the password helper's socket."""
    from nvr_guard.web import authclient

    assert config.web is not None
    path = config.web.auth_socket

    def login(user: str, password: str, client: str) -> Mapping[str, Any]:
        reply: Mapping[str, Any] = authclient.login(path, user, password, client)
        return reply

    return login


def build(config: Config, notifier: Any = None) -> Console:
    """The console for ``config`` (which must have a web: section)."""
    web = config.web
    if web is None:
        raise InvalidInput(
            f"{config.source_path}: no web: section; add one (web: {{listen: ..., tls_cert: ..., "
            "tls_key: ...}}) to run the console"
        )
    return Console(
        config,
        Gateway(config.socket),
        password_checker(config),
        secure=web.tls_cert is not None,
        notifier=notifier,
    )


def serve(config: Config) -> int:
    """Serve the console until SIGTERM/SIGINT; the exit code."""
    import uvicorn

    console_notifier: Notifier | None = None
    if config.notify.smtp is not None or config.notify.webhook is not None:
        socket = config.socket
        console_notifier = Notifier(config, lambda: ControlClient(socket))
    console = build(config, console_notifier)
    web = config.web
    assert web is not None
    host, port = listen_parts(web.listen)
    loopback = is_loopback(host)
    if web.tls_cert is None and not loopback:  # config check refuses it; never serve so
        raise InvalidInput(f"web.listen {web.listen}: plain HTTP is served on loopback only")
    if web.tls_cert is not None:
        # fail here, with the file named, rather than inside uvicorn's start-up
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                web.tls_cert, web.tls_key
            )
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(
                f"web.tls_cert/tls_key ({web.tls_cert}, {web.tls_key}): cannot load: {exc}"
            ) from None
    # deadlines for slow clients, and a cap per address unless behind a proxy on this host
    GuardedH11Protocol.per_client = 0 if loopback else PER_CLIENT
    if console_notifier is not None:
        console_notifier.start()
    try:
        uvicorn.run(
            console.app,
            http=GuardedH11Protocol,
            host=host,
            port=port,
            ssl_certfile=web.tls_cert,
            ssl_keyfile=web.tls_key,
            # behind a reverse proxy on this host: its X-Forwarded-For names the client
            proxy_headers=loopback,
            forwarded_allow_ips="127.0.0.1,::1" if loopback else "",
            server_header=False,
            limit_concurrency=500,
            timeout_keep_alive=10,
            log_level="info",
            access_log=True,
        )
    finally:
        if console_notifier is not None:
            console_notifier.stop()
    return 0
