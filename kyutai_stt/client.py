"""Python client for a running kyutai-stt (or Kyutai moshi-server) over any of its WebSocket protocols.

    client = Client("ws://127.0.0.1:8000")                       # our JSON events (timestamps, turns)
    client = Client("ws://127.0.0.1:8000", protocol="kyutai")    # moshi-server's msgpack protocol
    client = Client("ws://127.0.0.1:8000", protocol="seed")      # Modal example's Opus protocol (text only)
    async for event in client.stream(pcm_24k, realtime=True):
        if isinstance(event, Word): print(event.start_time, event.text)

    async with Client("ws://127.0.0.1:8000").open() as live:     # /v1/stream driven by hand (a voice agent)
        await live.send(pcm_24k)
        turn = await live.flush()                                # the events up to ``Flushed``: every word so far

Every protocol yields the same typed events (``kyutai_stt.messages.events``) and ends with ``End``. The client
imports neither torch nor PyAV (a test checks it): it sends 24 kHz float PCM, and reads files nowhere.
"""

from __future__ import annotations

import asyncio
import itertools
from urllib.parse import quote
from typing import AsyncIterable, AsyncIterator, Literal

import numpy as np
import sphn
import websockets

from kyutai_stt.audio.chunks import audio_chunks
from kyutai_stt.audio.constants import FRAME_SIZE, SAMPLE_RATE
from kyutai_stt.messages.events import End, Error, Event, Flushed, FlushControl, Marker, Ready, Step, Word, WordEnd
from kyutai_stt.messages import kyutai as kyutai_wire
from kyutai_stt.messages import seed as seed_wire
from kyutai_stt.messages.queue import AUDIO, TRANSCRIPTION, queue_call
from kyutai_stt.messages.events import EndControl, StreamQuery, parse_event  # noqa: F401  (parse_event: public here too)

Protocol = Literal["events", "kyutai", "seed"]
PATHS = {"events": "/v1/stream", "kyutai": "/api/asr-streaming", "seed": "/ws"}


class ServerError(RuntimeError):
    """The server reported an error or closed the stream abnormally."""


def ws_url(url: str, path: str) -> str:
    url = url.rstrip("/")
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(http):
            url = ws + url[len(http):]
    return url if url.endswith(path) else url + path


class Client:
    def __init__(self, url: str, protocol: Protocol = "events", api_key: str | None = None):
        if protocol not in PATHS:
            raise ValueError(f"protocol must be one of {', '.join(PATHS)}")
        self.url, self.protocol, self.api_key = url, protocol, api_key

    def _connect(self, query: str = ""):
        headers = {"kyutai-api-key": self.api_key} if self.api_key else None
        return websockets.connect(ws_url(self.url, PATHS[self.protocol]) + query, additional_headers=headers,
                                  max_size=None)

    async def stream(self, audio: np.ndarray | AsyncIterable[np.ndarray], *, realtime: bool = False,
                     chunk_samples: int = FRAME_SIZE, steps: bool = False, diarize: bool = False,
                     temperature: float | None = None, seed: int | None = None,
                     keyterms: tuple[str, ...] = ()) -> AsyncIterator[Event]:
        """Send 24 kHz mono float PCM (an array, or an async iterable of chunks such as a microphone) and yield
        events until ``End`` (``ServerError`` on failure).

        Multichannel (``events`` only): an array of shape ``[channels, samples]`` is sent interleaved with
        ``multichannel=true``; each channel is transcribed on its own and its events carry ``channel``.
        ``diarize`` (``events`` only): words carry ``speaker`` (a server started with a diarizer).
        ``temperature``, ``seed``, ``keyterms``: decoding (``/v1/stream`` only; ``Ready.seed`` says the seed a
        sampling stream got)."""
        decoding = {"temperature": temperature, "seed": seed, "keyterms": ",".join(keyterms) or None}
        decoding = {k: v for k, v in decoding.items() if v is not None}
        if decoding and self.protocol != "events":
            raise ValueError("temperature, seed and keyterms are parameters of the events protocol (/v1/stream)")
        if diarize and self.protocol != "events":
            raise ValueError("speakers need the events protocol")
        if isinstance(audio, np.ndarray) and audio.ndim == 2:
            if self.protocol != "events":
                raise ValueError("multichannel audio needs the events protocol")
            channels = audio.shape[0]
            chunks = audio_chunks(audio.T.reshape(-1), chunk_samples * channels, realtime, channels)
            stream = self._events(chunks, steps, decoding, channels, diarize)
        elif self.protocol == "events":
            stream = self._events(audio_chunks(audio, chunk_samples, realtime), steps, decoding, diarize=diarize)
        elif self.protocol == "kyutai":
            stream = self._kyutai(audio_chunks(audio, chunk_samples, realtime), realtime, steps)
        else:
            stream = self._seed(audio_chunks(audio, chunk_samples, realtime))
        async for event in stream:
            yield event

    async def _run(self, ws, sender, handle) -> AsyncIterator[Event]:
        task = asyncio.create_task(sender())
        try:
            async for message in ws:
                for event in handle(message):
                    yield event
                    if isinstance(event, Error):
                        raise ServerError(event.message)
                    if isinstance(event, End):
                        return
            raise ServerError(f"connection closed before the end of the stream ({ws.close_code} {ws.close_reason})")
        finally:
            task.cancel()

    def open(self, *, steps: bool = False, temperature: float | None = None, seed: int | None = None,
             keyterms: tuple[str, ...] = ()) -> "LiveStream":
        """A ``/v1/stream`` connection driven by hand (``async with client.open() as live``): ``send`` audio,
        ``flush`` (every word so far, the stream goes on), ``end``. For the events protocol only."""
        if self.protocol != "events":
            raise ValueError("open() speaks the events protocol (/v1/stream)")
        decoding = {"temperature": temperature, "seed": seed, "keyterms": ",".join(keyterms) or None}
        return LiveStream(self._connect(_events_query(steps, {k: v for k, v in decoding.items() if v is not None})))

    async def _events(self, chunks, steps, decoding, channels: int = 1, diarize: bool = False):
        async with self._connect(_events_query(steps, decoding, channels, diarize)) as ws:
            async def sender():
                async for chunk in chunks:
                    await ws.send(np.asarray(chunk, "<f4").tobytes())
                await ws.send(EndControl().model_dump_json())

            async for event in self._run(ws, sender, lambda message: [parse_event(message)]):
                yield event

    async def _kyutai(self, chunks, realtime, steps):
        # moshi-server has no end-of-stream message: send a marker, then silence until the marker comes back.
        marker_id = 1_000_001

        def handle(message):
            match kyutai_wire.parse_server_message(message):
                case kyutai_wire.Ready():
                    return [Ready()]
                case kyutai_wire.Word(text=text, start_time=start_time):
                    return [Word(text=text, start_time=start_time)]
                case kyutai_wire.EndWord(stop_time=stop_time):
                    return [WordEnd(stop_time=stop_time)]
                case kyutai_wire.Step() as step:
                    return [Step(step_idx=step.step_idx, pause_probabilities=tuple(step.prs),
                                 buffered_samples=step.buffered_pcm)] if steps else []
                case kyutai_wire.Marker(id=found) if found == marker_id:
                    return [End(duration=chunks.samples / SAMPLE_RATE)]
                case kyutai_wire.Marker(id=found):
                    return [Marker(id=found)]
                case kyutai_wire.Error(message=text):
                    return [Error(message=text)]
            return []

        def audio(pcm: np.ndarray) -> bytes:
            return kyutai_wire.pack(kyutai_wire.Audio(pcm=pcm), single_float=True)

        async with self._connect() as ws:
            async def sender():
                async for chunk in chunks:
                    await ws.send(audio(chunk))
                await ws.send(kyutai_wire.pack(kyutai_wire.Marker(id=marker_id)))
                silence = audio(np.zeros(FRAME_SIZE, np.float32))
                for _ in range(2000):  # bounded: the marker comes back after the model's delay
                    await ws.send(silence)
                    await asyncio.sleep(FRAME_SIZE / SAMPLE_RATE if realtime else 0.01)

            async for event in self._run(ws, sender, handle):
                yield event

    async def _seed(self, chunks):
        writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        async with self._connect() as ws:
            async def sender():
                pending = np.zeros(0, np.float32)
                async for chunk in chunks:
                    pending = np.concatenate([pending, chunk])
                    while len(pending) >= FRAME_SIZE:  # the encoder takes whole 80 ms frames
                        page = writer.append_pcm(pending[:FRAME_SIZE])
                        pending = pending[FRAME_SIZE:]
                        if page:
                            await ws.send(page)
                if len(pending):
                    page = writer.append_pcm(np.pad(pending, (0, FRAME_SIZE - len(pending))))
                    if page:
                        await ws.send(page)
                await ws.send(seed_wire.END_OF_AUDIO)

            def handle(message):
                event = seed_wire.parse_server_message(message, chunks.samples / SAMPLE_RATE)
                return [event] if event is not None else []

            yield Ready()
            async for event in self._run(ws, sender, handle):
                yield event


def _events_query(steps: bool, decoding: dict, channels: int = 1, diarize: bool = False) -> str:
    """The ``/v1/stream`` query of our client: 24 kHz float PCM (checked as the server checks it)."""
    query = StreamQuery(format="pcm_f32le", sample_rate=SAMPLE_RATE, steps=steps, channels=channels,
                        multichannel=channels > 1, diarize=diarize, **decoding)
    return (f"?format={query.format}&sample_rate={query.sample_rate}"
            + ("&steps=true" if query.steps else "")
            + (f"&channels={channels}&multichannel=true" if query.multichannel else "")
            + ("&diarize=true" if query.diarize else "")
            + "".join(f"&{k}={quote(str(v))}" for k, v in decoding.items()))


class LiveStream:
    """One ``/v1/stream`` connection driven by hand (``Client.open``). The server's events are read as they come
    (the socket is always read); ``flush`` and ``end`` return the events received until their answer."""

    def __init__(self, connect):
        self._connect = connect
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()  # None: the connection closed
        self._ids = itertools.count(1)  # ids of flushes the caller does not name

    async def __aenter__(self) -> "LiveStream":
        self._ws = await self._connect
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._ws.close()

    async def _read(self) -> None:
        try:
            async for message in self._ws:
                self._queue.put_nowait(parse_event(message))
        except websockets.ConnectionClosed:
            pass
        finally:
            self._queue.put_nowait(None)

    async def send(self, pcm: np.ndarray) -> None:
        """24 kHz mono float PCM, any length."""
        await self._ws.send(np.asarray(pcm, "<f4").tobytes())

    async def next_event(self) -> Event:
        """The next event (``ServerError`` on an ``Error`` event, or when the connection closed first)."""
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # every later call fails too
            raise ServerError(f"connection closed ({self._ws.close_code} {self._ws.close_reason})")
        if isinstance(event, Error):
            raise ServerError(event.message)
        return event

    async def flush(self, id: int | None = None) -> list[Event]:
        """Finalize the audio sent so far without ending the stream: wait for the server's ``Flushed`` and return
        the events received until then, ``Flushed`` last (every word of that audio is among them or came before;
        ``Flushed.audio_seconds`` says how much audio it covers)."""
        flush_id = next(self._ids) if id is None else id
        await self._ws.send(FlushControl(id=flush_id).model_dump_json())
        return await self._until(lambda event: isinstance(event, Flushed) and event.id == flush_id)

    async def end(self) -> list[Event]:
        """No more audio: the events until the stream's ``End`` (the last words), ``End`` last."""
        await self._ws.send(EndControl().model_dump_json())
        return await self._until(lambda event: isinstance(event, End))

    async def _until(self, done) -> list[Event]:
        events: list[Event] = []
        while not events or not done(events[-1]):
            events.append(await self.next_event())
        return events


async def stream_events(url: str, pcm: np.ndarray, *, realtime: bool = False, chunk_samples: int = FRAME_SIZE,
                        steps: bool = False, api_key: str | None = None,
                        protocol: Protocol = "events") -> AsyncIterator[Event]:
    """Shortcut for ``Client(url, protocol, api_key).stream(pcm, ...)``."""
    async for event in Client(url, protocol, api_key).stream(pcm, realtime=realtime, chunk_samples=chunk_samples,
                                                            steps=steps):
        yield event


# ------------------------------------------------------------------------------------------ Modal Queue client
async def stream_through_queue(q, chunks: list[tuple[bytes, float]], *, realtime: bool = False,
                               write=print) -> tuple[float | None, list[dict]]:
    """The client side of ``queue_bridge.transcribe_queue`` (with ``events=True``) on a ``modal.Queue``: send
    ``chunks`` (audio bytes, each with the seconds of audio up to its end: ``audio.decode.opus_chunks`` makes them
    from a file) to partition ``"audio"`` (at the pace of their audio with ``realtime``), print words as they
    arrive; returns (seconds to the first word, every event received)."""
    import time

    start = time.perf_counter()

    async def send() -> None:
        for chunk, until in chunks:
            if realtime:  # a live client has a chunk only once its audio has been spoken
                await asyncio.sleep(max(0.0, start + until - time.perf_counter()))
            await queue_call(q.put, chunk, partition=AUDIO)
        await queue_call(q.put, None, partition=AUDIO)

    first_word: float | None = None
    received: list[dict] = []
    column = 0
    sender = asyncio.create_task(send())
    try:
        while True:
            event = await queue_call(q.get, partition=TRANSCRIPTION)
            if event is None:
                break
            received.append(event)
            if event["type"] == "word":
                if first_word is None:
                    first_word = time.perf_counter() - start
                if column and column + len(event["text"]) > 100:
                    write()
                    column = 0
                write(event["text"], end=" ", flush=True)
                column += len(event["text"]) + 1
            elif event["type"] in ("end_of_turn", "end") and column:
                write()
                column = 0
            elif event["type"] == "error":
                write(f"error: {event['message']}")
    finally:
        if not sender.done():  # the service ended the stream early (an error): stop sending
            sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
    return first_word, received
