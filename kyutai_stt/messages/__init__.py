"""Every protocol's wire messages, declared once as typed models (one module per protocol).

The server's adapters (``kyutai_stt.serve.protocols``) and our Python client (``kyutai_stt.client``) parse and build
messages with the same models, through one ``TypeAdapter`` per direction, so a message is checked in one place.

* ``kyutai``: moshi-server's msgpack messages (``/api/asr-streaming``).
* ``events``: our JSON events protocol (``/v1/stream``): its query, its client controls (the server's messages are
  the events of ``kyutai_stt.messages.events``).
* ``seed``: the Modal example's byte protocol (``/ws``).
"""
