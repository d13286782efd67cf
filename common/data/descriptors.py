"""Class descriptor files: the JSON formats CuPL and VCD publish, read and matched to a dataset's classes.

Both are one JSON object per dataset, ``{class name: [text, ...]}``:
- ``cupl``: full sentences, each a CLIP text input as it is ("A platypus looks like a beaver with a duck's
  bill."; sarahpratt/CuPL ``all_prompts/full_prompts/<name>_prompts_full.json``);
- ``vcd``: short descriptor phrases, turned into sentences by the method ("a duck's bill";
  sachit-menon/classify_by_description_release ``descriptors/descriptors_<name>.json``).
The embedded world writes the same formats for its sets (``Dataset.meta["descriptors"]``).

The authors' keys are their own class names (case, underscores, renamings and order differ from the
dataset's), so classes are matched **by name**, never by position: case, ``_`` and ``-`` are ignored, and
``ALIASES`` (plus a run's own ``aliases``) maps the names that differ in words (Caltech101's "face" is
CuPL's "off-center face"). A dataset class name that repeats (CLIP's ImageNet names "missile",
"sunglasses") is resolved by position only where the file lists exactly one key per class. Every problem
is a one-line user error naming the file, the classes and the fix: a missing file, bad JSON, a value that
is not a list of strings, an empty list (unless the method allows it), classes the file lacks (with the
closest unused keys), and, when ``strict``, keys that name no class.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import ConfigError, InvalidDataError, MissingDataError

KINDS = ("cupl", "vcd")
FORMATS = {"cupl": "{class name: [full sentence, ...]}", "vcd": "{class name: [descriptor phrase, ...]}"}

# The authors' file for each dataset of this project's registry (what a folder given as `descriptors` holds).
AUTHOR_FILES: dict[str, dict[str, str]] = {
    "cupl": {  # sarahpratt/CuPL all_prompts/full_prompts/ (ImageNet: imagenet_prompts/CuPL_image_prompts.json)
        "imagenet": "CuPL_image_prompts.json", "dtd": "texture_prompts_full.json",
        "stanford_cars": "cars_prompts_full.json", "sun397": "sun_prompts_full.json",
        "food101": "food_prompts_full.json", "fgvc_aircraft": "airplane_prompts_full.json",
        "oxford_pets": "pets_prompts_full.json", "caltech101": "cal_prompts_full.json",
        "oxford_flowers": "flower_prompts_full.json", "ucf101": "ucf_prompts_full.json",
    },
    "vcd": {  # sachit-menon/classify_by_description_release descriptors/
        "imagenet": "descriptors_imagenet.json", "imagenetv2": "descriptors_imagenet.json",
        "dtd": "descriptors_dtd.json", "eurosat": "descriptors_eurosat.json", "food101": "descriptors_food101.json",
        "oxford_pets": "descriptors_pets.json",
    },
}
WHERE = {"cupl": "github.com/sarahpratt/CuPL (all_prompts/full_prompts/)",
         "vcd": "github.com/sachit-menon/classify_by_description_release (descriptors/)"}

# dataset -> {our class name: the authors' key}, for names that differ in words (case/_/- are ignored anyway).
ALIASES: dict[str, dict[str, dict[str, str]]] = {
    "cupl": {
        # CuPL's Caltech keys are CLIP's Caltech101 names; CoOp's split names (ours) come from the folders.
        "caltech101": {"face": "off-center face", "car side": "side of a car", "cougar body": "body of a cougar cat",
                       "cougar face": "face of a cougar cat", "crocodile head": "head of a crocodile",
                       "flamingo head": "head of a flamingo", "snoopy": "snoopy (cartoon beagle)",
                       "yin yang": "yin and yang symbol"},
    },
    "vcd": {
        # VCD renamed EuroSAT's classes (descriptors_eurosat.json); ours are CoOp's renaming.
        "eurosat": {"Herbaceous Vegetation Land": "brushland or shrubland",
                    "Industrial Buildings": "industrial buildings or commercial buildings",
                    "Residential Buildings": "residential buildings or homes or apartments",
                    "Sea or Lake": "lake or sea"},
    },
}


def name_key(name: str) -> str:
    """A class name as matching sees it: case-folded, `_`/`-`/whitespace runs as one space."""
    return re.sub(r"[\s_\-]+", " ", str(name).casefold()).strip()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"descriptor kind must be one of {KINDS}, got {kind!r}")


def read_descriptor_file(path: str | Path, kind: str) -> dict[str, list[str]]:
    """The file as ``{key: [text, ...]}`` in file order; a clear error for anything that is not that format."""
    _check_kind(kind)
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"{kind} descriptor file {path} does not exist; give the path of a JSON file "
                               f"{FORMATS[kind]} (the authors' files: {WHERE[kind]})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InvalidDataError(f"{kind} descriptor file {path} is not UTF-8 text ({err.reason}); it must be a JSON "
                               f"file {FORMATS[kind]}") from err
    except json.JSONDecodeError as err:
        raise InvalidDataError(f"{kind} descriptor file {path} is not valid JSON (line {err.lineno}, column "
                               f"{err.colno}: {err.msg}); it must be {FORMATS[kind]}") from err
    if not isinstance(data, dict):
        raise InvalidDataError(f"{kind} descriptor file {path} holds a JSON {type(data).__name__}, not an object "
                               f"{FORMATS[kind]}")
    if not data:
        raise InvalidDataError(f"{kind} descriptor file {path} is an empty JSON object: it lists no class")
    bad = [k for k, v in data.items() if not (isinstance(v, list) and all(isinstance(t, str) for t in v))]
    if bad:
        raise InvalidDataError(f"{kind} descriptor file {path}: the value of {len(bad)} key(s) is not a list of "
                               f"strings (e.g. {bad[0]!r}: {str(data[bad[0]])[:60]!r}); the format is {FORMATS[kind]}")
    return {str(k): list(v) for k, v in data.items()}


def file_digest(path: str | Path) -> str:
    """Short content hash of a descriptor file (recorded with every run that used it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@dataclass(frozen=True)
class ClassTexts:
    """The texts of each class of a dataset, in label order, as matched in one descriptor file."""

    path: str
    kind: str
    classnames: list[str]
    keys: list[str]                     # the file's key used for each class
    texts: list[list[str]]              # per class, in file order (may be empty where allowed)
    unused: list[str] = field(default_factory=list)      # file keys that name no class of the dataset
    empty: list[str] = field(default_factory=list)       # classes whose list is empty in the file
    notes: list[str] = field(default_factory=list)       # how repeated class names were resolved, ...
    digest: str = ""

    @property
    def counts(self) -> list[int]:
        return [len(t) for t in self.texts]


def match_classes(data: Mapping[str, Sequence[str]], classnames: Sequence[str], *, kind: str, path: str = "<file>",
                  dataset: str = "", aliases: Mapping[str, str] | None = None, allow_empty: bool = False,
                  strict: bool = False) -> ClassTexts:
    """Match the file's keys to `classnames` by name (see the module doc); raise a user error naming what fails."""
    _check_kind(kind)
    where = f"{kind} descriptor file {path}" + (f" for dataset {dataset}" if dataset else "")
    by_key: dict[str, list[str]] = {}
    for k in data:
        by_key.setdefault(name_key(k), []).append(k)
    alias = {name_key(c): k for c, k in {**ALIASES.get(kind, {}).get(dataset, {}), **(aliases or {})}.items()}
    user = {name_key(c) for c in (aliases or {})}
    ours = {name_key(c) for c in classnames}
    bad_alias = sorted(c for c in (aliases or {}) if name_key(c) not in ours)
    if bad_alias:
        raise ConfigError(f"aliases for {dataset or 'this dataset'} name unknown class(es) {bad_alias}; its classes "
                          f"are e.g. {list(classnames)[:5]}")
    missing_keys = sorted({k for c, k in (aliases or {}).items() if k not in data})
    if missing_keys:
        raise ConfigError(f"aliases for {dataset or 'this dataset'} map to key(s) {missing_keys} that {where} lacks")
    seen: dict[str, int] = {}
    for c in classnames:
        seen[name_key(c)] = seen.get(name_key(c), 0) + 1
    file_keys = list(data)
    by_position = len(file_keys) == len(classnames)
    keys: list[str | None] = []
    notes: list[str] = []
    for i, c in enumerate(classnames):
        n = name_key(c)
        if n in user or (n in alias and n not in by_key):   # a run's aliases first; built-in ones where the name fails
            keys.append(alias[n] if alias[n] in data else None)
            continue
        if seen[n] > 1 and by_position:
            keys.append(file_keys[i])
            notes.append(f"class {i} {c!r} (a repeated class name) uses the file's key at its position, "
                         f"{file_keys[i]!r}")
            continue
        cands = by_key.get(n, [])
        if len(cands) > 1:
            raise InvalidDataError(f"{where}: class {c!r} matches several keys {cands} (names differ only in case, "
                                   f"'_' or '-'); keep one")
        keys.append(cands[0] if cands else None)
        if seen[n] > 1 and cands:
            notes.append(f"class name {c!r} repeats in the dataset: every such class uses the key {cands[0]!r}")
    missing = [c for c, k in zip(classnames, keys) if k is None]
    used = {k for k in keys if k is not None}
    unused = [k for k in file_keys if k not in used]
    if missing:
        hints = []
        for c in missing[:5]:
            close = difflib.get_close_matches(name_key(c), [name_key(k) for k in unused], n=1, cutoff=0.6)
            hints.append(f"{c!r}" + (f" (closest unused key: {by_key[close[0]][0]!r})" if close else ""))
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidDataError(f"{where} lacks {len(missing)} of the {len(classnames)} classes: {', '.join(hints)}"
                               f"{more}. Add them to the file, or map names with --set aliases="
                               f"'{{{dataset or '<dataset>'}: {{<class>: <key in the file>}}}}'")
    if strict and unused:
        raise InvalidDataError(f"{where} has {len(unused)} key(s) that name no class of the dataset: "
                               f"{unused[:5]}{' ...' if len(unused) > 5 else ''}; remove them or use the dataset "
                               f"the file was written for")
    texts = [list(data[k]) for k in keys]
    empty = [c for c, t in zip(classnames, texts) if not t]
    if empty and not allow_empty:
        raise InvalidDataError(f"{where}: {len(empty)} class(es) have an empty list: {empty[:5]}; a class needs at "
                               f"least one text")
    return ClassTexts(str(path), kind, list(classnames), [str(k) for k in keys], texts, unused, empty, notes)


def load_class_texts(path: str | Path, kind: str, classnames: Sequence[str], dataset: str = "",
                     aliases: Mapping[str, str] | None = None, allow_empty: bool = False,
                     strict: bool = False) -> ClassTexts:
    """Read a descriptor file and match it to `classnames` (see `match_classes`)."""
    data = read_descriptor_file(path, kind)
    out = match_classes(data, classnames, kind=kind, path=str(path), dataset=dataset, aliases=aliases,
                        allow_empty=allow_empty, strict=strict)
    return replace(out, digest=file_digest(path))


def derangement(n: int, seed: int) -> list[int]:
    """A permutation of range(n) with no fixed point, deterministic in `seed`: which class lends its texts to which
    in the shuffled-descriptor controls (every class gets another class's list)."""
    if n < 2:
        raise ValueError("shuffling texts across classes needs at least two classes")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return [int(i) for i in p]


def descriptor_path(spec: str, kind: str, dataset_name: str, meta: Mapping | None = None) -> Path:
    """The descriptor file of one dataset for a run's `descriptors` option:
    ``auto``: the file the dataset ships (the embedded world writes one per set);
    a ``.json`` file: that file, for every dataset of the run;
    a folder: the authors' file for the dataset (``AUTHOR_FILES``), in the folder or below it."""
    _check_kind(kind)
    spec = str(spec or "").strip()
    if not spec:
        raise ConfigError(f"no {kind} descriptor file given for {dataset_name}: --set descriptors=/path/to/folder "
                          f"(the authors' files from {WHERE[kind]}) or =/path/to/file.json")
    if spec == "auto":
        shipped = ((meta or {}).get("descriptors") or {}).get(kind)
        if not shipped:
            raise ConfigError(f"dataset {dataset_name} ships no {kind} descriptor file; give one with --set "
                              f"descriptors=/path/to/folder (the authors' files from {WHERE[kind]}) or "
                              f"=/path/to/file.json")
        return Path(shipped)
    p = Path(spec).expanduser()
    if p.is_dir():
        name = AUTHOR_FILES[kind].get(dataset_name)
        if name is None:
            raise ConfigError(f"the authors published no {kind} file for dataset {dataset_name} (they cover "
                              f"{', '.join(sorted(AUTHOR_FILES[kind]))}); give a file with --set descriptors="
                              f"/path/to/file.json")
        found = [p / name] if (p / name).is_file() else sorted(p.rglob(name))
        if not found:
            raise MissingDataError(f"{kind} descriptors for {dataset_name}: {name} not found in {p} (nor below it); "
                                   f"copy it there from {WHERE[kind]}")
        if len(found) > 1:
            raise ConfigError(f"{kind} descriptors for {dataset_name}: several {name} below {p} "
                              f"({', '.join(map(str, found[:3]))}); give the file itself")
        return found[0]
    if not p.exists():
        raise MissingDataError(f"descriptors {p} does not exist; give a JSON file {FORMATS[kind]} or a folder with "
                               f"the authors' files from {WHERE[kind]}")
    return p


def run_class_texts(cfg: Mapping, kind: str, names: Sequence[str], allow_empty: bool = False) -> dict:
    """{dataset name: (Dataset, ClassTexts)} for every dataset a run reads, from its `descriptors` and `aliases`
    options; every problem of every dataset is collected into one user error before any work starts. A file the
    dataset ships (`auto`) must match its classes exactly; the authors' files may hold extra keys (CuPL's Caltech
    file lists "background"), reported in `ClassTexts.unused`."""
    from ..errors import DataError, UserError, one_line
    from .registry import build_dataset
    if not str(cfg.get("descriptors", "auto")).strip():   # the real profile ships it empty: a file the user supplies
        raise DataError(f"descriptors: the {cfg.get('profile', 'real')} profile needs the authors' {kind} files: "
                        f"--set descriptors=/path/to/folder (from {WHERE[kind]}) or =/path/to/file.json")
    out, problems = {}, []
    aliases = cfg.get("aliases") or {}
    if not isinstance(aliases, Mapping) or not all(isinstance(v, Mapping) for v in aliases.values()):
        raise ConfigError(f"aliases must map dataset -> {{class name: key in the descriptor file}}, got {aliases!r}")
    for name in dict.fromkeys(names):
        try:
            ds = build_dataset(name, cfg["data_root"])
            path = descriptor_path(cfg.get("descriptors", "auto"), kind, name, ds.meta)
            texts = load_class_texts(path, kind, ds.classnames, dataset=name, aliases=aliases.get(name),
                                     allow_empty=allow_empty, strict=str(cfg.get("descriptors")) == "auto")
            out[name] = (ds, texts)
        except UserError as err:
            problems.append(one_line(str(err)))
    if problems:
        raise DataError("; ".join(dict.fromkeys(problems)))
    return out
