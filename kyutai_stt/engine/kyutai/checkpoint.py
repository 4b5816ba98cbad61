"""Loading a Kyutai STT checkpoint (Hugging Face repo or local directory in the same layout).

A checkpoint is a folder with ``config.json`` (the LM config plus ``stt_config``, ``moshi_name``, ``mimi_name``,
``tokenizer_name``), the LM weights, the Mimi weights and a sentencepiece tokenizer. ``kyutai_stt.engine.kyutai.testing_checkpoint``
writes random-weight checkpoints in that layout for tests and benchmarks.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch

from moshi.models import LMModel, MimiModel, loaders

from kyutai_stt.audio.constants import FRAME_RATE
from kyutai_stt.engine.contract import ModelLoadError

log = logging.getLogger(__name__)


class CheckpointError(ModelLoadError):
    """The checkpoint could not be found, downloaded or loaded; the message says what to do."""


@dataclass
class SttModel:
    """Everything the engine needs: Mimi, the LM, the tokenizer and the STT timing constants."""

    name: str
    mimi: MimiModel
    lm: LMModel
    tokenizer: sentencepiece.SentencePieceProcessor
    audio_delay_seconds: float
    audio_silence_prefix_seconds: float
    device: torch.device
    dtype: torch.dtype
    random_weights: bool = False

    @property
    def delay_frames(self) -> int:
        return round(self.audio_delay_seconds * FRAME_RATE)

    @property
    def prefix_frames(self) -> int:
        return round(self.audio_silence_prefix_seconds * FRAME_RATE)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16, "float32": torch.float32, "fp32": torch.float32}[dtype]
    except KeyError:
        raise CheckpointError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32") from None


def _local_checkpoint_info(folder: Path) -> loaders.CheckpointInfo:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: it is not a Kyutai STT checkpoint folder.")
    config = json.loads(config_path.read_text())
    files = {}
    for key, default in (("moshi_name", loaders.MOSHI_NAME), ("mimi_name", loaders.MIMI_NAME),
                         ("tokenizer_name", loaders.TEXT_TOKENIZER_NAME)):
        path = folder / config.get(key, default)
        if not path.is_file():
            raise CheckpointError(f"{folder}: config.json names {key}={path.name}, which is missing.")
        files[key] = path
    return loaders.CheckpointInfo.from_hf_repo(
        str(folder),
        moshi_weights=files["moshi_name"],
        mimi_weights=files["mimi_name"],
        tokenizer=files["tokenizer_name"],
        config_path=config_path,
    )


_NO_HUB_HINT = ("If the hub cannot be reached from this machine, download the repository elsewhere and pass "
                "--model /path/to/folder (config.json, the LM weights, the Mimi weights and the tokenizer), "
                "or make a random-weight test checkpoint with `kyutai-stt make-checkpoint DIR`.")


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the hub's host cannot be reached (one TCP connection, a few seconds at most), or None when it can.

    huggingface_hub retries a failed request five times with backoff (about a minute, a warning per try), so an
    unreachable hub is told apart first."""
    import socket
    from urllib.parse import urlsplit

    import huggingface_hub.constants as hf_constants

    url = urlsplit(hf_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as exc:
        return f"cannot reach {url.scheme}://{url.hostname} ({exc.strerror or exc})"
    return None


def _hub_checkpoint_info(repo: str) -> loaders.CheckpointInfo:
    import huggingface_hub.constants as hf_constants

    offline = hf_constants.HF_HUB_OFFLINE
    try:  # already in the local cache: no network at all
        hf_constants.HF_HUB_OFFLINE = True
        with warnings.catch_warnings():  # moshi warns when config.json is not cached; we then fetch it
            warnings.simplefilter("ignore")
            return loaders.CheckpointInfo.from_hf_repo(repo)
    except Exception:  # not (completely) cached
        if offline:
            raise CheckpointError(f"{repo!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
                                  + _NO_HUB_HINT) from None
    finally:
        hf_constants.HF_HUB_OFFLINE = offline
    why = _hub_unreachable()
    if why is not None:
        raise CheckpointError(f"could not get {repo!r}: {why}, and it is not in the local cache. {_NO_HUB_HINT}")
    try:
        import hf_transfer  # noqa: F401

        hf_constants.HF_HUB_ENABLE_HF_TRANSFER = True
        how = "with hf_transfer"
    except ImportError:
        how = "without hf_transfer"
    log.info("fetching %s from the Hugging Face Hub (%s; cached after the first download)", repo, how)
    retries = logging.getLogger("huggingface_hub.utils._http")
    level = retries.level
    retries.setLevel(logging.ERROR)  # a warning per retry, with the whole exception: the final error says it all
    try:
        return loaders.CheckpointInfo.from_hf_repo(repo)
    except Exception as exc:  # the hub raises many kinds: connection, 404, offline mode...
        raise CheckpointError(
            f"could not get {repo!r} from the Hugging Face Hub ({type(exc).__name__}: {str(exc)[:300]}). "
            + _NO_HUB_HINT) from exc
    finally:
        retries.setLevel(level)


def load_model(model: str, device: str = "auto", dtype: str = "auto") -> SttModel:
    """Load Mimi, the LM and the tokenizer from a Hugging Face repo id or a local checkpoint folder."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    folder = Path(model).expanduser()
    if folder.exists():
        info = _local_checkpoint_info(folder)
    elif model.count("/") == 1 and not model.startswith((".", "/")):
        info = _hub_checkpoint_info(model)
    else:
        raise CheckpointError(f"--model {model!r} is neither a local folder nor a Hugging Face repo id (owner/name).")

    if info.model_type != "stt":
        log.warning("%s declares model_type=%r, not 'stt'", model, info.model_type)
    lm_config = info.lm_config or {}
    if lm_config.get("dep_q", 0) != 0:
        raise CheckpointError(f"{model} has a depformer (dep_q={lm_config.get('dep_q')}): not an STT model.")
    try:
        mimi = info.get_mimi(device=torch_device)
        lm = info.get_moshi(device=torch_device, dtype=torch_dtype)
        tokenizer = info.get_text_tokenizer()
    except (RuntimeError, OSError, KeyError) as exc:
        raise CheckpointError(f"could not load the weights of {model}: {exc}") from exc
    stt = info.stt_config or {}
    return SttModel(
        name=model,
        mimi=mimi,
        lm=lm,
        tokenizer=tokenizer,
        audio_delay_seconds=float(stt.get("audio_delay_seconds", 0.0)),
        audio_silence_prefix_seconds=float(stt.get("audio_silence_prefix_seconds", 0.0)),
        device=torch_device,
        dtype=torch_dtype,
        random_weights=bool((info.model_id or {}).get("kyutai_stt_random_weights", False)),
    )
