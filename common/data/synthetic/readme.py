"""Generated parts of data/README.md: the sample grid (PNG) and the zero-shot vs linear-probe table.

    python -m common.data.synthetic.readme --root data/embedded --grid data/samples.png \\
        --probe data/embedded/probe/tiny-rn.json data/embedded/probe/tiny-vit.json --readme data/README.md

The README keeps hand-written text; the blocks between `<!-- BEGIN generated:NAME -->` and
`<!-- END generated:NAME -->` are replaced.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.data import build_dataset, load_image

from .captions import captions
from .catalog import SETS
from .pretrain import PRETRAIN_CAPTIONS, PRETRAIN_DIST
from .probe import base_table, checks_table, markdown_table
from .render import render
from .world import sample_scenes

CELL = 64
LABEL_W = 150


def _seg_colours(mask: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    pal = rng.integers(40, 255, (256, 3)).astype(np.uint8)
    pal[255] = 0
    return pal[mask]


def sample_grid(root: str | Path, out: str | Path, per_row: int = 10, seed: int = 0) -> Path:
    """One row per dataset (plus pretraining samples with their captions' first words), PNG."""
    rows: list[tuple[str, list[np.ndarray]]] = []
    rng = np.random.default_rng(seed)
    spec, infos = sample_scenes(rng, per_row, PRETRAIN_DIST, 64)
    rows.append(("pretraining stream", list(render(spec, rng, 64))))
    r = random.Random(seed)
    for name, info in SETS.items():
        ds = build_dataset(name, root)
        items = r.sample(ds.test, min(per_row, len(ds.test)))
        imgs = []
        for d in items:
            im = np.asarray(load_image(d.impath).resize((CELL, CELL), Image.NEAREST))
            if d.mask and len(imgs) % 2 == 1:
                im = _seg_colours(np.asarray(Image.open(d.mask).resize((CELL, CELL), Image.NEAREST)))
            imgs.append(im)
        rows.append((name, imgs))
    H = len(rows) * (CELL + 4)
    W = LABEL_W + per_row * (CELL + 4)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=13)
    for i, (name, imgs) in enumerate(rows):
        y = i * (CELL + 4)
        draw.text((4, y + CELL // 2 - 8), name, fill=(0, 0, 0), font=font)
        for j, im in enumerate(imgs):
            canvas.paste(Image.fromarray(im), (LABEL_W + j * (CELL + 4), y))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def suite_table(root: str | Path | None = None) -> str:
    """The catalogue as a markdown table (with the written split sizes when the suite is on disk)."""
    sizes = {}
    if root is not None and (Path(root) / "suite.json").is_file():
        sizes = json.loads((Path(root) / "suite.json").read_text())["sets"]
    lines = ["| dataset | folder | classes | template | train / val / test | what |", "|---|---|---|---|---|---|"]
    for name, info in SETS.items():
        sz = sizes.get(name)
        split = f"{sz['train']} / {sz['val']} / {sz['test']}" if sz else "/".join(map(str, info.per_class)) + " per class"
        lines.append(f"| `{name}` | `{info.folder}` | {len(info.classnames)} | `{info.template}` | {split} | {info.about} |")
    return "\n".join(lines)


def example_captions(n: int = 8, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    _, infos = sample_scenes(rng, n, PRETRAIN_DIST, 64)
    return captions(infos, seed, PRETRAIN_CAPTIONS)


def pretrain_table(logs: list[str | Path]) -> str:
    """The pretraining runs from their JSON logs: recipe, wall time and the quick zero-shot checks."""
    lines = ["| tower | steps x batch | lr | distill | s / step | training (min) | object zero-shot by step | colour zero-shot (end) |",
             "|---|---|---|---|---|---|---|---|"]
    for p in logs:
        log = json.loads(Path(p).read_text())
        curve = ", ".join(f"{e['step']}: {100 * e['object']:.0f}%" for e in log["evals"])
        lines.append(f"| {log['arch']} | {log['steps']} x {log['batch']} | {log['lr']} | {log['distill']} | {log['s_per_step']} | "
                     f"{log['train_s'] / 60:.1f} | {curve} | {100 * log['evals'][-1]['colour']:.0f}% |")
    return "\n".join(lines)


SWEEP_COLUMNS = ["emb_objects", "emb_textures", "emb_scenes", "emb_finegrained", "emb_counting", "emb_satellite"]


def sweep_table(paths: list[str | Path]) -> str:
    """Recipe-sweep records (`sweep.py` JSON lines): recipe, quick object zero-shot, then downstream
    zero-shot / 16-shot probe per set, best quick check first within each tower."""
    recs = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    recs.sort(key=lambda r: (r["arch"], -r["evals"][-1]["object"]))
    lines = ["| variant | tower | steps x batch | seed | curriculum | groups of 2-4 | object zero-shot (quick) | "
             + " | ".join(f"{c[4:]} zs / probe" for c in SWEEP_COLUMNS) + " |",
             "|---" * (7 + len(SWEEP_COLUMNS)) + "|"]
    for r in recs:
        c = r["cfg"]
        groups = "" if "counts" not in r else f"{100 * (1 - r['counts'][0]):.0f}%"
        cells = [r["variant"], r["arch"], f"{c['steps']} x {c['batch']}", str(c["seed"]), str(c["curriculum"]), groups,
                 f"{100 * r['evals'][-1]['object']:.0f}%"]
        for name in SWEEP_COLUMNS:
            zs, lp = r["rows"].get(name, (None, None))
            cells.append("" if zs is None else f"{zs:.1f} / {lp:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- BEGIN generated:{name} -->", f"<!-- END generated:{name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        return re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    return text.rstrip() + "\n\n" + block + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="data/embedded")
    ap.add_argument("--grid", default="data/samples.png")
    ap.add_argument("--probe", nargs="*", default=[], help="probe JSON files (python -m common.data.synthetic.probe --json)")
    ap.add_argument("--pretrain-logs", nargs="*", default=[], help="checkpoint JSON logs (<ckpt>.pt.json)")
    ap.add_argument("--sweeps", nargs="*", default=[], help="recipe-sweep JSON lines (python -m common.data.synthetic.sweep)")
    ap.add_argument("--readme", default="data/README.md")
    a = ap.parse_args(argv)
    sample_grid(a.root, a.grid)
    readme = Path(a.readme)
    text = readme.read_text() if readme.is_file() else "# data\n"
    text = replace_block(text, "captions", "\n".join(f"- `{c}`" for c in example_captions()))
    text = replace_block(text, "suite", suite_table(a.root))
    if a.pretrain_logs:
        text = replace_block(text, "pretrain", pretrain_table(a.pretrain_logs))
    if a.sweeps:
        text = replace_block(text, "sweep", sweep_table(a.sweeps))
    if a.probe:
        results = {}
        for p in a.probe:
            js = json.loads(Path(p).read_text())
            results[js["arch"]] = js["rows"]
        text = replace_block(text, "probe", markdown_table(results))
        if any("zero_shot_base" in row for rows in results.values() for row in rows):
            text = replace_block(text, "probe_base", base_table(results))
        text = replace_block(text, "probe_checks", checks_table(results))
    readme.write_text(text)
    print(f"wrote {a.grid} and {readme}")


if __name__ == "__main__":
    main()
