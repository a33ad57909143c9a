"""HTTP/2 for the gateway's clients: a translation shim in front of the HTTP/1.1 engine (``server.py``).

TLS negotiates the protocol with ALPN. A connection that chose ``h2`` gets an :class:`h2.connection.H2Connection`;
every stream on it becomes one HTTP/1.1 exchange on a *virtual* client connection made by the engine's
:class:`~meshkit.gateway.server.Server`, whose transport is the stream (:class:`_Stream`). So routing, plugins,
limits, retries, breakers and the upstream pool behave exactly as for HTTP/1.1, and the upstreams stay HTTP/1.1.

- request: the stream's header block becomes an HTTP/1.1 head (``:method :path HTTP/1.1``, ``Host`` from
  ``:authority``, split ``cookie`` fields joined), ``Content-Length`` framing when the client sent one,
  ``chunked`` otherwise (no body when ``END_STREAM`` came with the headers), and ``Connection: close`` so the
  engine ends the virtual connection with its one response;
- response: what the engine writes is parsed (httptools) and sent as HEADERS (``:status``, hop-by-hop headers
  dropped) and DATA frames within the client's flow-control windows; bytes beyond them wait on the stream, and
  past ``_HIGH_WATER`` the virtual connection's writer is paused (which pauses reading from the upstream);
- the client's address is the peer's (``get_extra_info`` of a stream answers for the TLS connection), so
  ``ip_filter``, rate limits per IP and ``X-Forwarded-For`` see the real client;
- a stream the client resets closes its virtual connection (the engine drops the upstream exchange); a virtual
  connection that closes before its response is complete resets the stream (``INTERNAL_ERROR``);
- the engine's drain and idle timeouts reach an HTTP/2 connection through a member of ``Server.connections``
  (:class:`_Presence`): draining refuses new streams (``REFUSED_STREAM``: safe to retry elsewhere) and sends
  GOAWAY when the last stream ends.

A connection that negotiated anything else is handed to the HTTP/1.1 protocol (``transport.set_protocol``: no
per-byte cost). Cleartext HTTP/2 with prior knowledge (``negotiating(server, h2c=True)``: the first bytes decide)
works the same way; the config has no switch for it yet. Not supported: server push, priorities (streams are
served as their data comes), trailers (request trailers are dropped), extended CONNECT (WebSocket over HTTP/2).

Plugins see one header HTTP/2 clients cannot send: ``connection: close`` (see above).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

from meshkit.gateway.server import Limits, Server, _ClientConn

try:
    import h2.config
    import h2.connection
    import h2.errors
    import h2.events
    import h2.exceptions
    import h2.settings
except ImportError:  # pragma: no cover - the gateway extra installs h2; without it TLS offers HTTP/1.1 only
    HAVE_H2 = False
else:
    HAVE_H2 = True

__all__ = ["HAVE_H2", "alpn_protocols", "negotiating"]

log = logging.getLogger(__name__)

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: SETTINGS_MAX_CONCURRENT_STREAMS: streams one client connection may have open at once
MAX_STREAMS = 100
#: response bytes a stream holds beyond the client's window before its upstream is paused, and when it resumes
_HIGH_WATER = 64 * 1024
_LOW_WATER = 16 * 1024
#: streams a client may reset before their response beyond the ones it let finish: past that, the connection is
#: closed (ENHANCE_YOUR_CALM): opening and cancelling streams at once ("rapid reset") costs the gateway an
#: upstream exchange each and the client nothing
_RESET_ALLOWANCE = 2 * MAX_STREAMS
#: the connection-level receive window (the per-stream one stays at the protocol's default, 64 KiB)
_CONNECTION_WINDOW = 1024 * 1024
# request fields the HTTP/1.1 head gets from elsewhere, or must not carry (h2 itself refuses Connection & co.)
_REQUEST_SKIP = frozenset(
    {b"host", b"content-length", b"te", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding"}
)
# response fields that describe the HTTP/1.1 connection, not the message (forbidden in HTTP/2)
_RESPONSE_SKIP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"trailer"}
)
_END = -1  # an inbox entry that stands for END_STREAM


def alpn_protocols() -> list[str]:
    """What the gateway's TLS context offers: ``h2`` first when the h2 library is installed."""
    return ["h2", "http/1.1"] if HAVE_H2 else ["http/1.1"]


def negotiating(server: Server, *, h2c: bool = False) -> Callable[[], asyncio.Protocol]:
    """The protocol factory of a listening socket in front of ``server``: HTTP/2 on TLS connections that chose
    ``h2`` with ALPN, HTTP/1.1 on every other. ``h2c``: on cleartext connections too, HTTP/2 for clients that
    start with the HTTP/2 preface ("prior knowledge"), HTTP/1.1 otherwise (the first bytes decide)."""
    if not HAVE_H2:
        return server
    return functools.partial(_Negotiate, server, h2c)


class _Negotiate(asyncio.Protocol):
    """Lives until it knows the protocol, then hands the transport over (``set_protocol``)."""

    __slots__ = ("buffer", "h2c", "server", "timer", "transport")

    def __init__(self, server: Server, h2c: bool) -> None:
        self.server = server
        self.h2c = h2c
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._hand_over(transport, ssl_object.selected_alpn_protocol() == "h2")
        elif not self.h2c:
            self._hand_over(transport, False)
        else:  # cleartext: the first bytes tell (an HTTP/2 client with prior knowledge starts with the preface)
            self.transport = transport  # type: ignore[assignment]
            self.timer = asyncio.get_running_loop().call_later(self.server.limits.header_timeout, transport.close)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        buffer = self.buffer
        if len(buffer) < len(_PREFACE) and _PREFACE.startswith(buffer):
            return
        assert self.transport is not None
        if self.timer is not None:
            self.timer.cancel()
        self._hand_over(self.transport, buffer.startswith(_PREFACE)).data_received(buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _hand_over(self, transport: asyncio.BaseTransport, http2: bool) -> asyncio.Protocol:
        protocol = _Http2(self.server) if http2 else self.server()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        return protocol


class _Presence(_ClientConn):
    """The HTTP/2 connection as the engine's :class:`Server` sees it: a member of ``server.connections``, so
    the server's drain and the sweep's timeouts reach it. It never reads a request itself."""

    __slots__ = ("owner",)

    def __init__(self, owner: _Http2) -> None:
        super().__init__(owner.server)
        self.owner = owner

    def expired(self, now: float, limits: Limits) -> bool:
        return self.owner.expired(now, limits)

    def timed_out(self) -> None:
        self.owner.goaway()

    def close(self) -> None:
        self.owner.drain()


class _Http2(asyncio.Protocol):
    """One HTTP/2 client connection: the h2 state machine, its streams, the frames out."""

    __slots__ = (
        "accepted",
        "batching",
        "cancelled",
        "closed",
        "completed",
        "draining",
        "h2",
        "idle_since",
        "loop",
        "peer",
        "presence",
        "resets",
        "server",
        "streams",
        "transport",
        "used",
        "write_paused",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        # response heads come from httptools, which validated them, with names lower-cased and the connection's
        # headers dropped here: h2's own outbound checks (a third of its cost per stream) would find nothing
        config = h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False, normalize_outbound_headers=False
        )
        self.h2 = h2.connection.H2Connection(config)
        # twice the engine's limit: a head between the two gets the engine's 431 answer, not a connection error
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 2 * server.limits.max_header_bytes,
            },
        )
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.streams: dict[int, _Stream] = {}
        self.presence = _Presence(self)
        self.peer = ""
        self.idle_since = server.now
        self.used = False  # a stream was opened: idle time is measured against keepalive_timeout from then on
        self.draining = False
        self.closed = False
        self.write_paused = False
        self.batching = False  # inside data_received: frames go out once, at its end
        self.accepted = 0  # the last stream id handed to the engine (GOAWAY's last-stream-id)
        self.completed = 0  # streams whose response went out whole
        self.resets = 0  # streams the client reset before their response was complete
        self.cancelled: frozenset[int] = frozenset()  # streams reset in the read being handled

    # -- asyncio.Protocol ----------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass it
        self.loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else "unix"
        self.idle_since = self.server.now
        self.server.connections.add(self.presence)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW - self.h2.inbound_flow_control_window)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY with the error code
            log.info(
                "gateway: HTTP/2 protocol error from %s: %s", self.peer, exc, extra={"client": self.peer, "error": exc}
            )
            self.abort(goaway=False)
            return
        if len(events) > 1:
            # h2 has read every frame of this read already: a stream opened and reset in it is never started
            self.cancelled = frozenset(e.stream_id for e in events if isinstance(e, h2.events.StreamReset))
        self.batching = True
        try:
            for event in events:
                self._event(event)
        finally:
            self.batching = False
            self.cancelled = frozenset()
        self.flush()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    def _closed(self) -> None:
        """The connection is gone: out of the server's set, and its open streams lose their virtual connections."""
        self.closed = True
        self.server.connections.discard(self.presence)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.lost()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.send()
        self.flush()

    # -- events --------------------------------------------------------------------------------------------------

    def _event(self, event: h2.events.Event) -> None:
        if self.closed:
            return
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.receive(event.data, event.flow_controlled_length)
            else:  # a stream already answered: the bytes still count against the connection's window
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.RequestReceived):
            self._open(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.receive(b"", _END)
        elif isinstance(event, h2.events.WindowUpdated):
            if event.stream_id:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.send()
            else:
                for stream in list(self.streams.values()):
                    stream.send()
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.reset_by_client()
                self._client_reset()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                for stream in list(self.streams.values()):
                    stream.send()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.abort(goaway=False)  # h2 sends nothing once the client said GOAWAY: streams still open are lost

    def _client_reset(self) -> None:
        self.resets += 1
        if self.resets > _RESET_ALLOWANCE + self.completed:
            log.warning(
                "gateway: %s reset %d HTTP/2 streams before their response: closing the connection",
                self.peer,
                self.resets,
                extra={"client": self.peer, "resets": self.resets},
            )
            self.abort(error=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)

    def _open(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if stream_id in self.cancelled:
            self._client_reset()
            return
        if self.draining:  # REFUSED_STREAM: not processed, safe to retry on another connection
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        method = path = authority = host = length = None
        cookies: list[bytes] = []
        parts: list[bytes] = []
        for name, value in event.headers:
            # header_encoding=None: names and values are bytes, validated by h2 (no CR, LF, NUL; lower-case names)
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue  # :scheme (the gateway knows its own), :protocol (extended CONNECT: not supported)
            if name == b"cookie":
                cookies.append(value)  # HTTP/2 may split the cookie header; HTTP/1.1 wants one (RFC 9113 8.2.3)
            elif name in _REQUEST_SKIP:
                if name == b"content-length":
                    length = value
                elif name == b"host":
                    host = value
            else:
                parts += (name, b": ", value, b"\r\n")
        if cookies:
            parts += (b"cookie: ", b"; ".join(cookies), b"\r\n")
        ended = event.stream_ended is not None
        stream = _Stream(self, stream_id, method == b"HEAD", ended)
        if not ended:
            if length is not None:
                parts += (b"content-length: ", length, b"\r\n")
            else:
                parts.append(b"transfer-encoding: chunked\r\n")
                stream.chunked = True
        parts.append(b"connection: close\r\n\r\n")  # one exchange: the engine closes the virtual connection after it
        authority = authority or host or b""
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method or b"GET", path or authority, authority)
        self.used = True
        self.accepted = stream_id
        self.streams[stream_id] = stream
        virtual = self.server()
        stream.protocol = virtual
        virtual.connection_made(stream)
        virtual.data_received(head + b"".join(parts))

    # -- used by streams ---------------------------------------------------------------------------------------

    def flush(self, *, now: bool = False) -> None:
        """Write the frames h2 has queued (at the end of data_received when inside it, unless ``now``)."""
        if (self.batching and not now) or self.transport is None:
            return
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def stream_done(self, stream: _Stream) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        if not self.streams:
            self.idle_since = self.server.now
            if self.draining:
                self.goaway()

    # -- endings -------------------------------------------------------------------------------------------------

    def expired(self, now: float, limits: Limits) -> bool:
        """Idle (no stream) for longer than keepalive_timeout; header_timeout before the first stream."""
        if self.streams or self.closed:
            return False
        return now - self.idle_since > (limits.keepalive_timeout if self.used else limits.header_timeout)

    def drain(self) -> None:
        """The server drains: refuse new streams, GOAWAY once the open ones ended. Called again (the grace
        period is over): close now."""
        if self.draining or not self.streams:
            self.abort()
            return
        self.draining = True

    def goaway(self) -> None:
        """Say GOAWAY (no error) and close: the client knows which streams were served."""
        self.abort()

    def abort(self, *, goaway: bool = True, error: int = 0) -> None:
        """Close the connection (after a GOAWAY, and the frames h2 queued before, like its own GOAWAY after a
        protocol error): streams still open lose their virtual connections."""
        if not self.closed:
            if goaway:
                with contextlib.suppress(h2.exceptions.ProtocolError):
                    self.h2.close_connection(error, last_stream_id=self.accepted)
            self.flush(now=True)
        self._closed()
        if self.transport is not None:
            self.transport.close()


class _Stream(asyncio.Transport):
    """One stream: the transport of its virtual HTTP/1.1 connection. Request bytes go in through
    ``protocol.data_received``; what the engine writes is parsed and sent back as HEADERS and DATA frames."""

    __slots__ = (
        "chunked",
        "closed",
        "conn",
        "done",
        "end_sent",
        "head_only",
        "id",
        "inbox",
        "interim",
        "parser",
        "pending",
        "pending_size",
        "protocol",
        "reading_paused",
        "request_ended",
        "resp_headers",
        "response_ended",
        "writer_paused",
    )

    def __init__(self, conn: _Http2, stream_id: int, head_only: bool, request_ended: bool) -> None:
        super().__init__()
        self.conn = conn
        self.id = stream_id
        self.head_only = head_only
        self.protocol: asyncio.Protocol | None = None
        self.chunked = False
        self.request_ended = request_ended
        self.reading_paused = False
        self.inbox: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length) held while paused
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.resp_headers: list[tuple[bytes, bytes]] = []
        self.interim = False  # a 1xx response is being parsed
        self.pending: deque[bytes | memoryview] = deque()  # response bytes waiting for the client's window
        self.pending_size = 0
        self.writer_paused = False
        self.response_ended = False  # the engine wrote the whole response
        self.end_sent = False  # END_STREAM went out
        self.closed = False  # the virtual connection was closed (by the engine, the client or the connection)
        self.done = False  # the stream is over for this side (removed from the connection)

    # -- the request: client -> virtual connection ---------------------------------------------------------------

    def receive(self, data: bytes, flow: int) -> None:
        """DATA (or END_STREAM: ``flow`` is ``_END``) from the client."""
        if flow == _END:
            self.request_ended = True
        if self.closed:
            if flow > 0:
                self.conn.h2.acknowledge_received_data(flow, self.id)
            return
        if self.reading_paused or self.inbox:
            self.inbox.append((data, flow))
            return
        self._deliver(data, flow)

    def _deliver(self, data: bytes, flow: int) -> None:
        protocol = self.protocol
        assert protocol is not None
        if flow == _END:
            if self.chunked:
                protocol.data_received(b"0\r\n\r\n")
            return
        if data:
            protocol.data_received(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if flow:
            # the window reopens only for bytes the engine took: a paused upstream stops the client in turn
            self.conn.h2.acknowledge_received_data(flow, self.id)

    # -- asyncio.Transport: what the virtual connection calls ----------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        transport = self.conn.transport
        return transport.get_extra_info(name, default) if transport is not None else default

    def is_closing(self) -> bool:
        return self.closed

    def is_reading(self) -> bool:
        return not self.reading_paused

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False
        while self.inbox and not self.reading_paused and not self.closed:
            data, flow = self.inbox.popleft()
            self._deliver(data, flow)
        self.conn.flush()

    def get_write_buffer_size(self) -> int:
        return self.pending_size

    def write(self, data: bytes | bytearray | memoryview) -> None:
        parser = self.parser
        if parser is None or self.closed:
            return
        try:
            parser.feed_data(bytes(data))
        except httptools.HttpParserError:
            log.exception("gateway: cannot translate a response to HTTP/2 (stream %d)", self.id)
            self._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
            self.close()
        self.conn.flush()

    def close(self) -> None:
        """The engine is done with the virtual connection: the stream ends with the response if it was complete,
        with RST_STREAM if not."""
        if self.closed:
            return
        self.closed = True
        self._ack_inbox()
        if self.protocol is not None and self.conn.loop is not None:
            self.conn.loop.call_soon(self.protocol.connection_lost, None)  # as asyncio does: on the next turn
        if not self.response_ended:
            self._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.conn.flush()

    def abort(self) -> None:
        self._reset(h2.errors.ErrorCodes.CANCEL)
        self.close()

    # -- the response: virtual connection -> client (httptools callbacks) ----------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.resp_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None
        status = parser.get_status_code()
        headers = [(b":status", b"%d" % status)]
        headers += [(k, v) for k, v in self.resp_headers if k not in _RESPONSE_SKIP]
        self.resp_headers = []
        self.interim = status < 200
        end = self.head_only and not self.interim  # the answer to HEAD has no body, whatever its length says
        try:
            self.conn.h2.send_headers(self.id, headers, end_stream=end)
        except h2.exceptions.ProtocolError as exc:
            self._send_failed(exc, "a response head")
            return
        if end:
            self.parser = None
            self.response_ended = self.end_sent = True
            self._finish()

    def _send_failed(self, exc: h2.exceptions.ProtocolError, what: str) -> None:
        """Sending ``what`` raised ``exc`` (called in its ``except``): the client reset or the connection closed the
        stream (it is gone), or the h2 state machine refused (a bug: logged, the stream reset)."""
        if isinstance(exc, h2.exceptions.StreamClosedError | h2.exceptions.StreamIDTooLowError):
            self._gone()
            return
        log.exception("gateway: cannot send %s over HTTP/2 (stream %d)", what, self.id)
        self._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)

    def on_body(self, body: bytes) -> None:
        if self.done:
            return
        self.pending.append(body)
        self.pending_size += len(body)
        self.send()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.parser = None
        self.response_ended = True
        self.send()

    def send(self) -> None:
        """Send what the windows allow; pause or resume the writer side by what is left."""
        if self.done:
            return
        conn = self.conn
        connection = conn.h2
        if not conn.write_paused:
            pending = self.pending
            try:
                while pending:
                    window = min(connection.local_flow_control_window(self.id), connection.max_outbound_frame_size)
                    if window <= 0:
                        break
                    chunk = pending[0]
                    if len(chunk) > window:
                        view = memoryview(chunk)
                        pending[0] = view[window:]
                        chunk = view[:window]
                    else:
                        pending.popleft()
                    self.pending_size -= len(chunk)
                    last = self.response_ended and not pending
                    connection.send_data(self.id, chunk, end_stream=last)
                    self.end_sent = last
                if self.response_ended and not pending:
                    if not self.end_sent:
                        connection.end_stream(self.id)
                        self.end_sent = True
                    self._finish()
                    return
            except h2.exceptions.ProtocolError as exc:
                self._send_failed(exc, "response data")
                return
        protocol = self.protocol
        if protocol is None or self.closed:
            return
        if self.pending_size > _HIGH_WATER:
            self.writer_paused = True
            protocol.pause_writing()  # again for each read beyond the mark: an upstream attached since is paused too
        elif self.writer_paused and self.pending_size <= _LOW_WATER:
            self.writer_paused = False
            protocol.resume_writing()

    # -- endings -------------------------------------------------------------------------------------------------

    def _finish(self) -> None:
        """The response went out whole. A request body still coming is not wanted any more (RFC 9113 8.1)."""
        if self.done:
            return
        if not self.request_ended:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.h2.reset_stream(self.id, h2.errors.ErrorCodes.NO_ERROR)
        self.done = True
        self.conn.completed += 1
        self.conn.stream_done(self)

    def _reset(self, code: int) -> None:
        """End the stream with RST_STREAM (the response cannot be completed)."""
        self.pending.clear()
        self.pending_size = 0
        self.parser = None
        if not self.done:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.h2.reset_stream(self.id, code)
            self.done = True
            self.conn.stream_done(self)

    def _gone(self) -> None:
        """h2 no longer knows the stream: the client reset it in the read being handled (its StreamReset event
        comes after this). The virtual connection is closed on the next turn (the engine is in a call now)."""
        self.pending.clear()
        self.pending_size = 0
        self.parser = None
        if not self.done:
            self.done = True
            self.conn.stream_done(self)
        self.close()

    def reset_by_client(self) -> None:
        """RST_STREAM from the client: the virtual connection is lost (the engine drops the upstream exchange)."""
        self.done = True
        self.pending.clear()
        self.pending_size = 0
        self.parser = None
        self.conn.stream_done(self)
        self.lost()

    def lost(self) -> None:
        """The stream (or the whole connection) is gone: tell the virtual connection."""
        self.done = True
        self._ack_inbox()
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                self.protocol.connection_lost(None)

    def _ack_inbox(self) -> None:
        """Request bytes held for a virtual connection that will never read them: give the window back."""
        inbox, self.inbox = self.inbox, deque()
        if self.conn.closed:
            return
        for _, flow in inbox:
            if flow > 0:
                self.conn.h2.acknowledge_received_data(flow, self.id)
