"""Language tags as clients send them, and the names OpenAI's ``verbose_json`` reports.

What a model transcribes is ``ModelInfo.languages`` (ISO 639-1 codes); these helpers map a client's tag onto it.
"""

from __future__ import annotations

# ISO 639-1 code -> the English name OpenAI's verbose_json reports ("english", "french").
NAMES = {"en": "english", "fr": "french"}


def base_language(tag: str) -> str:
    """The primary subtag of a BCP-47 tag, lower case: ``"en-US"`` -> ``"en"``."""
    return tag.replace("_", "-").split("-")[0].strip().lower()
