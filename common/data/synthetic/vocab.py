"""Concept tables of the embedded world: object kinds (with geometry), colours, patterns, scenes, styles.

Every concept has the name used in class lists and the words captions may use for it. Geometry is in
an object-local frame, x right and y down, both in [-1, 1]; `shapes.py` rasterises it once into a bank.
Roles of a region: 1 = main colour (carries the fill pattern), 2 = the kind's secondary colour, 3 = dark
detail, 0 = cut a hole.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------- geometry


def regular(n: int, r: float = 0.95, rot: float = -math.pi / 2, cx: float = 0.0, cy: float = 0.0):
    return [(cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n)) for i in range(n)]


def star(n: int, r_out: float = 0.95, r_in: float = 0.4, rot: float = -math.pi / 2):
    pts = []
    for i in range(2 * n):
        r = r_out if i % 2 == 0 else r_in
        a = rot + math.pi * i / n
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def arc(cx, cy, rx, ry, a0, a1, n=24):
    return [(cx + rx * math.cos(a0 + (a1 - a0) * i / n), cy + ry * math.sin(a0 + (a1 - a0) * i / n)) for i in range(n + 1)]


def lens(half_len, half_width, rot=0.0, n=24):
    """A pointed leaf outline (two arcs meeting at sharp tips)."""
    ts = [-1 + 2 * i / n for i in range(n + 1)]
    pts = [(half_len * t, -half_width * (1 - t * t)) for t in ts] + [(half_len * t, half_width * (1 - t * t)) for t in reversed(ts[1:-1])]
    c, s = math.cos(rot), math.sin(rot)
    return [(c * x - s * y, s * x + c * y) for x, y in pts]


def heart(n=48):
    pts = []
    for i in range(n):
        t = 2 * math.pi * i / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x / 17.0, -y / 17.0 + 0.1))
    return pts


def P(*pts):
    return ("poly", 1, list(pts))


def E(cx, cy, rx, ry, role=1):
    return ("ellipse", role, (cx, cy, rx, ry))


def R(x0, y0, x1, y1, role=1):
    return ("rect", role, (x0, y0, x1, y1))


def poly(pts, role=1):
    return ("poly", role, list(pts))


def line(pts, width, role=3):
    return ("line", role, (list(pts), width))


@dataclass(frozen=True)
class Kind:
    name: str
    parent: str  # mid-level category (label hierarchy)
    parts: tuple
    secondary: tuple[int, int, int] | None = None  # natural colour of role-2 regions (None: darker main colour)
    plural: str = ""
    synonyms: tuple[str, ...] = ()
    descriptors: tuple[str, ...] = ()  # rule-written visual facts (VCD/CuPL files)

    @property
    def plural_name(self) -> str:
        return self.plural or self.name + "s"


def _k(name, parent, parts, secondary=None, plural="", synonyms=(), descriptors=()):
    return Kind(name, parent, tuple(parts), secondary, plural, tuple(synonyms), tuple(descriptors))


WHITE, YELLOW, BROWN, SKY, BEIGE = (240, 240, 235), (245, 210, 40), (120, 75, 35), (150, 200, 240), (225, 205, 165)

KINDS: list[Kind] = [
    # ----- geometric shapes
    _k("circle", "round shape", [E(0, 0, .95, .95)], descriptors=("a round outline", "no corners", "the same width in every direction")),
    _k("oval", "round shape", [E(0, 0, .95, .6)], synonyms=("ellipse",), descriptors=("a stretched round outline", "no corners", "wider than it is tall")),
    _k("semicircle", "round shape", [poly(arc(0, .35, .95, .95, math.pi, 2 * math.pi))], synonyms=("half circle",),
       descriptors=("one straight edge", "one curved edge", "half of a disc")),
    _k("crescent", "round shape", [E(0, 0, .9, .9), E(.4, -.2, .75, .75, role=0)], synonyms=("moon",),
       descriptors=("a thin curved sliver", "two pointed tips", "the shape of a moon")),
    _k("ring", "round shape", [E(0, 0, .95, .95), E(0, 0, .5, .5, role=0)], synonyms=("donut",),
       descriptors=("a hole in the middle", "a round band", "no corners")),
    _k("heart", "round shape", [poly(heart())], descriptors=("two rounded lobes on top", "a point at the bottom", "a symbol of love")),
    _k("teardrop", "round shape", [poly(arc(0, .3, .62, .62, -0.35, math.pi + 0.35) + [(0, -.95)])], synonyms=("drop",),
       descriptors=("a round bottom", "a pointed top", "the shape of a falling drop of water")),
    _k("square", "polygon", [R(-.8, -.8, .8, .8)], descriptors=("four equal sides", "four right angles", "straight edges")),
    _k("rectangle", "polygon", [R(-.95, -.5, .95, .5)], descriptors=("four right angles", "two long sides and two short sides", "straight edges")),
    _k("triangle", "polygon", [poly(regular(3, .95, cy=.15))], descriptors=("three corners", "three straight sides", "a pointed top")),
    _k("pentagon", "polygon", [poly(regular(5))], descriptors=("five corners", "five straight sides", "a flat bottom edge")),
    _k("hexagon", "polygon", [poly(regular(6, rot=0))], descriptors=("six corners", "six straight sides", "the shape of a honeycomb cell")),
    _k("octagon", "polygon", [poly(regular(8, rot=math.pi / 8))], descriptors=("eight corners", "eight straight sides", "the shape of a stop sign")),
    _k("diamond", "polygon", [P((0, -.95), (.65, 0), (0, .95), (-.65, 0))], synonyms=("rhombus",),
       descriptors=("four slanted sides", "a point at the top and at the bottom", "taller than it is wide")),
    _k("trapezoid", "polygon", [P((-.5, -.6), (.5, -.6), (.95, .6), (-.95, .6))],
       descriptors=("a short top edge", "a long bottom edge", "two slanted sides")),
    _k("parallelogram", "polygon", [P((-.45, -.55), (.95, -.55), (.45, .55), (-.95, .55))],
       descriptors=("two pairs of parallel sides", "slanted sides", "no right angles")),
    _k("star", "symbol", [poly(star(5))], descriptors=("five pointed tips", "straight edges", "a spiky outline")),
    _k("sparkle", "symbol", [poly(star(4, .95, .25))], synonyms=("four-pointed star",),
       descriptors=("four long thin points", "a twinkle", "narrow spikes")),
    _k("cross", "symbol", [R(-.28, -.9, .28, .9), R(-.9, -.28, .9, .28)], synonyms=("plus sign",),
       descriptors=("two crossing bars", "four equal arms", "a plus sign")),
    _k("arrow", "symbol", [P((-.9, -.22), (.15, -.22), (.15, -.6), (.95, 0), (.15, .6), (.15, .22), (-.9, .22))],
       descriptors=("a long shaft", "a triangular head", "points in one direction")),
    _k("lightning bolt", "symbol", [P((.25, -.95), (-.5, .12), (-.02, .12), (-.3, .95), (.55, -.18), (.06, -.18), (.42, -.95))],
       synonyms=("bolt",), plural="lightning bolts", descriptors=("a zigzag outline", "sharp corners", "a jagged flash")),
    # ----- everyday objects
    _k("house", "building", [R(-.7, -.1, .7, .9), poly([(-.95, -.05), (0, -.9), (.95, -.05)], role=2), R(-.15, .35, .15, .9, role=3),
                             R(.3, .15, .55, .4, role=3)], secondary=(150, 40, 35),
       descriptors=("a triangular roof", "a square body", "a door and a window")),
    _k("tree", "plant", [R(-.16, .15, .16, .95, role=2), E(0, -.3, .75, .62)], secondary=BROWN,
       descriptors=("a round leafy crown", "a brown trunk", "a tall narrow base")),
    _k("flower", "plant", [E(0, -.5, .28, .42), E(.47, -.15, .42, .28), E(-.47, -.15, .42, .28), E(.3, .4, .33, .33), E(-.3, .4, .33, .33),
                           E(0, 0, .28, .28, role=2)], secondary=YELLOW,
       descriptors=("petals around a centre", "a yellow middle", "a round blossom")),
    _k("leaf", "plant", [poly(lens(.95, .5, rot=-math.pi / 4)), line([(-.62, .62), (.62, -.62)], .07), line([(-.62, .62), (-.85, .85)], .07)],
       descriptors=("a pointed oval outline", "a vein down the middle", "a thin flat blade")),
    _k("mushroom", "plant", [R(-.22, -.05, .22, .9, role=2), poly(arc(0, .05, .95, .95, math.pi, 2 * math.pi))], secondary=BEIGE,
       descriptors=("a dome-shaped cap", "a thick pale stem", "grows on the ground")),
    _k("apple", "fruit", [E(-.3, .12, .58, .7), E(.3, .12, .58, .7), line([(0, -.45), (.08, -.95)], .1),
                          E(.3, -.75, .25, .12, role=2)], secondary=(60, 150, 50),
       descriptors=("a round fruit", "a short stem on top", "a small green leaf")),
    _k("car", "vehicle", [P((-.95, -.1), (-.5, -.15), (-.3, -.55), (.35, -.55), (.55, -.15), (.95, -.05), (.95, .45), (-.95, .45)),
                          P((-.22, -.45), (0, -.45), (0, -.18), (-.38, -.18)), P((.08, -.45), (.3, -.45), (.42, -.18), (.08, -.18)),
                          E(-.5, .45, .25, .25, role=3), E(.5, .45, .25, .25, role=3)],
       descriptors=("four wheels", "windows on the side", "a long low body")),
    _k("boat", "vehicle", [P((-.95, .35), (.95, .35), (.6, .85), (-.6, .85)), line([(0, .35), (0, -.95)], .07),
                           poly([(.07, -.9), (.07, .25), (.75, .25)], role=2)], secondary=WHITE,
       descriptors=("a hull that floats", "a mast", "a triangular sail")),
    _k("rocket", "vehicle", [poly([(0, -.97), (.3, -.55), (.3, .55), (-.3, .55), (-.3, -.55)]), P((-.3, .2), (-.62, .7), (-.3, .55)),
                             P((.3, .2), (.62, .7), (.3, .55)), E(0, -.2, .14, .14, role=3), poly([(-.2, .55), (.2, .55), (0, .95)], role=2)],
       secondary=(250, 140, 20), descriptors=("a pointed nose", "fins at the bottom", "a flame underneath")),
    _k("fish", "animal", [E(-.15, 0, .65, .42), P((.4, 0), (.95, -.45), (.95, .45)), E(-.5, -.08, .08, .08, role=3)],
       plural="fish", descriptors=("fins and a tail", "an oval body", "a small eye")),
    _k("bird", "animal", [E(0, .1, .6, .38), E(-.5, -.25, .3, .3), P((-.78, -.28), (-.98, -.18), (-.78, -.14)),
                          P((-.1, .05), (.55, -.6), (.35, .15)), P((.5, .1), (.95, -.05), (.9, .3)), E(-.55, -.3, .06, .06, role=3)],
       descriptors=("a small beak", "wings and feathers", "a round head")),
    _k("cup", "household item", [P((-.6, -.6), (.4, -.6), (.3, .8), (-.5, .8)), E(.45, .05, .4, .35), E(.45, .05, .22, .18, role=0)],
       synonyms=("mug",), descriptors=("a handle on the side", "an open top", "holds a drink")),
    _k("key", "household item", [E(-.55, 0, .4, .4), E(-.55, 0, .17, .17, role=0), R(-.2, -.1, .95, .1), R(.5, .1, .62, .38), R(.75, .1, .87, .3)],
       descriptors=("a round bow with a hole", "a long shaft", "teeth at the end")),
    _k("umbrella", "household item", [poly(arc(0, .05, .95, .85, math.pi, 2 * math.pi)), line([(0, .05), (0, .75)], .08),
                                      line(arc(.15, .75, .15, .15, 0, math.pi, 8), .08)],
       descriptors=("a dome-shaped canopy", "a long handle", "a hooked end")),
    _k("bell", "household item", [poly([(-.8, .6), (-.55, .35), (-.5, -.35)] + arc(0, -.35, .5, .55, math.pi, 2 * math.pi, 12)[1:-1]
                                       + [(.5, -.35), (.55, .35), (.8, .6)]), E(0, .72, .16, .16, role=3)],
       descriptors=("a flared rim", "a rounded top", "a clapper underneath")),
    _k("clock", "household item", [E(0, 0, .95, .95), E(0, 0, .75, .75, role=2), line([(0, 0), (0, -.6)], .09), line([(0, 0), (.42, .1)], .09)],
       secondary=WHITE, descriptors=("a round face", "two hands", "a rim around the dial")),
    _k("bottle", "household item", [R(-.42, -.25, .42, .95), P((-.42, -.25), (-.15, -.6), (.15, -.6), (.42, -.25)), R(-.15, -.9, .15, -.6),
                                    R(-.17, -.97, .17, -.85, role=2)], secondary=(60, 60, 60),
       descriptors=("a narrow neck", "a cap on top", "a tall body")),
    _k("candle", "household item", [R(-.28, -.3, .28, .95), line([(0, -.3), (0, -.45)], .06), poly(arc(0, -.6, .17, .17, -0.4, math.pi + .4) + [(0, -.97)], role=2)],
       secondary=(250, 190, 40), descriptors=("a tall stick of wax", "a small flame", "a wick on top")),
    _k("balloon", "toy", [E(0, -.25, .62, .72), P((0, .42), (-.1, .55), (.1, .55)), line([(0, .55), (.1, .75), (-.05, .97)], .05)],
       descriptors=("an oval body", "a thin string", "a small knot")),
    _k("kite", "toy", [P((0, -.95), (.6, -.2), (0, .55), (-.6, -.2)), line([(0, .55), (.15, .75), (-.1, .95)], .05),
                       line([(0, -.95), (0, .55)], .04, role=2), line([(-.6, -.2), (.6, -.2)], .04, role=2)], secondary=(60, 60, 60),
       descriptors=("a diamond-shaped sail", "a tail string", "a cross of sticks")),
    _k("sun", "nature", [E(0, 0, .55, .55)] + [poly([(.62 * math.cos(a - .2), .62 * math.sin(a - .2)), (.97 * math.cos(a), .97 * math.sin(a)),
                                                     (.62 * math.cos(a + .2), .62 * math.sin(a + .2))]) for a in [i * math.pi / 4 for i in range(8)]],
       descriptors=("a bright disc", "rays all around", "shines in the sky")),
    _k("cloud", "nature", [E(-.45, .2, .45, .38), E(.45, .2, .45, .38), E(0, -.1, .55, .5), R(-.45, .1, .45, .58)],
       descriptors=("puffy rounded bumps", "a flat bottom", "floats in the sky")),
    _k("snowman", "nature", [E(0, .5, .47, .45), E(0, -.12, .35, .33), E(0, -.62, .26, .26), P((0, -.62), (.35, -.56), (0, -.54), ), E(-.08, -.68, .04, .04, role=3),
                             E(.08, -.68, .04, .04, role=3)], descriptors=("three stacked balls", "a small head on top", "made of snow")),
    # ----- clothing (silhouettes; relate to Fashion-MNIST)
    _k("t-shirt", "clothing", [P((-.35, -.85), (-.95, -.55), (-.75, -.15), (-.5, -.3), (-.5, .9), (.5, .9), (.5, -.3), (.75, -.15), (.95, -.55), (.35, -.85),
                                 (.15, -.7), (-.15, -.7))], synonyms=("tee", "top"),
       descriptors=("short sleeves", "a round neck", "a straight body")),
    _k("trousers", "clothing", [P((-.55, -.95), (.55, -.95), (.65, .95), (.1, .95), (0, -.3), (-.1, .95), (-.65, .95))], plural="trousers",
       synonyms=("pants", "trouser"), descriptors=("two long legs", "a waistband", "a split in the middle")),
    _k("dress", "clothing", [P((-.25, -.95), (.25, -.95), (.3, -.3), (.8, .95), (-.8, .95), (-.3, -.3))],
       plural="dresses", descriptors=("a fitted top", "a wide flowing skirt", "no legs")),
    _k("coat", "clothing", [P((-.3, -.9), (-.85, -.6), (-.95, .6), (-.7, .65), (-.6, -.2), (-.55, .95), (.55, .95), (.6, -.2), (.7, .65), (.95, .6),
                              (.85, -.6), (.3, -.9), (0, -.5)), line([(0, -.5), (0, .95)], .05)], synonyms=("jacket",),
       descriptors=("long sleeves", "a long body", "buttons down the front")),
    _k("boot", "clothing", [P((-.5, -.95), (.15, -.95), (.15, .25), (.9, .45), (.95, .9), (-.5, .9)), R(-.5, .78, .95, .95, role=2)],
       secondary=(50, 40, 35), synonyms=("ankle boot",), descriptors=("a high ankle", "a thick sole", "a closed toe")),
    _k("sneaker", "clothing", [P((-.95, -.2), (-.45, -.3), (.2, .05), (.85, .15), (.95, .45), (-.95, .45)), R(-.95, .45, .95, .7, role=2)],
       secondary=WHITE, synonyms=("shoe", "trainer"), descriptors=("a low cut", "laces on top", "a rubber sole")),
    _k("bag", "clothing", [R(-.8, -.25, .8, .9), E(0, -.3, .5, .55), E(0, -.3, .35, .42, role=0), R(-.8, -.25, .8, .9)], synonyms=("handbag",),
       descriptors=("a handle on top", "a boxy body", "used to carry things")),
]

KIND_INDEX = {k.name: i for i, k in enumerate(KINDS)}

# mid-level category -> top level (ProTeCt-style tree: leaf -> mid -> top -> "object")
PARENT_OF_CATEGORY = {
    "round shape": "geometric shape", "polygon": "geometric shape", "symbol": "geometric shape",
    "building": "man-made thing", "vehicle": "man-made thing", "household item": "man-made thing", "toy": "man-made thing",
    "clothing": "man-made thing",
    "plant": "natural thing", "fruit": "natural thing", "animal": "natural thing", "nature": "natural thing",
}
TOP_PARENT = "object"

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# --------------------------------------------------------------------------------------------- colours


@dataclass(frozen=True)
class Colour:
    name: str
    rgb: tuple[int, int, int]
    basic: str  # the everyday word web captions mostly use for it


COLOURS: list[Colour] = [
    Colour("red", (210, 35, 35), "red"), Colour("orange", (240, 135, 20), "orange"), Colour("yellow", (240, 215, 40), "yellow"),
    Colour("green", (45, 160, 60), "green"), Colour("blue", (40, 85, 215), "blue"), Colour("purple", (130, 55, 175), "purple"),
    Colour("pink", (240, 140, 185), "pink"), Colour("brown", (125, 80, 40), "brown"), Colour("black", (30, 30, 30), "black"),
    Colour("white", (240, 240, 240), "white"), Colour("gray", (128, 128, 128), "gray"),
    # finer shades: captions name them by the shade only part of the time
    Colour("crimson", (170, 20, 60), "red"), Colour("maroon", (110, 25, 35), "red"), Colour("coral", (250, 115, 80), "orange"),
    Colour("gold", (210, 165, 35), "yellow"), Colour("beige", (225, 205, 160), "brown"), Colour("tan", (195, 160, 110), "brown"),
    Colour("olive", (115, 125, 35), "green"), Colour("lime", (160, 225, 50), "green"), Colour("teal", (20, 130, 130), "blue"),
    Colour("turquoise", (60, 210, 200), "blue"), Colour("navy", (25, 35, 110), "blue"), Colour("sky blue", (120, 185, 240), "blue"),
    Colour("lavender", (185, 160, 230), "purple"), Colour("magenta", (215, 40, 175), "purple"),
]
COLOUR_INDEX = {c.name: i for i, c in enumerate(COLOURS)}
BASIC_COLOURS = [c.name for c in COLOURS if c.basic == c.name]

# --------------------------------------------------------------------------------------------- patterns


@dataclass(frozen=True)
class Pattern:
    name: str
    words: tuple[str, ...]  # adjectives a caption may use
    phrase: str  # "with ..." form
    descriptors: tuple[str, ...] = ()


PATTERNS: list[Pattern] = [
    Pattern("solid", ("plain", "solid"), "in one colour", ("a single flat colour", "no pattern")),
    Pattern("striped", ("striped", "stripy"), "with stripes", ("parallel straight bands", "alternating stripes of two colours")),
    Pattern("dotted", ("dotted", "polka-dot"), "with dots", ("small round dots", "dots in a regular grid")),
    Pattern("checkered", ("checkered", "chequered"), "with a checkerboard pattern", ("alternating squares", "a chessboard grid")),
    Pattern("zigzag", ("zigzag", "chevron"), "with zigzags", ("sharp back-and-forth lines", "repeated v shapes")),
    Pattern("wavy", ("wavy",), "with waves", ("smooth curvy bands", "lines that go up and down like waves")),
    Pattern("grid", ("grid", "gridded"), "with a grid", ("thin crossing lines", "a lattice of small squares")),
    Pattern("crosshatched", ("crosshatched", "hatched"), "with crosshatching", ("diagonal lines in two directions", "a woven diamond mesh")),
    Pattern("spotted", ("spotted", "blotchy"), "with spots", ("irregular blobs", "random patches of colour")),
    Pattern("brick", ("brick", "bricked"), "with a brick pattern", ("staggered rectangles", "rows of bricks and mortar")),
    Pattern("speckled", ("speckled", "grainy"), "with speckles", ("tiny scattered specks", "a fine grainy noise")),
    Pattern("scaly", ("scaly", "scalloped"), "with scales", ("overlapping half circles", "rows of fish scales")),
]
PATTERN_INDEX = {p.name: i for i, p in enumerate(PATTERNS)}

# --------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Scene:
    name: str
    phrases: tuple[str, ...]  # "on the beach", ...
    descriptors: tuple[str, ...] = ()


SCENES: list[Scene] = [
    Scene("beach", ("on the beach", "at the beach", "on the sand by the sea"), ("sand at the bottom", "a strip of blue sea", "a clear sky")),
    Scene("forest", ("in the forest", "in the woods", "among trees"), ("many tree trunks", "dark green leaves", "dim light")),
    Scene("desert", ("in the desert", "on the dunes"), ("orange sand dunes", "a pale hot sky", "no plants")),
    Scene("snowfield", ("in the snow", "on a snowfield", "in a snowy field"), ("white snow on the ground", "a grey winter sky", "cold and bright")),
    Scene("night sky", ("under the night sky", "at night", "against the starry sky"), ("a dark blue sky", "tiny white stars", "no daylight")),
    Scene("meadow", ("in a meadow", "on the grass", "in a field of grass"), ("green grass", "a blue sky above", "small wild flowers")),
    Scene("ocean", ("in the ocean", "on the sea", "over the water"), ("deep blue water", "waves", "a thin strip of sky")),
    Scene("brick wall", ("in front of a brick wall", "against a brick wall"), ("rows of red bricks", "grey mortar lines", "a flat wall")),
    Scene("kitchen", ("in the kitchen", "on a tiled kitchen floor"), ("a tiled floor", "a light wall", "indoors")),
    Scene("sunset", ("at sunset", "at dusk", "in the evening light"), ("an orange and purple sky", "a dark horizon", "low light")),
    Scene("mountains", ("in the mountains", "in front of mountains"), ("grey peaks", "green slopes", "a wide sky")),
    Scene("cave", ("in a cave", "inside a cave"), ("dark rock walls", "very little light", "rough brown stone")),
]
SCENE_INDEX = {s.name: i for i, s in enumerate(SCENES)}

# stuff classes the scenes are made of (segmentation labels), in a fixed order
STUFF = ["sky", "water", "sand", "snow", "grass", "trees", "wall", "floor", "mountain", "rock", "ground"]
STUFF_INDEX = {s: i for i, s in enumerate(STUFF)}

# background kinds that are not named scenes
BG_PLAIN, BG_GRADIENT, BG_PATTERN, BG_NOISE = "plain", "gradient", "pattern", "noise"
BACKGROUNDS = [s.name for s in SCENES] + [BG_PLAIN, BG_GRADIENT, BG_PATTERN, BG_NOISE]

# --------------------------------------------------------------------------------------------- styles

STYLES = ["photo", "cartoon", "sketch", "cluttered"]
# renditions never used in pretraining (the -R style shift)
POST_NONE, POST_MOSAIC, POST_NEON, POST_PAINTING = 0, 1, 2, 3
POSTS = ["none", "mosaic", "neon", "painting"]

SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("", "medium-sized"), "large": ("large", "big", "huge")}
COUNT_WORDS = ["one", "two", "three", "four", "five", "six"]

# --------------------------------------------------------------------------------------------- out-of-domain vocabularies

SATELLITE_CLASSES = ["annual crop land", "forest", "herbaceous vegetation land", "highway or road", "industrial buildings",
                     "pasture land", "permanent crop land", "residential buildings", "river", "sea or lake"]
SATELLITE_DESCRIPTORS = {
    "annual crop land": ("long parallel strips of fields", "brown and green plots", "straight field borders"),
    "forest": ("a dense dark green canopy", "textured tree tops", "no buildings"),
    "herbaceous vegetation land": ("patchy light green vegetation", "a mottled texture", "no regular shapes"),
    "highway or road": ("a straight grey road", "fields on both sides", "a long thin line"),
    "industrial buildings": ("large grey rectangular roofs", "paved areas", "few plants"),
    "pasture land": ("smooth even green grass", "few features", "a uniform field"),
    "permanent crop land": ("rows of small round trees", "a regular grid of dots", "orchards"),
    "residential buildings": ("many small houses", "a grid of streets", "red and grey roofs"),
    "river": ("a winding blue band of water", "green banks", "a curving line"),
    "sea or lake": ("a large blue body of water", "a shoreline", "smooth dark water"),
}
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FASHION_DESCRIPTORS = {
    "t-shirt": ("short sleeves", "a round neck", "a plain top"), "trouser": ("two long legs", "a waistband", "long and narrow"),
    "pullover": ("long sleeves", "a knitted sweater", "a wide body"), "dress": ("a single piece", "a skirt that widens", "no legs"),
    "coat": ("long sleeves", "a long body", "an opening at the front"), "sandal": ("open straps", "a flat sole", "open toes"),
    "shirt": ("a collar", "buttons", "long or short sleeves"), "sneaker": ("a low sports shoe", "a rubber sole", "laces"),
    "bag": ("a handle or strap", "a boxy body", "used to carry things"), "ankle boot": ("a shoe that covers the ankle", "a thick heel", "a closed toe"),
}
MNIST_CLASSES = [str(d) for d in range(10)]
MNIST_DESCRIPTORS = {
    "0": ("a single closed oval loop", "no straight lines"), "1": ("one vertical stroke", "very thin"),
    "2": ("a curve on top", "a flat base line"), "3": ("two bumps open to the left", "no closed loops"),
    "4": ("a vertical and a horizontal stroke that cross", "an open or closed triangle"),
    "5": ("a flat top stroke", "a round bottom bump"), "6": ("a loop at the bottom", "a curved stem on top"),
    "7": ("a horizontal top bar", "a long diagonal stroke"), "8": ("two stacked loops", "a waist in the middle"),
    "9": ("a loop at the top", "a straight or curved tail"),
}
COUNT_DESCRIPTORS = {
    "one": ("a single object", "just one shape"), "two": ("a pair of objects", "two shapes side by side"),
    "three": ("three objects", "a small group of shapes"), "four": ("four objects", "a group of several shapes"),
}


def colour_names() -> list[str]:
    return [c.name for c in COLOURS]


def kind_names() -> list[str]:
    return [k.name for k in KINDS]


def hierarchy(leaves: list[str]) -> dict[str, str]:
    """child -> parent over leaf -> category -> top level -> "object"."""
    tree: dict[str, str] = {}
    for leaf in leaves:
        cat = KINDS[KIND_INDEX[leaf]].parent
        tree[leaf] = cat
        tree[cat] = PARENT_OF_CATEGORY[cat]
        tree[PARENT_OF_CATEGORY[cat]] = TOP_PARENT
    return tree

