"""Procedural scenes for the demo model: one coloured shape on a plain or gradient background.

Everything is drawn with numpy from a seed (no downloads). A scene is a `Scene` (colour, shape,
size, position, background colour, gradient or not) plus a little jitter; its caption names the
attributes: "a small red circle at the top left on a blue background". Captions sometimes leave
the position out ("a small red circle on a blue background"), so the short prompt of the README
works too. A fixed, seeded 5 % of the attribute tuples is held out of training (`HELD_OUT`).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np

IMAGE_SIZE = 64
# Saturated, well separated colours: the classifier names a region by the nearest of these.
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 40),
    "green": (40, 165, 60),
    "blue": (35, 75, 215),
    "purple": (140, 45, 180),
}
NEUTRALS = {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (20, 20, 20)}
PALETTE = {**COLOURS, **NEUTRALS}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 7.0, "medium": 11.0, "large": 15.0}  # radius of the shape's circumscribed circle, px
POSITIONS = {  # (row, column) of the centre, px
    "at the top left": (20, 20),
    "at the top right": (20, 44),
    "in the center": (32, 32),
    "at the bottom left": (44, 20),
    "at the bottom right": (44, 44),
}
BACKGROUNDS = tuple(PALETTE)
HOLD_OUT_FRACTION = 0.05


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str
    gradient: bool = False

    def caption(self, with_position: bool = True) -> str:
        where = f" {self.position}" if with_position else ""
        kind = " gradient" if self.gradient else ""
        article = "an" if self.background[0] in "aeiou" else "a"
        return f"a {self.size} {self.colour} {self.shape}{where} on {article} {self.background}{kind} background"


def all_scenes() -> list[Scene]:
    """Every attribute tuple (shape colour never equals the background colour)."""
    return [Scene(c, s, z, p, b, g)
            for c, s, z, p, b, g in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS, BACKGROUNDS, (False, True))
            if b != c]


def _split(seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    scenes = all_scenes()
    rng = random.Random(seed)
    held = set(rng.sample(range(len(scenes)), int(len(scenes) * HOLD_OUT_FRACTION)))
    return ([s for i, s in enumerate(scenes) if i not in held], [s for i, s in enumerate(scenes) if i in held])


TRAIN_SCENES, HELD_OUT = _split()


def held_out_prompts(count: int = 32, seed: int = 1) -> list[Scene]:
    """A fixed sample of held-out scenes (never drawn for training)."""
    return random.Random(seed).sample(HELD_OUT, count)


# ---- drawing ---------------------------------------------------------------------------------

def _polygon(kind: str, radius: float) -> np.ndarray:
    """Vertices (N, 2) as (dy, dx) around the centre; y grows downwards."""
    if kind == "triangle":
        angles = np.deg2rad([-90, 30, 150])
        r = np.full(3, radius)
    else:  # five-point star, inner radius 0.45 of the outer one
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    return np.stack([r * np.sin(angles), r * np.cos(angles)], axis=1)


def _inside_polygon(dy: np.ndarray, dx: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over the grid."""
    inside = np.zeros(dy.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        (y0, x0), (y1, x1) = vertices[i], vertices[(i + 1) % n]
        crosses = (y0 > dy) != (y1 > dy)
        x_at = x0 + (dy - y0) * (x1 - x0) / np.where(y1 == y0, 1e-9, y1 - y0)
        inside ^= crosses & (dx < x_at)
    return inside


def shape_mask(shape: str, radius: float, centre: tuple[float, float], size: int = IMAGE_SIZE,
               supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage in [0, 1], (size, size)."""
    grid = (np.arange(size * supersample) + 0.5) / supersample
    dy, dx = grid[:, None] - centre[0], grid[None, :] - centre[1]
    dy, dx = np.broadcast_arrays(dy, dx)
    if shape == "circle":
        inside = dy ** 2 + dx ** 2 <= radius ** 2
    elif shape == "square":
        half = radius / np.sqrt(2)
        inside = (np.abs(dy) <= half) & (np.abs(dx) <= half)
    elif shape in ("triangle", "star"):
        # A triangle's centroid sits below the circumscribed circle's top; shift it so that the
        # drawn shape is centred on `centre` by its bounding box.
        vertices = _polygon(shape, radius * (1.15 if shape == "triangle" else 1.1))
        vertices = vertices - (vertices.max(0) + vertices.min(0)) / 2
        inside = _inside_polygon(dy, dx, vertices)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def render(scene: Scene, rng: np.random.Generator | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 RGB (size, size, 3). With `rng`, the position, size and colours jitter a little and a
    gradient runs top to bottom or left to right (without: top to bottom)."""
    jitter = rng is not None
    bg = np.asarray(PALETTE[scene.background], dtype=np.float32)
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    if jitter:
        bg = bg + rng.uniform(-12, 12, 3)
        fg = fg + rng.uniform(-12, 12, 3)
    image = np.broadcast_to(bg, (size, size, 3)).copy()
    if scene.gradient:  # the named colour fading to half brightness, top to bottom or left to right
        end = bg * 0.5 if bg.mean() > 60 else bg + 60  # black lightens instead
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        vertical = rng.random() < 0.5 if jitter else True
        ramp = ramp[:, None, None] if vertical else ramp[None, :, None]
        image = np.broadcast_to(bg * (1 - ramp) + end * ramp, (size, size, 3)).copy()
    scale = size / IMAGE_SIZE
    radius = SIZES[scene.size] * scale
    cy, cx = (v * scale for v in POSITIONS[scene.position])
    if jitter:
        radius *= rng.uniform(0.9, 1.1)
        cy += rng.uniform(-3, 3) * scale
        cx += rng.uniform(-3, 3) * scale
    cover = shape_mask(scene.shape, radius, (cy, cx), size)[:, :, None]
    image = image * (1 - cover) + fg * cover
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def sample(count: int, seed: int, scenes: list[Scene] | None = None,
           position_dropout: float = 0.25) -> tuple[np.ndarray, list[str], list[Scene]]:
    """`count` jittered training images (count, 64, 64, 3) uint8 with captions, deterministic in `seed`.

    A caption leaves out the position with probability `position_dropout`.
    """
    scenes = TRAIN_SCENES if scenes is None else scenes
    rng = np.random.default_rng(seed)
    picks = [scenes[i] for i in rng.integers(0, len(scenes), count)]
    images = np.stack([render(s, rng) for s in picks])
    captions = [s.caption(with_position=rng.random() >= position_dropout) for s in picks]
    return images, captions, picks


def vocabulary() -> list[str]:
    """Every word a caption can use (the tokenizer is trained on these)."""
    words = {"a", "an", "on", "background", "gradient"}
    for phrase in (*COLOURS, *SHAPES, *SIZES, *POSITIONS, *BACKGROUNDS):
        words.update(phrase.split())
    return sorted(words)
