"""Rasterised banks the renderer samples from: object kinds (role maps), digit glyphs and fill patterns.

Drawn once with PIL at a fixed resolution; rendering a scene then only gathers from these arrays with
per-pixel object-local coordinates, so every image of a batch is drawn by the same few numpy ops.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .vocab import DIGIT_WORDS, KINDS, PATTERNS

BANK_RES = 96  # kind/glyph role maps, R x R
TILE = 16  # pattern period in tile pixels
NUM_KINDS = len(KINDS)
GLYPH_OFFSET = NUM_KINDS  # bank index of digit d is GLYPH_OFFSET + d


def _px(pt, res):
    x, y = pt
    return ((x + 1) * 0.5 * (res - 1), (y + 1) * 0.5 * (res - 1))


def _draw_parts(parts, res: int) -> np.ndarray:
    im = Image.new("L", (res, res), 0)
    dr = ImageDraw.Draw(im)
    for typ, role, geo in parts:
        if typ == "poly":
            dr.polygon([_px(p, res) for p in geo], fill=role)
        elif typ == "ellipse":
            cx, cy, rx, ry = geo
            dr.ellipse([_px((cx - rx, cy - ry), res), _px((cx + rx, cy + ry), res)], fill=role)
        elif typ == "rect":
            x0, y0, x1, y1 = geo
            dr.rectangle([_px((x0, y0), res), _px((x1, y1), res)], fill=role)
        elif typ == "line":
            pts, width = geo
            dr.line([_px(p, res) for p in pts], fill=role, width=max(1, round(width * 0.5 * res)), joint="curve")
        else:  # pragma: no cover - vocab is static
            raise ValueError(f"unknown primitive {typ!r}")
    return np.asarray(im, dtype=np.uint8)


def _glyph(digit: int, res: int) -> np.ndarray:
    """A printed digit (Pillow's bundled font, identical on every machine), centred, role 1."""
    font = ImageFont.load_default(size=int(res * 1.05))
    im = Image.new("L", (res, res), 0)
    dr = ImageDraw.Draw(im)
    x0, y0, x1, y1 = dr.textbbox((0, 0), str(digit), font=font)
    dr.text(((res - (x1 - x0)) / 2 - x0, (res - (y1 - y0)) / 2 - y0), str(digit), fill=1, font=font,
            stroke_width=max(1, res // 40), stroke_fill=1)
    return np.asarray(im, dtype=np.uint8)


@lru_cache(maxsize=None)
def kind_bank(res: int = BANK_RES) -> np.ndarray:
    """(NUM_KINDS + 10, R, R) uint8 role maps: the object kinds, then the digit glyphs 0-9."""
    maps = [_draw_parts(k.parts, res) for k in KINDS] + [_glyph(d, res) for d in range(len(DIGIT_WORDS))]
    bank = np.stack(maps)
    bank.setflags(write=False)
    return bank


def _periodic(fn) -> np.ndarray:
    y, x = np.mgrid[0:TILE, 0:TILE].astype(np.float32) + 0.5
    return fn(x, y)


def _lattice_dist(x, y, pts):
    d = np.full(x.shape, 1e9, np.float32)
    for px, py in pts:
        for ox in (-TILE, 0, TILE):
            for oy in (-TILE, 0, TILE):
                d = np.minimum(d, np.hypot(x - px - ox, y - py - oy))
    return d


@lru_cache(maxsize=None)
def pattern_bank() -> np.ndarray:
    """(len(PATTERNS), TILE, TILE) bool tiles, periodic; True = the object's main colour."""
    T = TILE
    rng = np.random.default_rng(1234)  # fixed: the tiles are part of the world's definition
    blobs = rng.uniform(0, T, size=(5, 2))
    tiles = {
        "solid": _periodic(lambda x, y: np.ones_like(x, bool)),
        "striped": _periodic(lambda x, y: (y % T) < T / 2),
        "dotted": _periodic(lambda x, y: np.hypot(x - T / 2, y - T / 2) > T * 0.26),
        "checkered": _periodic(lambda x, y: (x < T / 2) ^ (y < T / 2)),
        "zigzag": _periodic(lambda x, y: np.abs(y - (T * 0.25 + T * 0.5 * np.abs(((x / T) * 2) % 2 - 1))) > T * 0.16),
        "wavy": _periodic(lambda x, y: np.abs(y - T / 2 - T * 0.22 * np.sin(2 * np.pi * x / T)) > T * 0.15),
        "grid": _periodic(lambda x, y: ((x % T) > T * 0.2) & ((y % T) > T * 0.2)),
        "crosshatched": _periodic(lambda x, y: (((x + y) % T) > T * 0.2) & (((x - y) % T) > T * 0.2)),
        "spotted": _periodic(lambda x, y: _lattice_dist(x, y, blobs[:3]) > T * 0.2),
        "brick": _periodic(lambda x, y: ((y % (T / 2)) > T * 0.1) & (((x + (y >= T / 2) * T / 2) % T) > T * 0.1)),
        "speckled": rng.uniform(size=(T, T)) > 0.3,
        "scaly": _periodic(lambda x, y: np.abs(_lattice_dist(x, y, [(0, 0), (T / 2, T / 2)]) - T * 0.36) > T * 0.07),
    }
    bank = np.stack([tiles[p.name] for p in PATTERNS]).astype(bool)
    bank.setflags(write=False)
    return bank
