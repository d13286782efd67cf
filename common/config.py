"""Paper configs: `config.yaml` = shared profile defaults < the paper's defaults < its profile < --set.

A paper's config.yaml::

    source: configs/trainers/CoOp/rn50.yaml (official)   # where the real-profile values come from
    defaults: {...}        # method options, both profiles
    profiles:
      embedded: {...}      # overrides for the embedded profile (smaller epochs etc., say why)
      real: {...}          # the official hyperparameters
    unused: {key: why}     # shared options this paper does not read: `--set key=...` is refused with `why`
    accepts: {key: example} # an option that also takes another shape than its default (e.g. a list), by example

Shared per-profile defaults (backbone, data root, dataset lists, shots, seeds) live in
`common/profiles.yaml` so every paper runs on the same tasks. Keys are dotted for nesting
(`--set train.lr=0.01`); an override of an unknown key is an error with the closest keys, and every
override is type-checked against the option's shipped values (`common.validate` then checks ranges).
"""
from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, UnknownNameError, one_line

PROFILES = ("embedded", "real")
SHARED_PROFILES = Path(__file__).with_name("profiles.yaml")
TOP_LEVEL = {"source", "defaults", "profiles", "notes", "unused", "accepts"}


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


NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value parsed as YAML). Numbers as users type them (`1e-3`, which YAML 1.1 reads as a
    string) are converted later, against the type of the option they set (see `coerce`)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {one_line(str(err))}") from err
    return key.strip(), value


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "int" if isinstance(v, int) else "float"
    return {str: "str", list: "list", dict: "dict"}.get(type(v), type(v).__name__)


def _as(kind: str, v: Any, raw: Any) -> tuple[bool, Any]:
    """(ok, v converted to `kind`): ints are floats where a float is expected, a number typed as `1e-3` is a
    number, a whole float is an int where an int is expected, and a string option keeps what was typed."""
    if isinstance(v, str) and kind in ("int", "float") and NUMBER.match(v.strip()):
        v = float(v) if kind == "float" or not re.fullmatch(r"[+-]?\d+", v.strip()) else int(v)
    have = _kind(v)
    if have == kind:
        return True, v
    if kind == "float" and have == "int":
        return True, float(v)
    if kind == "int" and have == "float" and float(v).is_integer():
        return True, int(v)
    if kind == "str" and have in ("int", "float", "bool"):
        return True, str(raw if isinstance(raw, str) else v)
    return False, v


def coerce(key: str, value: Any, refs: list[Any], raw: Any = None) -> Any:
    """`value` checked and converted against `refs`, the option's values in the shipped config (this profile's
    first, then the other profile's, then the paper's `accepts` example). None is allowed only where a profile has
    it; an option that is None in both takes any value (its paper's `validate` checks it). A single value where a
    list is expected is a one-item list; a mapping replaces the mapping it sets (`--set train.lr=...` changes one
    entry), its known entries checked."""
    raw = value if raw is None else raw
    known = [r for r in refs if r is not None]
    if not known:
        return float(value) if isinstance(value, str) and NUMBER.match(value.strip()) else value
    if value is None:
        if any(r is None for r in refs):
            return None
        raise ConfigError(f"{key}: null is not allowed here; expected {_describe_kind(known[0])} "
                          f"(like {_show(known[0])})")
    for ref in sorted(known, key=lambda r: isinstance(r, str)):  # a typed number is a number before it is text
        kind = _kind(ref)
        if kind == "list":
            items = value if isinstance(value, list) else [value]
            if not ref:  # an empty default list says nothing about its items
                return items
            return [coerce(f"{key}[{i}]", item, [ref[0]]) for i, item in enumerate(items)]
        if kind == "dict":
            if not isinstance(value, dict):
                continue
            return {k: coerce(f"{key}.{k}", v, [ref.get(k)]) for k, v in value.items()}
        ok, out = _as(kind, value, raw)
        if ok:
            return out
    wanted = " or ".join(dict.fromkeys(_describe_kind(r) for r in known))
    raise ConfigError(f"{key}: expected {wanted} (like {_show(known[0])}), got {raw!r}")


def _describe_kind(v: Any) -> str:
    return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
            "list": "a list", "dict": "a mapping"}.get(_kind(v), _kind(v))


def _show(v: Any) -> str:
    """A shipped value as a user would type it (a mapping by its first keys)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: ..." for k in list(v)[:3]) + (", ..." if len(v) > 3 else "") + "}"
    return json.dumps(v, default=str)


def set_dotted(cfg: dict, key: str, value: Any, shipped: list[Any] | None = None, raw: Any = None) -> None:
    """Set `key` (dotted for nesting) to `value`, type-checked against the option's `shipped` values (see `coerce`)."""
    flat = _flat(cfg)
    if key not in flat and not any(k.startswith(key + ".") for k in flat):
        close = difflib.get_close_matches(key, sorted(flat), n=3, cutoff=0.6) or \
            [k for k in sorted(flat) if key.split(".")[-1] in k][:3]
        raise UnknownNameError(f"unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                              + " (--help lists every option)")
    node = cfg
    parts = key.split(".")
    for p in parts[:-1]:
        node = node[p]
    if shipped is not None:
        value = coerce(key, value, shipped, raw)
    node[parts[-1]] = value


def _lookup(cfg: dict, key: str) -> Any:
    node: Any = cfg
    for p in key.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    return node


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {one_line(str(err))}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def _resolve(raw: dict, shared: dict, profile: str) -> dict:
    cfg = _merge(shared.get("defaults", {}), shared.get(profile, {}))
    cfg = _merge(cfg, raw.get("defaults", {}))
    return _merge(cfg, (raw.get("profiles") or {}).get(profile, {}))


def read_paper_config(config_path: str | Path) -> dict:
    raw = read_yaml(config_path)
    unknown = set(raw) - TOP_LEVEL
    if unknown:
        raise ConfigError(f"{config_path}: unknown top-level keys {sorted(unknown)} "
                          f"(expected {', '.join(sorted(TOP_LEVEL))})")
    return raw


def load_config(config_path: str | Path, profile: str = "embedded", overrides: list[str] | None = None) -> dict:
    """Resolve a paper's config for `profile`, applying `key=value` overrides (type-checked against the shipped
    values of both profiles; keys the paper lists under `unused` are refused with the reason)."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; expected one of {PROFILES}")
    raw = read_paper_config(config_path)
    shared = read_yaml(SHARED_PROFILES)
    bases = {p: _resolve(raw, shared, p) for p in PROFILES}
    cfg = copy.deepcopy(bases[profile])
    order = [profile] + [p for p in PROFILES if p != profile]
    unused, accepts = raw.get("unused") or {}, raw.get("accepts") or {}
    for item in overrides or []:
        key, value = parse_override(item)
        top = key.split(".")[0]
        if key in unused or top in unused:
            why = unused.get(key, unused.get(top))
            raise ConfigError(f"--set {key}: this paper does not use {key!r}: {why}")
        shipped = [_lookup(bases[p], key) for p in order] + ([accepts[key]] if key in accepts else [])
        set_dotted(cfg, key, value, shipped, item.split("=", 1)[1])
    cfg["profile"] = profile
    return cfg


def describe(config_path: str | Path) -> str:
    """Every option with its value per profile (for --help)."""
    rows = []
    unused = read_paper_config(config_path).get("unused") or {}
    per_profile = {p: _flat(load_config(config_path, p)) for p in PROFILES}
    for key in sorted(set().union(*per_profile.values())):
        if key == "profile" or key.split(".")[0] in unused:
            continue
        vals = [per_profile[p].get(key, "-") for p in PROFILES]
        shown = f"{vals[0]!r}" if vals[0] == vals[1] else "  ".join(f"{p}={v!r}" for p, v in zip(PROFILES, vals))
        rows.append(f"  {key:32s} {shown}")
    return ("options (--set key=value; a number as you type it, a list as [a, b], one value for a one-item list;\n"
            "force=true reruns finished runs and restarts interrupted ones from scratch):\n" + "\n".join(rows))
