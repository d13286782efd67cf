"""Report figures (matplotlib, Agg): few-shot curves, base/novel/HM bars, domain-shift bars.

Byte-reproducible: fixed size and dpi, no timestamps or software tag in the PNG, sorted inputs."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .tables import Group, Key, TRANSFER, dataset_order  # noqa: E402

DPI = 100
STYLE = {"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7, "figure.dpi": DPI,
         "svg.hashsalt": "vlm-transfer", "path.simplify": False}


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, metadata={"Software": None}, format="png")
    plt.close(fig)
    return path


def _curves(groups: Sequence[Group]) -> dict[tuple, dict]:
    """(method, variant) -> {shots: Group}."""
    out: dict[tuple, dict] = {}
    for g in groups:
        out.setdefault((g.key.method, g.key.variant), {})[g.key.shots] = g
    return out


def _label(method: str, variant: str) -> str:
    return method + (f" ({variant})" if variant else "")


def fewshot_figure(fewshot: Sequence[Group], zeroshot: Sequence[Group], metric: str, title: str,
                   path: Path) -> Path | None:
    """Accuracy vs shots per dataset plus the average over the datasets every curve has at every shot
    (zero-shot runs drawn as dashed horizontal lines)."""
    curves = _curves([g for g in fewshot if g.key.shots is not None])
    if not curves:
        return None
    datasets = sorted({d for g in fewshot for d in g.cells})
    common = [d for d in datasets if all(d in g.cells for c in curves.values() for g in c.values())]
    zs = [g for g in zeroshot if g.key.shots is None]
    panels = datasets + (["Average"] if common and len(datasets) > 1 else [])
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    colors = plt.get_cmap("tab10").colors
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols, 2.4 * nrows + 0.6), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            for i, (name, by_shot) in enumerate(sorted(curves.items())):
                ks = sorted(k for k, g in by_shot.items() if panel == "Average" or g.has(panel, metric))
                if panel == "Average":
                    pts = [by_shot[k].average(common, metric) for k in ks]
                else:
                    pts = [by_shot[k].stat(panel, metric)[:2] for k in ks]
                if not ks:
                    continue
                ax.errorbar(ks, [p[0] for p in pts], yerr=[p[1] or 0.0 for p in pts], marker="o", ms=3,
                            lw=1.2, capsize=2, color=colors[i % 10], label=_label(*name))
            for j, g in enumerate(sorted(zs, key=lambda g: (g.key.method, g.key.variant))):
                ds = common if panel == "Average" else [panel]
                if all(g.has(d, metric) for d in ds) and ds:
                    y = g.average(ds, metric)[0]
                    ax.axhline(y, ls="--", lw=1.0, color=colors[(len(curves) + j) % 10],
                               label=_label(g.key.method, g.key.variant) + " zero-shot")
            ax.set_xscale("log", base=2)
            ax.set_xticks([1, 2, 4, 8, 16])
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_title(panel if panel != "Average" else f"Average ({len(common)} datasets)")
            ax.set_xlabel("shots per class")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        handles, labels = {}, []
        for ax in axes.flat:
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in handles:
                    handles[l] = h
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(4, len(handles)),
                   frameon=False)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.06 + 0.02 * math.ceil(len(handles) / 4), 1, 0.97))
        return save(fig, path)


def bars_figure(groups: Sequence[Group], metrics: Sequence[str], title: str, path: Path) -> Path | None:
    """Grouped bars: one group per metric (e.g. base, novel, hm), one bar per series, averaged over the
    datasets every series has."""
    groups = [g for g in groups if all(any(g.has(d, m) for d in g.cells) for m in metrics)]
    if not groups:
        return None
    common = [d for d in sorted({d for g in groups for d in g.cells})
              if all(g.has(d, m) for g in groups for m in metrics)]
    if not common:
        return None
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(groups)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(1.2 + 1.3 * len(metrics) * max(1, len(groups) / 3), 3.0))
        for i, g in enumerate(groups):
            vals = [g.average(common, m) for m in metrics]
            xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(metrics))]
            ax.bar(xs, [v[0] for v in vals], width, yerr=[v[1] or 0.0 for v in vals], capsize=2,
                   color=colors[i % 10], label=g.key.label() + ("" if g.key.shots is None else f", k={g.key.shots}"))
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels(metrics)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{title}\naverage over {len(common)} datasets")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(3, len(groups)), frameon=False)
        fig.tight_layout()
        return save(fig, path)


def shift_figure(groups: Sequence[Group], metric: str, title: str, path: Path) -> Path | None:
    """Bars per evaluation set (source first, then shifted targets), one bar per series."""
    groups = [g for g in groups if any(g.has(d, metric) for d in g.cells)]
    if not groups:
        return None
    datasets = dataset_order(groups)
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(groups)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(datasets) * max(1, len(groups) / 3), 3.0))
        for i, g in enumerate(groups):
            xs, ys, es = [], [], []
            for j, d in enumerate(datasets):
                if g.has(d, metric):
                    m, s, _ = g.stat(d, metric)
                    xs.append(j + (i - (len(groups) - 1) / 2) * width)
                    ys.append(m)
                    es.append(s or 0.0)
            ax.bar(xs, ys, width, yerr=es, capsize=2, color=colors[i % 10], label=g.key.label())
        sources = {g.key.source for g in groups if g.key.source}
        ax.set_xticks(range(len(datasets)))
        ax.set_xticklabels([d + (" (source)" if d in sources else "") for d in datasets], rotation=20, ha="right")
        ax.set_ylabel(metric)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=min(3, len(groups)), frameon=False)
        fig.tight_layout()
        return save(fig, path)
