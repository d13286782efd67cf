"""The explanation figure (the paper's Fig. 1 style): per image, the descriptors that drove the decision, as bars of
their scores (cosine x 100) for the predicted class and for the other class of the story (the true class when the
prediction is wrong, else the runner-up); a class's score is the mean of its bars (dashed line)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from PIL import Image

from common.report.figures import STYLE, plt, save


def _short(text: str, width: int = 34) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def explanation_figure(data: dict, path: Path, top: int = 4) -> Path | None:
    images = data.get("images") or []
    if not images:
        return None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(images), 3, figsize=(9.5, 1.55 * len(images) + 0.4),
                                 gridspec_kw={"width_ratios": [0.55, 1, 1]}, squeeze=False)
        for row, im in zip(axes, images):
            ax = row[0]
            try:
                ax.imshow(Image.open(im["impath"]).convert("RGB"))
            except OSError:
                ax.text(0.5, 0.5, "image\nmissing", ha="center", va="center")
            ax.set_xticks([])
            ax.set_yticks([])
            ok = im["predicted"] == im["true"]
            ax.set_title(textwrap.fill(f"{im['dataset']} #{im['index']}: true {im['true']}", 22), fontsize=6)
            ax.set_xlabel(textwrap.fill(f"bare name: {im['classname_baseline']}", 24), fontsize=6)
            lo = min(d["score"] for c in im["classes"] for d in c["descriptors"][:top])
            hi = max(d["score"] for c in im["classes"] for d in c["descriptors"][:top])
            pad = max(0.5, 0.1 * (hi - lo))
            for ax, cls in zip(row[1:], im["classes"]):
                ds = cls["descriptors"][:top][::-1]
                color = ("tab:green" if ok else "tab:red") if cls["role"] == "predicted" else "tab:gray"
                ax.barh(range(len(ds)), [d["score"] for d in ds], color=color, alpha=0.8)
                ax.set_yticks(range(len(ds)))
                ax.set_yticklabels([_short(d["descriptor"] or "(empty)") for d in ds], fontsize=6)
                ax.axvline(cls["score"], color="black", ls="--", lw=0.8)
                ax.set_xlim(lo - pad, hi + pad)
                shown = f" (top {top} of {len(cls['descriptors'])})" if len(cls["descriptors"]) > top else ""
                ax.set_title(f"{cls['role']}: {_short(cls['class'], 28)}  score {cls['score']:.2f}{shown}", fontsize=7)
                ax.tick_params(axis="x", labelsize=6)
                ax.grid(axis="x", alpha=0.3)
        axes[-1][1].set_xlabel("cos(image, '<class>, which ... <descriptor>') x 100")
        axes[-1][2].set_xlabel("dashed: class score (mean of its descriptors)")
        fig.suptitle(f"Classification by description: why each image got its label ({data['backbone']}, "
                     f"{data['profile']})", fontsize=9)
        fig.tight_layout()
        return save(fig, Path(path))
