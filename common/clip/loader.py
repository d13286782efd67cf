"""One CLIP loader for every paper: open_clip architectures and tags, local checkpoints, embedded tiny CLIPs.

``load_clip(arch, pretrained)`` never initialises randomly by accident: ``pretrained`` must be an
open_clip tag whose weights are already on disk, a checkpoint path, or the explicit string ``"random"``
(tests only). Missing weights fail at once with one message that says which file, where to put it,
and how to use the embedded profile instead (open_clip itself would retry downloads for a minute).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from .registry import EMBEDDED_ARCHS, register_embedded_configs

register_embedded_configs()

EMBEDDED_HINT = (
    "The embedded profile needs no downloads: `make repro` (or `dvc repro pretrain`) builds the tiny CLIPs "
    "`tiny-rn` / `tiny-vit` under data/embedded/checkpoints/, and every entry point runs on them with "
    "`--profile embedded`."
)


class WeightsNotFoundError(FileNotFoundError):
    """Raised when requested CLIP weights are not available locally."""


@dataclass
class ClipBundle:
    """A loaded CLIP model with what every method needs next to it."""

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    arch: str
    pretrained: str
    checkpoint_id: str  # content hash (file) or "arch:tag": keys every cache built on this model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def is_vit(self) -> bool:
        return hasattr(self.model.visual, "conv1") and hasattr(self.model.visual, "class_embedding")

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)


_HASH_MEMO: dict[tuple, str] = {}


def file_sha256(path: str | Path, length: int = 16) -> str:
    """Content hash of a checkpoint (memoised on path, size and mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key][:length]


def _cached_tag_file(arch: str, tag: str, cache_dir: str | None) -> Path | None:
    """Where open_clip would find the weights of (arch, tag) without a network, or None."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        return None
    if cfg.get("file"):
        return Path(cfg["file"]) if Path(cfg["file"]).is_file() else None
    hub = cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            model_id, filename = os.path.split(hub)
            for fname in ([filename] if filename else ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"]):
                hit = try_to_load_from_cache(model_id, fname, cache_dir=cache_dir)
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit)
    url = cfg.get("url", "")
    if url:
        root = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
        cand = root / os.path.basename(url)
        if cand.is_file():
            return cand
    return None


def _missing_weights_message(arch: str, pretrained: str, cache_dir: str | None) -> str:
    cfg = open_clip.get_pretrained_cfg(arch, pretrained) or {}
    where = cfg.get("hf_hub") or cfg.get("url") or "(unknown source)"
    cache = cache_dir or "~/.cache/huggingface/hub (hf) or ~/.cache/clip (url)"
    return (
        f"CLIP weights for arch={arch!r} pretrained={pretrained!r} are not on this machine and nothing is "
        f"downloaded at run time. Fetch them once from {where} into {cache}, or pass the checkpoint file "
        f"directly with --set pretrained=/path/to/{arch}.pt (OpenAI or open_clip state dict). {EMBEDDED_HINT}"
    )


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read an OpenAI (TorchScript or plain) or open_clip checkpoint into a plain state dict."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # TorchScript archives (OpenAI's released .pt files) and corrupt files
        try:
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception:
            raise ValueError(f"cannot read CLIP checkpoint {path}: {err}") from err
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"CLIP checkpoint {path} holds a {type(obj).__name__}, expected a state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    for k in ("input_resolution", "context_length", "vocab_size"):  # OpenAI JIT extras
        sd.pop(k, None)
    return sd


def load_clip(arch: str, pretrained: str | os.PathLike | None, device: str | torch.device = "cpu",
              precision: str = "fp32", cache_dir: str | None = None, quick_gelu: bool | None = None,
              **model_kwargs: Any) -> ClipBundle:
    """Load a CLIP model with its train/val transforms and tokenizer.

    arch: an open_clip architecture (``ViT-B-16``, ``RN50``, ...) or an embedded one (``tiny-rn``, ``tiny-vit``).
    pretrained: an open_clip tag (``openai``, ``laion2b_s34b_b88k``, ...) already in the local cache, a path to
        a checkpoint (OpenAI or open_clip state dict, or OpenAI TorchScript), or ``"random"`` (tests only).
    precision: ``fp32`` (default, CPU), ``fp16``/``bf16``/``amp`` (CUDA).
    quick_gelu: force QuickGELU (OpenAI weights loaded from a path need it; tags decide it themselves).
    """
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown CLIP architecture {arch!r}; open_clip knows {len(open_clip.list_models())} "
                         f"(e.g. ViT-B-16, RN50) and the embedded ones are {sorted(EMBEDDED_ARCHS)}")
    if pretrained is None or str(pretrained) == "":
        raise ValueError(f"load_clip({arch!r}): `pretrained` is required (a tag, a checkpoint path, or 'random' "
                         f"for an explicitly random model). {EMBEDDED_HINT}")
    if precision not in ("fp32", "fp16", "bf16", "amp"):
        raise ValueError(f"precision must be fp32|fp16|bf16|amp, got {precision!r}")
    if precision != "fp32" and torch.device(device).type != "cuda":
        raise ValueError(f"precision {precision!r} needs a CUDA device; use fp32 on {device}")
    model_precision = "fp32" if precision == "amp" else precision
    pretrained = str(pretrained)
    force_qg = bool(quick_gelu) if quick_gelu is not None else False

    if pretrained == "random":
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            arch, pretrained=None, precision=model_precision, device=device, force_quick_gelu=force_qg, **model_kwargs)
        ckpt_id = f"{arch}:random"
    elif Path(pretrained).suffix or os.sep in pretrained or Path(pretrained).exists():
        path = Path(pretrained)
        if not path.is_file():
            raise WeightsNotFoundError(
                f"CLIP checkpoint file {path} does not exist (arch={arch!r}). "
                + (f"Build it with `dvc repro pretrain`. " if arch in EMBEDDED_ARCHS else "")
                + EMBEDDED_HINT)
        with _weights_loaded_next():
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                arch, pretrained=None, precision="fp32", device="cpu", force_quick_gelu=force_qg, **model_kwargs)
        state = _load_state_dict(path)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"checkpoint {path} does not match arch {arch!r}: {str(err).splitlines()[-1].strip()}") from err
        missing = [k for k in missing if k != "attn_mask"]
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match arch {arch!r}: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
        model = _to_precision(model.to(device), model_precision)
        ckpt_id = file_sha256(path)
    else:
        if pretrained not in open_clip.list_pretrained_tags_by_model(arch):
            raise ValueError(f"unknown pretrained tag {pretrained!r} for {arch!r}; known: "
                             f"{open_clip.list_pretrained_tags_by_model(arch)} (or give a checkpoint path)")
        if _cached_tag_file(arch, pretrained, cache_dir) is None:
            raise WeightsNotFoundError(_missing_weights_message(arch, pretrained, cache_dir))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, precision=model_precision, device=device, cache_dir=cache_dir,
            **model_kwargs)
        ckpt_id = f"{arch}:{pretrained}"

    model.eval()
    for p in model.parameters():  # frozen by default; methods unfreeze what they train
        p.requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(arch)
    return ClipBundle(model, pre_train, pre_val, tokenizer, arch, pretrained, ckpt_id)


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _weights_loaded_next():
    """open_clip warns that a model built without a tag is "initialized randomly"; when the checkpoint file is
    loaded right after, that warning is wrong, so it is dropped (its other messages pass)."""
    root, notice = logging.getLogger(), _DropRandomInitNotice()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _to_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    if precision == "fp16":
        open_clip.model.convert_weights_to_lp(model, dtype=torch.float16)
    elif precision == "bf16":
        open_clip.model.convert_weights_to_lp(model, dtype=torch.bfloat16)
    return model


def save_clip_checkpoint(model: torch.nn.Module, path: str | Path) -> Path:
    """Save a CLIP state dict in OpenAI/open_clip naming (what `load_clip(arch, path)` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "attn_mask"}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    return path
