"""kyutai-stt: streaming speech-to-text on Kyutai delayed-streams models."""

import os as _os

# Before torch's first CPU matrix product: MKL's strict reproducible mode, without which a batch row's attention
# output depends on its slot (see batch_invariant/mkl.py). MKL reads MKL_CBWR lazily, at its first computation.
if _os.environ.get("KYUTAI_STT_MKL_CNR", "1") != "0":
    _os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
