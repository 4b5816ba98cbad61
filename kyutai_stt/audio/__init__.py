"""Audio in, as 24 kHz mono float32. ``constants`` (a leaf) and ``errors``; ``chunks`` (numpy only, for clients);
``resample`` (julius); ``decode`` (Ogg/Opus, whole files); ``codecs`` (G.711, PyAV containers); ``decoders`` (the
``StreamDecoder`` protocol and the one factory every stream gets its decoder from); ``microphone``."""
