"""Batch-invariant execution: a stream's results do not depend on how many other rows share its batch.

On CUDA, cuBLAS picks split-K and tiles by the batch size, the attention kernels split the key sequence when the
batch is small, cuDNN picks convolution algorithms by shape and uses TF32: all reduce in an order that depends on
the batch, so a stream's tokens could depend on the load. In batch-invariant mode the aten operators Mimi and the
LM use are served by the Triton kernels of ``kernels`` (matrix products with fixed tiles and no split-K, attention
with a fixed key split, per-row mean and softmax, convolutions as im2col + that matrix product), registered with
``torch.library`` as batch_invariant_ops does, so moshi is never patched. TF32 is off in the mode.

On the CPU, at a fixed batch shape (the engine without lanes steps all its slots), a row's results do not depend on the
other rows once MKL runs in strict reproducible mode (``mkl``), which the package turns on at import. Across batch
sizes they can: oneDNN (mkldnn) picks its convolution algorithm by the batch size, so Mimi's latents for a stream at
batch 1 and at batch 4 differ in the last bits, and now and then a code on a near-tie flips (seen: a token at frame
5 of a 3 s espeak-ng clip), and MKL's sgemm gives a row other bits at 1 and at 2-3 rows than at 4 or more. On the
CPU the mode therefore turns oneDNN off while it is active (PyTorch's native convolution computes each sample alone),
runs the 1-D convolutions with short outputs as one matrix product of im2col columns, and computes every matrix
product, Mimi's codebook distances included, with at least 4 rows (``_cpu_impls``), so the engine equals the batch-1
reference bit for bit (encoding as many frames per Mimi call as the engine: the call size is another matter,
``reference``). It is faster than stock on Mimi's encoder (a 4-row 2-frame step of the tiny model: about 105 ms
against 135, 2 cores: BENCHMARKS.md), since the native kernel and oneDNN read a layer's weights once per sample and
the matrix product once per step, and it is what lets the engine step a few streams in a lane of their own size
(``engine.kyutai.lane``): ``auto`` turns it on on the CPU too.

The setting ``KYUTAI_STT_BATCH_INVARIANT`` is ``auto`` (default), ``on`` or ``off``; ``auto`` is on everywhere. On
CUDA the issue asks for it by default when it costs at most 10 % of capacity, which only a GPU can measure
(``scripts/gpu_check.py`` does); until measured, auto means on.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

from kyutai_stt.engine.batch_invariant.mkl import enable_strict_cnr, strict_cnr_active

__all__ = ["batch_invariant_mode", "cpu_mode", "enabled_for", "resolve_mode", "is_active", "enable_strict_cnr",
           "strict_cnr_active", "OPERATORS"]

MODES = ("auto", "on", "off")
# aten operators replaced in the mode (what Mimi's encoder and the LM reach through nn.Linear, F.conv1d, RMSNorm's
# mean, the quantizer's squared norms (torch.cdist), the VAD heads' softmax and F.scaled_dot_product_attention).
OPERATORS = ("aten::mm", "aten::addmm", "aten::mean.dim", "aten::sum.dim_IntList", "aten::_softmax", "aten::convolution",
             "aten::scaled_dot_product_attention")


def resolve_mode(setting: str | None = None) -> bool:
    """Whether the mode is on: ``setting`` or ``$KYUTAI_STT_BATCH_INVARIANT`` (auto/on/off; auto is on on every
    device)."""
    setting = (setting or os.environ.get("KYUTAI_STT_BATCH_INVARIANT", "auto")).lower()
    if setting not in MODES:
        raise ValueError(f"KYUTAI_STT_BATCH_INVARIANT must be one of {', '.join(MODES)}, got {setting!r}")
    return setting != "off"


_lock = threading.Lock()
_users: dict[str, int] = {}
_libraries: dict[str, torch.library.Library] = {}
_saved_tf32: dict[str, tuple[bool, bool]] = {}


def is_active(dispatch_key: str = "CUDA") -> bool:
    return _users.get(dispatch_key, 0) > 0


def _impls():
    from kyutai_stt.engine.batch_invariant import kernels

    def mm(a, b):
        return kernels.matmul(a, b)

    def addmm(bias, a, b, *, beta=1, alpha=1):
        if beta == 1 and alpha == 1 and bias.dim() == 1:
            return kernels.matmul(a, b, bias)
        return bias * beta + kernels.matmul(a, b) * alpha

    def reduce(x, dim, keepdim, dtype, mean):
        """Any reduction dims: moved last and flattened, so each output element is one row of the kernel."""
        dims = sorted({d % x.dim() for d in dim}) if dim else list(range(x.dim()))
        kept = [d for d in range(x.dim()) if d not in dims]
        if not x.is_floating_point():  # integer sums are exact in any order (cumsum: not overridden)
            flat = x.permute(*kept, *dims).reshape(*[x.shape[d] for d in kept], -1)
            out = flat.to(dtype or torch.int64).cumsum(-1)[..., -1] if flat.shape[-1] else flat.new_zeros(flat.shape[:-1])
        else:
            flat = x.permute(*kept, *dims).reshape(*[x.shape[d] for d in kept], -1)
            out = kernels._row_reduce(flat, mean, dtype)
        if keepdim:
            for d in dims:
                out = out.unsqueeze(d)
        return out

    def mean_dim(x, dim, keepdim=False, *, dtype=None):
        return reduce(x, dim, keepdim, dtype, True)

    def sum_dim(x, dim, keepdim=False, *, dtype=None):
        return reduce(x, dim, keepdim, dtype, False)

    def softmax(x, dim, half_to_float):
        if half_to_float:
            x = x.float()
        last = x.dim() - 1
        if dim % x.dim() == last:
            return kernels.softmax(x)
        return kernels.softmax(x.transpose(dim, last)).transpose(dim, last).contiguous()

    def convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
        if (x.dim() == 3 and not transposed and groups == 1 and len(stride) == 1
                and len(set(padding)) <= 1):
            return kernels.conv1d(x, weight, bias, stride[0], dilation[0], padding[0] if padding else 0)
        # not used by Mimi's encoder: PyTorch's own kernel, deterministic and without TF32 in this mode
        return torch.ops.aten._convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding,
                                           groups, False, True, False, False)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
        D = q.shape[-1]
        if (dropout_p or is_causal or enable_gqa or q.dim() != 4 or D & (D - 1) or k.shape[1] != q.shape[1]
                or attn_mask is not None and attn_mask.dtype != torch.bool):
            return torch.ops.aten._scaled_dot_product_attention_math(
                q, k, v, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa)[0]
        return kernels.attention(q, k, v, attn_mask, scale)

    return {"mm": mm, "addmm": addmm, "mean.dim": mean_dim, "sum.dim_IntList": sum_dim, "_softmax": softmax, "convolution": convolution,
            "scaled_dot_product_attention": sdpa}


def _enable(dispatch_key: str) -> None:
    with _lock:
        _users[dispatch_key] = _users.get(dispatch_key, 0) + 1
        if _users[dispatch_key] > 1:
            return
        library = torch.library.Library("aten", "IMPL")
        for name, fn in _impls().items():
            library.impl(name, fn, dispatch_key)
        _libraries[dispatch_key] = library
        _saved_tf32[dispatch_key] = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _disable(dispatch_key: str) -> None:
    with _lock:
        _users[dispatch_key] -= 1
        if _users[dispatch_key] > 0:
            return
        _libraries.pop(dispatch_key)._destroy()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = _saved_tf32.pop(dispatch_key)


@contextlib.contextmanager
def batch_invariant_mode(dispatch_key: str = "CUDA"):
    """Serve the operators of ``OPERATORS`` on ``dispatch_key`` with the batch-invariant kernels (process-wide,
    nestable). ``"CPU"`` is for tests with ``TRITON_INTERPRET=1``."""
    _enable(dispatch_key)
    try:
        yield
    finally:
        _disable(dispatch_key)


_saved_mkldnn: list[bool] = []
# MKL's sgemm computes a row of the product with one kernel for 1 row (a gemv), another for 2-3 rows and another
# for 4 and more (measured: a row's bits are the same for every M >= 4 up to 1100, for the shapes of Mimi and the
# LM, 1 or 2 threads), so the CPU mode computes every matrix product with at least this many rows
CPU_MIN_ROWS = 4
# 1-D convolutions with at most this many output positions per row run as one matrix product (``_cpu_impls``)
CPU_CONV_MAX_FRAMES = 32


def _cpu_impls():
    """The CPU key's aten::mm, aten::addmm, aten::convolution and aten::_euclidean_dist (torch.cdist). Matrix products
    have their rows padded to ``CPU_MIN_ROWS``: the LM steps its batch with one row per stream, so without this a
    stream alone (or in a lane of 1-3 rows) gets other bits than in a batch of 4. Computed through bmm/baddbmm (not
    overridden: no recursion), whose rows are as invariant."""

    def rows(a):
        """``a`` with its rows (dim -2) padded with zeros to ``CPU_MIN_ROWS``."""
        m = a.shape[-2]
        return a if m >= CPU_MIN_ROWS else torch.cat([a, a.new_zeros(*a.shape[:-2], CPU_MIN_ROWS - m, a.shape[-1])], -2)

    def mm(a, b):
        return torch.bmm(rows(a)[None], b[None])[0, :a.shape[0]]

    def addmm(bias, a, b, *, beta=1, alpha=1):
        m = a.shape[0]
        padded = rows(a)
        out = torch.baddbmm(bias.expand(padded.shape[0], b.shape[1])[None], padded[None], b[None], beta=beta,
                            alpha=alpha)
        return out[0, :m]

    def convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
        # A 1-D convolution whose output is short (Mimi's last downsampling layers: 2 to 32 positions per call)
        # is one matrix product of the rows' im2col columns by the weights. PyTorch's native kernel reads the
        # weights once per sample (33 MB for the 512 -> 1024 layer: 10 ms a row), this reads them once per call;
        # its rows are those of the matrix product, so they are as invariant. Whether a layer takes this path
        # depends on its shape per row, never on the batch. Longer outputs: the native kernel, sample by sample.
        if x.dim() == 3 and not transposed and groups == 1 and not any(padding):
            (batch, channels, length), (out_channels, _, kernel) = x.shape, weight.shape
            step, spacing = stride[0], dilation[0]
            span = (kernel - 1) * spacing + 1
            frames = (length - span) // step + 1 if length >= span else 0
            if 0 < frames <= CPU_CONV_MAX_FRAMES:
                cols = x.unfold(2, span, step)[..., ::spacing]  # [B, C, frames, kernel]
                cols = cols.permute(0, 2, 1, 3).reshape(batch * frames, channels * kernel)
                w = weight.reshape(out_channels, channels * kernel).t()
                out = addmm(bias, cols, w) if bias is not None else mm(cols, w)
                return out.view(batch, frames, out_channels).transpose(1, 2).contiguous()
        # torch._convolution, not torch.ops.aten._convolution: the former lets go of the GIL while it computes (the
        # long layers take tens of ms; the server's event loop runs meanwhile), and it is not overridden
        return torch._convolution(x, weight, bias, stride, padding, dilation, transposed, output_padding, groups,
                                  False, True, False, False)

    def euclidean_dist(x1, x2):
        # torch.cdist's matrix-product form (Mimi's quantizer: a frame's distances to a codebook's 2048 codes) with
        # the rows of the product padded like ``mm`` (one stream's 2 frames are a 2-row product, whose bits MKL
        # computes otherwise than in a batch of 4); without aten's concatenation of the codebook and its norms
        products = torch.matmul(rows(x1), x2.mT)[..., :x1.shape[-2], :]
        squares = (x1 * x1).sum(-1, keepdim=True) + (x2 * x2).sum(-1).unsqueeze(-2)
        return squares.sub_(products, alpha=2).clamp_min_(0).sqrt_()

    return {"mm": mm, "addmm": addmm, "convolution": convolution, "_euclidean_dist": euclidean_dist}


@contextlib.contextmanager
def cpu_mode():
    """The CPU's mode while any user holds it (process-wide, nestable; counted, so users that end in another order
    than they began leave it right): oneDNN off (native convolutions, per sample), short convolutions as one
    matrix product, and matrix products of at least ``CPU_MIN_ROWS`` rows (``_cpu_impls``)."""
    with _lock:
        _users["CPU-native"] = _users.get("CPU-native", 0) + 1
        if _users["CPU-native"] == 1:
            _saved_mkldnn.append(torch.backends.mkldnn.enabled)
            torch.backends.mkldnn.enabled = False
            library = torch.library.Library("aten", "IMPL")
            with warnings.catch_warnings():  # "Overriding a previously registered kernel": that is the point
                warnings.simplefilter("ignore", UserWarning)
                for name, fn in _cpu_impls().items():
                    library.impl(name, fn, "CPU")
            _libraries["CPU-native"] = library
    try:
        yield
    finally:
        with _lock:
            _users["CPU-native"] -= 1
            if _users["CPU-native"] == 0:
                torch.backends.mkldnn.enabled = _saved_mkldnn.pop()
                _libraries.pop("CPU-native")._destroy()


def enabled_for(device: torch.device | str, setting: str | None = None) -> contextlib.AbstractContextManager:
    """The mode for ``device`` when ``resolve_mode`` says so, else a no-op context."""
    if not resolve_mode(setting):
        return contextlib.nullcontext()
    return batch_invariant_mode("CUDA") if torch.device(device).type == "cuda" else cpu_mode()
