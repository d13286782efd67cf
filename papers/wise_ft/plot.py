"""The WiSE-FT figure from run records: reference accuracy (x) vs average accuracy over the shifted
sets (y) along alpha, one curve per fine-tuning variant, plus accuracy vs alpha per test set."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from common.report.figures import STYLE, plt, save

_VARIANT = re.compile(r"^(e2e|lc)_a([0-9.]+)$")
_LABEL = {"e2e": "end-to-end", "lc": "linear classifier"}


def curves(records: Sequence[dict], source: str, targets: Sequence[str]) -> dict[str, dict[float, dict[str, float]]]:
    """kind -> alpha -> {dataset: seed-mean top1, "shift": mean over the targets present at every alpha}."""
    cells: dict[tuple, list[float]] = {}
    for r in records:
        m = _VARIANT.match(r.get("variant") or "")
        if not m or r.get("source", r["dataset"]) != source:
            continue
        cells.setdefault((m.group(1), float(m.group(2)), r["dataset"]), []).append(float(r["metrics"]["top1"]))
    out: dict[str, dict[float, dict[str, float]]] = {}
    for (kind, alpha, ds), vals in cells.items():
        out.setdefault(kind, {}).setdefault(alpha, {})[ds] = sum(vals) / len(vals)
    for kind, by_alpha in out.items():
        common = [t for t in targets if all(t in v for v in by_alpha.values())]
        for v in by_alpha.values():
            v["shift"] = sum(v[t] for t in common) / len(common) if common else float("nan")
        out[kind] = {a: v for a, v in by_alpha.items() if source in v}
    return {k: v for k, v in out.items() if v}


def curve_figure(records: Sequence[dict], source: str, targets: Sequence[str], path: Path,
                 title: str = "WiSE-FT") -> Path | None:
    data = curves(records, source, targets)
    if not data:
        return None
    colors = plt.get_cmap("tab10").colors
    with plt.rc_context(STYLE):
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.0, 3.6))
        for i, (kind, by_alpha) in enumerate(sorted(data.items())):
            alphas = sorted(by_alpha)
            xs = [by_alpha[a][source] for a in alphas]
            ys = [by_alpha[a]["shift"] for a in alphas]
            ax.plot(xs, ys, "-o", ms=2.5, lw=1.2, color=colors[i], label=f"WiSE-FT ({_LABEL[kind]})")
            for a, mark, name in ((0.0, "*", "zero-shot"), (1.0, "s", "fine-tuned"), (0.5, "D", "alpha=0.5")):
                if a in by_alpha:
                    ax.plot([by_alpha[a][source]], [by_alpha[a]["shift"]], mark, ms=7, color=colors[i],
                            mec="black", mew=0.5, label=f"{name} ({kind})")
            for j, ds in enumerate([source, *targets]):
                if all(ds in by_alpha[a] for a in alphas):
                    ax2.plot(alphas, [by_alpha[a][ds] for a in alphas], ["-", "--"][i % 2], lw=1.0,
                             color=colors[(j + 2) % 10], label=f"{ds} ({kind})")
        ax.set_xlabel(f"reference accuracy ({source}), top-1 %")
        ax.set_ylabel(f"avg accuracy over {len(targets)} shifts, top-1 %")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        ax2.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
        ax2.set_ylabel("top-1 %")
        ax2.set_title("accuracy along the interpolation path")
        ax2.grid(alpha=0.3)
        ax2.legend(loc="best", fontsize=5, ncol=2)
        fig.tight_layout()
        return save(fig, Path(path))
