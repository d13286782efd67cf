"""Vectorised renderer: a `SceneSpec` (numpy arrays for a batch of images) -> uint8 RGB images.

All images of a batch are drawn together: backgrounds per background kind, objects slot by slot (slot k of
every image that has one), each object by mapping pixels into its local frame and gathering from the
kind bank and the pattern tiles. No per-image Python work, so rendering stays a small fraction of a
pretraining step. Pixel noise comes from the `rng` passed in: same spec + same rng state -> same bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from .shapes import TILE, kind_bank, pattern_bank
from .vocab import BACKGROUNDS, SCENES, STUFF_INDEX, STYLES

PHOTO, CARTOON, SKETCH, CLUTTERED = (STYLES.index(s) for s in ("photo", "cartoon", "sketch", "cluttered"))
SEG_OBJECT_OFFSET = 100  # segmentation value of an object = 100 + kind; stuff = its STUFF index; 255 = none
SEG_NONE = 255
DARK = np.array([0.12, 0.11, 0.10], np.float32)


@dataclass
class SceneSpec:
    """Everything needed to draw N images with up to K object slots (painter's order = slot order)."""

    # per image
    style: np.ndarray  # (N,) index into STYLES
    bg: np.ndarray  # (N,) index into BACKGROUNDS
    bg_rgb1: np.ndarray  # (N, 3) float in [0, 1]
    bg_rgb2: np.ndarray  # (N, 3)
    bg_pat: np.ndarray  # (N,) pattern of a "pattern" background
    bg_freq: np.ndarray  # (N,) pattern periods across the image
    bg_rand: np.ndarray  # (N, 4) uniform numbers that place scene elements (horizon height, ...)
    noise: np.ndarray  # (N,) pixel noise sigma
    blur: np.ndarray  # (N,) bool
    post: np.ndarray  # (N,) rendition post-process (vocab.POSTS)
    light: np.ndarray  # (N, 2) light direction for shading
    # per object slot
    active: np.ndarray  # (N, K) bool
    kind: np.ndarray  # (N, K) kind-bank index
    rgb: np.ndarray  # (N, K, 3) main colour
    rgb2: np.ndarray  # (N, K, 3) secondary colour
    pat: np.ndarray  # (N, K) fill pattern
    pat_rgb: np.ndarray  # (N, K, 3) second colour of the pattern
    pat_freq: np.ndarray  # (N, K) pattern periods across the object
    cx: np.ndarray  # (N, K) centre, pixels
    cy: np.ndarray
    r: np.ndarray  # (N, K) half size, pixels
    rot: np.ndarray  # (N, K) radians
    aspect: np.ndarray  # (N, K) horizontal stretch

    def __len__(self) -> int:
        return len(self.style)

    def subset(self, idx) -> "SceneSpec":
        return SceneSpec(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


# ------------------------------------------------------------------------------------------ helpers


def _grid(size: int):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return (yy + 0.5) / size, (xx + 0.5) / size  # in (0, 1), y down


def _interp_matrix(size: int, cells: int) -> np.ndarray:
    t = (np.arange(size, dtype=np.float32) + 0.5) / size * cells
    i0 = np.clip(np.floor(t).astype(int), 0, cells - 1)
    w = (t - i0)[:, None]
    m = np.zeros((size, cells + 1), np.float32)
    m[np.arange(size), i0] = 1 - w[:, 0]
    m[np.arange(size), i0 + 1] = w[:, 0]
    return m


def smooth_noise(rng: np.random.Generator, n: int, size: int, cells: int = 6) -> np.ndarray:
    """(n, size, size) smooth random field in [0, 1] (bilinear upsampling of a coarse grid)."""
    m = _interp_matrix(size, cells)
    low = rng.random((n, cells + 1, cells + 1), dtype=np.float32)
    return np.einsum("hi,nij,wj->nhw", m, low, m, optimize=True)


def _c(*rgb) -> np.ndarray:
    return np.array(rgb, np.float32) / 255.0


def _vmix(c_a, c_b, t):
    """Per-pixel blend of two colours (c_* broadcast to (..., 3)), t (...,) in [0, 1]."""
    t = np.clip(t, 0, 1)[..., None]
    return c_a * (1 - t) + c_b * t


def _tile(pat_idx, a, b):
    """Gather pattern bits at tile coordinates a (rows), b (cols) (float arrays, any sign)."""
    tiles = pattern_bank()
    return tiles[pat_idx, np.floor(a).astype(np.int64) % TILE, np.floor(b).astype(np.int64) % TILE]


def box_blur(img: np.ndarray, radius: int = 1) -> np.ndarray:
    """Separable box blur over the H, W axes of (n, H, W, C), edges replicated."""
    out = img
    for axis in (1, 2):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        p = np.pad(out, pad, mode="edge")
        acc = np.zeros_like(out)
        size = out.shape[axis]
        for d in range(2 * radius + 1):
            acc += np.take(p, np.arange(d, d + size), axis=axis)
        out = acc / (2 * radius + 1)
    return out


# ------------------------------------------------------------------------------------------ backgrounds


def _scene(name: str, n: int, yy, xx, p, j, rng):
    """One named scene for n images: RGB (n, H, W, 3) and stuff labels (n, H, W). p: (n, 4) uniforms,
    j: (n, 1, 1, 1) brightness jitter."""
    H = yy.shape[0]
    Y, X = yy[None], xx[None]
    S = STUFF_INDEX
    stuff = np.zeros((n, H, H), np.uint8)
    h = p[:, 0, None, None]
    if name == "beach":
        h = 0.28 + 0.15 * h
        sea_end = h + 0.1 + 0.1 * p[:, 1, None, None]
        sky = _vmix(_c(110, 170, 235), _c(195, 222, 245), Y / h)
        waves = (np.sin(X * 40 + Y * 90 + p[:, 2, None, None] * 6) > 0.75).astype(np.float32)
        sea = _vmix(_c(25, 95, 175), _c(120, 180, 220), waves * 0.6)
        sand = _vmix(_c(230, 205, 150), _c(200, 170, 120), smooth_noise(rng, n, H, 8))
        img = np.where((Y < h)[..., None], sky, np.where((Y < sea_end)[..., None], sea, sand))
        stuff[:] = np.where(Y < h, S["sky"], np.where(Y < sea_end, S["water"], S["sand"]))
    elif name == "forest":
        base = _vmix(_c(25, 70, 30), _c(60, 120, 50), smooth_noise(rng, n, H, 7))
        k = 4 + np.floor(p[:, 1, None, None] * 3)
        trunk = ((X * k + p[:, 2, None, None]) % 1.0) < 0.16
        canopy = (Y + 0.25 * smooth_noise(rng, n, H, 5)) < 0.3 + 0.2 * h
        img = np.where((trunk & ~canopy)[..., None], _vmix(_c(85, 60, 35), _c(60, 40, 25), Y), base)
        stuff[:] = S["trees"]
    elif name == "desert":
        h = 0.3 + 0.2 * h
        dune = h + 0.06 * np.sin(2 * np.pi * (X * (1 + p[:, 1, None, None]) + p[:, 2, None, None]))
        sky = _vmix(_c(225, 215, 190), _c(250, 235, 200), Y / h)
        sand = _vmix(_c(235, 175, 90), _c(190, 120, 55), (Y - dune) * 2 + 0.3 * smooth_noise(rng, n, H, 4))
        img = np.where((Y < dune)[..., None], sky, sand)
        stuff[:] = np.where(Y < dune, S["sky"], S["sand"])
    elif name == "snowfield":
        h = 0.3 + 0.2 * h
        sky = _vmix(_c(185, 195, 210), _c(225, 228, 235), Y / h)
        snow = _vmix(_c(248, 250, 252), _c(200, 210, 228), 0.6 * smooth_noise(rng, n, H, 6))
        img = np.where((Y < h)[..., None], sky, snow)
        stuff[:] = np.where(Y < h, S["sky"], S["snow"])
    elif name == "night sky":
        img = _vmix(_c(8, 12, 45), _c(35, 40, 90), Y + 0.2 * p[:, 1, None, None])
        stars = rng.random((n, H, H), dtype=np.float32) > 0.985
        img = np.where(stars[..., None], _c(240, 240, 255), img)
        stuff[:] = S["sky"]
    elif name == "meadow":
        h = 0.25 + 0.2 * h
        sky = _vmix(_c(100, 165, 235), _c(185, 215, 245), Y / h)
        grass = _vmix(_c(60, 150, 50), _c(110, 190, 70), smooth_noise(rng, n, H, 8))
        dots = rng.random((n, H, H), dtype=np.float32) > 0.985
        grass = np.where(dots[..., None], _c(245, 230, 80), grass)
        img = np.where((Y < h)[..., None], sky, grass)
        stuff[:] = np.where(Y < h, S["sky"], S["grass"])
    elif name == "ocean":
        h = 0.08 + 0.14 * h
        sky = _vmix(_c(150, 195, 240), _c(210, 230, 250), Y / h)
        waves = np.sin(X * 25 + 10 * np.sin(Y * 12) + p[:, 2, None, None] * 6) * np.sin(Y * 60) > 0.55
        sea = _vmix(_c(15, 60, 140), _c(40, 115, 195), (Y - h) * 1.5)
        sea = np.where(waves[..., None], sea * 1.35, sea)
        img = np.where((Y < h)[..., None], sky, sea)
        stuff[:] = np.where(Y < h, S["sky"], S["water"])
    elif name == "brick wall":
        f = 3 + 3 * p[:, 1, None, None]
        bits = _tile(np.full((n, 1, 1), _pattern_id("brick")), Y * f * TILE, X * f * TILE)
        brick = _vmix(_c(165, 65, 45), _c(125, 45, 35), smooth_noise(rng, n, H, 8))
        img = np.where(bits[..., None], brick, _c(190, 185, 175))
        stuff[:] = S["wall"]
    elif name == "kitchen":
        h = 0.35 + 0.2 * h
        f = 5 + 3 * p[:, 1, None, None]
        bits = _tile(np.full((n, 1, 1), _pattern_id("checkered")), Y * f * TILE, X * f * TILE)
        floor = np.where(bits[..., None], _c(235, 235, 230), _c(120, 135, 160))
        wall = _vmix(_c(240, 228, 200), _c(220, 205, 175), Y / h)
        img = np.where((Y < h)[..., None], wall, floor)
        stuff[:] = np.where(Y < h, S["wall"], S["floor"])
    elif name == "sunset":
        h = 0.6 + 0.2 * h
        sky = _vmix(_c(95, 50, 125), _c(250, 150, 60), Y / h)
        sx = 0.2 + 0.6 * p[:, 1, None, None]
        sun = np.hypot(X - sx, Y - h) < 0.12
        sky = np.where(sun[..., None], _c(255, 215, 120), sky)
        img = np.where((Y < h)[..., None], sky, _c(45, 28, 40))
        stuff[:] = np.where(Y < h, S["sky"], S["ground"])
    elif name == "mountains":
        h = 0.45 + 0.15 * h
        k = 1.5 + 1.5 * p[:, 1, None, None]
        saw = np.abs(((X * k + p[:, 2, None, None]) % 1.0) * 2 - 1)
        peak = h - 0.3 * (1 - saw)
        grass_h = h + 0.12
        sky = _vmix(_c(120, 175, 235), _c(200, 225, 245), Y / h)
        rock = np.where((Y < peak + 0.06)[..., None], _c(235, 235, 240), _vmix(_c(105, 105, 120), _c(80, 80, 95), Y))
        img = np.where((Y < peak)[..., None], sky, np.where((Y < grass_h)[..., None], rock, _c(80, 150, 70)))
        stuff[:] = np.where(Y < peak, S["sky"], np.where(Y < grass_h, S["mountain"], S["grass"]))
    elif name == "cave":
        img = _vmix(_c(30, 22, 18), _c(100, 75, 55), smooth_noise(rng, n, H, 6) * (0.6 + 0.6 * p[:, 1, None, None]))
        stuff[:] = S["rock"]
    else:  # pragma: no cover - SCENES is static
        raise ValueError(name)
    img = np.broadcast_to(img, (n, H, H, 3)) * j
    return img.astype(np.float32), stuff


_PAT_IDS: dict[str, int] = {}


def _pattern_id(name: str) -> int:
    if not _PAT_IDS:
        from .vocab import PATTERNS
        _PAT_IDS.update({p.name: i for i, p in enumerate(PATTERNS)})
    return _PAT_IDS[name]


def render_backgrounds(spec: SceneSpec, rng: np.random.Generator, size: int):
    n_img = len(spec)
    yy, xx = _grid(size)
    img = np.empty((n_img, size, size, 3), np.float32)
    stuff = np.full((n_img, size, size), SEG_NONE, np.uint8)
    for b, name in enumerate(BACKGROUNDS):
        sel = np.nonzero(spec.bg == b)[0]
        if not sel.size:
            continue
        n = sel.size
        p = spec.bg_rand[sel].astype(np.float32)
        c1 = spec.bg_rgb1[sel][:, None, None, :].astype(np.float32)
        c2 = spec.bg_rgb2[sel][:, None, None, :].astype(np.float32)
        if b < len(SCENES):
            j = (0.85 + 0.3 * p[:, 3])[:, None, None, None]
            img[sel], stuff[sel] = _scene(name, n, yy, xx, p, j, rng)
        elif name == "plain":
            img[sel] = np.broadcast_to(c1, (n, size, size, 3))
        elif name == "gradient":
            a = p[:, 0, None, None] * 2 * np.pi
            t = 0.5 + (np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5)) * 1.2
            img[sel] = _vmix(c1, c2, t)
        elif name == "pattern":
            f = spec.bg_freq[sel][:, None, None] * TILE
            a = p[:, 0, None, None] * np.pi
            u = np.cos(a) * xx + np.sin(a) * yy
            v = -np.sin(a) * xx + np.cos(a) * yy
            bits = _tile(spec.bg_pat[sel][:, None, None], v * f, u * f)
            img[sel] = np.where(bits[..., None], c1, c2)
        elif name == "noise":
            img[sel] = _vmix(c1, c2, smooth_noise(rng, n, size, 5))
    return img, stuff


# ------------------------------------------------------------------------------------------ objects


def _edges(code: np.ndarray) -> np.ndarray:
    """Pixels where the object/region code changes (both sides: a 2-pixel line)."""
    e = np.zeros(code.shape, bool)
    dx = code[:, :, 1:] != code[:, :, :-1]
    dy = code[:, 1:, :] != code[:, :-1, :]
    e[:, :, 1:] |= dx
    e[:, :, :-1] |= dx
    e[:, 1:, :] |= dy
    e[:, :-1, :] |= dy
    return e


def _window_buckets(size: int) -> list[int]:
    return sorted({min(b, size) for b in (12, 20, 28, 40)} | {size})


def render(spec: SceneSpec, rng: np.random.Generator, size: int = 64, with_seg: bool = False):
    """Draw the batch. Returns uint8 images (N, size, size, 3) and, with `with_seg`, a (N, size, size)
    uint8 label map (stuff index / SEG_OBJECT_OFFSET + kind / SEG_NONE)."""
    N, K = spec.active.shape
    img, stuff = render_backgrounds(spec, rng, size)
    seg = stuff if with_seg else None
    code = np.zeros((N, size, size), np.int16)
    bank = kind_bank()
    R = bank.shape[1]
    shaded_style = (spec.style == PHOTO) | (spec.style == CLUTTERED)
    # each object is drawn in a square window that holds it under any rotation; windows come in a few
    # sizes so that objects of one slot and one window size are drawn together
    buckets = _window_buckets(size)
    need = np.ceil(2 * (spec.r * np.maximum(spec.aspect, 1) * 1.415 + 1)).astype(np.int64)
    bucket_of = np.minimum(np.searchsorted(buckets, need), len(buckets) - 1)
    for k in range(K):
        for bi, B in enumerate(buckets):
            sel = np.nonzero(spec.active[:, k] & (bucket_of[:, k] == bi))[0]
            if not sel.size:
                continue
            n = sel.size
            cx, cy = spec.cx[sel, k], spec.cy[sel, k]
            x0 = np.clip(np.floor(cx - B / 2), 0, size - B).astype(np.int64)
            y0 = np.clip(np.floor(cy - B / 2), 0, size - B).astype(np.int64)
            ar = np.arange(B)
            rows, cols = y0[:, None] + ar, x0[:, None] + ar  # (n, B)
            r = spec.r[sel, k][:, None, None].astype(np.float32)
            dx = ((cols + 0.5)[:, None, :] - cx[:, None, None]) / r  # (n, 1, B)
            dy = ((rows + 0.5)[:, :, None] - cy[:, None, None]) / r  # (n, B, 1)
            c = np.cos(spec.rot[sel, k])[:, None, None].astype(np.float32)
            s = np.sin(spec.rot[sel, k])[:, None, None].astype(np.float32)
            u = (c * dx + s * dy) / spec.aspect[sel, k][:, None, None]
            v = -s * dx + c * dy
            inside = (np.abs(u) < 1) & (np.abs(v) < 1)
            iu = np.clip(((u + 1) * (0.5 * R)).astype(np.int32), 0, R - 1)
            iv = np.clip(((v + 1) * (0.5 * R)).astype(np.int32), 0, R - 1)
            role = np.where(inside, bank[spec.kind[sel, k][:, None, None], iv, iu], 0).astype(np.int64)
            m = role > 0
            f = (spec.pat_freq[sel, k] * (0.5 * TILE))[:, None, None]
            bit = _tile(spec.pat[sel, k][:, None, None], (v + 1) * f, (u + 1) * f)
            # per-object palette: 1 main, 2 secondary, 3 dark detail, 4 second colour of the pattern
            pal = np.stack([np.zeros((n, 3), np.float32), spec.rgb[sel, k], spec.rgb2[sel, k],
                            np.broadcast_to(DARK, (n, 3)), spec.pat_rgb[sel, k]], axis=1)
            idx = np.where((role == 1) & ~bit, 4, role)
            col = pal[np.arange(n)[:, None, None], idx]
            shade = shaded_style[sel]
            if shade.any():
                lx = spec.light[sel, 0][:, None, None]
                ly = spec.light[sel, 1][:, None, None]
                sh = 1.0 - 0.22 * (lx * u + ly * v) - 0.12 * (u * u + v * v)
                col *= np.where(shade[:, None, None] & (role != 3), sh, 1.0)[..., None]
            I, Rr, Cc = sel[:, None, None], rows[:, :, None], cols[:, None, :]
            img[I, Rr, Cc] = np.where(m[..., None], col, img[I, Rr, Cc])
            code[I, Rr, Cc] = np.where(m, (k + 1) * 4 + role, code[I, Rr, Cc])
            if seg is not None:
                seg[I, Rr, Cc] = np.where(m, SEG_OBJECT_OFFSET + spec.kind[sel, k][:, None, None], seg[I, Rr, Cc])
    img = _stylise(spec, img, code, rng, size)
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    return (out, seg) if with_seg else out


def _stylise(spec: SceneSpec, img, code, rng, size):
    edges = _edges(code)
    # cartoon: flat posterised background, black outlines
    sel = np.nonzero(spec.style == CARTOON)[0]
    if sel.size:
        x = img[sel]
        bgm = (code[sel] == 0)[..., None]
        x = np.where(bgm, np.round(x * 4) / 4, x)
        x = np.where(edges[sel][..., None], DARK, x)
        img[sel] = x
    # sketch: pencil outlines and light hatching on paper, no colour
    sel = np.nonzero(spec.style == SKETCH)[0]
    if sel.size:
        n = sel.size
        paper = (0.9 + 0.08 * spec.bg_rand[sel, 3])[:, None, None] - 0.04 * rng.random((n, size, size), dtype=np.float32)
        ys, xs = np.mgrid[0:size, 0:size]
        hatch = ((xs + ys + (spec.bg_rand[sel, 2] * 5).astype(int)[:, None, None]) % 5 == 0) & (code[sel] > 0)
        pencil = (0.15 + 0.3 * spec.bg_rand[sel, 1])[:, None, None]
        x = np.where(edges[sel], pencil, np.where(hatch, paper * 0.75, paper))
        img[sel] = np.repeat(x[..., None], 3, axis=-1)
    # photo-like: blur and pixel noise
    sel = np.nonzero(spec.blur)[0]
    if sel.size:
        img[sel] = box_blur(img[sel], 1)
    sel = np.nonzero(spec.noise > 0)[0]
    if sel.size:
        # uniform noise with the given standard deviation (cheaper to draw than Gaussian)
        u = rng.random((sel.size, size, size, 3), dtype=np.float32) - 0.5
        img[sel] += u * (spec.noise[sel] * np.float32(12 ** 0.5))[:, None, None, None]
    # renditions (held out of pretraining)
    sel = np.nonzero(spec.post == 1)[0]  # mosaic
    if sel.size:
        b = 4 if size % 4 == 0 else 2
        x = img[sel].reshape(sel.size, size // b, b, size // b, b, 3).mean(axis=(2, 4))
        img[sel] = np.repeat(np.repeat(x, b, axis=1), b, axis=2)
    sel = np.nonzero(spec.post == 2)[0]  # neon: glowing outlines on black
    if sel.size:
        x = img[sel]
        bright = np.clip(x / np.maximum(x.max(axis=-1, keepdims=True), 0.2), 0, 1)
        line = np.where(edges[sel][..., None], bright, 0.02)
        img[sel] = np.clip(line + 0.8 * box_blur(line, 2), 0, 1)
    sel = np.nonzero(spec.post == 3)[0]  # painting: smeared, posterised, brush-stroke noise
    if sel.size:
        x = box_blur(img[sel], 2)
        x = np.round(x * 5) / 5
        x = x + 0.12 * (smooth_noise(rng, sel.size, size, 12)[..., None] - 0.5)
        img[sel] = x
    return img
