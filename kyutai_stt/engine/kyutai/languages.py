"""Which languages a Kyutai checkpoint transcribes (``ModelInfo.languages``, for the protocols that let a client
name one).

Kyutai publishes two STT models (their model cards on the Hugging Face Hub, https://huggingface.co/kyutai):
``kyutai/stt-1b-en_fr`` (English and French, 0.5 s delay) and ``kyutai/stt-2.6b-en`` (English, 2.5 s delay).
A checkpoint says what it supports, in order of precedence:

1. ``config.json``'s ``model_id.languages`` (a list of ISO 639-1 codes; ``make-checkpoint`` checkpoints may carry it);
2. its name: a repository or folder name ending in ``-en_fr`` / ``-en`` (Kyutai's naming);
3. its timing: the 0.5 s delay is the stt-1b family (en, fr), anything else the stt-2.6b family (en).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kyutai_stt.engine.kyutai.checkpoint import SttModel

def model_languages(model: SttModel) -> tuple[str, ...]:
    """ISO 639-1 codes the model transcribes, e.g. ``("en", "fr")``."""
    config = Path(model.name).expanduser() / "config.json"
    if config.is_file():
        try:
            declared = (json.loads(config.read_text()).get("model_id") or {}).get("languages")
        except (ValueError, OSError, AttributeError):
            declared = None
        if isinstance(declared, list) and declared and all(isinstance(x, str) for x in declared):
            return tuple(x.lower() for x in declared)
    match = re.search(r"-((?:[a-z]{2}_)*[a-z]{2})$", Path(model.name.rstrip("/")).name.lower())
    if match:
        return tuple(match.group(1).split("_"))
    return ("en", "fr") if abs(model.audio_delay_seconds - 0.5) < 1e-6 else ("en",)
