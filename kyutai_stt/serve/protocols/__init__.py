"""Protocol adapters, each a translator over the one stream runner (``runner``): a protocol parses its client
messages into stream inputs, renders session events as its wire messages, and says what an error looks like
in-band; ``runner`` does the rest. ``common``: admission (auth, origin, query, a slot). ``errors``: the one map
from errors to close codes.

A new protocol: its wire messages in ``kyutai_stt.messages``, a ``runner.Translator`` here, a router line in
``serve.server``.
"""
