"""Kyutai moshi-server compatibility at ``/api/asr-streaming`` (msgpack over WebSocket, and HTTP POST of a file).

Spoken by Kyutai's own client scripts and by unmute. Every message is one binary frame holding a msgpack map with a
``type``. In: ``Audio{pcm}`` (float32 at 24 kHz, any length), ``OggOpus{data}``, ``Marker{id}``, ``Init``; text
frames are ignored. Out: ``Ready`` first, then ``Step{step_idx, prs, buffered_pcm}`` every 80 ms when the model has
VAD heads, ``Word{text, start_time}``, ``EndWord{stop_time}``, ``Marker{id}`` once all audio sent before it has been
transcribed (model delay included), ``Error{message}``. There is no end-of-stream message: clients send a marker,
keep sending silence, and close when it comes back.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Request, WebSocket
from fastapi.responses import JSONResponse

from kyutai_stt.audio.decoders import OPUS, stream_decoder
from kyutai_stt.messages.events import Error, Marker, Ready, Step, Word, WordEnd
from kyutai_stt.messages import kyutai as wire
from kyutai_stt.messages.events import Event
from kyutai_stt.serve.protocols import runner
from kyutai_stt.serve.protocols.common import AuthQuery, open_session, parse_query
from kyutai_stt.serve.protocols.errors import INVALID_PAYLOAD
from kyutai_stt.serve.uploads import (
    HttpProblem,
    Upload,
    authorized,
    routes_rendering,
    transcribe,
    uploaded_body,
)

log = logging.getLogger(__name__)
router = APIRouter()
PATH = "/api/asr-streaming"


def to_wire(event) -> wire.Ready | wire.Word | wire.EndWord | wire.Step | wire.Marker | wire.Error | None:
    """Our event as moshi-server's message, or None when moshi-server has no such message."""
    match event:
        case Word():
            return wire.Word(text=event.text, start_time=event.start_time)
        case WordEnd():
            return wire.EndWord(stop_time=event.stop_time)
        case Step(pause_probabilities=None):
            return None  # models without VAD heads send no Step, as moshi-server
        case Step():
            return wire.Step(step_idx=event.step_idx, prs=list(event.pause_probabilities),
                             buffered_pcm=event.buffered_samples)
        case Marker():
            return wire.Marker(id=event.id)
        case Ready():
            return wire.Ready()
        case Error():
            return wire.Error(message=event.message)
    return None


class KyutaiTranslator(runner.Translator):
    """moshi-server's msgpack messages; an error is told in an ``Error`` message before the close, as moshi-server
    clients expect."""

    protocol = "kyutai"

    def __init__(self):
        super().__init__(stream_decoder(OPUS))  # for OggOpus messages

    def parse(self, message: dict) -> list[runner.Input]:
        data = message.get("bytes")
        if data is None:
            return []  # moshi-server ignores text frames
        match wire.parse_client_message(data):
            case wire.Audio(pcm=pcm):
                return [runner.Samples(pcm)]
            case wire.OggOpus(data=ogg):
                return [runner.Audio(ogg)]
            case wire.Marker(id=marker_id):
                return [runner.Marker(marker_id)]
            case wire.Init():
                return [runner.Reply([wire.pack(wire.Ready())])]
        return []

    def render(self, event: Event) -> list[bytes]:
        message = to_wire(event)
        return [wire.pack(message)] if message is not None else []

    def refuse(self, exc: BaseException, code: int, reason: str) -> tuple[list[bytes], str]:
        message = f"invalid message: {str(exc)[:200]}" if code == INVALID_PAYLOAD else reason
        return [wire.pack(wire.Error(message=message))], message


@router.websocket(PATH)
async def kyutai_socket(ws: WebSocket) -> None:
    if await parse_query(ws, AuthQuery) is None:
        return

    async def refuse(_reason: str) -> None:
        await ws.send_bytes(wire.pack(wire.Error(message="no free channels")))

    session = await open_session(ws, "kyutai", on_full=refuse)
    if session is None:
        return
    await runner.run_stream(ws, session, KyutaiTranslator())


# ----------------------------------------------------------------------------- HTTP POST of a file
def render_error(request: Request, problem: HttpProblem) -> JSONResponse:
    """An HTTP error as moshi-server's clients read it: ``{"detail": message}``."""
    message = "no free channels" if problem.reason == "busy" else problem.message  # moshi-server's words
    return JSONResponse({"detail": message}, status_code=problem.status_code, headers=problem.headers)


http_router = APIRouter(route_class=routes_rendering(render_error))


@http_router.post(PATH, dependencies=[Depends(authorized)], response_model=list[wire.Word | wire.EndWord])
async def kyutai_post(request: Request, upload: Annotated[Upload, Depends(uploaded_body)]):
    """A whole audio file in the body; the answer is the JSON list of Word/EndWord messages."""
    return [to_wire(event) for event in await transcribe(request, upload)]


router.include_router(http_router)
