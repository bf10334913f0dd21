"""Pictures of simple shapes with questions that have exactly one correct short answer.

Every picture holds 1-3 shapes of one kind (circle, square or triangle) on a
lightly noisy, light background; their colours (red, green, blue, yellow) are either all the same
or drawn independently. Each shape sits in its own quadrant of the picture, at a random place and
size inside it. Every question has exactly one correct short answer on every picture:

- "What shape is this?" / "What shapes are there?": the kind (``circle``; singular whatever the
  count, so that every answer fits in the 8 tokens the demo generates);
- "What color is the shape?" / "What color are the shapes?": the colour when every shape has it
  (``red``), else ``mixed``;
- "How many shapes are there?": a number word (``one``, ``two``, ``three``).

Everything is drawn from the ``random.Random`` passed in, so a seed fixes pictures, questions and
answers. Only the standard library, numpy and Pillow are used (no torch), so the CLI can import it
cheaply.

    >>> import random
    >>> from vlm.demo.shapes import make_example, answer_is_correct
    >>> image, question, answer = make_example(random.Random(0))
    >>> answer_is_correct(question, answer, answer.upper() + ".")
    True
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 112
"""Side of the generated pictures in pixels (the demo model's tile size)."""

KINDS = ("circle", "square", "triangle")
COLORS = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 215),
    "yellow": (235, 200, 25),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_SHAPES = 3
MIXED = "mixed"

Q_SHAPE = "What shape is this?"
Q_SHAPES = "What shapes are there?"
Q_COLOR = "What color is the shape?"
Q_COLORS = "What color are the shapes?"
Q_COUNT = "How many shapes are there?"
QUESTIONS = (Q_SHAPE, Q_SHAPES, Q_COLOR, Q_COLORS, Q_COUNT)


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    cx: float
    cy: float
    radius: float  # half the side of the bounding box


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]

    @property
    def count(self) -> int:
        return len(self.shapes)

    @property
    def kind(self) -> str:
        return self.shapes[0].kind

    @property
    def uniform_color(self) -> str | None:
        colors = {s.color for s in self.shapes}
        return colors.pop() if len(colors) == 1 else None


def make_scene(rng: random.Random, size: int = IMAGE_SIZE) -> Scene:
    """Choose the shapes of one picture: kind, colours, count and non-overlapping places."""
    count = rng.choices((1, 2, 3), weights=(0.4, 0.3, 0.3))[0]
    kind = rng.choice(KINDS)
    names = list(COLORS)
    if count == 1 or rng.random() < 0.5:
        colors = [rng.choice(names)] * count
    else:
        colors = [rng.choice(names) for _ in range(count)]
    # each shape in its own quadrant (random position and size inside it), so shapes never
    # overlap or touch and counting them is counting occupied quadrants
    quadrants = rng.sample(range(4), count)
    half = size / 2
    margin = 0.04 * size
    lo, hi = 0.12 * size, 0.20 * size
    placed = []
    for color, quadrant in zip(colors, quadrants):
        r = rng.uniform(lo, hi)
        x0, y0 = (quadrant % 2) * half, (quadrant // 2) * half
        cx = rng.uniform(x0 + r + margin, x0 + half - r - margin)
        cy = rng.uniform(y0 + r + margin, y0 + half - r - margin)
        placed.append(Shape(kind, color, cx, cy, r))
    return Scene(tuple(placed))


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    red, green, blue = (max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)
    return red, green, blue


def draw_scene(scene: Scene, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """Render ``scene`` on a light, lightly noisy background."""
    base = rng.randint(215, 255)
    tint = np.array([base + rng.randint(-8, 0) for _ in range(3)], dtype=np.int16)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(-10, 11, size=(size, size, 3), dtype=np.int16)
    background = np.clip(tint + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = _jitter(COLORS[s.color], rng)
        x0, y0, x1, y1 = s.cx - s.radius, s.cy - s.radius, s.cx + s.radius, s.cy + s.radius
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif s.kind == "triangle":
            h = s.radius * math.sqrt(3)  # equilateral, side 2r, centred in the box
            top = s.cy - h / 2
            draw.polygon([(s.cx, top), (x0, top + h), (x1, top + h)], fill=fill)
        else:  # pragma: no cover - KINDS is closed
            raise ValueError(s.kind)
    return image


def questions_for(scene: Scene) -> list[tuple[str, str]]:
    """Every question of :data:`QUESTIONS` with its one correct answer for ``scene``."""
    kind = scene.kind
    color = scene.uniform_color or MIXED
    return [
        (Q_SHAPE, kind),
        (Q_SHAPES, kind),
        (Q_COLOR, color),
        (Q_COLORS, color),
        (Q_COUNT, NUMBER_WORDS[scene.count]),
    ]


def answer(scene: Scene, question: str) -> str:
    """The answer to one of :data:`QUESTIONS` for ``scene``."""
    for q, a in questions_for(scene):
        if q == question:
            return a
    raise ValueError(f"not a demo question: {question!r} (ask one of {QUESTIONS})")


def make_picture(rng: random.Random, size: int = IMAGE_SIZE) -> tuple[Image.Image, Scene]:
    scene = make_scene(rng, size)
    return draw_scene(scene, rng, size), scene


def make_example(rng: random.Random, size: int = IMAGE_SIZE) -> tuple[Image.Image, str, str]:
    """One picture with one of its questions (chosen at random) and the answer."""
    image, scene = make_picture(rng, size)
    question, answer = rng.choice(questions_for(scene))
    return image, question, answer


def make_examples(seed: int, n: int, size: int = IMAGE_SIZE) -> list[tuple[Image.Image, str, str]]:
    """``n`` examples from ``random.Random(seed)``: the same seed gives the same examples."""
    rng = random.Random(seed)
    return [make_example(rng, size) for _ in range(n)]


_ARTICLES = re.compile(r"^(a|an|the)\s+")
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no leading article, digits spelled as words."""
    text = _PUNCT.sub(" ", text.lower())
    text = " ".join(text.split())
    text = _ARTICLES.sub("", text)
    words = [NUMBER_WORDS[int(w)] if w.isdigit() and int(w) < len(NUMBER_WORDS) else w for w in text.split()]
    return " ".join(words).replace("colour", "color")


def answer_is_correct(question: str, expected: str, got: str) -> bool:
    """Is ``got`` the ``expected`` answer to ``question``, up to case, punctuation, articles, 2/two?"""
    del question  # every question has a one-word answer; kept for callers that want to dispatch on it
    return normalize_answer(got) == normalize_answer(expected)


def _sample(kind: str, colors: tuple[str, ...], places: tuple[tuple[float, float, float], ...]) -> Scene:
    return Scene(tuple(Shape(kind, c, x, y, r) for c, (x, y, r) in zip(colors, places)))


#: The pictures bundled in ``core/demo/pictures`` (file name -> scene), drawn by :func:`sample_pictures`.
SAMPLE_SCENES: dict[str, Scene] = {
    "red_circle.png": _sample("circle", ("red",), ((30, 29, 21),)),
    "green_square.png": _sample("square", ("green",), ((82, 80, 18),)),
    "yellow_triangle.png": _sample("triangle", ("yellow",), ((29, 84, 20),)),
    "two_blue_squares.png": _sample("square", ("blue", "blue"), ((28, 30, 15), (84, 82, 17))),
    "three_green_triangles.png": _sample("triangle", ("green",) * 3, ((30, 28, 16), (83, 29, 14), (28, 82, 17))),
    "mixed_circles.png": _sample("circle", ("red", "blue", "yellow"), ((84, 28, 15), (27, 83, 16), (82, 84, 14))),
}


def sample_pictures(size: int = IMAGE_SIZE) -> dict[str, tuple[Image.Image, Scene]]:
    """The bundled sample pictures, drawn deterministically (file name -> (picture, scene))."""
    out = {}
    for name, scene in SAMPLE_SCENES.items():
        rng = random.Random(name)
        scale = size / IMAGE_SIZE
        scaled = Scene(
            tuple(Shape(s.kind, s.color, s.cx * scale, s.cy * scale, s.radius * scale) for s in scene.shapes)
        )
        out[name] = (draw_scene(scaled, rng, size), scaled)
    return out
