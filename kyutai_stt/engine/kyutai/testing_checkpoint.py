"""Random-weight STT checkpoints in the real layout, for tests and benchmarks.

THE TEXT THESE CHECKPOINTS PRODUCE IS MEANINGLESS. They exist because the real weights may be out of reach
(no Hugging Face access): they use the real moshi LM and Mimi classes, a sentencepiece tokenizer trained on the
spot, and the real ``stt_config`` delay, so every code path of the service runs exactly as with real weights.

Three things make them useful rather than inert:
- A random Mimi has all-zero codebooks (every code would be 0 and the LM would never hear the audio). Here the
  first levels get centroids of the encoder's own latents on synthetic sounds, so codes, and so the text, really
  depend on the audio (see ``_fit_codebooks``).
- The text head is tilted so that greedy decoding gives a realistic mix of padding (3), word boundaries (0) and
  word pieces, instead of a torrent of random pieces.
- The VAD ("extra") heads are present and scaled so their pause probability actually moves.
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Callable

import numpy as np
import sentencepiece
import torch
from safetensors.torch import save_file

from moshi.models import LMGen, loaders

from kyutai_stt.audio.constants import FRAME_RATE, FRAME_SIZE, SAMPLE_RATE

log = logging.getLogger(__name__)

MIMI_FILE = "mimi-random.safetensors"
LM_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"

_STT_1B = dict(
    dim=2048, num_heads=16, num_layers=16, context=750, text_card=8000,
    audio_delay_seconds=0.5, audio_silence_prefix_seconds=0.0,
)
SIZES = {
    "tiny": dict(dim=64, num_heads=4, num_layers=2, context=750, text_card=1000,
                 audio_delay_seconds=0.5, audio_silence_prefix_seconds=0.0),
    "small": dict(dim=512, num_heads=8, num_layers=6, context=750, text_card=4000,
                  audio_delay_seconds=0.5, audio_silence_prefix_seconds=0.0),
    "1b": _STT_1B,
}


def lm_config(size: str) -> dict:
    """The LM kwargs of a Kyutai STT model (stt-1b-en_fr architecture for '1b')."""
    s = SIZES[size]
    return {
        "dim": s["dim"],
        "text_card": s["text_card"],
        "existing_text_padding_id": 3,
        "n_q": 32,
        "dep_q": 0,
        "card": 2048,
        "num_heads": s["num_heads"],
        "num_layers": s["num_layers"],
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "context": s["context"],
        "max_period": 100000,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": 0,
        "depformer_dim_feedforward": 0,
        "depformer_num_heads": 0,
        "depformer_num_layers": 0,
        "depformer_layer_scale": None,
        "depformer_multi_linear": False,
        "depformer_context": 0,
        "depformer_max_period": 0,
        "depformer_gating": None,
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": False,
        "delays": [0] * 33,
        "extra_heads_num_heads": 4,
        "extra_heads_dim": 6,
    }


def synthetic_sounds(seconds: float, seed: int) -> np.ndarray:
    """Speech-like synthetic audio: voiced harmonics with moving pitch and formants, noise bursts, pauses."""
    rng = np.random.default_rng(seed)
    out = []
    total = int(seconds * SAMPLE_RATE)
    n = 0
    while n < total:
        kind = rng.choice(["voiced", "noise", "silence"], p=[0.55, 0.25, 0.2])
        length = int(rng.uniform(0.08, 0.5) * SAMPLE_RATE)
        t = np.arange(length) / SAMPLE_RATE
        if kind == "voiced":
            f0 = rng.uniform(90, 260) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
            phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
            formants = rng.uniform(300, 3000, size=3)
            seg = sum(np.sin(k * phase) * np.exp(-(((k * f0.mean()) - formants[:, None]) ** 2).min(0) / 4e5)
                      for k in range(1, 20))
        elif kind == "noise":
            seg = rng.normal(size=length) * np.hanning(length)
        else:
            seg = rng.normal(size=length) * 1e-3
        seg = np.asarray(seg, dtype=np.float64)
        seg = seg / (np.abs(seg).max() + 1e-9) * rng.uniform(0.05, 0.6)
        out.append(seg)
        n += length
    return np.concatenate(out)[:total].astype(np.float32)


def _train_tokenizer(vocab_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    consonants = "b c d f g h j k l m n p r s t v w z ch sh th st tr pl br".split()
    vowels = "a e i o u ai ea ou ie oo".split()

    def word() -> str:
        syllables = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))
        return syllables + (rng.choice(consonants) if rng.random() < 0.5 else "")

    words = [word() for _ in range(40000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(20000)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )
    return model.getvalue()


FITTED_LEVELS = 2  # per RVQ (semantic and acoustic): these levels follow the audio; the rest always give code 0
CLUSTERS = 24


def _kmeans(vectors: torch.Tensor, k: int, generator: torch.Generator, iters: int = 20) -> torch.Tensor:
    """Lloyd's k-means, every cluster updated at once; stops early once no assignment changes."""
    centroids = vectors[torch.randperm(vectors.shape[0], generator=generator)[:k]].clone()
    previous = None
    for _ in range(iters):
        assign = torch.cdist(vectors, centroids).argmin(dim=1)
        if previous is not None and torch.equal(assign, previous):
            break
        previous = assign
        sums = torch.zeros_like(centroids).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0  # an empty cluster keeps its centroid
        centroids[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
    return centroids


@torch.no_grad()
def _fit_codebooks(mimi, audio: np.ndarray, generator: torch.Generator) -> None:
    """Give Mimi codebooks that make its codes follow the audio, with wide decision margins.

    The first ``FITTED_LEVELS`` levels of each RVQ get k-means centroids of the encoder's own latents (a few
    clusters, so a latent is rarely near a boundary); every other level gets a zero centroid at index 0 and far
    away ones elsewhere, so it always answers 0. Wide margins matter: float results differ by ~1e-7 between
    batch sizes, and a code that flips on such noise would make batched and single-stream runs disagree.
    """
    x = torch.from_numpy(audio)[None, None]
    latent = mimi._encode_to_unquantized_latent(x)  # [1, 512, T]
    for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
        residual = rvq.input_proj(latent) if rvq.input_proj is not None else latent
        residual = residual[0].transpose(0, 1)  # [T, D]
        for level, layer in enumerate(rvq.vq.layers):
            codebook = layer._codebook
            vectors = layer.project_in(residual)
            far = torch.randn(codebook.codebook_size, vectors.shape[1], generator=generator)
            centroids = far * (1000.0 * vectors.norm(dim=1).max() / far.norm(dim=1, keepdim=True))
            if level < FITTED_LEVELS:
                centroids[:CLUSTERS] = _kmeans(vectors, CLUSTERS, generator)
            else:
                centroids[0] = 0.0
            codebook.embedding_sum.copy_(centroids)
            codebook.cluster_usage.fill_(1.0)
            codebook._initialized.fill_(1.0)
            codebook._embedding = None
            codes = codebook.encode(vectors)
            residual = residual - layer.project_out(codebook.decode(codes))


@torch.no_grad()
def _greedy_run(lm, codes: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """Greedy single-stream run over precomputed codes: text tokens, head-2 pause probabilities, hidden states."""
    gen = LMGen(lm, temp=0.0, temp_text=0.0)
    tokens, pauses, hidden = [], [], []
    hook = lm.out_norm.register_forward_hook(lambda _m, _i, out: hidden.append(out[0, 0].float().clone()))
    try:
        with gen.streaming(1):
            gen.step(codes[:, :, :1])
            hidden.clear()
            for t in range(codes.shape[-1]):
                out, heads = gen.step_with_extra_heads(codes[:, :, t:t + 1])
                tokens.append(int(out[0, 0, 0]))
                pauses.append(float(heads[2][0, 0, 0]))
    finally:
        hook.remove()
    return np.array(tokens), np.array(pauses), torch.stack(hidden)


def _bisect(apply, measure, target: float, lo: float, hi: float, steps: int = 10) -> float:
    """Find a scale in [lo, hi] where the (increasing) measured fraction is near target."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        apply(mid)
        if measure() < target:
            lo = mid
        else:
            hi = mid
    scale = (lo + hi) / 2
    apply(scale)
    return scale


TILT_ROUNDS = 3  # greedy runs after the first: each refreshes the hidden states the bisections measure on


@torch.no_grad()
def _tilt_heads(lm, codes: torch.Tensor, progress: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Tilt the text head towards padding/boundaries and scale the VAD heads (see module docstring).

    The hidden state is RMS-normalised, so a row's logit is its norm times a cosine: adding ``s * u`` to the
    padding row, with ``u`` the mean hidden direction, makes padding win more often as ``s`` grows; the
    boundary row follows the main direction of variation, so boundaries come where the hidden state moves.

    The bisections measure on the hidden states of one greedy run (the text head and the VAD heads read the same
    normalised hidden state, so their outputs follow without running the LM); a few rounds of a fresh greedy run
    then bisections again absorb the feedback of the chosen tokens into the next steps. Returns the fractions
    measured on a last greedy run.
    """
    hidden = _greedy_run(lm, codes)[2]
    progress()
    u = hidden.mean(0)
    u /= u.norm()
    centred = hidden - hidden.mean(0)
    v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    v -= (v @ u) * u
    v /= v.norm()
    weight = lm.text_linear.weight
    pad_row, boundary_row = weight[3].clone(), weight[0].clone()
    heads = [head.weight.clone() for head in lm.extra_heads]

    def scale_heads(s: float) -> None:
        for head, original in zip(lm.extra_heads, heads):
            head.weight.copy_(original)
            head.weight[0] += s * u  # "no voice" follows the same direction as padding

    def token_fraction(token: int) -> float:
        return float((lm.text_linear(hidden).argmax(-1) == token).float().mean())

    def pause_fraction() -> float:
        return float((torch.softmax(lm.extra_heads[2](hidden), -1)[:, 0] > 0.5).float().mean())

    for _ in range(TILT_ROUNDS):
        _bisect(lambda s: weight[3].copy_(pad_row + s * u), lambda: token_fraction(3), 0.55, 0.0, 50.0)
        _bisect(lambda s: weight[0].copy_(boundary_row + s * v), lambda: token_fraction(0), 0.12, 0.0, 50.0)
        _bisect(scale_heads, pause_fraction, 0.3, 0.0, 50.0)
        tokens, pauses, hidden = _greedy_run(lm, codes)
        progress()
    return {"padding": float((tokens == 3).mean()), "boundary": float((tokens == 0).mean()),
            "pause": float((pauses > 0.5).mean())}


# The steps make_checkpoint reports to ``progress``: tokenizer, Mimi, LM, each greedy calibration run, saving.
def progress_steps(size: str) -> int:
    return 4 + (1 + TILT_ROUNDS if size != "1b" else 0)


def make_checkpoint(folder: str | Path, size: str = "tiny", seed: int = 0,
                    progress: Callable[[str], None] | None = None) -> Path:
    """Write a random-weight STT checkpoint (meaningless text!) to ``folder`` and return its path.

    ``progress(description)`` is called after each of the ``progress_steps(size)`` steps, with what comes next.
    A tiny checkpoint takes about a minute on 2 busy cores, most of it in the LM calibration's greedy runs."""
    report = progress or (lambda description: None)
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    spec = SIZES[size]

    log.info("training a %d-piece sentencepiece tokenizer", spec["text_card"])
    (folder / TOKENIZER_FILE).write_bytes(_train_tokenizer(spec["text_card"], seed))
    report("fitting Mimi's codebooks to its own latents")

    log.info("building a random Mimi and fitting its codebooks to its own latents")
    mimi = loaders.get_mimi(None, num_codebooks=32, device="cpu")
    audio = synthetic_sounds(40.0, seed)
    _fit_codebooks(mimi, audio, generator)
    mimi_state = {k: v.detach().contiguous().clone() for k, v in mimi.state_dict().items()}
    save_file(mimi_state, str(folder / MIMI_FILE))
    report(f"building a random {size} LM")

    log.info("building a random %s LM", size)
    config = lm_config(size)
    lm = loaders.get_moshi_lm(None, lm_kwargs=config, device="cpu", dtype=torch.float32)
    report("calibrating the LM's heads (greedy runs)" if size != "1b" else "saving")
    if size != "1b":  # calibration runs the LM many times: cheap for small sizes only
        calib = torch.from_numpy(synthetic_sounds(12.0, seed + 1))
        usable = calib.shape[-1] // FRAME_SIZE * FRAME_SIZE
        with torch.no_grad():
            codes = mimi.encode(calib[None, None, :usable])
        fractions = _tilt_heads(lm, codes, lambda: report("calibrating the LM's heads (greedy runs)"))
        log.info("calibrated: padding %.2f, boundaries %.2f, pauses %.2f of the steps", fractions["padding"],
                 fractions["boundary"], fractions["pause"])
    lm_state = {k: v.detach().contiguous().clone() for k, v in lm.state_dict().items()}
    if size == "1b":
        lm_state = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in lm_state.items()}
    save_file(lm_state, str(folder / LM_FILE))

    config.update(
        model_type="stt",
        moshi_name=LM_FILE,
        mimi_name=MIMI_FILE,
        tokenizer_name=TOKENIZER_FILE,
        stt_config={
            "audio_delay_seconds": spec["audio_delay_seconds"],
            "audio_silence_prefix_seconds": spec["audio_silence_prefix_seconds"],
        },
        # moshi passes unknown top-level keys to the LM; model_id is popped and kept aside, so notes go there.
        model_id={
            "kyutai_stt_random_weights": True,
            "note": "RANDOM WEIGHTS: this checkpoint produces meaningless text. For tests and benchmarks only.",
            "size": size,
        },
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    report("done")
    (folder / "README.md").write_text(
        f"# Random-weight Kyutai STT checkpoint ({size})\n\n"
        "Made by `kyutai-stt make-checkpoint`. **It produces meaningless text**: the weights are random. "
        "It has the real layout, architecture and delay, for tests and benchmarks.\n"
    )
    return folder


# ---------------------------------------------------------------------------------------------- a stalling model
STALL_COORDINATE = -1  # the residual coordinate that carries the rut
_STALL_MAGNITUDE = 1e4


def make_stall_checkpoint(source: str | Path, folder: str | Path, audio: np.ndarray,
                          after_seconds: float = 4.0) -> tuple[Path, int]:
    """A copy of the checkpoint in ``source`` whose decoder falls into a "blank rut" (issue 20's stall): once it
    emits a trigger piece, it emits only padding for as long as its context remembers, whatever the audio; a
    context reset (``Engine.reset``) gets it out. Returns the folder and the trigger token: the first piece the
    piece whose first emission on ``audio`` is nearest ``after_seconds``: on that audio the stall starts there.

    How, with the real moshi classes: one residual coordinate ``k`` is kept at exactly 0 in normal operation (that
    column of every embedding and that row of every layer's output projections are zeroed); the trigger's and
    padding's text embeddings carry a huge value there. After the final RMS norm the hidden state is then almost
    exactly the unit vector ``k``, and the text head's padding row reads only ``k``: padding wins by far, is fed
    back, and wins again (the rut). In normal operation the padding logit is exactly 0 and some piece always
    beats it, so words are delimited by boundaries only. VAD head 0 says "voice" at every step (uniform output),
    so the watchdog's VAD condition holds and signal energy decides."""
    import shutil

    from safetensors.torch import load_file

    from kyutai_stt.engine.kyutai.checkpoint import load_model
    from kyutai_stt.engine.kyutai.reference import reference_outputs

    source, folder = Path(source), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != LM_FILE and item.is_file():
            shutil.copy(item, folder / item.name)
    state = load_file(str(source / LM_FILE))
    k = STALL_COORDINATE
    for name, tensor in state.items():
        if name.startswith("emb.") or name == "text_emb.weight":
            tensor[:, k] = 0
        elif name.endswith(("out_projs.0.weight", "linear_out.weight")):
            tensor[k, :] = 0
    state["text_linear.weight"][3] = 0
    state["text_linear.weight"][3, k] = 100.0
    state["extra_heads.0.weight"].zero_()
    state["text_emb.weight"][3, k] = _STALL_MAGNITUDE
    save_file(state, str(folder / LM_FILE))
    model = load_model(str(folder), "cpu", "float32")
    outputs = reference_outputs(model, audio)
    start = round(after_seconds * FRAME_RATE) + model.delay_frames + model.prefix_frames
    first_seen: dict[int, int] = {}
    for o in outputs:
        if o.token >= 4:
            first_seen.setdefault(o.token, o.frame)
    # the piece whose first emission is nearest ``after_seconds``: the stall starts there
    trigger = min(first_seen, key=lambda token: abs(first_seen[token] - start))
    state["text_emb.weight"][trigger, k] = _STALL_MAGNITUDE
    save_file(state, str(folder / LM_FILE))
    return folder, trigger
