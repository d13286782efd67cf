"""Caption writer: web alt-text-like descriptions of a `SceneInfo`, at varied detail and with some noise.

Detail varies (sometimes only the object, sometimes colour, fill pattern, count, size, position, scene
and style), word choice varies (synonyms, shade names or everyday colour words, tag lists, filler), and
a few captions are wrong or vague, as on the web. Every choice comes from the `random.Random` passed
in, so captions are reproducible.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .render import CARTOON, CLUTTERED, SKETCH
from .shapes import GLYPH_OFFSET
from .vocab import BACKGROUNDS, COLOURS, COUNT_WORDS, DIGIT_WORDS, KINDS, PATTERNS, SCENES, SIZE_WORDS
from .world import Group, SceneInfo


@dataclass(frozen=True)
class CaptionStyle:
    """How often a caption mentions each attribute, and how noisy it is."""

    p_colour: float = 0.5
    p_shade_name: float = 0.4  # use the exact shade ("crimson") instead of the everyday word ("red")
    p_pattern: float = 0.6
    p_size: float = 0.25
    p_position: float = 0.12
    p_scene: float = 0.5
    p_background: float = 0.3  # "on a blue background" / "on a striped background"
    p_style: float = 0.7  # prefix naming the rendering style
    p_synonym: float = 0.15
    p_vague_kind: float = 0.06  # "a red shape" instead of the object's name
    p_wrong_kind: float = 0.04  # label noise: another object's name
    p_wrong_colour: float = 0.05
    p_tags: float = 0.1  # "star, red, beach" tag lists
    p_filler: float = 0.1  # "IMG 2041", "free download", ...


STYLE_PREFIX = {
    "photo": ["a photo of", "a picture of", "an image of", "a close-up photo of", "a blurry photo of", "a bright photo of",
              "stock photo of", "a snapshot of"],
    "cartoon": ["a cartoon of", "a drawing of", "clip art of", "an illustration of", "a cartoon drawing of", "a flat icon of"],
    "sketch": ["a sketch of", "a pencil drawing of", "a line drawing of", "a black and white sketch of", "a doodle of"],
    "cluttered": ["a cluttered photo of", "a messy picture with", "a busy scene with", "a photo of", "lots of things including"],
}
STYLE_KEYS = ["photo", "cartoon", "sketch", "cluttered"]
FILLER_PRE = ["IMG 2041", "free download:", "new!", "hd wallpaper", "stock image:", "my art:", "pic:"]
FILLER_POST = ["for sale", "| stock photo", "lol", "via pinterest", "(free download)", "#art", "#design", "- wallpaper"]
VAGUE = ["shape", "thing", "object", "figure", "item"]
# a patterned background is sometimes called a texture or pattern, as texture datasets (DTD) name their classes
BG_PATTERN_PHRASES = ["on a {} background", "on a {} background", "against a {} texture", "on a {} pattern",
                      "in front of a {} texture"]
POSITIONS_H = {0: "on the left", 1: "in the middle", 2: "on the right"}
POSITIONS_V = {0: "at the top", 1: "in the middle", 2: "at the bottom"}


def kind_word(kind: int, r: random.Random, cs: CaptionStyle, plural: bool) -> str:
    if kind >= GLYPH_OFFSET:
        d = kind - GLYPH_OFFSET
        form = r.random()
        if plural:
            return f"{d}s" if form < 0.5 else f"number {d}s"
        return str(d) if form < 0.4 else (f"number {d}" if form < 0.7 else (f"digit {d}" if form < 0.85 else f"number {DIGIT_WORDS[d]}"))
    k = KINDS[kind]
    if r.random() < cs.p_wrong_kind:
        k = KINDS[r.randrange(len(KINDS))]
    if r.random() < cs.p_vague_kind:
        w = r.choice(VAGUE)
        return w + "s" if plural else w
    name = r.choice(k.synonyms) if (k.synonyms and r.random() < cs.p_synonym) else k.name
    if plural:
        return k.plural_name if name == k.name else (name if name.endswith("s") else name + "s")
    return name


def colour_word(colour: int, r: random.Random, cs: CaptionStyle) -> str:
    if r.random() < cs.p_wrong_colour:
        colour = r.randrange(len(COLOURS))
    c = COLOURS[colour]
    return c.name if (c.name == c.basic or r.random() < cs.p_shade_name) else c.basic


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou8" else "a"


def noun_phrase(g: Group, style: int, r: random.Random, cs: CaptionStyle, single: bool) -> str:
    plural = g.count > 1
    noun = kind_word(g.kind, r, cs, plural)
    mods = []
    if single and r.random() < cs.p_size:
        w = r.choice(SIZE_WORDS[("small", "medium", "large")[g.size]])
        if w:
            mods.append(w)
    use_colour = style != SKETCH and r.random() < cs.p_colour
    use_pattern = style != SKETCH and g.pattern != 0 and r.random() < cs.p_pattern
    pat = PATTERNS[g.pattern]
    pattern_after = use_pattern and r.random() < 0.35  # "with stripes" instead of "striped"
    if use_colour:
        mods.append(colour_word(g.colour, r, cs))
    if use_pattern and not pattern_after:
        mods.append(r.choice(pat.words))
    if use_colour and use_pattern and not pattern_after and r.random() < 0.3:
        mods[-2], mods[-1] = mods[-1], mods[-2]
    phrase = " ".join(mods + [noun])
    if pattern_after:
        phrase += " " + pat.phrase
    if plural:
        if r.random() < 0.85:
            return f"{COUNT_WORDS[g.count - 1]} {phrase}"
        return f"{r.choice(['some', 'several', 'a few', 'a group of'])} {phrase}"
    return f"{article(phrase)} {phrase}" if r.random() < 0.9 else phrase


def caption(info: SceneInfo, r: random.Random, cs: CaptionStyle = CaptionStyle()) -> str:
    style = info.style
    single = len(info.groups) == 1 and info.groups[0].count == 1
    if r.random() < cs.p_tags:
        return _tags(info, r, cs)
    nps = [noun_phrase(g, style, r, cs, single) for g in info.groups]
    body = nps[0] if len(nps) == 1 else ", ".join(nps[:-1]) + " and " + nps[-1]
    parts = []
    if r.random() < cs.p_style:
        parts.append(r.choice(STYLE_PREFIX[STYLE_KEYS[style]]))
    parts.append(body)
    if single and r.random() < cs.p_position:
        x, y = info.position
        h, v = min(int(x * 3), 2), min(int(y * 3), 2)
        parts.append(POSITIONS_H[h] if (v == 1 or r.random() < 0.5) else POSITIONS_V[v])
    bg = BACKGROUNDS[info.bg]
    if style != SKETCH:
        if info.bg < len(SCENES) and r.random() < cs.p_scene:
            parts.append(r.choice(SCENES[info.bg].phrases))
        elif bg in ("plain", "gradient") and info.bg_colour >= 0 and r.random() < cs.p_background:
            parts.append(f"on a {colour_word(info.bg_colour, r, cs)} background")
        elif bg == "pattern" and info.bg_pattern > 0 and r.random() < cs.p_background:
            parts.append(r.choice(BG_PATTERN_PHRASES).format(r.choice(PATTERNS[info.bg_pattern].words)))
    text = " ".join(parts)
    if style == CLUTTERED and r.random() < 0.2:
        text += " among other things"
    if style == CARTOON and r.random() < 0.1:
        text += ", cartoon style"
    if r.random() < cs.p_filler:
        text = f"{r.choice(FILLER_PRE)} {text}" if r.random() < 0.5 else f"{text} {r.choice(FILLER_POST)}"
    return text + "." if r.random() < 0.7 else text


def _tags(info: SceneInfo, r: random.Random, cs: CaptionStyle) -> str:
    words = []
    for g in info.groups:
        words.append(kind_word(g.kind, r, cs, False))
        if info.style != SKETCH and r.random() < cs.p_colour:
            words.append(colour_word(g.colour, r, cs))
        if info.style != SKETCH and g.pattern and r.random() < cs.p_pattern:
            words.append(PATTERNS[g.pattern].words[0])
    if info.bg < len(SCENES) and info.style != SKETCH and r.random() < cs.p_scene:
        words.append(SCENES[info.bg].name)
    if r.random() < 0.5:
        words.append(STYLE_KEYS[info.style] if info.style != CLUTTERED else "clutter")
    r.shuffle(words)
    return " ".join("#" + w.replace(" ", "") for w in words) if r.random() < 0.3 else ", ".join(words)


def captions(infos: list[SceneInfo], seed: int, cs: CaptionStyle = CaptionStyle()) -> list[str]:
    r = random.Random(seed)
    return [caption(info, r, cs) for info in infos]
