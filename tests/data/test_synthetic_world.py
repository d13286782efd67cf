"""The embedded world's generator: determinism, geometry, captions."""
from __future__ import annotations

import random

import numpy as np
import open_clip
import pytest

from common.clip import load_clip  # noqa: F401  (registers the tiny configs for the tokenizer)
from common.data.synthetic.captions import CaptionStyle, caption, captions
from common.data.synthetic.render import PHOTO, SEG_NONE, SEG_OBJECT_OFFSET, SKETCH, render
from common.data.synthetic.satellite import render_satellite
from common.data.synthetic.shapes import GLYPH_OFFSET, kind_bank, pattern_bank
from common.data.synthetic.vocab import BACKGROUNDS, COLOURS, KIND_INDEX, KINDS, PATTERN_INDEX, PATTERNS, SCENES, STUFF
from common.data.synthetic.world import Distribution, Group, SceneInfo, sample_scenes


def _draw(seed, n=24, **kw):
    rng = np.random.default_rng(seed)
    spec, infos = sample_scenes(rng, n, Distribution(), 64, **kw)
    return render(spec, rng, 64), infos


def test_world_is_rich_enough():
    assert len(KINDS) >= 16 and len(COLOURS) >= 10 and len(PATTERNS) >= 8 and len(SCENES) >= 8
    assert {"solid", "striped", "dotted", "checkered", "zigzag"} <= {p.name for p in PATTERNS}


def test_same_seed_same_bytes_different_seed_different():
    a, infos_a = _draw(3)
    b, infos_b = _draw(3)
    c, _ = _draw(4)
    assert a.dtype == np.uint8 and a.shape == (24, 64, 64, 3)
    assert a.tobytes() == b.tobytes()
    assert captions(infos_a, 7) == captions(infos_b, 7)
    assert a.tobytes() != c.tobytes()
    assert captions(infos_a, 7) != captions(infos_a, 8)


def test_banks_every_kind_and_glyph_has_area_and_patterns_differ():
    bank = kind_bank()
    assert bank.shape[0] == len(KINDS) + 10
    area = (bank > 0).mean(axis=(1, 2))
    assert (area > 0.05).all() and (area < 0.9).all()
    assert len({m.tobytes() for m in bank}) == len(bank), "two kinds rasterise identically"
    tiles = pattern_bank()
    assert len({t.tobytes() for t in tiles}) == len(PATTERNS)
    assert tiles[0].all(), "solid is all main colour"


def test_object_is_drawn_where_the_spec_puts_it_with_its_colour_and_segmentation():
    rng = np.random.default_rng(0)
    n = 4
    fixed = {"kind": np.full(n, KIND_INDEX["square"]), "count": np.ones(n, int), "style": np.full(n, PHOTO),
             "colour": np.full(n, 0), "pattern": np.zeros(n, int), "bg": np.full(n, BACKGROUNDS.index("plain")), "size": np.full(n, 2)}
    spec, _ = sample_scenes(rng, n, Distribution(), 64, fixed)
    spec.noise[:] = 0
    spec.blur[:] = False
    spec.rot[:] = 0
    imgs, seg = render(spec, rng, 64, with_seg=True)
    for i in range(n):
        k = np.nonzero(spec.active[i])[0][0]
        cx, cy = int(spec.cx[i, k]), int(spec.cy[i, k])
        assert seg[i, cy, cx] == SEG_OBJECT_OFFSET + KIND_INDEX["square"]
        assert imgs[i, cy, cx, 0] > 150 and imgs[i, cy, cx, 1] < 90, "the centre of a red square is red"
        assert seg[i, 0, 0] == SEG_NONE or seg[i, 0, 0] < len(STUFF)
        # the square covers about (2 * 0.8 r)^2 pixels (bank square spans [-0.8, 0.8])
        area = (seg[i] == SEG_OBJECT_OFFSET + KIND_INDEX["square"]).sum()
        expect = (1.6 * spec.r[i, k]) ** 2 * spec.aspect[i, k]
        assert abs(area - expect) / expect < 0.2


def test_scene_stuff_labels_and_count_zero_backgrounds():
    rng = np.random.default_rng(1)
    n = len(SCENES)
    spec, infos = sample_scenes(rng, n, Distribution(), 64, {"bg": np.arange(n), "count": np.zeros(n, int),
                                                             "style": np.full(n, PHOTO)})
    assert not spec.active.any() and all(not inf.groups for inf in infos)
    _, seg = render(spec, rng, 64, with_seg=True)
    assert (seg < len(STUFF)).all(), "scenes label every pixel with a stuff class"
    beach = SCENES.index(next(s for s in SCENES if s.name == "beach"))
    assert seg[beach, 0, 32] == STUFF.index("sky") and seg[beach, 63, 32] == STUFF.index("sand")


def test_sketches_are_gray_and_satellite_tiles_render():
    rng = np.random.default_rng(2)
    spec, _ = sample_scenes(rng, 6, Distribution(), 64, {"style": np.full(6, SKETCH)})
    spec.noise[:] = 0
    imgs = render(spec, rng, 64).astype(int)
    assert (imgs[..., 0] == imgs[..., 1]).all() and (imgs[..., 1] == imgs[..., 2]).all()
    sat = render_satellite(np.arange(10), np.random.default_rng(0))
    assert sat.shape == (10, 64, 64, 3) and len({s.tobytes() for s in sat}) == 10


def test_caption_mentions_what_is_drawn():
    r = random.Random(0)
    star = KIND_INDEX["star"]
    info = SceneInfo([Group(star, 0, 1, 3, 1)], BACKGROUNDS.index("beach"), -1, PHOTO, 0, (0.5, 0.5))
    caps = [caption(info, r) for _ in range(400)]
    mention = np.mean(["star" in c for c in caps])
    assert 0.75 < mention < 1.0, "the object is named most of the time, with some web noise"
    assert np.mean([("three" in c) for c in caps]) > 0.5
    assert np.mean([("beach" in c or "sand" in c) for c in caps]) > 0.25
    clean = CaptionStyle(p_wrong_kind=0, p_vague_kind=0, p_tags=0, p_synonym=0)
    assert all("stars" in caption(info, r, clean) for _ in range(50)), "plural for count > 1"
    sketch = SceneInfo([Group(star, 0, 1, 1, 1)], BACKGROUNDS.index("plain"), 3, SKETCH, 0, (0.5, 0.5))
    colour_words = {c.name for c in COLOURS} | {c.basic for c in COLOURS}
    for _ in range(100):
        text = caption(sketch, r, CaptionStyle(p_wrong_colour=0)).replace("black and white sketch", "sketch")
        words = set(text.replace(",", " ").replace(".", " ").split())
        assert not words & colour_words, "a sketch has no colours to describe"
    digit = SceneInfo([Group(GLYPH_OFFSET + 7, 0, 0, 1, 1)], BACKGROUNDS.index("plain"), 3, PHOTO, 0, (0.5, 0.5))
    digit_caps = [caption(digit, r) for _ in range(100)]
    assert all("7" in c or "seven" in c for c in digit_caps), "digits are always named"
    striped = PATTERNS[PATTERN_INDEX["striped"]]
    on_stripes = SceneInfo([Group(star, 0, 0, 1, 1)], BACKGROUNDS.index("pattern"), -1, PHOTO, 0, (0.5, 0.5),
                           bg_pattern=PATTERN_INDEX["striped"])
    bg_caps = [caption(on_stripes, r, CaptionStyle(p_background=1.0, p_tags=0.0)) for _ in range(200)]
    assert all(any(w in c for w in striped.words) for c in bg_caps), "a patterned background is described"
    assert 0.2 < np.mean(["texture" in c for c in bg_caps]) < 0.6, "sometimes as a texture (DTD's class names)"


def test_captions_fit_the_text_context():
    _, infos = _draw(5, n=300)
    caps = captions(infos, 0)
    tok = open_clip.get_tokenizer("tiny-rn")
    ids = tok(caps)
    assert ids.shape[1] >= 32
    lengths = (ids > 0).sum(1)
    assert (lengths < ids.shape[1]).float().mean() > 0.99, "captions are not truncated"
    assert len(set(caps)) > 250, "captions vary"


def test_fixed_choices_are_respected():
    rng = np.random.default_rng(3)
    n = 20
    kinds = rng.choice(len(KINDS), n)
    spec, infos = sample_scenes(rng, n, Distribution(), 64, {"kind": kinds, "count": np.full(n, 3), "pattern": np.full(n, 2)})
    for i, inf in enumerate(infos):
        assert inf.groups[0].kind == kinds[i] and inf.groups[0].pattern == 2
        assert sum(g.count for g in inf.groups) == 3
    with pytest.raises(KeyError):
        KIND_INDEX["unicorn"]
