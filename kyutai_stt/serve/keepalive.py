"""WebSocket keepalive that never cuts off a client that is still sending.

uvicorn fails a connection whose pong is ``ws_ping_timeout`` late. A client that streams audio but reads late is
not dead: its WebSocket library stops reading the socket once enough of our messages wait unread (Python's
`websockets`: 16), so our ping sits unread behind them and its pong never comes, while its audio keeps arriving.
Here data received counts as a sign of life too: a peer is failed (1011 "keepalive ping timeout") only once neither
the pong nor any data came for the timeout (twice the ping interval), which is how a dead peer is found while the
server owes it words. Silent clients are the idle policies' business (``Translator.idle_timeout``), not this one's.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# the hooks this relies on (uvicorn >= 0.44: a pong cancels `pong_timer`); fail at start-up, not silently, if a
# release renames them
_HOOKS = ("data_received", "keepalive_timeout", "handle_pong")
if not all(callable(getattr(WebSocketsSansIOProtocol, name, None)) for name in _HOOKS):
    raise ImportError(f"this uvicorn's websockets protocol lacks {_HOOKS}: install uvicorn>=0.44 (pyproject.toml)")


class SendingPeerIsAlive(WebSocketsSansIOProtocol):
    """uvicorn's websockets protocol, where data received stands in for a late pong: the connection fails only once
    neither the pong nor any data came for ``ping_timeout`` (its ping stays outstanding meanwhile, so a reader that
    catches up still answers it)."""

    heard_at = float("-inf")  # loop time of the last bytes received from the peer

    def data_received(self, data: bytes) -> None:
        self.heard_at = self.loop.time()
        super().data_received(data)

    def keepalive_timeout(self) -> None:
        grace = self.heard_at + self.ping_timeout - self.loop.time()
        if grace > 0 and not (self.close_sent or self.transport.is_closing()):
            self.pong_timer = self.loop.call_later(grace, self.keepalive_timeout)  # alive: look again then
            return
        super().keepalive_timeout()
