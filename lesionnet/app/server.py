"""The HTTP server behind ``lesionnet serve`` (lesionnet.cli.serve): uvicorn with TLS and two deadlines.

uvicorn closes only idle keep-alive connections: one that opens and sends half its headers, or whose answer went out
before its body was read and that keeps trickling the rest, is held for ever. The server here runs uvicorn's h11
protocol with two deadlines added (:func:`timed_h11_protocol`); the wait for the body while the app reads an upload
is the app's own (``lesionnet.app.api.BodyLimit``), so that it answers 408 instead of just closing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)
HEADER_TIMEOUT_TEXT = b"The request headers did not arrive in time; send the request again."
REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
    + b"content-length: %d\r\n\r\n" % len(HEADER_TIMEOUT_TEXT)
    + HEADER_TIMEOUT_TEXT
)


def timed_h11_protocol(header_timeout_s: float, linger_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers and one for an unread body.

    - Headers: complete within ``header_timeout_s`` of the connection opening or of the request's first byte (not
      reset by each byte, so a drip-fed header cannot extend it); else 408 (if part of a request came) and close.
    - Unread body: when the app answered before reading the whole body (413 by Content-Length, 404, ...), uvicorn
      discards what still comes, and every byte would cancel its keep-alive timer; the connection is closed
      ``linger_s`` after the answer unless the body ended.

    uvicorn is imported here so that ``lesionnet serve --help`` works without the app extra.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm(header_timeout_s)  # a connection that never sends a request

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch(after_response=False)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch(after_response=True)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _watch(self, after_response: bool) -> None:
            their, ours = self.conn.their_state, self.conn.our_state
            if their is h11.IDLE and not after_response:  # (between requests uvicorn's keep-alive timer counts)
                self._arm(header_timeout_s)  # an armed deadline stays: counted from the first byte
            elif their is h11.SEND_BODY and ours in (h11.DONE, h11.MUST_CLOSE):
                self._arm(linger_s)
            else:
                self._disarm()

        def _arm(self, seconds: float) -> None:
            if self.deadline is None and not self.transport.is_closing():
                self.deadline = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def _expire(self) -> None:
            self.deadline = None
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a request's headers
                self.transport.write(REQUEST_TIMEOUT)
            self.logger.info("Closing a connection that stalled (%s).", self.client)
            self.transport.close()

    return TimedH11Protocol


def tls_options(certfile: str | None, keyfile: str | None) -> dict[str, str]:
    """uvicorn's ``ssl_certfile``/``ssl_keyfile``: both or neither, and both readable files."""
    if not certfile and not keyfile:
        return {}
    if not (certfile and keyfile):
        raise ValueError(
            "HTTPS needs both ssl_certfile= (the server certificate) and ssl_keyfile= (its private key); "
            "scripts/make_local_ca.sh makes a pair for a local network."
        )
    missing = [str(p) for p in (certfile, keyfile) if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"TLS file(s) not found: {', '.join(missing)}. Give existing PEM files.")
    return {"ssl_certfile": str(certfile), "ssl_keyfile": str(keyfile)}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_options(cfg: DictConfig) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments from serve.yaml: address, TLS and the timeouts (``limits.*``)."""
    tls = tls_options(cfg.ssl_certfile, cfg.ssl_keyfile)
    if not tls and not is_loopback(str(cfg.host)):
        log.warning(
            "Serving plain HTTP on %s: photos cross the network unencrypted. Use it on a trusted network only, or "
            "give ssl_certfile= and ssl_keyfile= (scripts/make_local_ca.sh).",
            cfg.host,
        )
    limits = cfg.limits
    return {
        "host": cfg.host,
        "port": cfg.port,
        "http": timed_h11_protocol(float(limits.header_timeout_s), float(limits.body_timeout_s)),
        "timeout_keep_alive": limits.keep_alive_s,
        **tls,
    }


def serve(cfg: DictConfig) -> None:
    """Load the model and serve it until stopped (``lesionnet serve``, serve.yaml)."""
    import uvicorn  # the app extra; imported here so `lesionnet serve --help` works without it

    from lesionnet.app.build import build_app

    options = server_options(cfg)  # a wrong TLS setting fails before the model is loaded
    uvicorn.run(build_app(cfg), log_level="info", **options)
