"""The world's distribution: sample scene specs (what is where, in which style) for a batch of images.

`sample_scenes(rng, n, dist, fixed)` draws n scenes from a `Distribution` (pretraining defaults; the
downstream sets override fields), with optional per-image fixed choices (the class of a downstream
image: its kind, pattern, scene, count, ...). It returns the `SceneSpec` the renderer draws and one
`SceneInfo` per image that the caption writer describes.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .render import CARTOON, CLUTTERED, PHOTO, SKETCH, SceneSpec
from .shapes import GLYPH_OFFSET, NUM_KINDS
from .vocab import BACKGROUNDS, COLOURS, KINDS, PATTERNS, SCENES, STYLES

MAX_MAIN = 6  # objects named by the caption
MAX_SLOTS = 13  # + distractors and occluders of cluttered scenes
GRID = 3  # multi-object layout: distinct cells of a GRID x GRID grid

_PALETTE = np.array([c.rgb for c in COLOURS], np.float32) / 255.0
_SECONDARY = [None if k.secondary is None else np.array(k.secondary, np.float32) / 255.0 for k in KINDS]
ALL_KINDS = tuple(range(NUM_KINDS))
DIGIT_KINDS = tuple(range(GLYPH_OFFSET, GLYPH_OFFSET + 10))
SHAPE_KINDS = tuple(i for i, k in enumerate(KINDS) if k.parent in ("round shape", "polygon", "symbol"))


@dataclass(frozen=True)
class Distribution:
    """What the world looks like. Probabilities need not sum to one (they are normalised)."""

    kinds: tuple[int, ...] = ALL_KINDS + DIGIT_KINDS
    digit_share: float = 0.05  # share of groups that are printed digits (if digits are among `kinds`)
    colours: tuple[int, ...] = tuple(range(len(COLOURS)))
    basic_colour_weight: float = 2.0  # basic colours are this much more frequent than shades
    solid_share: float = 0.5  # share of objects without a fill pattern
    patterns: tuple[int, ...] = tuple(range(len(PATTERNS)))
    styles: dict = field(default_factory=lambda: {"photo": 0.72, "cartoon": 0.15, "sketch": 0.05, "cluttered": 0.08})
    posts: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0)  # none, mosaic, neon, painting
    groups: tuple[float, ...] = (0.85, 0.13, 0.02)  # P(1, 2, 3 groups of objects)
    counts: tuple[float, ...] = (0.75, 0.1, 0.08, 0.07)  # P(count = 1..4) per group
    backgrounds: dict = field(default_factory=lambda: {"scene": 0.55, "plain": 0.2, "gradient": 0.1, "pattern": 0.08, "noise": 0.07})
    scenes: tuple[int, ...] = tuple(range(len(SCENES)))
    sizes: tuple[float, ...] = (0.15, 0.4, 0.45)  # small, medium, large (single objects)
    rot_deg: float = 15.0
    aspect: tuple[float, float] = (0.85, 1.15)
    camouflage: float = 0.0  # P(background colour close to the object's)
    bg_mute: tuple[float, float] = (0.3, 0.7)  # plain/gradient/noise/pattern backgrounds are mixed this much with gray
    contrast: float = 0.3  # ... and pushed at least this far in luminance from the first object (edges stay visible)
    distractors: tuple[int, int] = (2, 5)  # cluttered: small unnamed objects behind
    occluders: tuple[int, int] = (1, 2)  # cluttered: objects drawn over the main one
    noise: tuple[float, float] = (0.01, 0.05)  # photo pixel noise sigma
    blur: float = 0.4

    def with_(self, **kw: Any) -> "Distribution":
        return replace(self, **kw)


@dataclass
class Group:
    kind: int
    colour: int
    pattern: int
    count: int
    size: int  # 0 small, 1 medium, 2 large


@dataclass
class SceneInfo:
    groups: list[Group]
    bg: int
    bg_colour: int  # palette index of plain/gradient backgrounds (-1 otherwise)
    style: int
    post: int
    position: tuple[float, float]  # centre of the first object, in [0, 1]
    bg_pattern: int = -1  # pattern of a "pattern" background


def _norm(p) -> np.ndarray:
    p = np.asarray(p, np.float64)
    return p / p.sum()


def _cum(weights) -> list[float]:
    return list(np.cumsum(_norm(weights)))


def sample_scenes(rng: np.random.Generator, n: int, dist: Distribution = Distribution(), size: int = 64,
                  fixed: dict[str, Any] | None = None) -> tuple[SceneSpec, list[SceneInfo]]:
    """Draw n scenes. `fixed` may pin per image (arrays of length n): "style", "post", "bg" (BACKGROUNDS
    index), "kind" (of the first group), "kinds" ((n, G) with -1 padding: exactly these groups, e.g.
    multi-label), "count" (total named objects, spread over the groups; 0 = background only), "colour",
    "pattern", "size" (of the first group), "bg_pat" (pattern of a "pattern" background)."""
    fixed = fixed or {}
    pr = random.Random(int(rng.integers(2 ** 63)))  # fast scalar draws for the per-image layout
    s = size / 64.0
    K = MAX_SLOTS
    spec = _empty_spec(n, K)
    colour_idx = np.zeros((n, K), np.int64)

    style_opts = [STYLES.index(k) for k in dist.styles]
    style_cw = _cum(list(dist.styles.values()))
    post_cw = _cum(dist.posts)
    bg_types = list(dist.backgrounds)
    bg_cw = _cum(list(dist.backgrounds.values()))
    kinds_all = list(dist.kinds)
    is_digit = [k in DIGIT_KINDS for k in kinds_all]
    n_dig = sum(is_digit)
    kind_w = [dist.digit_share / n_dig if d else (1 - dist.digit_share * (n_dig > 0)) / max(len(kinds_all) - n_dig, 1)
              for d in is_digit]
    col_opts = list(dist.colours)
    col_cw = _cum([dist.basic_colour_weight if COLOURS[c].basic == COLOURS[c].name else 1.0 for c in col_opts])
    pat_opts = list(dist.patterns)
    n_pat = sum(p != 0 for p in pat_opts)
    pat_cw = _cum([dist.solid_share if p == 0 else (1 - dist.solid_share * (0 in pat_opts)) / max(n_pat, 1) for p in pat_opts])
    group_cw, count_cw, size_cw = _cum(dist.groups), _cum(dist.counts), _cum(dist.sizes)
    clutter_kinds = SHAPE_KINDS + ALL_KINDS[len(SHAPE_KINDS):]
    plain_bg = BACKGROUNDS.index("plain")

    def choice(opts, cw):
        return pr.choices(opts, cum_weights=cw)[0]

    infos: list[SceneInfo] = []
    main_slot = np.full(n, -1)
    camo = np.zeros(n, bool)
    for i in range(n):
        st = int(fixed["style"][i]) if "style" in fixed else choice(style_opts, style_cw)
        spec.style[i] = st
        spec.post[i] = int(fixed["post"][i]) if "post" in fixed else choice(range(len(dist.posts)), post_cw)
        # ---- groups: kinds, colours, patterns, counts, sizes
        if "kinds" in fixed:
            gk = [int(k) for k in fixed["kinds"][i] if k >= 0]
        else:
            ng = choice(range(1, len(dist.groups) + 1), group_cw)
            gk = [int(fixed["kind"][i])] if "kind" in fixed else []
            while len(gk) < ng:
                k = pr.choices(kinds_all, weights=kind_w)[0]
                if k not in gk:
                    gk.append(k)
        if "count" in fixed:  # total named objects (0: a background only, e.g. a full-frame texture)
            total = int(fixed["count"][i])
            gk = gk[:total]
            counts = [1] * len(gk)
            for _ in range(total - len(gk)):
                counts[pr.randrange(len(gk))] += 1
        else:
            counts = [choice(range(1, len(dist.counts) + 1), count_cw) for _ in gk]
            while sum(counts) > MAX_MAIN:
                counts[counts.index(max(counts))] -= 1
        groups = []
        for g, k in enumerate(gk):
            first = g == 0
            colour = int(fixed["colour"][i]) if first and "colour" in fixed else choice(col_opts, col_cw)
            if k >= GLYPH_OFFSET:
                pattern = 0
            else:
                pattern = int(fixed["pattern"][i]) if first and "pattern" in fixed else choice(pat_opts, pat_cw)
            sz = int(fixed["size"][i]) if first and "size" in fixed else choice((0, 1, 2), size_cw)
            groups.append(Group(k, colour, pattern, counts[g], sz))

        # ---- layout of the named objects
        total = sum(gr.count for gr in groups)
        slots = []  # (kind, colour, pattern, cx, cy, r)
        if total == 0:
            pass
        elif total == 1:
            lo, hi = ((7, 11), (12, 17), (18, 26))[groups[0].size]
            r = pr.uniform(lo, hi) * s
            slots.append((groups[0], pr.uniform(r + 1, size - r - 1), pr.uniform(r + 1, size - r - 1), r))
        else:
            cell = size / GRID
            cells = pr.sample(range(GRID * GRID), total)
            members = [gr for gr in groups for _ in range(gr.count)]
            for gr, c in zip(members, cells):
                r = min(pr.uniform(6.5, 10) * s * (0.85, 1.0, 1.12)[gr.size], cell / 2 - 0.5)
                j = cell / 2 - r
                slots.append((gr, (c % GRID + 0.5) * cell + pr.uniform(-j, j), (c // GRID + 0.5) * cell + pr.uniform(-j, j), r))
        named = [(gr.kind, gr.colour, gr.pattern, cx, cy, r) for gr, cx, cy, r in slots]
        behind, front = [], []
        if st == CLUTTERED and named:  # unnamed distractors behind, occluders over the first object
            def clutter(cx, cy, r):
                pat = pr.randrange(len(PATTERNS)) if pr.random() < 0.5 else 0
                return (pr.choice(clutter_kinds), pr.randrange(len(COLOURS)), pat, cx, cy, r)
            for _ in range(pr.randint(*dist.distractors)):
                r = pr.uniform(4, 7) * s
                behind.append(clutter(pr.uniform(r, size - r), pr.uniform(r, size - r), r))
            _, _, _, cx0, cy0, r0 = named[0]
            for _ in range(pr.randint(*dist.occluders)):
                a, d = pr.uniform(0, 2 * math.pi), r0 * pr.uniform(0.7, 1.1)
                front.append(clutter(cx0 + d * math.cos(a), cy0 + d * math.sin(a), r0 * pr.uniform(0.45, 0.7)))
        main_slot[i] = len(behind) if named else -1
        for k, (kind, colour, pattern, cx, cy, r) in enumerate((behind + named + front)[:K]):
            spec.active[i, k] = True
            spec.kind[i, k], colour_idx[i, k], spec.pat[i, k] = kind, colour, pattern
            spec.cx[i, k], spec.cy[i, k], spec.r[i, k] = cx, cy, r
            spec.rot[i, k] = math.radians(pr.uniform(-dist.rot_deg, dist.rot_deg))
            spec.aspect[i, k] = pr.uniform(*dist.aspect)

        # ---- background
        main_colour = groups[0].colour if groups else pr.randrange(len(COLOURS))
        if "bg" in fixed:
            spec.bg[i] = int(fixed["bg"][i])
        elif st == SKETCH:
            spec.bg[i] = plain_bg
        else:
            bgt = choice(bg_types, bg_cw)
            spec.bg[i] = pr.choice(dist.scenes) if bgt == "scene" else BACKGROUNDS.index(bgt)
        if pr.random() < dist.camouflage:
            bg_colour = main_colour
            camo[i] = bool(groups)
        else:
            bg_colour = pr.choice([c for c in range(len(COLOURS)) if COLOURS[c].basic != COLOURS[main_colour].basic])
        spec.bg_pat[i] = int(fixed["bg_pat"][i]) if "bg_pat" in fixed else pr.randrange(1, len(PATTERNS))
        infos.append(SceneInfo(groups, int(spec.bg[i]), bg_colour if BACKGROUNDS[spec.bg[i]] in ("plain", "gradient") else -1,
                               st, int(spec.post[i]), (named[0][3] / size, named[0][4] / size) if named else (0.5, 0.5),
                               int(spec.bg_pat[i]) if BACKGROUNDS[spec.bg[i]] == "pattern" else -1))
        spec.bg_rgb1[i] = _PALETTE[bg_colour]

    # ---- colours and photometric settings, vectorised
    style = spec.style
    spec.rgb[:] = np.clip(_PALETTE[colour_idx] + rng.normal(0, 0.03, (n, K, 3)).astype(np.float32), 0, 1)
    sec = _SECONDARY_TABLE[spec.kind]
    has_sec = ~np.isnan(sec[..., 0])
    spec.rgb2[:] = np.where(has_sec[..., None], np.clip(np.nan_to_num(sec) + rng.normal(0, 0.03, (n, K, 3)), 0, 1), spec.rgb * 0.55)
    light_or_dark = np.where(spec.rgb.mean(-1, keepdims=True) > 0.45, spec.rgb * 0.4, spec.rgb * 0.4 + 0.6)
    other = _PALETTE[rng.integers(len(COLOURS), size=(n, K))]
    spec.pat_rgb[:] = np.where(rng.random((n, K, 1)) < 0.5, light_or_dark, other)
    spec.pat_freq[:] = rng.uniform(2.0, 4.0, (n, K))
    # backgrounds: muted towards gray and pushed away in luminance from the first object, so that its
    # outline is visible (a CNN learns shape far faster from luminance edges); camouflage keeps its colour
    has_obj = main_slot >= 0
    main_rgb = spec.rgb[np.arange(n), np.maximum(main_slot, 0)]
    mute = np.where(has_obj, rng.uniform(*dist.bg_mute, n), 0.0)[:, None].astype(np.float32)
    bg1 = spec.bg_rgb1 * rng.uniform(0.8, 1.1, (n, 1)) + rng.normal(0, 0.03, (n, 3))
    bg2 = _PALETTE[rng.integers(len(COLOURS), size=n)] * rng.uniform(0.6, 1.0, (n, 1))
    bg1, bg2 = ((1 - mute) * b + mute * 0.5 for b in (bg1, bg2))
    lo = main_rgb @ _LUM
    for b in (bg1, bg2):
        lb = b @ _LUM
        target = np.where(lo > 0.5, np.minimum(lb, lo - dist.contrast), np.maximum(lb, lo + dist.contrast))
        b += np.where(has_obj, target - lb, 0.0)[:, None]
    bg1 = np.where(camo[:, None], main_rgb + rng.normal(0, 0.08, (n, 3)), bg1)
    spec.bg_rgb1[:] = np.clip(bg1, 0, 1)
    spec.bg_rgb2[:] = np.clip(bg2, 0, 1)
    spec.bg_freq[:] = rng.uniform(3, 8, n)
    spec.bg_rand[:] = rng.random((n, 4))
    spec.noise[:] = np.where(style == PHOTO, rng.uniform(*dist.noise, n), np.where(style == CLUTTERED, rng.uniform(0.03, 0.07, n), 0.0))
    spec.blur[:] = ((style == PHOTO) | (style == CLUTTERED)) & (rng.random(n) < dist.blur)
    a = rng.uniform(0, 2 * math.pi, n)
    spec.light[:] = np.stack([np.cos(a), np.sin(a)], 1)
    return spec, infos


_LUM = np.array([0.299, 0.587, 0.114], np.float32)
_SECONDARY_TABLE = np.full((NUM_KINDS + len(DIGIT_KINDS), 3), np.nan, np.float32)
for _i, _sec in enumerate(_SECONDARY):
    if _sec is not None:
        _SECONDARY_TABLE[_i] = _sec


def _empty_spec(n: int, K: int) -> SceneSpec:
    f32 = np.float32
    return SceneSpec(
        style=np.zeros(n, np.int64), bg=np.zeros(n, np.int64), bg_rgb1=np.zeros((n, 3), f32), bg_rgb2=np.zeros((n, 3), f32),
        bg_pat=np.zeros(n, np.int64), bg_freq=np.ones(n, f32), bg_rand=np.zeros((n, 4), f32), noise=np.zeros(n, f32),
        blur=np.zeros(n, bool), post=np.zeros(n, np.int64), light=np.zeros((n, 2), f32),
        active=np.zeros((n, K), bool), kind=np.zeros((n, K), np.int64), rgb=np.zeros((n, K, 3), f32),
        rgb2=np.zeros((n, K, 3), f32), pat=np.zeros((n, K), np.int64), pat_rgb=np.zeros((n, K, 3), f32),
        pat_freq=np.ones((n, K), f32), cx=np.zeros((n, K), f32), cy=np.zeros((n, K), f32), r=np.ones((n, K), f32),
        rot=np.zeros((n, K), f32), aspect=np.ones((n, K), f32))


__all__ = ["Distribution", "Group", "SceneInfo", "sample_scenes", "ALL_KINDS", "DIGIT_KINDS", "SHAPE_KINDS",
           "CARTOON", "CLUTTERED", "PHOTO", "SKETCH"]
