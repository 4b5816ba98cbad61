"""NVIDIA's streaming Sortformer (``nvidia/diar_streaming_sortformer_4spk-v2``, NeMo) as a batched ``Diarizer``.

Each stream keeps its own Sortformer streaming state (NeMo's ``async_streaming`` state: speaker cache and FIFO
with per-row lengths) and a rolling window of its 16 kHz audio. A step takes every stream with a whole chunk
waiting (``chunk_len`` frames of 80 ms, 0.48 s), computes the log-mel features of each stream's window (left
context, the chunk, right context), stacks the rows and their states into one batch, runs
``forward_streaming_step`` once and gives each stream its chunk's activities. This is how NeMo's own voice-agent
diarizer streams (a fixed feature window, fixed left/right offsets: ``nemo.agents.voice_agent``), so every step
has the same shapes and the same context offsets for every row, whatever each stream's age.

Exactness, streams joining mid-batch: NeMo's batch streaming (``forward_streaming``) uses one left/right offset
per step for the whole batch, so a stream joining later than the others would get the wrong context. Here the
offsets are the same constants at every step (the window is zero-filled before a stream's first audio), and the
state rows carry their own lengths, so a row's inputs are exactly what it would have alone: a stream's activities
equal its batch-1 run up to the float kernels' batch-size dependence (measured below 1e-6, tested in
``tests/test_diarization.py``), not bit for bit (matrix products on another batch shape; no batch-invariant mode
here).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kyutai_stt.audio.constants import SAMPLE_RATE
from kyutai_stt.audio.resample import StreamResampler
from kyutai_stt.engine.diarization.contract import (DiarizationEnd, DiarizationEvent, DiarizationSink, DiarizerInfo,
    SpeakerFrames)

log = logging.getLogger(__name__)

HUB_MODEL = "nvidia/diar_streaming_sortformer_4spk-v2"
RATE = 16000  # NeMo's audio
# NeMo's streaming set-up for this model (nemo.agents.voice_agent's DiarizationConfig): 0.48 s chunks, a right
# context of 7 frames in the encoder, 8 feature frames (80 ms) of left and right offset around each chunk
STREAMING = dict(spkcache_len=188, spkcache_update_period=144, fifo_len=188, chunk_len=6, chunk_left_context=1,
                 chunk_right_context=7)
RANDOM_OUTPUT_GAIN = 30.0
RANDOM_MARKER = "RANDOM_WEIGHTS"  # beside a random build's model.nemo (as engine/nemo's test checkpoints)
LEFT_OFFSET = RIGHT_OFFSET = 8  # feature frames (10 ms) of context around a chunk's features


def tiny_config(d_model: int = 64, layers: int = 1, tf_d_model: int = 32, tf_layers: int = 1) -> dict:
    """A Sortformer of the streaming 4-speaker model's shape, tiny (tests, CPU benchmarks: random weights). At full
    size (``d_model=512, layers=17, tf_d_model=192, tf_layers=18``) it has the real model's ~118 M parameters."""
    return {
        "sample_rate": RATE, "max_num_of_spks": 4, "streaming_mode": True, "async_streaming": True,
        "model_defaults": {"fc_d_model": d_model, "tf_d_model": tf_d_model},
        "preprocessor": {"_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
                         "normalize": "NA", "window_size": 0.025, "sample_rate": RATE, "window_stride": 0.01,
                         "window": "hann", "features": 128, "n_fft": 512, "frame_splicing": 1, "dither": 0.0,
                         "pad_to": 0},
        "encoder": {"_target_": "nemo.collections.asr.modules.ConformerEncoder", "feat_in": 128, "feat_out": -1,
                    "n_layers": layers, "d_model": d_model, "subsampling": "dw_striding", "subsampling_factor": 8,
                    "subsampling_conv_channels": d_model, "causal_downsampling": False, "ff_expansion_factor": 4,
                    "self_attention_model": "rel_pos", "n_heads": 8 if d_model >= 256 else 4,
                    "att_context_size": [-1, -1], "xscaling": True, "untie_biases": True, "pos_emb_max_len": 5000,
                    "conv_kernel_size": 9, "conv_norm_type": "batch_norm", "dropout": 0.0,
                    "dropout_pre_encoder": 0.0, "dropout_emb": 0.0, "dropout_att": 0.0},
        "sortformer_modules": {"_target_": "nemo.collections.asr.modules.sortformer_modules.SortformerModules",
                               "num_spks": 4, "dropout_rate": 0.0, "fc_d_model": d_model, "tf_d_model": tf_d_model,
                               "subsampling_factor": 8, **STREAMING},
        "transformer_encoder": {
            "_target_": "nemo.collections.asr.modules.transformer.transformer_encoders.TransformerEncoder",
            "num_layers": tf_layers, "hidden_size": tf_d_model, "inner_size": tf_d_model * 4,
            "num_attention_heads": 8 if tf_d_model >= 128 else 4, "attn_score_dropout": 0.0,
            "attn_layer_dropout": 0.0, "ffn_dropout": 0.0, "hidden_act": "relu", "pre_ln": False,
            "pre_ln_final_layer_norm": True},
        "loss": {"_target_": "nemo.collections.asr.losses.bce_loss.BCELoss", "weight": None, "reduction": "mean"},
    }


SIZES = {"tiny": {}, "full": dict(d_model=512, layers=17, tf_d_model=192, tf_layers=18)}


def load_sortformer(name: str, device: str = "cpu", seed: int = 0):
    """The Sortformer ``name`` names, in eval mode, set up for streaming: ``random:tiny`` / ``random:full`` (random
    weights from ``tiny_config``), a ``.nemo`` file or a folder holding one (``make_checkpoint``), or a hub id (downloaded through the Hugging Face hub as NeMo
    does, e.g. ``nvidia/diar_streaming_sortformer_4spk-v2``)."""
    import torch
    from nemo.collections.asr.models import SortformerEncLabelModel
    from omegaconf import OmegaConf

    if name.startswith("random:"):
        torch.manual_seed(seed)
        model = SortformerEncLabelModel(cfg=OmegaConf.create(tiny_config(**SIZES[name.split(":", 1)[1]])))
        model.random_weights = True
        # Random output layers give every frame nearly the same activities (one speaker everywhere): sharpen
        # them so that speakers change with the audio and tests can tell a right label from a wrong one.
        with torch.no_grad():
            modules = model.sortformer_modules
            for layer in (modules.first_hidden_to_hidden, modules.hidden_to_spks, modules.single_hidden_to_spks):
                layer.weight.mul_(RANDOM_OUTPUT_GAIN)
    elif name.endswith(".nemo") or Path(name).is_dir():
        path = Path(name)
        if path.is_dir():  # a folder as ``make-checkpoint --family sortformer`` writes it
            found = sorted(path.glob("*.nemo"))
            if not found:
                raise FileNotFoundError(f"no .nemo file in {name}")
            path = found[0]
        model = SortformerEncLabelModel.restore_from(str(path), map_location=device)
        # the marker travels beside the file: a random build must keep warning that its speakers mean nothing
        model.random_weights = (path.parent / RANDOM_MARKER).exists()
    else:
        model = SortformerEncLabelModel.from_pretrained(name, map_location=device)
    for key, value in STREAMING.items():
        setattr(model.sortformer_modules, key, value)
    model.sortformer_modules.spkcache_refresh_rate = STREAMING["spkcache_update_period"]
    model.streaming_mode = True
    model.async_streaming = True  # per-row cache lengths: rows of different ages share a batch
    return model.to(device).eval()


def make_checkpoint(folder: str | os.PathLike, size: str = "tiny", seed: int = 0) -> Path:
    """Write the RANDOM-WEIGHT Sortformer ``random:<size>`` builds (same seed, same sharpened output layers) as
    ``folder/model.nemo``, with a marker file saying its speakers are meaningless (tests and benchmarks only)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    load_sortformer(f"random:{size}", "cpu", seed).save_to(str(folder / "model.nemo"))
    (folder / RANDOM_MARKER).write_text("random weights: tests and benchmarks only\n")
    return folder


@dataclass(eq=False)
class _Stream:
    sink: DiarizationSink
    window: np.ndarray  # the last window of 16 kHz audio
    state: object  # NeMo's StreamingSortformerState, batch 1
    resampler: StreamResampler = field(default_factory=lambda: StreamResampler(SAMPLE_RATE, RATE))
    pending: list[np.ndarray] = field(default_factory=list)
    pending_samples: int = 0
    frames: int = 0
    closing: bool = False


class SortformerDiarizer:
    """A ``Diarizer`` over a Sortformer model: one worker thread steps every stream with a chunk waiting (see the
    module docstring)."""

    def __init__(self, model, name: str = "sortformer", max_batch: int = 64):
        import torch

        self.model, self.torch, self.max_batch = model, torch, max_batch
        modules = model.sortformer_modules
        self.chunk_frames = modules.chunk_len
        self.frame_samples = modules.subsampling_factor * int(model._cfg.preprocessor.window_stride * RATE)
        self.chunk_samples = self.chunk_frames * self.frame_samples
        self.hop = int(model._cfg.preprocessor.window_stride * RATE)
        self.feature_frames = self.chunk_frames * modules.subsampling_factor + LEFT_OFFSET + RIGHT_OFFSET
        self.window_samples = self.feature_frames * self.hop
        self.info = DiarizerInfo(name=name, speakers=modules.n_spk, frame_seconds=self.frame_samples / RATE,
                                 chunk_frames=self.chunk_frames, offset_seconds=-RIGHT_OFFSET * self.hop / RATE,
                                 random_weights=getattr(model, "random_weights", False))
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="kyutai-stt-diarizer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the contract (any thread)
    def open(self, sink: DiarizationSink) -> int:
        state = self.model.sortformer_modules.init_streaming_state(batch_size=1, async_streaming=True,
                                                                   device=self.model.device)
        with self._lock:
            handle = next(self._ids)
            self._streams[handle] = _Stream(sink, np.zeros(self.window_samples, np.float32), state)
            return handle

    def push(self, handle: int, pcm: np.ndarray) -> None:
        with self._lock:
            stream = self._streams.get(handle)
            if stream is None or stream.closing:
                return
            self._add(stream, stream.resampler.feed(np.asarray(pcm, np.float32)))

    def close(self, handle: int) -> None:
        """No more audio: the rest is padded with silence (the right context, then to a whole chunk)."""
        with self._lock:
            stream = self._streams.get(handle)
            if stream is None or stream.closing:
                return
            self._add(stream, stream.resampler.flush())
            pad = RIGHT_OFFSET * self.hop
            pad += -(stream.pending_samples + pad) % self.chunk_samples
            self._add(stream, np.zeros(pad, np.float32))
            stream.closing = True

    def abort(self, handle: int) -> None:
        with self._lock:
            self._streams.pop(handle, None)

    def stop(self) -> None:
        with self._lock:
            self._running = False
            self._lock.notify_all()
        self._thread.join(timeout=10)

    def _add(self, stream: _Stream, pcm: np.ndarray) -> None:
        if pcm.size:
            stream.pending.append(pcm)
            stream.pending_samples += pcm.size
            self._lock.notify_all()

    # ------------------------------------------------------------ the worker
    def _ready(self) -> list[tuple[int, _Stream]]:
        return [(h, s) for h, s in self._streams.items()
                if s.pending_samples >= self.chunk_samples or (s.closing and not s.pending_samples)][:self.max_batch]

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._running and not self._ready():
                    self._lock.wait()
                if not self._running:
                    return
                batch, ends = [], []
                for handle, stream in self._ready():
                    if stream.pending_samples < self.chunk_samples:  # closed and all labelled
                        del self._streams[handle]
                        ends.append(stream)
                        continue
                    audio = np.concatenate(stream.pending)
                    chunk, rest = audio[:self.chunk_samples], audio[self.chunk_samples:]
                    stream.pending, stream.pending_samples = ([rest] if rest.size else []), rest.size
                    stream.window = np.concatenate([stream.window[self.chunk_samples:], chunk])
                    batch.append((handle, stream))
            for stream in ends:
                stream.sink([DiarizationEnd(frames=stream.frames)])
            if batch:
                try:
                    outputs = self.step([stream for _, stream in batch])
                except Exception:  # a bug: the streams lose their speakers, never the server
                    log.exception("diarizer step failed")
                    with self._lock:
                        for handle, _ in batch:
                            self._streams.pop(handle, None)
                    for _, stream in batch:
                        stream.sink([DiarizationEnd(frames=stream.frames)])
                    continue
                for (_, stream), probabilities in zip(batch, outputs):
                    event: DiarizationEvent = SpeakerFrames(first_frame=stream.frames, probabilities=probabilities)
                    stream.frames += len(probabilities)
                    stream.sink([event])

    def step(self, streams: list[_Stream]) -> list[list[list[float]]]:
        """One Sortformer streaming step for ``streams`` (their windows already hold the new chunk): each stream's
        chunk activities, ``[frame][speaker]``; their states are updated."""
        torch = self.torch
        device = self.model.device
        with torch.inference_mode():
            audio = torch.from_numpy(np.stack([s.window for s in streams])).to(device)
            lengths = torch.full((len(streams),), self.window_samples, dtype=torch.long, device=device)
            features, _ = self.model.preprocessor(input_signal=audio, length=lengths)
            features = features[:, :, :self.feature_frames].transpose(1, 2)  # [batch, time, features]
            feature_lengths = torch.full((len(streams),), self.feature_frames, dtype=torch.long, device=device)
            state = _stack([s.state for s in streams])
            total = torch.zeros((len(streams), 0, self.info.speakers), device=device)
            state, preds = self.model.forward_streaming_step(
                processed_signal=features, processed_signal_length=feature_lengths, streaming_state=state,
                total_preds=total, left_offset=LEFT_OFFSET, right_offset=RIGHT_OFFSET)
            for i, stream in enumerate(streams):
                stream.state = _row(state, i)
            return preds[:, -self.chunk_frames:].float().cpu().tolist()


_STATE_FIELDS = ("spkcache", "spkcache_lengths", "spkcache_preds", "fifo", "fifo_lengths", "fifo_preds",
                 "spk_perm", "mean_sil_emb", "n_sil_frames")


def _stack(states: list):
    """Batch-1 states as one batch (rows in order)."""
    import torch
    from nemo.collections.asr.modules.sortformer_modules import StreamingSortformerState

    out = StreamingSortformerState()
    for name in _STATE_FIELDS:
        values = [getattr(s, name) for s in states]
        if all(v is None for v in values):
            continue
        if any(v is None for v in values):
            # a new stream's state lacks what the first step sets (fifo_preds, spk_perm): NeMo's async update
            # rebuilds fifo_preds from its lengths, and spk_perm only serves the synchronous update
            like = next(v for v in values if v is not None)
            values = [torch.zeros_like(like[:1]) if v is None else v for v in values]
        setattr(out, name, values[0] if len(values) == 1 else torch.cat(values, dim=0))
    return out


def _row(state, i: int):
    from nemo.collections.asr.modules.sortformer_modules import StreamingSortformerState

    out = StreamingSortformerState()
    for name in _STATE_FIELDS:
        value = getattr(state, name)
        if value is not None:
            setattr(out, name, value[i:i + 1].clone())
    return out
