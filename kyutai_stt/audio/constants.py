"""The audio every model family is fed: 24 kHz mono float32, in 80 ms frames. A leaf: imports nothing."""

SAMPLE_RATE = 24000
FRAME_SIZE = 1920  # samples per frame (80 ms)
FRAME_RATE = SAMPLE_RATE / FRAME_SIZE  # 12.5 Hz

# Audio containers a stream or upload may name (FFmpeg demuxer name; None: FFmpeg probes).
CONTAINER_FORMATS: dict[str, str | None] = {
    "webm": "matroska", "matroska": "matroska", "mkv": "matroska", "ogg": "ogg", "mp3": "mp3", "aac": "aac",
    "adts": "aac", "flac": "flac", "wav": "wav", "container": None, "auto": None,
}
