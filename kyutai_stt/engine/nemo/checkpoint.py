"""Loading NVIDIA's cache-aware streaming FastConformer checkpoints (CTC, RNNT), and tiny random-weight ones for tests.

``--model`` names a ``.nemo`` file, a folder holding one (or an extracted ``.nemo``), or a model hub id such as
``nvidia/nemotron-speech-streaming-en-0.6b`` (downloaded through the hub by NeMo's own ``from_pretrained``, as Kyutai
checkpoints are). Only cache-aware streaming encoders (``att_context_style`` chunked_limited) are
served here (CTC or RNNT heads; a hybrid model's RNNT head); their features must not be normalised over the whole utterance (``normalize: NA``), which no stream can
do.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kyutai_stt.engine.contract import ModelLoadError

log = logging.getLogger(__name__)

RANDOM_MARKER = "RANDOM_WEIGHTS"  # a file in a test checkpoint's folder: the text is meaningless


@dataclass
class NemoModel:
    """A loaded NVIDIA model, ready to stream."""

    name: str
    asr: object  # nemo.collections.asr.models.EncDecCTCModel (BPE)
    device: torch.device
    dtype: torch.dtype
    random_weights: bool
    lookahead: int  # encoder frames of right context per chunk (the chunk is lookahead + 1 frames of 80 ms)


def _restore(name: str, device: torch.device):
    from nemo.collections.asr.models import ASRModel

    path = Path(name)
    if path.is_dir():
        found = sorted(path.glob("*.nemo"))
        if found:
            path = found[0]
    if path.exists():
        return ASRModel.restore_from(str(path), map_location=device), (Path(name) / RANDOM_MARKER).exists()
    if Path(name).is_absolute() or name.startswith("."):
        raise ModelLoadError(f"no NeMo checkpoint at {name}")
    return ASRModel.from_pretrained(name, map_location=device), False


def load_model(name: str, device: str = "auto", dtype: str = "auto", lookahead: int | None = None) -> NemoModel:
    """Load ``name`` for streaming with ``lookahead`` frames of right context (default: the model's own)."""
    try:
        import nemo.collections.asr  # noqa: F401  (the optional extra)
    except ImportError as exc:
        raise ModelLoadError(f"{name} is a NeMo checkpoint: install the extra, `pip install 'kyutai-stt[nemo]'`") from exc
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dtype not in ("auto", "float32"):
        raise ModelLoadError(f"the NeMo family runs in float32 only (dtype={dtype})")
    try:
        asr, random_weights = _restore(name, dev)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load the NeMo checkpoint {name}: {exc}") from exc
    _check_streamable(name, asr)
    asr.eval()
    if hasattr(asr, "joint"):  # greedy batched RNNT/TDT decoding, each slot continuing its own hypothesis
        asr.change_decoding_strategy(_greedy_batch(asr.cfg.decoding), verbose=False)
    encoder = asr.encoder
    contexts = [list(c) for c in encoder.att_context_size_all]
    if lookahead is None:
        lookahead = int(encoder.att_context_size[1])
    context = next((c for c in contexts if c[1] == lookahead), None)
    if context is None:
        raise ModelLoadError(f"{name} streams with lookahead {sorted(c[1] for c in contexts)} frames, "
                             f"not {lookahead} (KYUTAI_STT_NEMO_LOOKAHEAD)")
    encoder.set_default_att_context_size(context)
    encoder.setup_streaming_params()
    return NemoModel(name, asr, dev, torch.float32, random_weights, lookahead)


def _greedy_batch(decoding):
    from omegaconf import OmegaConf, open_dict

    decoding = OmegaConf.create(OmegaConf.to_container(decoding)) if decoding is not None else OmegaConf.create({})
    with open_dict(decoding):
        decoding.strategy = "greedy_batch"
        decoding.preserve_alignments = False
        decoding.compute_timestamps = False
    return decoding


def _check_streamable(name: str, asr) -> None:
    from nemo.collections.asr.models import EncDecCTCModel, EncDecRNNTModel
    from nemo.collections.asr.modules.conformer_encoder import ConformerEncoder

    if not isinstance(asr, (EncDecCTCModel, EncDecRNNTModel)):
        raise ModelLoadError(f"{name} is a {type(asr).__name__}: only CTC and RNNT/TDT cache-aware models are served")
    if not isinstance(asr.encoder, ConformerEncoder) or asr.encoder.att_context_style != "chunked_limited":
        raise ModelLoadError(f"{name} has no cache-aware streaming encoder (att_context_style chunked_limited)")
    pre = asr.cfg.preprocessor
    if str(pre.get("normalize", "NA")) not in ("NA", "None", "none"):
        raise ModelLoadError(f"{name} normalises features over the whole utterance ({pre.normalize}): not streamable")
    if int(pre.get("sample_rate", 16000)) != 16000 or abs(float(pre.get("window_stride", 0.01)) - 0.01) > 1e-9:
        raise ModelLoadError(f"{name}: only 16 kHz models with 10 ms feature frames are served")
    if asr.encoder.subsampling_factor != 8:
        raise ModelLoadError(f"{name}: only 8x subsampling (80 ms encoder frames) is served")


# ---------------------------------------------------------------------------------------------- test checkpoints
SIZES = {
    # d_model, layers, heads, features, vocabulary
    "tiny": (64, 2, 2, 32, 64),
    # the 0.6B-parameter layout of NVIDIA's streaming FastConformer (random weights; GPU benchmarks)
    "0.6b": (1024, 24, 8, 128, 1024),
}

_TEXT = ("the quick brown fox jumps over the lazy dog while streaming speech becomes text one chunk at a time "
         "and every stream keeps its own cache in its own slot of the batch so neighbours never change a word ")


def tiny_config(size: str, tokenizer_dir: str, lookahead: tuple[int, ...] = (1, 0, 6, 13), head: str = "ctc") -> dict:
    d_model, layers, heads, features, _ = SIZES[size]
    if head == "rnnt":
        config = tiny_config(size, tokenizer_dir, lookahead)
        config["model_defaults"] = {"enc_hidden": d_model, "pred_hidden": d_model, "joint_hidden": d_model}
        config["decoder"] = {"_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
                             "random_state_sampling": False, "blank_as_pad": True,
                             "prednet": {"pred_hidden": d_model, "pred_rnn_layers": 1, "t_max": None, "dropout": 0.0}}
        config["joint"] = {"_target_": "nemo.collections.asr.modules.RNNTJoint", "log_softmax": None,
                           "preserve_memory": False, "fuse_loss_wer": False, "fused_batch_size": 4,
                           "jointnet": {"joint_hidden": d_model, "activation": "relu", "dropout": 0.0}}
        config["decoding"] = {"strategy": "greedy_batch", "greedy": {"max_symbols": 5}}
        config["loss"] = {"loss_name": "default"}
        return config
    return {
        "sample_rate": 16000,
        "tokenizer": {"dir": tokenizer_dir, "type": "bpe"},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000, "normalize": "NA", "window_size": 0.025, "window_stride": 0.01,
            "window": "hann", "features": features, "n_fft": 512, "log": True, "frame_splicing": 1,
            "dither": 1e-5, "pad_to": 0, "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": features, "feat_out": -1, "n_layers": layers, "d_model": d_model,
            "subsampling": "dw_striding", "subsampling_factor": 8, "subsampling_conv_channels": d_model,
            "causal_downsampling": True, "ff_expansion_factor": 4, "self_attention_model": "rel_pos",
            "n_heads": heads, "att_context_size": [[70, k] for k in lookahead],
            "att_context_style": "chunked_limited", "xscaling": True, "untie_biases": True,
            "pos_emb_max_len": 5000, "conv_kernel_size": 9, "conv_norm_type": "layer_norm",
            "conv_context_size": "causal", "dropout": 0.0, "dropout_pre_encoder": 0.0, "dropout_emb": 0.0,
            "dropout_att": 0.0,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": d_model, "num_classes": -1, "vocabulary": [],
        },
    }


def make_checkpoint(folder: str | os.PathLike, size: str = "tiny", seed: int = 0, head: str = "ctc") -> Path:
    """Write a RANDOM-WEIGHT cache-aware checkpoint (``model.nemo``) of ``size`` with a ``head`` ("ctc" or "rnnt")
    into ``folder``."""
    import sentencepiece as spm
    from nemo.collections.asr.models import EncDecCTCModelBPE, EncDecRNNTBPEModel
    from omegaconf import OmegaConf

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocabulary = SIZES[size][4]
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "text.txt"
        words = _TEXT.split()
        corpus.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 20)
        # NeMo's own tokenizer layout: unk 0, no bos/eos, pieces marked with "▁" at word starts
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=f"{work}/tokenizer", vocab_size=vocabulary,
                                       model_type="bpe", character_coverage=1.0, bos_id=-1, eos_id=-1,
                                       hard_vocab_limit=False, minloglevel=2)
        # vocab.txt as NeMo's tokenizer script writes it: word-start pieces without "▁", the others after "##"
        processor = spm.SentencePieceProcessor(model_file=f"{work}/tokenizer.model")
        pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
        (Path(work) / "vocab.txt").write_text("".join(
            (p[1:] if p.startswith("▁") else "##" + p) + "\n" for p in pieces))
        torch.manual_seed(seed)
        if head not in ("ctc", "rnnt"):
            raise ValueError("head must be ctc or rnnt")
        cls = EncDecRNNTBPEModel if head == "rnnt" else EncDecCTCModelBPE
        model = cls(cfg=OmegaConf.create(tiny_config(size, work, head=head)))
        with torch.no_grad():  # sharper random logits: labels change from frame to frame, so parity tests bite
            for parameter in (model.joint if head == "rnnt" else model.decoder).parameters():
                parameter.mul_(8.0)
        model.eval()
        model.save_to(str(folder / "model.nemo"))
    (folder / RANDOM_MARKER).write_text("random weights: tests and benchmarks only\n")
    return folder
