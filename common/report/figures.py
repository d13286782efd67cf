"""Report figures (matplotlib, Agg): few-shot curves, base/novel/HM bars, domain-shift bars.

Byte-reproducible: fixed size and dpi, no timestamps or software tag in the PNG, sorted inputs."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .tables import Group, dataset_order, metric_title  # noqa: E402

DPI = 100
STYLE = {"font.size": 8, "axes.titlesize": 9, "legend.fontsize": 7, "figure.dpi": DPI,
         "svg.hashsalt": "vlm-transfer", "path.simplify": False}


def _err(stds: list) -> list | None:
    """Error bars only where some value has a seed std (zero-shot runs have none)."""
    return None if all(s is None for s in stds) else [s or 0.0 for s in stds]


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
                ax.errorbar(ks, [p[0] for p in pts], yerr=_err([p[1] for p in pts]), marker="o", ms=3,
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
            ax.set_ylabel(metric_title(metric))
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
    """Base/novel/HM-style bars: one group per metric, one bar per series, averaged over the datasets
    every series has."""
    groups = [g for g in groups if all(any(g.has(d, m) for d in g.cells) for m in metrics)]
    common = [d for d in sorted({d for g in groups for d in g.cells})
              if all(g.has(d, m) for g in groups for m in metrics)]
    if not groups or not common:
        return None
    stats = [[g.average(common, m) for m in metrics] for g in groups]
    labels = [g.key.label() + ("" if g.key.shots is None else f", k={g.key.shots}") for g in groups]
    return grouped_bars(labels, list(metrics), [[s[0] for s in row] for row in stats],
                        [[s[1] for s in row] for row in stats],
                        f"{title}\naverage over {len(common)} datasets", "accuracy (%)", path)


def shift_figure(groups: Sequence[Group], metric: str, title: str, path: Path) -> Path | None:
    """Domain-shift bars: one group per evaluation set (source first, then targets), one bar per series."""
    groups = [g for g in groups if any(g.has(d, metric) for d in g.cells)]
    if not groups:
        return None
    datasets = dataset_order(groups)
    sources = {g.key.source for g in groups if g.key.source}
    stats = [[g.stat(d, metric)[:2] if g.has(d, metric) else (None, None) for d in datasets] for g in groups]
    return grouped_bars([g.key.label() for g in groups], [d + (" (source)" if d in sources else "") for d in datasets],
                        [[s[0] for s in row] for row in stats], [[s[1] for s in row] for row in stats],
                        title, metric_title(metric), path)


def curve_figure(curves: dict[str, list[tuple]], refs: dict[str, float], title: str, ylabel: str,
                 path: Path) -> Path | None:
    """One panel: ``curves`` label -> [(shots, mean, std|None)], ``refs`` label -> horizontal line."""
    if not curves:
        return None
    colors = plt.get_cmap("tab10").colors
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for i, (label, pts) in enumerate(sorted(curves.items())):
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=_err([p[2] for p in pts]), marker="o",
                        ms=3, lw=1.2, capsize=2, color=colors[i % 10], label=label)
        for j, (label, y) in enumerate(sorted(refs.items())):
            ax.axhline(y, ls="--", lw=1.0, color=colors[(len(curves) + j) % 10], label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("shots per class")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.tight_layout()
        return save(fig, path)


def grouped_bars(series: list[str], categories: list[str], values: list[list[float | None]],
                 errors: list[list[float | None]], title: str, ylabel: str, path: Path) -> Path | None:
    """Bars grouped by category (x axis), one colour per series; ``values[s][c]`` (None = no bar)."""
    if not series or not categories:
        return None
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(series)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(2.0 + 0.9 * len(categories) * max(1.0, len(series) / 3), 3.4))
        for i, name in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(categories))]
            pts = [(x, v, e) for x, v, e in zip(xs, values[i], errors[i]) if v is not None]
            ax.bar([p[0] for p in pts], [p[1] for p in pts], width, yerr=_err([p[2] for p in pts]),
                   capsize=2, color=colors[i % 10], label=name)
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(categories, rotation=15 if len(categories) > 3 else 0,
                           ha="right" if len(categories) > 3 else "center")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        fig.tight_layout()
        return save(fig, path)


def convergence_figure(record: dict, path: Path) -> Path | None:
    """Left: validation accuracy against optimiser steps of the official-budget run, per dataset. Right: final
    validation accuracy against the budget (epochs), per dataset and averaged, the justified budget marked."""
    datasets = sorted(record.get("datasets") or {})
    if not datasets:
        return None
    colors = plt.get_cmap("tab10").colors
    with plt.rc_context(STYLE):
        fig, (a, b) = plt.subplots(1, 2, figsize=(8.0, 3.2))
        for i, d in enumerate(datasets):
            curve = record["datasets"][d].get("val_curve") or []
            if curve:
                a.plot([c["step"] for c in curve], [c["val"] for c in curve], marker=".", ms=3, lw=1.0,
                       color=colors[i % 10], label=d)
            final = record["datasets"][d]["final"]
            es = sorted(final, key=int)
            b.plot([int(e) for e in es], [final[e]["val"] for e in es], marker="o", ms=3, lw=1.0, color=colors[i % 10])
        es = sorted(record["mean_val"], key=int)
        b.plot([int(e) for e in es], [record["mean_val"][e] for e in es], marker="s", ms=4, lw=2.0, color="black",
               label="mean")
        b.axvline(record["justified_epochs"], ls="--", lw=1.0, color="gray", label="justified budget")
        a.set_xlabel("optimiser steps (official budget)")
        a.set_ylabel("validation top-1 (%)")
        a.set_title("validation curve")
        b.set_xscale("log", base=2)
        b.set_xlabel("budget (epochs)")
        b.set_title(f"final val by budget (lr x{record['lr_factor']:g})")
        for ax in (a, b):
            ax.grid(alpha=0.3)
        a.legend(frameon=False)
        b.legend(frameon=False)
        fig.tight_layout()
        return save(fig, path)
