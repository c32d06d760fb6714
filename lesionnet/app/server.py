"""The HTTP server behind ``lesionnet serve`` (lesionnet.cli.serve): uvicorn with TLS and per-connection deadlines.

uvicorn closes only idle keep-alive connections: one that opens and never finishes its TLS handshake, sends half its
headers, trickles its body, or whose answer went out before its body was read and that keeps trickling the rest, is
held for ever. The server here runs uvicorn's h11 protocol with deadlines added (:func:`timed_h11_protocol`), each
counted from a fixed moment of the connection (its opening, a request's first byte, its headers, its answer) and never
extended by the bytes that come; with TLS the handshake has the header deadline too (:func:`tls_timed_loop`). While
the app reads an upload the wait for the body is the app's own (``lesionnet.app.api.BodyLimit``), so that it answers
408 instead of just closing; the protocol's body deadline is the backstop a little later. Errors the server answers
itself (a malformed request, headers that did not arrive in time) have the app's JSON error body.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger(__name__)
HEADER_TIMEOUT_TEXT = "The request headers did not arrive in time; send the request again."
BAD_REQUEST_TEXT = "The request is not valid HTTP (for example a malformed header); send it again."
BACKSTOP_S = 1.0  # the protocol closes this long after the app's body deadline, so that the app's 408 goes first


def raw_response(status: int, reason: str, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for an answer written outside h11's state machine
    (``headers`` with the body's content-length)."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason.encode()), *(name + b": " + value for name, value in headers)]
    return b"\r\n".join([*lines, b"connection: close"]) + b"\r\n\r\n" + body


def timed_h11_protocol(
    header_timeout_s: float, linger_s: float, body_deadline_s: float | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline for each request's headers, its body and an unread body.

    - Headers: complete within ``header_timeout_s`` of the connection opening (the TCP accept, before any TLS
      handshake) or of the request's first byte (not reset by each byte, so a drip-fed header cannot extend it);
      else 408 (if part of a request came) and close.
    - Body: complete within ``body_deadline_s`` of the headers. The app answers 408 at that deadline while it reads
      (``BodyLimit``); the connection is closed ``BACKSTOP_S`` later in any case (an app that does not read).
    - Unread body: when the app answered before reading the whole body (413 by Content-Length, 404, ...), uvicorn
      discards what still comes, and every byte would cancel its keep-alive timer; the connection is closed
      ``linger_s`` after the answer (or at the body deadline, if earlier) unless the body ended.

    Between requests uvicorn's keep-alive timer counts. The 400 of a malformed request and the 408 have the app's
    JSON error body (``lesionnet.app.api.error_response``). uvicorn and the app are imported here so that
    ``lesionnet serve --help`` works without the app extra.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from lesionnet.app.api import error_response

    def json_error(status: int, code: str, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """The app's JSON error: its headers (content-type and -length, nosniff as on every answer) and body."""
        response = error_response(status, code, message, headers={"X-Content-Type-Options": "nosniff"})
        return response.raw_headers, bytes(response.body)

    header_timeout = raw_response(408, "Request Timeout", *json_error(408, "header_timeout", HEADER_TIMEOUT_TEXT))
    bad_request = json_error(400, "bad_request", BAD_REQUEST_TEXT)

    class TimedH11Protocol(H11Protocol):
        deadline: asyncio.TimerHandle | None = None
        due: float | None = None  # when ``deadline`` fires (loop time)
        started: float | None = None  # the current request's start: the connection's opening, else its first byte
        headers_at: float | None = None  # when its headers were complete
        answered_at: float | None = None  # when the answer went out (its body still coming)
        watched: object = None  # the request (uvicorn's cycle) these times are of

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.started = self.loop.time()  # made at the TCP accept: a TLS handshake counts against the headers

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._watch()  # a connection that never sends a request

        def data_received(self, data: bytes) -> None:
            if self.started is None:  # the first byte of the next request on a kept-alive connection
                self.started = self.loop.time()
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            self._arm(None)
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request h11 cannot parse, with the JSON error body (``msg`` is uvicorn's)."""
            headers, body = bad_request
            close = [*headers, (b"connection", b"close")]
            output = self.conn.send(h11.Response(status_code=400, headers=close, reason=b"Bad Request"))
            output = (output or b"") + (self.conn.send(h11.Data(data=body)) or b"")
            self.transport.write(output + (self.conn.send(h11.EndOfMessage()) or b""))
            self.transport.close()

        def _watch(self) -> None:
            """(Re)arm the deadline for where the connection is now; each is counted from a fixed moment."""
            their, ours, now = self.conn.their_state, self.conn.our_state, self.loop.time()
            if self.cycle is not self.watched:  # a new request (pipelined ones keep the earlier start: stricter)
                self.watched, self.headers_at, self.answered_at = self.cycle, None, None
            if their is h11.IDLE:
                if self.cycle is not None and ours is h11.IDLE and not self.conn.trailing_data[0]:
                    self.started = self.headers_at = self.answered_at = None  # between requests: keep-alive
                    self._arm(None)
                    return
                self.started = self.started if self.started is not None else now
                self._arm(self.started + header_timeout_s)
            elif their is h11.SEND_BODY:
                self.headers_at = self.headers_at if self.headers_at is not None else now
                body_due = self.headers_at + body_deadline_s + BACKSTOP_S if body_deadline_s is not None else None
                if ours in (h11.DONE, h11.MUST_CLOSE):  # answered; the rest of the body is discarded
                    self.answered_at = self.answered_at if self.answered_at is not None else now
                    linger_due = self.answered_at + linger_s
                    self._arm(linger_due if body_due is None else min(linger_due, body_due))
                else:
                    self._arm(body_due)
            else:  # the request arrived in full (the app answers it), or the connection is closing
                self._arm(None)

        def _arm(self, due: float | None) -> None:
            if due == self.due or (due is not None and self.transport is not None and self.transport.is_closing()):
                return
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline, self.due = None, due
            if due is not None:
                self.deadline = self.loop.call_at(due, self._expire)

        def _expire(self) -> None:
            self.deadline = self.due = None
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a request's headers
                self.transport.write(header_timeout)
            self.logger.info("Closing a connection that stalled (%s).", self.client)
            self.transport.close()

    return TimedH11Protocol


def tls_timed_loop(handshake_timeout_s: float, shutdown_timeout_s: float) -> Callable[[], asyncio.AbstractEventLoop]:
    """An asyncio event loop whose TLS servers give up a handshake after ``handshake_timeout_s`` (asyncio: 60 s) and
    the wait for the client's close_notify after ``shutdown_timeout_s`` (asyncio: 30 s).

    uvicorn has no setting for either: a connection that never sends a ClientHello would be held 60 s before the
    protocol (and its header deadline) even exists, and one closed for stalling 30 s more. uvicorn's ``loop=`` takes
    this factory (a callable passes through its import-string loader); it replaces uvloop, whose TLS is not used here.
    """

    class TLSTimedLoop(asyncio.SelectorEventLoop):
        async def create_server(self, *args: Any, **kwargs: Any) -> asyncio.Server:
            if kwargs.get("ssl") is not None:
                kwargs.setdefault("ssl_handshake_timeout", handshake_timeout_s)
                if sys.version_info >= (3, 11):  # the shutdown timeout is new in 3.11 (3.10 closes without waiting)
                    kwargs.setdefault("ssl_shutdown_timeout", shutdown_timeout_s)
            return await super().create_server(*args, **kwargs)

    return TLSTimedLoop


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
    header_s = float(limits.header_timeout_s)
    linger_s = float(limits.body_timeout_s) if limits.body_timeout_s is not None else header_s
    deadline = limits.get("body_deadline_s")
    return {
        "host": cfg.host,
        "port": cfg.port,
        "http": timed_h11_protocol(header_s, linger_s, float(deadline) if deadline is not None else None),
        "timeout_keep_alive": limits.keep_alive_s,
        **({"loop": tls_timed_loop(header_s, header_s)} if tls else {}),  # a TLS handshake: the header deadline
        **tls,
    }


def serve(cfg: DictConfig) -> None:
    """Load the model and serve it until stopped (``lesionnet serve``, serve.yaml)."""
    import uvicorn  # the app extra; imported here so `lesionnet serve --help` works without it

    from lesionnet.app.build import build_app

    options = server_options(cfg)  # a wrong TLS setting fails before the model is loaded
    uvicorn.run(build_app(cfg), log_level="info", **options)
