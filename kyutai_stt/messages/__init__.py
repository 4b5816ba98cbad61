"""Every protocol's wire messages, declared once as typed models (one module per protocol).

The server's adapters (``kyutai_stt.serve.protocols``) and our Python client (``kyutai_stt.client``) parse and build
messages with the same models, through one ``TypeAdapter`` per direction, so a message is checked in one place.

* ``kyutai``: moshi-server's msgpack messages (``/api/asr-streaming``).
* ``events``: our JSON events protocol (``/v1/stream``): its query, its client controls (the server's messages are
  the events of ``kyutai_stt.messages.events``).
* ``seed``: the Modal example's byte protocol (``/ws``).
* ``deepgram``, ``openai_realtime``: Deepgram's live API (``/v1/listen``) and OpenAI Realtime transcription
  (``/v1/realtime``), client and server messages.
* ``queue``: the Modal Queue's partitions (``serve.queue_bridge``; ``client.stream_through_queue``).

None of them imports torch, moshi or PyAV (checked by import-linter and by a test).
"""
