"""``papers/<slug>/paper.yaml``: the paper's identity, its reported numbers and its claims, validated on load.

Schema (unknown keys are errors, so typos cannot silently drop a number)::

    slug: coop                        # = folder name
    title: Learning to Prompt for Vision-Language Models
    authors: [Kaiyang Zhou, Jingkang Yang, Chen Change Loy, Ziwei Liu]
    venue: IJCV 2022
    year: 2022
    arxiv: "2109.01134"               # or null
    official_repo: KaiyangZhou/CoOp   # GitHub owner/name or a URL; or null
    url: ...                          # optional extra link
    note: ...                         # optional one-line remark shown under the identity
    backbone: RN50                    # optional: the paper's main backbone; checks use it on the real
                                      # profile and its stand-in (RN* -> tiny-rn, ViT* -> tiny-vit) on embedded
    embedded_backbone: tiny-rn        # optional override of that stand-in
    defaults:                         # optional per-method filters added to every selection of that method
      zeroshot_clip: {variant: single}
    compare: [zeroshot_clip, linear_probe]   # optional: extra methods to show beside the paper's
    reported:                         # numbers as printed in the paper
      - {protocol: fewshot, dataset: ImageNet, backbone: RN50, shots: 16, method: coop, metric: top1,
         value: 62.95, table: "Fig. 3"}
      - protocol: domain_generalization   # a row group: one row per entry of `values`
        backbone: RN50
        method: coop
        shots: 16
        source: ImageNet
        metric: top1
        table: Table 1
        verified: false                   # optional (default true); false needs a note
        note: recalled, not checked against the PDF
        values: {ImageNet: 63.33, ImageNet-V2: 55.40}
    claims:
      - id: beats_zeroshot_16
        text: "CoOp with 16 shots beats hand-crafted zero-shot prompts by ~15 points on average"
        source: paper                     # paper (stated in the paper or its official README; needs ref) |
                                          # hypothesis (read from a figure, a card or a secondary source,
                                          # unverified) | project (a protocol check of ours)
        ref: Abstract                     # where the paper says it (required for source: paper)
        protocol: fewshot                 # protocol the check needs (default filter of every selection)
        check: mean(top1, method=coop, shots=16) > mean(top1, method=zeroshot_clip, protocol=zeroshot)
        profiles: [embedded, real]        # optional (default both): where the claim is judged
        backbone: ViT-B/16                # optional: overrides the paper's backbone for this claim
        requires: [other_claim_id]        # optional premises: if one is not reproduced, this claim's
                                          # verdict is "premise not met"
        scale_free: "..."                 # only where an embedded check keeps a threshold > 2 points:
                                          # why that number does not depend on the model's scale
      - id: cost
        text: ...
        source: paper
        ref: Sec. 4
        protocol: fewshot
        untestable: "a wall-clock claim: no numeric check over accuracy records"   # instead of check

Absolute magnitudes (a threshold or offset of more than 2 points on an accuracy term: ``a - b >= 14``)
are the paper's numbers on real CLIP: such a check must be judged on the real profile only
(``profiles: [real]``), with its relative form (sign, order) as a separate embedded claim.
    deviations:                        # optional: differences from the official code
      - "Context length 20 instead of 77 on the embedded tiny CLIPs"
      - {what: "...", why: "..."}
    figures:                           # optional: the paper's own figures (files in its folder, made by its
      - {path: heatmap_alpha_beta.png, caption: "alpha/beta search on val"}   #  entry point from run outputs)
    real_args: "--set descriptors=/path/to/files"   # optional: what the real-profile command needs besides
                                      # data_root (shown in the report's exact command)
    budget:                            # the embedded training budget and what justifies it (common/engine/convergence.py)
      epochs: train.epochs             # embedded config key of the epochs at the representative setting (16 shots)
      lr: train.lr                     # ... and of the learning rate; the record is papers/<slug>/convergence.json
    # or: budget: {none: "training-free: ..."}; or {pending: "why there is no record yet"} (shown as unjustified)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .expr import Expression, ExpressionError
from .records import PROFILES, PROTOCOLS, norm, stand_in

TOP_KEYS = {"slug", "title", "authors", "venue", "year", "arxiv", "official_repo", "url", "note", "backbone",
            "embedded_backbone", "defaults", "compare", "reported", "claims", "deviations", "figures", "budget",
            "real_args"}
REQUIRED_TOP = ("slug", "title", "authors", "venue", "year", "arxiv", "official_repo", "reported", "claims")
ROW_KEYS = {"protocol", "dataset", "backbone", "shots", "method", "variant", "metric", "value", "table",
            "verified", "note", "source", "values"}
ROW_REQUIRED = ("protocol", "backbone", "method", "metric", "table")
CLAIM_KEYS = {"id", "text", "protocol", "check", "untestable", "profiles", "backbone", "ref", "source", "requires",
              "scale_free"}
SOURCES = ("paper", "hypothesis", "project")
DEFAULT_KEYS = {"variant", "backbone", "shots", "protocol", "source", "paper"}


class PaperSpecError(ValueError):
    """paper.yaml does not follow the schema; the message names the file, the row and the key."""


@dataclass(frozen=True)
class Reported:
    protocol: str
    dataset: str
    backbone: str
    shots: int | None
    method: str
    metric: str
    value: float
    table: str
    variant: str = ""
    source: str | None = None
    verified: bool = True
    note: str = ""


@dataclass
class Claim:
    id: str
    text: str
    protocol: str
    check: Expression | None
    untestable: str | None = None
    profiles: tuple[str, ...] = PROFILES
    backbone: str | None = None
    ref: str | None = None
    source: str = "paper"
    requires: tuple[str, ...] = ()
    scale_free: str | None = None


@dataclass
class Paper:
    slug: str
    title: str
    authors: list[str]
    venue: str
    year: int
    arxiv: str | None
    official_repo: str | None
    reported: list[Reported]
    claims: list[Claim]
    url: str | None = None
    note: str | None = None
    backbone: str | None = None
    embedded_backbone: str | None = None
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    compare: list[str] = field(default_factory=list)
    deviations: list[dict[str, str]] = field(default_factory=list)
    figures: list[dict[str, str]] = field(default_factory=list)
    budget: dict[str, str] | None = None
    real_args: str | None = None
    path: Path | None = None

    def backbone_for(self, profile: str, claim: Claim | None = None) -> str | None:
        """Backbone the checks use on ``profile`` (None: no default, selections must not mix)."""
        bb = (claim.backbone if claim is not None and claim.backbone else None) or self.backbone
        if profile == "embedded":
            if claim is not None and claim.backbone:
                return stand_in(claim.backbone)
            return self.embedded_backbone or stand_in(bb)
        return bb

    def methods(self) -> list[str]:
        """Methods the paper reports or compares, in order of first mention (reported, claims, compare)."""
        out: list[str] = []
        for m in [r.method for r in self.reported] + [v[0] for c in self.claims if c.check
                                                       for s in c.check.selections
                                                       for k, v in s.filters if k == "method"] + self.compare:
            if norm(m) not in {norm(x) for x in out}:
                out.append(m)
        return out

    def ordered_claims(self) -> list[Claim]:
        """Claims with every premise before the claims that require it (the schema forbids cycles)."""
        by_id = {c.id: c for c in self.claims}
        done: dict[str, Claim] = {}

        def visit(c: Claim) -> None:
            if c.id not in done:
                for p in c.requires:
                    visit(by_id[p])
                done[c.id] = c
        for c in self.claims:
            visit(c)
        return list(done.values())

    @property
    def arxiv_url(self) -> str | None:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else None

    @property
    def repo_url(self) -> str | None:
        if not self.official_repo:
            return None
        return self.official_repo if "://" in self.official_repo else f"https://github.com/{self.official_repo}"


def load_paper(path: str | Path) -> Paper:
    """Load and validate one paper.yaml (``path`` may be the file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "paper.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: every paper folder needs a paper.yaml (schema in "
                                f"common/report/schema.py)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PaperSpecError(f"{path}: not valid YAML: {e}") from None
    return parse_paper(data, where=str(path), folder=path.parent.name, path=path)


def parse_paper(data: Any, where: str = "paper.yaml", folder: str | None = None, path: Path | None = None) -> Paper:
    def fail(msg: str):
        raise PaperSpecError(f"{where}: {msg}")

    if not isinstance(data, dict):
        fail("top level must be a mapping")
    _keys(data, TOP_KEYS, REQUIRED_TOP, "top level", fail)
    slug = _str(data["slug"], "slug", fail)
    if not re.fullmatch(r"[a-z0-9_]+", slug):
        fail(f"slug '{slug}' must be lower-case letters, digits and _")
    if folder is not None and slug != folder:
        fail(f"slug '{slug}' differs from its folder name '{folder}'")
    authors = data["authors"]
    if not isinstance(authors, list) or not authors or not all(isinstance(a, str) and a for a in authors):
        fail("authors must be a non-empty list of names")
    year = data["year"]
    if not isinstance(year, int) or not 1990 <= year <= 2100:
        fail(f"year must be an integer year, got {year!r}")
    arxiv = data["arxiv"]
    if arxiv is not None:
        if not isinstance(arxiv, str):
            fail(f"arxiv {arxiv!r} must be a quoted string like \"2109.01134\" (unquoted, YAML reads a number "
                 f"and drops trailing zeros)")
        if not re.fullmatch(r"\d{4}\.\d{4,5}(v\d+)?", arxiv):
            fail(f"arxiv '{arxiv}' is not an arXiv id like \"2109.01134\" (quote it in YAML)")
    repo = data["official_repo"]
    if repo is not None and not (isinstance(repo, str) and (re.fullmatch(r"[\w.-]+/[\w.-]+", repo) or "://" in repo)):
        fail(f"official_repo '{repo}' must be GitHub owner/name or a URL")

    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        fail("defaults must map method -> {filter: value}")
    for m, d in defaults.items():
        if not isinstance(d, dict):
            fail(f"defaults.{m} must be a mapping of filters")
        bad = set(d) - DEFAULT_KEYS
        if bad:
            fail(f"defaults.{m}: unknown key(s) {sorted(bad)} (allowed: {sorted(DEFAULT_KEYS)})")
    compare = data.get("compare") or []
    if not isinstance(compare, list) or not all(isinstance(m, str) for m in compare):
        fail("compare must be a list of method names")

    reported = []
    rows = data["reported"] or []
    if not isinstance(rows, list):
        fail("reported must be a list of rows")
    for i, row in enumerate(rows):
        reported.extend(_parse_row(row, f"reported[{i}]", fail))

    claims = []
    cl = data["claims"] or []
    if not isinstance(cl, list):
        fail("claims must be a list")
    ids = set()
    for i, c in enumerate(cl):
        claim = _parse_claim(c, i, fail, where)
        if claim.id in ids:
            fail(f"claims[{i}]: duplicate id '{claim.id}'")
        ids.add(claim.id)
        claims.append(claim)
    _check_premises(claims, fail)

    deviations = []
    for i, d in enumerate(data.get("deviations") or []):
        if isinstance(d, str) and d.strip():
            deviations.append({"what": d.strip(), "why": ""})
        elif isinstance(d, dict) and set(d) <= {"what", "why"} and isinstance(d.get("what"), str):
            deviations.append({"what": d["what"].strip(), "why": str(d.get("why") or "").strip()})
        else:
            fail(f"deviations[{i}] must be a string or {{what: ..., why: ...}}")

    figures = []
    for i, f in enumerate(data.get("figures") or []):
        if not (isinstance(f, dict) and set(f) <= {"path", "caption"} and isinstance(f.get("path"), str)
                and not f["path"].startswith("fig_") and "/" not in f["path"]):
            fail(f"figures[{i}] must be {{path: <file in the paper folder, not fig_*>, caption: ...}}")
        figures.append({"path": f["path"], "caption": str(f.get("caption") or "").strip()})

    budget = data.get("budget")
    if budget is not None:
        kinds = [k for k in ("none", "pending") if k in budget] if isinstance(budget, dict) else None
        if not isinstance(budget, dict) or (kinds and len(budget) != 1) or \
                (not kinds and set(budget) != {"epochs", "lr"}) or not all(isinstance(v, str) and v for v in budget.values()):
            fail("budget must be {epochs: <config key>, lr: <config key>}, {none: <why>} or {pending: <why>}")
    real_args = data.get("real_args")
    if real_args is not None and not (isinstance(real_args, str) and real_args.strip()):
        fail("real_args must be the extra command-line arguments of the real-profile run, e.g. \"--set key=value\"")
    return Paper(slug=slug, title=_str(data["title"], "title", fail), authors=list(authors),
                 venue=_str(data["venue"], "venue", fail), year=year, arxiv=arxiv, official_repo=repo,
                 reported=reported, claims=claims, url=data.get("url"), note=data.get("note"),
                 backbone=data.get("backbone"), embedded_backbone=data.get("embedded_backbone"),
                 defaults=defaults, compare=list(compare), deviations=deviations, figures=figures,
                 budget=budget, real_args=real_args.strip() if real_args else None, path=path)


def _check_premises(claims: list[Claim], fail) -> None:
    """`requires` names existing claims and forms no cycle."""
    by_id = {c.id: c for c in claims}
    for c in claims:
        unknown = [p for p in c.requires if p not in by_id]
        if unknown:
            fail(f"claims ({c.id}): requires unknown claim id(s) {unknown} (ids: {', '.join(by_id)})")
    state: dict[str, int] = {}

    def visit(cid: str, path: list[str]) -> None:
        if state.get(cid) == 2:
            return
        if state.get(cid) == 1:
            fail(f"claims ({cid}): requires forms a cycle: {' -> '.join(path + [cid])}")
        state[cid] = 1
        for p in by_id[cid].requires:
            visit(p, path + [cid])
        state[cid] = 2
    for c in claims:
        visit(c.id, [])


def _keys(d: dict, allowed: set, required: tuple, what: str, fail) -> None:
    bad = sorted(set(map(str, d)) - allowed)
    if bad:
        fail(f"{what}: unknown key(s) {bad} (allowed: {', '.join(sorted(allowed))})")
    missing = [k for k in required if k not in d]
    if missing:
        fail(f"{what}: missing key(s) {missing}")


def _str(v: Any, key: str, fail) -> str:
    if not isinstance(v, str) or not v.strip():
        fail(f"{key} must be a non-empty string, got {v!r}")
    return v.strip()


def _parse_row(row: Any, what: str, fail) -> list[Reported]:
    if not isinstance(row, dict):
        fail(f"{what}: a row must be a mapping")
    name = row.get("dataset") or row.get("method")
    what = f"{what} ({name})" if name else what
    _keys(row, ROW_KEYS, ROW_REQUIRED, what, fail)
    if row["protocol"] not in PROTOCOLS:
        fail(f"{what}: protocol '{row['protocol']}' is not one of {', '.join(PROTOCOLS)}")
    shots = row.get("shots")
    if shots is not None and (not isinstance(shots, int) or isinstance(shots, bool) or shots < 0):
        fail(f"{what}: shots must be a non-negative integer or null, got {shots!r}")
    verified = row.get("verified", True)
    if not isinstance(verified, bool):
        fail(f"{what}: verified must be true or false")
    note = str(row.get("note") or "").strip()
    if not verified and not note:
        fail(f"{what}: verified: false needs a note saying why the number could not be checked")
    if ("values" in row) == ("dataset" in row or "value" in row):
        fail(f"{what}: give either dataset + value, or values: {{dataset: value, ...}}")
    values = row["values"] if "values" in row else {row.get("dataset"): row.get("value")}
    if not isinstance(values, dict) or not values:
        fail(f"{what}: values must map dataset -> number")
    out = []
    for ds, v in values.items():
        if not isinstance(ds, str) or not ds:
            fail(f"{what}: dataset must be a non-empty string, got {ds!r}")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            fail(f"{what}: value for {ds} must be a number, got {v!r}")
        out.append(Reported(protocol=row["protocol"], dataset=ds, backbone=_str(row["backbone"], "backbone", fail),
                            shots=shots, method=_str(row["method"], "method", fail),
                            metric=_str(row["metric"], "metric", fail), value=float(v),
                            table=_str(str(row["table"]), "table", fail), variant=str(row.get("variant") or ""),
                            source=row.get("source"), verified=verified, note=note))
    return out


def _parse_claim(c: Any, i: int, fail, where: str) -> Claim:
    if not isinstance(c, dict):
        fail(f"claims[{i}] must be a mapping")
    what = f"claims[{i}]" + (f" ({c['id']})" if "id" in c else "")
    _keys(c, CLAIM_KEYS, ("id", "text", "protocol", "source"), what, fail)
    cid = str(c["id"])
    if not re.fullmatch(r"[a-z0-9_]+", cid):
        fail(f"{what}: id must be lower-case letters, digits and _")
    if c["protocol"] not in PROTOCOLS:
        fail(f"{what}: protocol '{c['protocol']}' is not one of {', '.join(PROTOCOLS)}")
    if ("check" in c) == ("untestable" in c):
        fail(f"{what}: give exactly one of check (an expression) or untestable (the reason)")
    profiles = c.get("profiles", list(PROFILES))
    if isinstance(profiles, str):
        profiles = [profiles]
    if not isinstance(profiles, list) or not profiles or any(p not in PROFILES for p in profiles):
        fail(f"{what}: profiles must be a list out of {list(PROFILES)}")
    source = c["source"]
    if source not in SOURCES:
        fail(f"{what}: source must be one of {', '.join(SOURCES)} (paper: stated in the paper or its official "
             f"README, with ref; hypothesis: read from a figure, a card or a secondary source; project: a "
             f"protocol check of ours), got {source!r}")
    ref = c.get("ref")
    if source == "paper" and not (isinstance(ref, str) and ref.strip()):
        fail(f"{what}: source: paper needs ref (where the paper or its README says it)")
    requires = c.get("requires") or []
    if isinstance(requires, str):
        requires = [requires]
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires) or cid in requires:
        fail(f"{what}: requires must be a list of other claim ids")
    scale_free = c.get("scale_free")
    if scale_free is not None and not (isinstance(scale_free, str) and scale_free.strip()):
        fail(f"{what}: scale_free must say why the threshold does not depend on the model's scale")
    check = None
    if "check" in c:
        if not isinstance(c["check"], str) or not c["check"].strip():
            fail(f"{what}: check must be a non-empty expression string")
        try:
            check = Expression(c["check"], where=f"{where}: {what}.check")
        except ExpressionError as e:
            raise PaperSpecError(str(e)) from None
        sizes = check.point_thresholds()
        if sizes and "embedded" in profiles and not scale_free:
            fail(f"{what}: threshold {', '.join(f'{x:g}' for x in sizes)} points is an absolute magnitude: judge "
                 f"it on the real profile only (profiles: [real]) and give the embedded profile its relative "
                 f"form as its own claim, or say why it is scale-free (scale_free: ...)")
    return Claim(id=cid, text=_str(c["text"], "text", fail), protocol=c["protocol"], check=check,
                 untestable=str(c["untestable"]).strip() if "untestable" in c else None,
                 profiles=tuple(profiles), backbone=c.get("backbone"), ref=ref, source=source,
                 requires=tuple(requires), scale_free=scale_free.strip() if scale_free else None)
