"""MKL's strict conditional numerical reproducibility (CNR) for CPU matrix products.

Why: without CNR, MKL's sgemm picks code paths by the memory alignment of its operands. PyTorch's CPU attention
kernel (scaled_dot_product_attention, flash kernel) runs MKL gemms on per-thread scratch buffers, one slice per
OpenMP thread at a different alignment, so a batch row's attention output depended on which thread computed it,
i.e. on the row's slot and on the batch around it (measured: rows 0-1 of a 4-row batch differed from rows 2-3 in
the last bit with 2 threads; identical with 1 thread or with CNR). Strict CNR makes ?gemm bitwise reproducible
whatever the alignment and thread count (Intel oneMKL developer guide, "Obtaining Numerically Reproducible
Results", MKL_CBWR / mkl_cbwr_set).

MKL reads the mode once, at its first computation: ``enable_strict_cnr`` must run before torch multiplies any
matrix on the CPU, which is why ``kyutai_stt/__init__.py`` calls it at import. ``KYUTAI_STT_MKL_CNR=0`` turns it
off (used by the test that shows the non-invariance it fixes).
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

# mkl_service.h
_CBWR_ALL = -1
_CBWR_AUTO = 2
_CBWR_STRICT = 0x10000
_CBWR_SUCCESS = 0


def _mkl():
    """The MKL service entry points statically linked into libtorch_cpu (None where torch has no MKL)."""
    try:
        import torch

        if not torch.backends.mkl.is_available():
            return None
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get, set_ = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set
    except (OSError, AttributeError, ImportError):
        return None
    get.restype = set_.restype = ctypes.c_int
    get.argtypes = set_.argtypes = [ctypes.c_int]
    return get, set_


def strict_cnr_active() -> bool | None:
    """True when MKL runs in strict CNR mode; None when torch does not use MKL (nothing to fix)."""
    mkl = _mkl()
    if mkl is None:
        return None
    return bool(mkl[0](_CBWR_ALL) & _CBWR_STRICT)


def enable_strict_cnr() -> bool | None:
    """Put MKL in strict CNR mode (AUTO code path, STRICT). Returns ``strict_cnr_active()``.

    Fails (returns False, logs why) when MKL has already computed something: then set ``MKL_CBWR=AUTO,STRICT``
    in the environment before starting Python.
    """
    if os.environ.get("KYUTAI_STT_MKL_CNR", "1") == "0":
        return strict_cnr_active()
    mkl = _mkl()
    if mkl is None:
        return None
    get, set_ = mkl
    if get(_CBWR_ALL) & _CBWR_STRICT:
        return True
    status = set_(_CBWR_AUTO | _CBWR_STRICT)
    if status != _CBWR_SUCCESS:
        log.warning("could not put MKL in strict CNR mode (status %d: MKL already ran); CPU results may depend on "
                    "the batch slot. Set MKL_CBWR=AUTO,STRICT before starting Python.", status)
    return strict_cnr_active()
