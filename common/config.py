"""Paper configs: `config.yaml` = shared profile defaults < the paper's defaults < its profile < --set.

A paper's config.yaml::

    source: configs/trainers/CoOp/rn50.yaml (official)   # where the real-profile values come from
    defaults: {...}        # method options, both profiles
    profiles:
      embedded: {...}      # overrides for the embedded profile (smaller epochs etc., say why)
      real: {...}          # the official hyperparameters

Shared per-profile defaults (backbone, data root, dataset lists, shots, seeds) live in
`common/profiles.yaml` so every paper runs on the same tasks. Keys are dotted for nesting
(`--set train.lr=0.01`); an override of an unknown key is an error that lists the known keys.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

PROFILES = ("embedded", "real")
SHARED_PROFILES = Path(__file__).with_name("profiles.yaml")


def _merge(base: dict, over: dict, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{path}{k}.")
        else:
            out[k] = copy.deepcopy(v)
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ValueError(f"--set {key}: cannot parse value {raw!r}: {err}") from err
    return key.strip(), value


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    flat = _flat(cfg)
    if key not in flat and not any(k.startswith(key + ".") for k in flat):
        close = [k for k in sorted(flat) if key.split(".")[-1] in k][:8]
        raise KeyError(f"unknown config key {key!r}" + (f"; did you mean {close}?" if close else "")
                       + f" Known keys: {', '.join(sorted(flat))}")
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[p]
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping at the top level")
    return data


def load_config(config_path: str | Path, profile: str = "embedded", overrides: list[str] | None = None) -> dict:
    """Resolve a paper's config for `profile`, applying `key=value` overrides."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    raw = read_yaml(config_path)
    unknown = set(raw) - {"source", "defaults", "profiles", "notes"}
    if unknown:
        raise ValueError(f"{config_path}: unknown top-level keys {sorted(unknown)} "
                         f"(expected source, defaults, profiles, notes)")
    shared = read_yaml(SHARED_PROFILES)
    cfg = _merge(shared.get("defaults", {}), shared.get(profile, {}))
    cfg = _merge(cfg, raw.get("defaults", {}))
    cfg = _merge(cfg, (raw.get("profiles") or {}).get(profile, {}))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(cfg, key, value)
    cfg["profile"] = profile
    return cfg


def describe(config_path: str | Path) -> str:
    """Every option with its value per profile (for --help)."""
    rows = []
    per_profile = {p: _flat(load_config(config_path, p)) for p in PROFILES}
    for key in sorted(set().union(*per_profile.values())):
        if key == "profile":
            continue
        vals = [per_profile[p].get(key, "-") for p in PROFILES]
        shown = f"{vals[0]!r}" if vals[0] == vals[1] else "  ".join(f"{p}={v!r}" for p, v in zip(PROFILES, vals))
        rows.append(f"  {key:32s} {shown}")
    return "options (--set key=value):\n" + "\n".join(rows)
