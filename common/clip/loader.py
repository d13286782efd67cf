"""One CLIP loader for every paper: open_clip architectures and tags, local checkpoints, embedded tiny CLIPs.

``load_clip(arch, pretrained)`` never initialises randomly by accident: ``pretrained`` must be an
open_clip tag whose weights are already on disk, a checkpoint path, or the explicit string ``"random"``
(tests only). Missing weights fail at once with one message that says which file, where to put it,
and how to use the embedded profile instead (open_clip itself would retry downloads for a minute).

OpenAI's weights were trained with QuickGELU while open_clip's plain ``ViT-B-16`` / ``RN50`` configs build GELU:
the loader builds QuickGELU for the ``openai`` tag and for files in OpenAI's format (see ``load_clip``). A ready
CLIP module (a user's own fine-tuned model) is accepted in place of an arch name.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch

from ..atomic import torch_save_atomic
from ..errors import ConfigError, UserError, one_line
from .registry import EMBEDDED_ARCHS, register_embedded_configs

register_embedded_configs()

EMBEDDED_HINT = (
    "The embedded profile needs no downloads: `make repro` (or `dvc repro pretrain`) builds the tiny CLIPs "
    "`tiny-rn` / `tiny-vit` under data/embedded/checkpoints/, and every entry point runs on them with "
    "`--profile embedded`."
)


class WeightsNotFoundError(UserError, FileNotFoundError):
    """Raised when requested CLIP weights are not available locally."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read or does not fit the arch."""


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


# Keys OpenAI's CLIP files carry beside the weights (TorchScript attributes); open_clip's own files lack them.
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
# What the methods use of a CLIP module (the text encoder from embeddings, hooks, zero-shot head).
CLIP_PARTS = ("visual", "encode_image", "encode_text", "token_embedding", "positional_embedding", "transformer",
              "ln_final", "text_projection", "logit_scale")


def _load_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read an OpenAI (TorchScript or plain) or open_clip checkpoint into a plain state dict, and say whether it
    is in OpenAI's format: a TorchScript archive (OpenAI's released .pt files) or a state dict with OpenAI's
    extra keys. OpenAI trained with QuickGELU, so such weights need it whatever the arch's open_clip config says."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        scripted = False
    except Exception as err:  # TorchScript archives (OpenAI's released .pt files) and corrupt files
        try:
            obj, scripted = torch.jit.load(str(path), map_location="cpu").state_dict(), True
        except Exception:
            raise CheckpointError(f"cannot read CLIP checkpoint {path}: {one_line(str(err))[:300]}") from err
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"CLIP checkpoint {path} holds a {type(obj).__name__}, expected a state dict")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    openai_format = scripted or any(k in sd for k in OPENAI_EXTRAS)
    for k in (*OPENAI_EXTRAS, "attn_mask"):  # the mask is computed, never learned (traced models store it)
        sd.pop(k, None)
    return sd, openai_format


def _is_path(pretrained: str) -> bool:
    return bool(Path(pretrained).suffix) or os.sep in pretrained or Path(pretrained).exists()


def check_weights(arch: str, pretrained: str | os.PathLike | None, cache_dir: str | None = None) -> str:
    """Everything `load_clip` would refuse, found without building the model: an unknown arch or tag, a missing
    checkpoint file or uncached tag weights. Returns how the weights will be read: "random", "file" or "tag"."""
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(str(arch), open_clip.list_models(), n=3)
        raise ConfigError(f"unknown CLIP architecture {arch!r}"
                          + (f" (did you mean {', '.join(close)}?)" if close else "")
                          + f"; open_clip knows {len(open_clip.list_models())} (e.g. ViT-B-16, RN50) and the embedded "
                            f"ones are {sorted(EMBEDDED_ARCHS)}")
    if pretrained is None or str(pretrained) == "":
        raise ConfigError(f"load_clip({arch!r}): `pretrained` is required (a tag, a checkpoint path, or 'random' "
                          f"for an explicitly random model). {EMBEDDED_HINT}")
    pretrained = str(pretrained)
    if pretrained == "random":
        return "random"
    if _is_path(pretrained):
        if not Path(pretrained).is_file():
            raise WeightsNotFoundError(
                f"CLIP checkpoint file {pretrained} does not exist (arch={arch!r}). "
                + ("Build it with `dvc repro pretrain`. " if arch in EMBEDDED_ARCHS else "")
                + EMBEDDED_HINT)
        return "file"
    if pretrained not in open_clip.list_pretrained_tags_by_model(arch):
        raise ConfigError(f"unknown pretrained tag {pretrained!r} for {arch!r}; known: "
                          f"{open_clip.list_pretrained_tags_by_model(arch)} (or give a checkpoint path)")
    if _cached_tag_file(arch, pretrained, cache_dir) is None:
        raise WeightsNotFoundError(_missing_weights_message(arch, pretrained, cache_dir))
    return "tag"


def _check_precision(precision: str, device) -> None:
    if precision not in ("fp32", "fp16", "bf16", "amp"):
        raise ConfigError(f"precision must be fp32|fp16|bf16|amp, got {precision!r}")
    if precision != "fp32" and torch.device(device).type != "cuda":
        raise ConfigError(f"precision {precision!r} needs a CUDA device; use fp32 on {device}")


def _arch_quick_gelu(arch: str) -> bool:
    return bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))


def load_clip(arch: str | torch.nn.Module, pretrained: str | os.PathLike | None = None,
              device: str | torch.device | None = None, precision: str = "fp32", cache_dir: str | None = None,
              quick_gelu: bool | None = None, **model_kwargs: Any) -> ClipBundle:
    """Load a CLIP model with its train/val transforms and tokenizer.

    arch: an open_clip architecture (``ViT-B-16``, ``RN50``, ...), an embedded one (``tiny-rn``, ``tiny-vit``), or
        a ready CLIP module (e.g. a user's own fine-tuned open_clip ``CLIP``; ``pretrained`` is then an optional
        label for it). A module is frozen, put in eval mode and moved to ``device`` if one is given.
    pretrained: an open_clip tag (``openai``, ``laion2b_s34b_b88k``, ...) already in the local cache, a path to
        a checkpoint (OpenAI or open_clip state dict, or OpenAI TorchScript), or ``"random"`` (tests only).
    precision: ``fp32`` (default, CPU), ``fp16``/``bf16``/``amp`` (CUDA).
    quick_gelu: None (default) builds the activation the weights were trained with: QuickGELU for OpenAI weights
        (the ``openai`` tag, or a file in OpenAI's format: TorchScript or with OpenAI's extra keys), else the
        arch's own config (``ViT-B-16`` is GELU, ``ViT-B-16-quickgelu`` and the embedded archs QuickGELU).
        True forces QuickGELU; False leaves the arch's config alone.
    """
    if isinstance(arch, torch.nn.Module):
        return _bundle_of_module(arch, pretrained, device, precision)
    device = device if device is not None else "cpu"
    _check_precision(precision, device)
    kind = check_weights(arch, pretrained, cache_dir)
    model_precision = "fp32" if precision == "amp" else precision
    pretrained = str(pretrained)

    if kind == "random":
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            arch, pretrained=None, precision=model_precision, device=device, force_quick_gelu=bool(quick_gelu),
            **model_kwargs)
        ckpt_id = f"{arch}:random"
    elif kind == "file":
        path = Path(pretrained)
        state, openai_format = _load_state_dict(path)
        force_qg = openai_format if quick_gelu is None else quick_gelu
        if force_qg and not _arch_quick_gelu(arch) and quick_gelu is None:
            print(f"load_clip: {path} holds OpenAI-format weights: building {arch} with QuickGELU, as OpenAI "
                  f"trained it", file=sys.stderr)
        with _weights_loaded_next():
            model, pre_train, pre_val = open_clip.create_model_and_transforms(
                arch, pretrained=None, precision="fp32", device="cpu", force_quick_gelu=force_qg, **model_kwargs)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise CheckpointError(f"checkpoint {path} does not match arch {arch!r}: "
                                  f"{str(err).splitlines()[-1].strip()}") from err
        missing = [k for k in missing if k != "attn_mask"]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {path} does not match arch {arch!r}: missing {missing[:5]}"
                                  f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                                  f"{'...' if len(unexpected) > 5 else ''}")
        model = _to_precision(model.to(device), model_precision)
        # the activation is part of the model: a QuickGELU build of a file gets its own id (and caches)
        ckpt_id = file_sha256(path) + ("+quickgelu" if force_qg and not _arch_quick_gelu(arch) else "")
    else:
        tag_qg = bool(open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu", False))
        force_qg = tag_qg if quick_gelu is None else quick_gelu
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained, precision=model_precision, device=device, cache_dir=cache_dir,
            force_quick_gelu=force_qg, **model_kwargs)
        ckpt_id = f"{arch}:{pretrained}" + ("+quickgelu" if force_qg and not _arch_quick_gelu(arch) else "")

    _freeze(model)
    tokenizer = open_clip.get_tokenizer(arch)
    return ClipBundle(model, pre_train, pre_val, tokenizer, arch, pretrained, ckpt_id)


def _freeze(model: torch.nn.Module) -> None:
    model.eval()
    for p in model.parameters():  # frozen by default; methods unfreeze what they train
        p.requires_grad_(False)


def state_dict_sha256(model: torch.nn.Module, length: int = 16) -> str:
    """Content hash of a module's weights (names, dtypes, shapes, values): keys caches of a ready model."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]


def _bundle_of_module(model: torch.nn.Module, label: str | os.PathLike | None, device, precision: str) -> ClipBundle:
    """A ClipBundle around a ready CLIP module: transforms from its preprocess config (OpenAI's by default), the
    OpenAI BPE tokenizer at its context length, and an id from its weights' content."""
    lacking = [a for a in CLIP_PARTS if not hasattr(model, a)]
    if lacking:
        raise ConfigError(f"load_clip: a ready model must be an open_clip CLIP (with {', '.join(CLIP_PARTS)}); "
                          f"this {type(model).__name__} lacks {', '.join(lacking)}")
    if device is not None:
        model = model.to(device)
    _check_precision(precision, next(model.parameters()).device)
    model = _to_precision(model, "fp32" if precision == "amp" else precision)
    _freeze(model)
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    pp = PreprocessCfg(**merge_preprocess_dict(PreprocessCfg(), open_clip.get_model_preprocess_cfg(model)))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=int(model.context_length))
    name = f"module-{type(model).__name__}"
    return ClipBundle(model, image_transform_v2(pp, is_train=True), image_transform_v2(pp, is_train=False), tokenizer,
                      name, str(label) if label is not None else "module", f"module:{state_dict_sha256(model)}")


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
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "attn_mask"}
    return torch_save_atomic(state, path)
