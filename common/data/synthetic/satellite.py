"""Top-down 'satellite' tiles (the EuroSAT-like out-of-domain set): never drawn during pretraining.

Ten land-use classes, each a vectorised texture recipe over a batch (fields in strips, forest canopy,
roads, roofs, rivers, ...), with random orientation, scale and colour jitter and sensor noise.
"""
from __future__ import annotations

import numpy as np

from .render import _c, _tile, _vmix, box_blur, smooth_noise
from .vocab import PATTERNS, SATELLITE_CLASSES

_PAT = {p.name: i for i, p in enumerate(PATTERNS)}


def _rot_coords(n, size, rng):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy, xx = (yy + 0.5) / size - 0.5, (xx + 0.5) / size - 0.5
    a = rng.uniform(0, np.pi, n).astype(np.float32)[:, None, None]
    u = np.cos(a) * xx[None] + np.sin(a) * yy[None]
    v = -np.sin(a) * xx[None] + np.cos(a) * yy[None]
    return u, v


def _class_tiles(name: str, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rot_coords(n, size, rng)
    noise = smooth_noise(rng, n, size, 8)
    fine = rng.random((n, size, size), dtype=np.float32)
    if name == "annual crop land":  # strips of differently coloured fields
        f = rng.uniform(4, 8, n).astype(np.float32)[:, None, None]
        strip = np.floor((u + 0.5) * f)
        hue = (np.sin(strip * 12.9898 + rng.uniform(0, 6, n)[:, None, None]) * 43758.5453) % 1.0
        img = _vmix(_c(150, 120, 70), _c(120, 170, 70), hue)
        img = img * (0.9 + 0.15 * noise[..., None])
    elif name == "forest":
        img = _vmix(_c(20, 60, 25), _c(55, 105, 45), 0.6 * noise + 0.4 * smooth_noise(rng, n, size, 20))
    elif name == "herbaceous vegetation land":
        img = _vmix(_c(110, 140, 70), _c(160, 170, 95), smooth_noise(rng, n, size, 12))
        img = img * (0.85 + 0.3 * smooth_noise(rng, n, size, 4)[..., None])
    elif name == "highway or road":
        base = _vmix(_c(120, 140, 80), _c(165, 150, 100), noise)
        w = rng.uniform(0.04, 0.08, n).astype(np.float32)[:, None, None]
        off = rng.uniform(-0.2, 0.2, n).astype(np.float32)[:, None, None]
        road = np.abs(v - off) < w
        mid = np.abs(v - off) < w * 0.12
        img = np.where(road[..., None], _c(110, 110, 115), base)
        img = np.where(mid[..., None], _c(230, 230, 230), img)
    elif name == "industrial buildings":
        f = rng.uniform(2, 4, n).astype(np.float32)[:, None, None]
        cell_u, cell_v = np.floor((u + 0.5) * f), np.floor((v + 0.5) * f)
        rnd = (np.sin(cell_u * 12.99 + cell_v * 78.23) * 43758.5) % 1.0
        inner = ((((u + 0.5) * f) % 1) > 0.1) & ((((v + 0.5) * f) % 1) > 0.1)
        roof = _vmix(_c(150, 150, 155), _c(200, 200, 205), rnd)
        img = np.where(inner[..., None], roof, _c(90, 90, 95))
    elif name == "pasture land":
        img = _vmix(_c(120, 165, 80), _c(140, 180, 95), 0.5 * noise)
    elif name == "permanent crop land":  # orchards: a regular grid of round tree tops
        f = rng.uniform(6, 9, n).astype(np.float32)[:, None, None] * 16
        bits = _tile(np.full((n, 1, 1), _PAT["dotted"]), (v + 0.5) * f, (u + 0.5) * f)
        img = np.where(bits[..., None], _vmix(_c(150, 125, 80), _c(170, 145, 95), noise), _c(45, 95, 40))
    elif name == "residential buildings":
        f = rng.uniform(5, 8, n).astype(np.float32)[:, None, None]
        cu, cv = ((u + 0.5) * f) % 1, ((v + 0.5) * f) % 1
        street = (cu < 0.15) | (cv < 0.15)
        house = (cu > 0.3) & (cu < 0.85) & (cv > 0.3) & (cv < 0.85)
        red = ((np.sin(np.floor((u + 0.5) * f) * 7.1 + np.floor((v + 0.5) * f) * 3.3) * 9e3) % 1.0) > 0.5
        img = np.where(street[..., None], _c(140, 140, 140), _vmix(_c(90, 130, 70), _c(120, 150, 90), noise))
        img = np.where((house & red)[..., None], _c(170, 80, 60), np.where(house[..., None], _c(185, 185, 190), img))
    elif name == "river":
        base = _vmix(_c(90, 130, 60), _c(140, 160, 90), noise)
        phase = rng.uniform(0, 6.3, n).astype(np.float32)[:, None, None]
        amp = rng.uniform(0.08, 0.18, n).astype(np.float32)[:, None, None]
        w = rng.uniform(0.04, 0.09, n).astype(np.float32)[:, None, None]
        river = np.abs(v - amp * np.sin(u * 9 + phase)) < w
        img = np.where(river[..., None], _vmix(_c(30, 70, 110), _c(50, 95, 130), noise), base)
    elif name == "sea or lake":
        shore = rng.uniform(-0.5, 0.2, n).astype(np.float32)[:, None, None]
        water = v + 0.08 * (noise - 0.5) > shore
        img = np.where(water[..., None], _vmix(_c(15, 45, 85), _c(30, 70, 110), noise * 0.6), _vmix(_c(120, 140, 80), _c(190, 180, 140), noise))
    else:  # pragma: no cover
        raise ValueError(name)
    img = np.broadcast_to(img, (n, size, size, 3)).astype(np.float32)
    img = img * rng.uniform(0.85, 1.15, (n, 1, 1, 3)).astype(np.float32)  # sensor colour balance
    img = img + 0.04 * (fine[..., None] - 0.5)
    return img


def render_satellite(labels: np.ndarray, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """uint8 (n, size, size, 3) tiles for the given class indices into SATELLITE_CLASSES."""
    labels = np.asarray(labels)
    out = np.empty((len(labels), size, size, 3), np.float32)
    for c, name in enumerate(SATELLITE_CLASSES):
        sel = np.nonzero(labels == c)[0]
        if sel.size:
            out[sel] = _class_tiles(name, sel.size, size, rng)
    out = box_blur(out, 1) * 0.5 + out * 0.5  # slight optical softness
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
