"""The overlay figure: one row per seeded test image; image, ground truth and each variant's prediction drawn as
class colours over the image (ignored pixels left bare), with a legend of the classes shown."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.paths import runs_root
from common.report.figures import STYLE, plt, save

TITLES = {"naive": "naive (query-key)", "raw": "MaskCLIP", "ks": "MaskCLIP + KS", "pd": "MaskCLIP + PD",
          "ks_pd": "MaskCLIP + KS + PD"}
ALPHA = 0.6


def palette(k: int) -> np.ndarray:
    """(k, 3) distinct colours in [0, 1]: tab20's ten strong hues, then its ten light ones, then tab20b/c."""
    t20 = plt.get_cmap("tab20").colors
    cols = list(t20[0::2]) + list(t20[1::2]) + [c for name in ("tab20b", "tab20c") for c in plt.get_cmap(name).colors]
    return np.array([cols[i % len(cols)] for i in range(k)], dtype=np.float32)


def overlay(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, ignore: int) -> np.ndarray:
    """Class colours blended over the image where the label is a class; the image itself elsewhere."""
    img = image.astype(np.float32) / 255.0
    valid = (labels >= 0) & (labels < len(colours)) & (labels != ignore)
    out = img.copy()
    out[valid] = (1 - ALPHA) * img[valid] + ALPHA * colours[labels[valid]]
    return out


def overlay_figure(npz: str | Path, path: Path, title: str = "MaskCLIP", titles: dict | None = None) -> Path:
    """`titles`: column titles of variants beyond (or instead of) MaskCLIP's `TITLES`."""
    data = np.load(npz)
    images, masks = data["image"], data["mask"].astype(np.int64)
    names = [str(c) for c in data["classnames"]]
    variants = [str(v) for v in data["variants"]]
    ignore = int(data["ignore_index"])
    preds = {v: data[f"pred_{v}"].astype(np.int64) for v in variants}
    k = len(names)
    colours = palette(k + 1)                      # the last colour: any extra (distractor) class
    names_shown = names + ["(other vocabulary class)"]
    titles = {**TITLES, **(titles or {})}
    cols = ["image", "ground truth"] + [titles.get(v, v) for v in variants]
    n = len(images)
    present = sorted({int(c) for arr in [masks, *preds.values()] for c in np.unique(arr) if 0 <= c <= k and c != ignore})
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(n, len(cols), figsize=(1.9 * len(cols), 1.9 * n + 0.9), squeeze=False)
        for r in range(n):
            panels = [images[r].astype(np.float32) / 255.0, overlay(images[r], masks[r], colours, ignore)]
            panels += [overlay(images[r], np.minimum(preds[v][r], k), colours, ignore) for v in variants]
            for c, (ax, im) in enumerate(zip(axes[r], panels)):
                ax.imshow(im, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(cols[c])
        handles = [plt.Rectangle((0, 0), 1, 1, color=colours[c]) for c in present]
        fig.legend(handles, [names_shown[c] for c in present], loc="lower center", ncol=min(6, len(present)),
                   frameon=False)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.12 if len(present) > 6 else 0.07, 1, 0.97))
        return save(fig, path)


def overlay_figures(cfg: dict, slug: str, protocol: str, method: str, titles: dict | None = None) -> list[Path]:
    """Every saved test-image prediction (`overlays_<arch>.npz` of a run folder) drawn to cfg["figure_dir"]."""
    made = []
    for npz in sorted((runs_root() / slug / protocol / cfg["profile"]).glob("*/overlays_*.npz")):
        arch, dataset = npz.stem[len("overlays_"):], npz.parent.name
        out = Path(cfg["figure_dir"]) / f"overlays_{cfg['profile']}_{dataset}_{arch}.png"
        made.append(overlay_figure(npz, out, title=f"{method} on {dataset}, {arch} ({cfg['profile']})", titles=titles))
        print(made[-1])
    if not made:
        print(f"no saved predictions to draw yet: run `python -m papers.{slug} reproduce` first")
    return made
