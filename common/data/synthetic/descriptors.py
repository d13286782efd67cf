"""Rule-written class descriptors for the embedded sets, in the published formats.

- VCD (`descriptors_vcd.json`): {classname: [descriptor phrase, ...]} (scored as "{c} which has {d}").
- CuPL (`descriptors_cupl.json`): {classname: [full sentence, ...]}.
No language model: the phrases are the world's own facts about each concept (vocab tables), and the
CuPL sentences are fixed sentence frames filled with them.
"""
from __future__ import annotations

import json
from pathlib import Path

from .catalog import FINE_CLASSES, SETS
from .vocab import (COLOUR_INDEX, COLOURS, COUNT_DESCRIPTORS, FASHION_DESCRIPTORS, KIND_INDEX, KINDS, MNIST_DESCRIPTORS,
                    PATTERN_INDEX, PATTERNS, SATELLITE_DESCRIPTORS, SCENE_INDEX, SCENES, STUFF)

STUFF_DESCRIPTORS = {
    "sky": ("a wide open area above the horizon", "blue or grey colour"), "water": ("a blue surface", "ripples or waves"),
    "sand": ("a yellow or orange grainy ground", "dunes or a beach"), "snow": ("a white cold ground", "soft bluish shadows"),
    "grass": ("a green ground", "short plants"), "trees": ("tree trunks", "dark green leaves"),
    "wall": ("a flat vertical surface", "bricks or paint"), "floor": ("tiles", "a flat surface underfoot"),
    "mountain": ("grey rocky peaks", "snow caps"), "rock": ("rough dark stone", "a cave wall"),
    "ground": ("dark earth", "a horizon line"),
}
CUPL_FRAMES = ("{A} {c} has {d}.", "A photo of {a} {c}, which has {d}.", "You can recognise {a} {c} by {d}.",
               "{A} {c} usually shows {d}.", "In a picture, {a} {c} looks like something with {d}.")


def _colour_phrases(name: str) -> tuple[str, ...]:
    c = COLOURS[COLOUR_INDEX[name]]
    lum = sum(c.rgb) / (3 * 255)
    tone = "dark" if lum < 0.3 else ("light" if lum > 0.7 else "bright")
    return (f"a {tone} {c.basic} colour", f"a {name} hue") if c.basic != name else (f"a {tone} {name} colour",)


def class_descriptors(name: str) -> dict[str, list[str]]:
    """VCD-style descriptor phrases for every class of the set `name`."""
    info = SETS[name]
    out = {}
    for c in info.classnames:
        if name.startswith("emb_objects") or name == "emb_multilabel" or (name == "emb_segmentation" and c in KIND_INDEX):
            k = KINDS[KIND_INDEX[c]]
            d = list(k.descriptors) + [f"a kind of {k.parent}"]
        elif name == "emb_segmentation":
            d = list(STUFF_DESCRIPTORS[c])
        elif name == "emb_textures":
            d = list(PATTERNS[PATTERN_INDEX[c]].descriptors) + ["a repeating pattern"]
        elif name == "emb_scenes":
            d = list(SCENES[SCENE_INDEX[c]].descriptors)
        elif name == "emb_finegrained":
            shade, shape = c.rsplit(" ", 1)
            d = list(_colour_phrases(shade)) + list(KINDS[KIND_INDEX[shape]].descriptors[:2])
        elif name == "emb_counting":
            d = list(COUNT_DESCRIPTORS[c])
        elif name == "emb_satellite":
            d = list(SATELLITE_DESCRIPTORS[c]) + ["seen from above"]
        elif name == "emb_mnist":
            d = list(MNIST_DESCRIPTORS[c]) + ["a handwritten digit"]
        elif name == "emb_fashion":
            d = list(FASHION_DESCRIPTORS[c]) + ["a piece of clothing or footwear"]
        else:  # pragma: no cover - catalogue and rules move together
            raise KeyError(name)
        out[c] = d
    return out


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def cupl_sentences(name: str, vcd: dict[str, list[str]]) -> dict[str, list[str]]:
    out = {}
    for c, ds in vcd.items():
        noun = f"number {c}" if name == "emb_mnist" else (f"group of {c} objects" if name == "emb_counting" else c)
        if name == "emb_satellite":
            noun = f"satellite photo of {c}"
        a = _article(noun)
        out[c] = [f.format(a=a, A=a.capitalize(), c=noun, d=d) for d in ds for f in CUPL_FRAMES]
    return out


def write_descriptor_files(folder: Path, name: str) -> dict[str, Path]:
    vcd = class_descriptors(name)
    paths = {"vcd": folder / "descriptors_vcd.json", "cupl": folder / "descriptors_cupl.json"}
    paths["vcd"].write_text(json.dumps(vcd, indent=1))
    paths["cupl"].write_text(json.dumps(cupl_sentences(name, vcd), indent=1))
    return paths


assert set(STUFF_DESCRIPTORS) == set(STUFF)
assert all(c.rsplit(" ", 1)[0] in COLOUR_INDEX for c in FINE_CLASSES)
