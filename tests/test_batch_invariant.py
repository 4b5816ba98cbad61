"""The batch-invariant kernels, on the CPU in Triton's interpreter: a row's result is bitwise the same whatever the
batch size, and close to PyTorch's own result. The CUDA run of the same kernels is scripts/gpu_check.py's job."""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined: triton.jit reads it then

import pytest
import torch

pytest.importorskip("triton", reason="triton is a dev dependency (the kernels' interpreter tests)")

from kyutai_stt.engine.batch_invariant import batch_invariant_mode, kernels, resolve_mode  # noqa: E402

F = torch.nn.functional
g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g)


def test_matmul_rows_do_not_depend_on_the_batch_size():
    a, b, bias = randn(70, 96), randn(96, 80), randn(80)
    full = kernels.matmul(a, b, bias)
    for rows in (1, 3, 33):
        assert torch.equal(kernels.matmul(a[:rows], b, bias), full[:rows])
    assert torch.equal(kernels.matmul(a[40:41], b, bias), full[40:41])  # a row in a later tile
    torch.testing.assert_close(full, a @ b + bias, rtol=1e-5, atol=1e-4)


def test_row_mean_and_softmax_per_row():
    x = randn(9, 2100)  # longer than one block: the blocked reduction is walked in order
    for fn, ref in ((kernels.row_mean, x.mean(-1)), (kernels.softmax, x.softmax(-1))):
        full = fn(x)
        assert torch.equal(fn(x[4:5]), full[4:5])
        torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-6)


def test_attention_with_per_row_masks_like_the_ring_cache():
    B, H, Tq, Tk, D = 4, 2, 2, 150, 16
    q, k, v = randn(B, H, Tq, D), randn(B, H, Tk, D), randn(B, H, Tk, D)
    mask = torch.zeros(B, 1, Tq, Tk, dtype=torch.bool)
    for row, valid in enumerate((150, 7, 0, 90)):  # row 2 sees no key at all (an idle slot)
        mask[row, :, :, :valid] = True
    full = kernels.attention(q, k, v, mask)
    for row in range(B):
        alone = kernels.attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], mask[row:row + 1])
        assert torch.equal(alone, full[row:row + 1])
    assert torch.equal(full[2], torch.zeros_like(full[2]))  # never NaN, unlike torch
    keep = [0, 1, 3]
    torch.testing.assert_close(full[keep], F.scaled_dot_product_attention(q, k, v, mask)[keep], rtol=1e-5, atol=1e-5)


def test_conv1d_as_im2col_matmul():
    x, w, bias = randn(3, 8, 50), randn(16, 8, 4), randn(16)
    full = kernels.conv1d(x, w, bias, stride=2, dilation=1, padding=0)
    torch.testing.assert_close(full, F.conv1d(x, w, bias, stride=2), rtol=1e-5, atol=1e-4)
    assert torch.equal(kernels.conv1d(x[1:2], w, bias, 2, 1, 0), full[1:2])
    dilated = kernels.conv1d(x, w, None, stride=1, dilation=3, padding=0)
    torch.testing.assert_close(dilated, F.conv1d(x, w, dilation=3), rtol=1e-5, atol=1e-4)


def test_the_mode_routes_torch_operators_to_the_kernels():
    """Registered with torch.library on the CPU key (the interpreter runs the kernels on CPU tensors)."""
    x, w = randn(5, 3, 32), randn(24, 32)
    linear = torch.nn.Linear(32, 24)
    with batch_invariant_mode("CPU"):
        got = F.linear(x, w)
        biased = linear(x)
        mean = torch.mean(x ** 2, dim=2, keepdim=True)
        total = torch.sum(x, dim=(0, 2))
        distances = torch.cdist(x[None, 0], w[None, :4], p=2)[0]  # Mimi's quantizer: squared norms + mm
        soft = torch.softmax(x, dim=-1)
        q = randn(2, 2, 1, 16)
        attn = F.scaled_dot_product_attention(q, q, q, torch.ones(2, 1, 1, 1, dtype=torch.bool))
        assert not torch.backends.cudnn.allow_tf32
    assert torch.equal(got, kernels.matmul(x.reshape(15, 32), w.t()).reshape(5, 3, 24))
    assert torch.equal(biased, kernels.matmul(x.reshape(15, 32), linear.weight.t(), linear.bias).reshape(5, 3, 24))
    assert torch.equal(mean, kernels.row_mean(x ** 2)[..., None])
    assert torch.equal(total, kernels.row_sum(x.permute(1, 0, 2).reshape(3, -1)))
    torch.testing.assert_close(distances, torch.cdist(x[None, 0], w[None, :4], p=2)[0], rtol=1e-4, atol=1e-4)
    assert torch.equal(soft, kernels.softmax(x))
    assert torch.equal(attn, kernels.attention(q, q, q, torch.ones(2, 1, 1, 1, dtype=torch.bool)))


def test_setting():
    assert resolve_mode("auto") and resolve_mode("on") and not resolve_mode("off")
    with pytest.raises(ValueError):
        resolve_mode("sometimes")


def split_k_matmul(a, b, bias=None):
    """A matmul whose reduction order depends on the batch: K is cut into as many pieces as ``a`` has rows and the
    partial products are added last piece first (a split-K kernel, the kind the mode exists to keep out)."""
    pieces = [p for p in torch.arange(a.shape[1]).tensor_split(max(1, a.shape[0])) if len(p)]
    parts = [exact_matmul(a[:, p[0]:p[-1] + 1], b[p[0]:p[-1] + 1]) for p in pieces]
    out = parts[-1]
    for part in reversed(parts[:-1]):
        out = out + part  # elementwise: not one of the operators the mode reroutes
    return out if bias is None else out + bias


exact_matmul = kernels.matmul


def lm_rows_match_alone(model, codes) -> bool:
    """Row 1 of a 3-row batch against the same codes at batch 1 through moshi's LM, in the mode: the same text
    tokens and VAD probabilities, bit for bit, at every step."""
    from moshi.models import LMGen

    def run(rows):
        lm_gen = LMGen(model.lm, temp=0.0, temp_text=0.0)
        out = []
        with lm_gen.streaming(len(rows)):
            for t in range(codes.shape[2]):
                tokens, heads = lm_gen.step_with_extra_heads(codes[rows, :, t:t + 1])
                out.append((tokens[:, 0, 0].clone(), torch.stack([h[:, 0, 0] for h in heads], 1).clone()))
        return out

    with batch_invariant_mode("CPU"):
        batched, alone = run([0, 1, 2]), run([1])
    return all(torch.equal(tokens[1:2], tokens_1) and torch.equal(pauses[1:2], pauses_1)
               for (tokens, pauses), (tokens_1, pauses_1) in zip(batched, alone))


def test_the_real_lm_is_batch_invariant_in_the_mode(checkpoint_dir, monkeypatch):
    """moshi's LM (tiny checkpoint) through the mode: a row's tokens and VAD probabilities do not depend on the
    batch, which checks that the mode covers every batch-dependent operator the LM reaches. The same check fails
    once one of the mode's kernels is swapped for a batch-dependent one (split-K), whatever the machine's own
    kernels do, so a pass means something."""
    from kyutai_stt.engine.kyutai.checkpoint import load_model

    model = load_model(str(checkpoint_dir), "cpu", "float32")
    codes = torch.randint(0, 2048, (3, 32, 2), generator=g)
    assert lm_rows_match_alone(model, codes)

    monkeypatch.setattr(kernels, "matmul", split_k_matmul)
    a, b = randn(3, 96), randn(96, 80)
    assert not torch.equal(split_k_matmul(a, b)[1:2], split_k_matmul(a[1:2], b))  # batch-dependent indeed
    assert not lm_rows_match_alone(model, codes)


# ------------------------------------------------------------------------------------- the CPU mode (no Triton)
# Mimi's convolutions whose output per call is short (2-frame steps), and the long ones: (in, length, out, kernel,
# stride). The short ones run as one matrix product in the mode, the long ones in PyTorch's kernel per sample.
MIMI_CONVS = [(512, 40, 1024, 16, 8), (1024, 6, 512, 3, 1), (512, 6, 512, 4, 2), (256, 198, 512, 12, 6),
              (64, 3844, 128, 8, 4)]


@pytest.mark.parametrize("shape", MIMI_CONVS, ids=lambda s: "x".join(map(str, s)))
def test_cpu_mode_convolutions_are_row_invariant_and_close_to_torch(shape):
    from kyutai_stt.engine.batch_invariant import cpu_mode

    channels, length, out_channels, kernel, stride = shape
    x, w, bias = randn(5, channels, length), randn(out_channels, channels, kernel) * 0.05, randn(out_channels)
    stock = F.conv1d(x, w, bias, stride=stride)
    with cpu_mode():
        full = F.conv1d(x, w, bias, stride=stride)
        for rows in (1, 2, 3):
            assert torch.equal(F.conv1d(x[:rows], w, bias, stride=stride), full[:rows])
        assert torch.equal(F.conv1d(x[:1], w, None, stride=stride), F.conv1d(x, w, None, stride=stride)[:1])
    torch.testing.assert_close(full, stock, rtol=1e-4, atol=1e-4)


def test_cpu_mode_codebook_distances_are_row_invariant_and_close_to_torch():
    """Mimi's quantizer: torch.cdist of a step's frames to 2048 codes, a 1- or 2-row matrix product for one stream,
    whose bits MKL computes otherwise than for 4 rows and more; the mode pads the rows."""
    from kyutai_stt.engine.batch_invariant import cpu_mode

    frames, codes = randn(1, 7, 256), randn(1, 2048, 256)
    stock = torch.cdist(frames, codes)
    with cpu_mode():
        full = torch.cdist(frames, codes)
        for rows in (1, 2, 3, 5):
            assert torch.equal(torch.cdist(frames[:, :rows], codes), full[:, :rows])
    torch.testing.assert_close(full, stock, rtol=1e-5, atol=1e-4)
    assert torch.equal(full.argmin(-1), stock.argmin(-1))
