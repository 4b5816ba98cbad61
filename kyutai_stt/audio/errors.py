"""What the audio decoders raise. A leaf (no numpy, no codec library), so any layer may catch these."""

MIN_FILE_SAMPLE_RATE = 8000  # a tiny rate in a small file would expand into hours of audio


class AudioFormatError(ValueError):
    """The bytes are not audio we can decode; the message says why."""


class AudioTooLong(AudioFormatError):
    """The file holds more audio than the configured limit."""
