"""Streaming speaker diarization, a stage beside the ASR engine that any model family can use: it hears the same
audio as the stream and labels its 80 ms frames with speaker activities. ``contract`` is its small torch-free
contract; ``sortformer`` serves NVIDIA's streaming Sortformer (NeMo, the ``nemo`` extra)."""
