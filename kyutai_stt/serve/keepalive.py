"""WebSocket keepalive that never cuts off a client that is still sending.

uvicorn fails a connection whose pong is ``ws_ping_timeout`` late. A client that streams audio but reads late is
not dead: its WebSocket library stops reading the socket once enough of our messages wait unread (Python's
`websockets`: 16), so our ping sits unread behind them and its pong never comes, while its audio keeps arriving.
Here any frame received since the ping went out counts as the answer; a peer that neither answers nor sends for
the timeout is still failed (1011 "keepalive ping timeout"), which is how a dead peer is found while the server
owes it words. Silent clients are the idle policies' business (``Translator.idle_timeout``), not this one's.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# the hooks overridden below (uvicorn >= 0.44); fail at start-up, not silently, if a release renames them
_HOOKS = ("data_received", "send_keepalive_ping", "keepalive_timeout", "schedule_ping")
if not all(callable(getattr(WebSocketsSansIOProtocol, name, None)) for name in _HOOKS):
    raise ImportError(f"this uvicorn's websockets protocol lacks {_HOOKS}: install uvicorn>=0.44 (pyproject.toml)")


class SendingPeerIsAlive(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol, with data received since the ping standing in for a late pong."""

    heard_at = float("-inf")  # loop times: the last bytes received from the peer, our last ping
    pinged_at = float("inf")

    def data_received(self, data: bytes) -> None:
        self.heard_at = self.loop.time()
        super().data_received(data)

    def send_keepalive_ping(self) -> None:
        self.pinged_at = self.loop.time()
        super().send_keepalive_ping()

    def keepalive_timeout(self) -> None:
        if self.heard_at >= self.pinged_at and not (self.close_sent or self.transport.is_closing()):
            # it sent since our ping: alive. Its pong, if it ever comes, is stale; the next ping starts a new round
            self.pong_timer = None
            self.pending_ping_payload = None
            self.schedule_ping()
            return
        super().keepalive_timeout()
