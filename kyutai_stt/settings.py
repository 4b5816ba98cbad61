"""One settings object for the whole service.

Every field can be set from the environment with the prefix ``KYUTAI_STT_`` (for example
``KYUTAI_STT_SLOTS=64``); the CLI flags of ``kyutai-stt serve`` map onto the same fields, and the Modal app
reads the same object.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated
from pydantic import field_validator

DEFAULT_MODEL = "kyutai/stt-1b-en_fr-candle"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KYUTAI_STT_", extra="ignore")

    # --- model and engine -------------------------------------------------------------------------------
    model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face repo id, or a local directory in the same layout (config.json naming the LM "
        "weights, the Mimi weights and the tokenizer). The default variant carries the VAD heads.",
    )
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: str = Field("auto", description="'auto' (bfloat16 on GPU, float32 on CPU), 'bfloat16', 'float16', 'float32'.")
    slots: int = Field(8, ge=1, le=4096, description="Concurrent streams served by one model instance (the batch size).")
    flush_seconds: float = Field(
        0.08,
        ge=0.08,
        description="Silence fed after the model's own delay when a stream ends or is finalized mid-stream (Deepgram "
        "Finalize, Realtime commit), so its last word comes out. The default, one 80 ms frame, is what the words "
        "need (the delay brings out the text of the last audio frame; one frame more closes the last word); more "
        "only costs compute and time to the final words. Before 0.5 s (before the minimal finalize).",
    )
    frames_per_step: int = Field(
        0, ge=0, le=8,
        description="80 ms frames each stream advances per engine step. 0: auto (1 on GPU; 2 on CPU, where "
        "Mimi's per-call cost dominates: more streams keep real time, for 80 ms more latency). Results are identical.",
    )
    max_frames_per_step: int | None = Field(
        None, ge=1, le=64,
        description="Kyutai models: the most 80 ms frames a step carries per stream when every stream it steps has "
        "them waiting (a finalize's flush, a backlog under load): one Mimi call then does the work of several, "
        "at a fraction of their cost. Results are identical; allowed only where that is exact (the CPU in the "
        "batch-invariant mode, 2 or more frames per step), else refused at start. Default there: a finalize's "
        "flush and a step of audio, in whole steps, at most 16 frames (10 for a 0.5 s delay), and the frames of "
        "finalizes (backlog and flush) in one step of up to 16; elsewhere frames per step.",
    )
    lane_slots: int | None = Field(
        None, ge=0, le=64,
        description="Kyutai models: rows of the largest lane. Lanes are small batches (1, 2, 4, ... rows and this "
        "many) stepped instead of the full batch of slots whenever every stream with frames to step fits in one "
        "(few clients; a finalize's flush while the others wait for audio), so such steps compute only the "
        "smallest lane's rows that hold them. Results are identical (they need the batch-invariant mode, "
        "KYUTAI_STT_BATCH_INVARIANT). 0: no lanes. Default: 4 on GPU, slots - 1 on CPU; 0 where the mode is off.",
    )
    threads: int = Field(
        0, ge=0, le=1024,
        description="CPU threads for the model's computations (torch's intra-op threads; the CPU only). 0: auto: "
        "OMP_NUM_THREADS when it is set, else one fewer than the cores torch would use, at least 1, so that the "
        "event loop, audio decoding and the protocols keep a core (on 2 cores, under load, an engine step took 91 ms "
        "with 1 thread against 112-122 ms with 2; BENCHMARKS.md).",
    )
    nemo_lookahead: int | None = Field(
        None, ge=0, le=64,
        description="NVIDIA (NeMo) models only: encoder frames (80 ms) of right context per chunk, one of the "
        "model's att_context_size look-aheads; a chunk is lookahead + 1 frames (latency). Default: the model's own.",
    )
    diarizer: str | None = Field(
        None, description="Streaming speaker diarization for streams that ask for it (diarize=true): "
        "'nvidia/diar_streaming_sortformer_4spk-v2' (a hub id), a .nemo file or a folder holding one "
        "(`make-checkpoint --family sortformer`), or 'random:tiny' (random weights, tests). Needs the nemo extra. None: no diarization.",
    )
    end_of_turn_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="End of turn fires when VAD head 2's pause probability crosses this."
    )

    # --- decoding ------------------------------------------------------------------------------------------
    default_temperature: float = Field(
        0.0, ge=0.0, le=2.0, description="Text sampling temperature of streams whose client does not choose one "
        "(0: greedy). Kyutai's production voice app runs stt-1b at 0.25.",
    )
    keyterm_boost: float = Field(
        5.0, ge=0.0, le=50.0, description="What a stream's keyterms add to the text logits of their pieces.",
    )
    stall_seconds: float = Field(
        6.0, ge=0.0, description="Stall watchdog: reset a stream's model context after this much speech (VAD and "
        "signal energy) with only padding from the model. 0: off.",
    )

    # --- server -------------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the server listens on.")
    port: int = Field(8000, description="Port the server listens on.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (comma separated in the environment). Empty: no authentication.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed for browser cross-origin requests and WebSockets (comma separated). Empty: no "
        "CORS headers (same-origin pages only) and WebSockets from any origin (protect them with API keys).",
    )
    log_format: str = Field("text", pattern="^(text|json)$", description="'text' or 'json' (one JSON object per line).")
    shutdown_flush_s: float = Field(
        15.0, ge=0, description="On SIGTERM, how long active streams get to flush their last words before closing."
    )
    workers: int = Field(
        0, ge=0, le=256, description="Front-end worker processes sharing the port (sockets, decoding, events), "
        "around one engine process that owns the model. 0: auto (one per core minus one on CUDA, 1 on CPU). "
        "1: everything in one process.",
    )
    record_dir: str | None = Field(
        None, description="Debug: write the 24 kHz audio each session decoded to this folder as WAV files."
    )

    # --- session bounds -----------------------------------------------------------------------------------
    idle_timeout_s: float = Field(30.0, gt=0, description="Close a stream that sends nothing for this long.")
    ping_interval_s: float = Field(10.0, gt=0, description=(
        "WebSocket keepalive ping interval. A connection is failed (1011) once its pong has not come and no data "
        "came either for twice this long (after the ping and after the last data)."))
    max_session_s: float = Field(4 * 3600.0, gt=0, description="Longest audio a single stream may send, in seconds.")
    max_message_bytes: int = Field(4 * 1024 * 1024, gt=0, description="Largest WebSocket message accepted.")
    max_buffered_audio_s: float = Field(
        10.0, gt=0, description="Audio of one stream handed to the engine ahead of it. A client sending faster (a "
        "file at full speed) is still read at once: the rest waits in the stream's spool and follows as the engine "
        "catches up, so its keepalive pongs keep flowing and no word is lost.",
    )
    spool_memory_s: float = Field(
        30.0, ge=0, description="Audio of one stream held in memory beyond max_buffered_audio_s before the rest "
        "spills to a temporary file (float32, 96 kB per second of audio).",
    )
    http_slot_wait_s: float = Field(
        30.0, ge=0, description="HTTP file requests wait this long for a free slot before answering 503."
    )
    queue_max: int = Field(
        0, ge=0, description="WebSocket clients that may wait for a free slot when all are busy (0: refuse at once)."
    )
    queue_timeout_s: float = Field(10.0, ge=0, description="How long a queued WebSocket client waits for a slot.")
    max_pending_events: int = Field(
        4000, gt=0, description="Results queued for a client that does not read them before it is dropped (1008)."
    )
    max_upload_bytes: int = Field(200 * 1024 * 1024, gt=0, description="Largest uploaded file accepted over HTTP.")

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value):
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value
