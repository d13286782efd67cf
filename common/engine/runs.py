"""Run records: every protocol run writes one ``metrics.json`` under ``runs/``.

A record is a flat, self-describing JSON object, so reports and the leaderboard only need to glob
``runs/**/metrics.json``::

    {
      "paper": "coop",              # folder under papers/ that produced it
      "method": "coop",             # method as named in paper.yaml rows (baselines: zeroshot_clip, linear_probe)
      "variant": "m16_end",         # free-form setting name ("" when none)
      "profile": "embedded",        # embedded | real
      "protocol": "fewshot",        # fewshot | base2novel | cross_dataset | domain_generalization |
                                    # multilabel | segmentation | test_time | unsupervised | zeroshot |
                                    # taxonomic
      "dataset": "emb_objects",     # dataset the metrics were measured on
      "source": "emb_objects",      # dataset trained on (== dataset unless transfer)
      "backbone": "tiny-rn",        # arch name given to load_clip
      "shots": 16,                  # null for zero-shot / unsupervised
      "seed": 1,
      "metrics": {"top1": 71.2},    # percentages; base2novel: base, novel, hm
      "config": {...},              # the resolved config of the run
      "wall_s": 12.3
    }
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

REQUIRED_KEYS = ("paper", "method", "profile", "protocol", "dataset", "backbone", "seed", "metrics")
from ..atomic import write_text_atomic
from ..paths import runs_root
from . import distributed


def run_dir(paper: str, protocol: str, profile: str, dataset: str, backbone: str, method: str,
            shots: int | None, seed: int, variant: str = "", source: str | None = None,
            root: Path | str | None = None) -> Path:
    """Canonical folder of one run: runs/<paper>/<protocol>/<profile>/<source->dataset>/<method[-variant]>/<backbone>/<k..-seed..>."""
    root = Path(root) if root is not None else runs_root()
    ds = dataset if not source or source == dataset else f"{source}--{dataset}"
    name = method + (f"-{variant}" if variant else "")
    shot = "zs" if shots is None else f"k{shots}"
    return root / paper / protocol / profile / ds / name / backbone / f"{shot}-seed{seed}"


def kept(path: Path, paper: str, what: str = "prompt") -> Path:
    """`path` of something `train` kept for a later `eval` (a learned prompt), or a clear error saying how to make it."""
    from ..errors import MissingDataError
    if not Path(path).is_file():
        raise MissingDataError(f"no trained {what} at {path}: run `python -m papers.{paper} train` with the same "
                               f"options first")
    return Path(path)


def write_record(record: dict[str, Any], root: Path | str | None = None) -> Path:
    """Validate and write a run record to its canonical ``metrics.json``; returns the path. Under torchrun only
    rank 0 writes (every rank computed the same record)."""
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise ValueError(f"run record lacks keys {missing}; required: {list(REQUIRED_KEYS)}")
    if not isinstance(record["metrics"], dict) or not record["metrics"]:
        raise ValueError("run record 'metrics' must be a non-empty dict of name -> number")
    rec = {"variant": "", "source": record["dataset"], "shots": None, **record}
    path = run_dir(rec["paper"], rec["protocol"], rec["profile"], rec["dataset"], rec["backbone"],
                   rec["method"], rec["shots"], rec["seed"], rec["variant"], rec["source"], root) / "metrics.json"
    if not distributed.is_main():
        return path
    return write_text_atomic(path, json.dumps(rec, indent=1, sort_keys=True, default=str))


def record_line(rec: dict[str, Any]) -> str:
    """One line with a run's metrics, e.g. `fewshot dtd coop/m16_end k=1 seed=1: top1 52.50`."""
    source = rec.get("source") or rec["dataset"]
    where = rec["dataset"] if source == rec["dataset"] else f"{source}->{rec['dataset']}"
    method = rec["method"] + (f"/{rec['variant']}" if rec.get("variant") else "")
    shots = f" k={rec['shots']}" if rec.get("shots") is not None else ""
    values = "  ".join(f"{k} {v:.2f}" for k, v in sorted(rec["metrics"].items()) if isinstance(v, (int, float)))
    return f"{rec['protocol']} {where} {method}{shots} seed={rec['seed']}: {values}"


def print_record(rec: dict[str, Any], existing: bool = False) -> None:
    """Print a run's metrics (beside any progress bar); `existing`: a finished run that was not rerun. Under
    torchrun rank 0 prints."""
    if not distributed.is_main():
        return
    tqdm.write(record_line(rec) + ("  (existing record; --set force=true reruns it)" if existing else ""))


def load_records(root: Path | str | None = None, **filters: Any) -> list[dict[str, Any]]:
    """All run records under ``root`` (sorted by path for determinism), optionally filtered by equality."""
    root = Path(root) if root is not None else runs_root()
    out = []
    for p in sorted(root.glob("**/metrics.json")):
        rec = json.loads(p.read_text())
        if all(rec.get(k) == v for k, v in filters.items()):
            rec["_path"] = str(p)
            out.append(rec)
    return out


def beside_record(metric: str, **filters: Any) -> str:
    """`"  (record 12.34)"`: the stored run record's `metric`, printed beside a re-evaluation of the same run; "" when
    no record matches `filters` (see `load_records`)."""
    rec = load_records(**filters)
    return f"  (record {rec[0]['metrics'][metric]:6.2f})" if rec else ""


def iter_metric(records: Iterable[dict[str, Any]], metric: str) -> list[float]:
    return [float(r["metrics"][metric]) for r in records if metric in r["metrics"]]


def summarize(paper: str, protocol: str, profile: str, backbone: str, root: Path | str | None = None) -> list[dict]:
    """Print the seed means of one paper's records of `protocol` (profile, backbone); returns the records."""
    recs = load_records(root, paper=paper, protocol=protocol, profile=profile, backbone=backbone)
    cells: dict[tuple, list[dict]] = {}
    for r in recs:
        cells.setdefault((r["method"], r["variant"], r["dataset"], r["shots"]), []).append(r["metrics"])
    for (method, variant, dataset, shots), ms in sorted(cells.items(), key=lambda kv: [str(x) for x in kv[0]]):
        means = {k: sum(m[k] for m in ms) / len(ms) for k in ms[0]}
        shown = "  ".join(f"{k} {v:6.2f}" for k, v in means.items() if k != "mean_per_class")
        print(f"{protocol:>14s} {method + ('/' + variant if variant else ''):>22s} {dataset:>24s} k={shots} "
              f"seeds={len(ms)}  {shown}")
    return recs
