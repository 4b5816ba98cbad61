"""Triton kernels whose result for one row never depends on how many rows the batch has.

Each output element is reduced by one program, over the reduction dimension in fixed-size blocks taken in order:
no split-K, no split of the key sequence, no tile size chosen from the batch size (the causes listed in Thinking
Machines' "Defeating Nondeterminism in LLM Inference"). Shapes and dtypes of the tensors are the caller's;
accumulation is float32. The same kernels run on the CPU in Triton's interpreter (``TRITON_INTERPRET=1``), which is
how the unit tests check them without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Fixed tiles (never derived from M, the batch dimension). BLOCK_K fixes the reduction order.
MM_BLOCK_M, MM_BLOCK_N, MM_BLOCK_K = 32, 64, 32
ROW_BLOCK = 1024  # elements of a row reduced per block (RMS norm, softmax, mean)
ATTN_BLOCK_N = 64  # keys per block of the online softmax, always walked from the first to the last


@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
                   stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        # float32 operands: exact products (no TF32); bf16/fp16 operands: the tensor cores' products
        acc = tl.dot(a, b, acc, input_precision="ieee" if a.dtype == tl.float32 else None)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b (+ bias)``: a [M, K], b [K, N], bias [N] -> [M, N] in a's dtype; row i depends on a[i] only."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul expects [M, K] @ [K, N], got {tuple(a.shape)} @ {tuple(b.shape)}")
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=a.dtype)
    if M == 0 or N == 0:
        return c
    grid = (triton.cdiv(M, MM_BLOCK_M), triton.cdiv(N, MM_BLOCK_N))
    _matmul_kernel[grid](a, b, c, bias if bias is not None else a, M, N, K,
                         a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
                         HAS_BIAS=bias is not None, BLOCK_M=MM_BLOCK_M, BLOCK_N=MM_BLOCK_N, BLOCK_K=MM_BLOCK_K)
    return c


@triton.jit
def _row_sum_kernel(x_ptr, out_ptr, n_cols, stride_row, divisor, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + row * stride_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + row, (tl.sum(acc, axis=0) / divisor).to(out_ptr.dtype.element_ty))


def _row_reduce(x: torch.Tensor, mean: bool, out_dtype: torch.dtype | None) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(rows.shape[0], device=x.device, dtype=out_dtype or x.dtype)
    if rows.shape[0]:
        divisor = float(rows.shape[1]) if mean else 1.0
        _row_sum_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), divisor, BLOCK=ROW_BLOCK)
    return out.reshape(x.shape[:-1])


def row_mean(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over the last dimension, one program per row: [..., C] -> [...] (RMS norm's reduction)."""
    return _row_reduce(x, True, dtype)


def row_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum over the last dimension, one program per row (the quantizer's squared norms in torch.cdist)."""
    return _row_reduce(x, False, dtype)


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, n_cols, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    m = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32))
    row_max = tl.max(m, axis=0)
    s = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        s += tl.where(cols < n_cols, tl.exp(v - row_max), 0.0)
    total = tl.sum(s, axis=0)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(base + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, (tl.exp(v - row_max) / total).to(out_ptr.dtype.element_ty),
                 mask=cols < n_cols)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, one program per row, same shape and dtype."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty_like(rows)
    if rows.numel():
        _softmax_kernel[(rows.shape[0],)](rows, out, rows.shape[1], rows.stride(0), BLOCK=ROW_BLOCK)
    return out.reshape(x.shape)


@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, H, Tq, Tk, scale,
                      sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, smb, smh, smq, smk, sob, soh, sot,
                      HAS_MASK: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sqb + h * sqh + t * sqt + d).to(tl.float32)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros((D,), dtype=tl.float32)
    for start in range(0, Tk, BLOCK_N):  # every key block, in order, whatever the batch: a fixed KV split
        n = start + tl.arange(0, BLOCK_N)
        inside = n < Tk
        k = tl.load(k_ptr + b * skb + h * skh + n[:, None] * skt + d[None, :], mask=inside[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        keep = inside
        if HAS_MASK:
            allowed = tl.load(mask_ptr + b * smb + h * smh + t * smq + n * smk, mask=inside, other=0)
            keep = keep & (allowed != 0)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        # a block with no allowed key so far keeps m at -inf: guard the rescaling against (-inf) - (-inf)
        safe_m = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(keep, tl.exp(s - safe_m), 0.0)
        alpha = tl.where(m_i == float("-inf"), 0.0, tl.exp(m_i - safe_m))
        v = tl.load(v_ptr + b * svb + h * svh + n[:, None] * svt + d[None, :], mask=inside[:, None], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = tl.where(l_i > 0, acc / l_i, 0.0)  # a query with no allowed key gives zeros, never NaN
    tl.store(o_ptr + b * sob + h * soh + t * sot + d, out.to(o_ptr.dtype.element_ty))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Scaled dot-product attention, one program per (batch, head, query), keys in fixed blocks in order.

    q [B, H, Tq, D], k and v [B, H, Tk, D] (D a power of two), mask bool broadcastable to [B, H, Tq, Tk] (True:
    attend). Returns [B, H, Tq, D] in q's dtype. A query with no allowed key gets zeros (torch gives NaN).
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    if D & (D - 1):
        raise ValueError(f"head dimension must be a power of two, got {D}")
    out = torch.empty((B, H, Tq, D), device=q.device, dtype=q.dtype)
    scale = scale if scale is not None else D ** -0.5
    if mask is not None:
        mask = mask.expand(B, H, Tq, Tk)
        ms = mask.stride()
    else:
        ms = (0, 0, 0, 0)
    _attention_kernel[(B * H, Tq)](
        q, k, v, mask if mask is not None else q, out, H, Tq, Tk, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), *ms, out.stride(0), out.stride(1), out.stride(2),
        HAS_MASK=mask is not None, D=D, BLOCK_N=ATTN_BLOCK_N)
    return out


def conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, dilation: int,
           padding: int) -> torch.Tensor:
    """1-D convolution (groups=1) as im2col + ``matmul``: x [B, C, T], weight [O, C, K] -> [B, O, T'].

    Each output frame is one row of the product, so it never depends on the batch (no cuDNN algorithm choice,
    no TF32).
    """
    if padding:
        x = torch.nn.functional.pad(x, (padding, padding))
    B, C, T = x.shape
    O, _, K = weight.shape
    span = dilation * (K - 1) + 1
    frames = (T - span) // stride + 1
    cols = x.unfold(2, span, stride)[..., ::dilation]  # [B, C, T', K]
    rows = cols.permute(0, 2, 1, 3).reshape(B * frames, C * K)
    out = matmul(rows, weight.reshape(O, C * K).t(), bias)
    return out.reshape(B, frames, O).transpose(1, 2)
