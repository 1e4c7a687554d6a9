"""A hand-written reader of demo images: which colour, where, how big, which shape.

No learned parts (no CLIP): the background is a plane per RGB channel fitted to the border pixels
(a plain or linear-gradient background is exactly such a plane); the shape is the set of pixels
far from that plane; its colour is the mean of its core pixels named by the nearest of
`dataset.COLOURS`; its position the nearest of `dataset.POSITIONS` to its centroid; its shape
from how much of its bounding box it fills (square ≈ 1, circle ≈ 0.79, triangle ≈ 0.5,
star ≈ 0.38) and how far its centroid sits below the box centre (a triangle's does, by 1/6 of
its height); its size the nearest of `dataset.SIZES` to the radius its area implies for that shape.
The background's colour is the plane's value at the top-left corner (where a gradient starts from
the named colour) named by the nearest of `dataset.PALETTE`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dataset import COLOURS, IMAGE_SIZE, PALETTE, POSITIONS, SIZES, Scene

# Area of each shape as drawn by dataset.shape_mask, in units of radius².
AREA_FACTOR = {"circle": np.pi, "square": 2.0, "triangle": 1.299 * 1.15 ** 2, "star": 1.322 * 1.1 ** 2}


@dataclass(frozen=True)
class Reading:
    colour: str | None
    position: str | None
    size: str | None
    shape: str | None
    area: int  # pixels in the shape mask
    background: str | None = None

    def agrees(self, scene: Scene, check: tuple[str, ...] = ("colour", "position")) -> bool:
        return all(getattr(self, name) == getattr(scene, name) for name in check)


def _nearest(colour: np.ndarray, palette: dict) -> str:
    return min(palette, key=lambda n: float(np.linalg.norm(colour - np.asarray(palette[n]))))


def _background(image: np.ndarray, border: int = 2) -> np.ndarray:
    """Per-channel plane a + b·row + c·col fitted to the border ring, refitted without outliers
    (a shape that touches the border)."""
    h, w, _ = image.shape
    rows, cols = np.mgrid[0:h, 0:w]
    ring = np.zeros((h, w), dtype=bool)
    ring[:border], ring[-border:], ring[:, :border], ring[:, -border:] = True, True, True, True
    design = np.stack([np.ones(h * w), rows.ravel() / h, cols.ravel() / w], axis=1)
    pixels = image.reshape(-1, 3).astype(np.float64)
    use = ring.ravel()
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(design[use], pixels[use], rcond=None)
        resid = np.linalg.norm(pixels - design @ coef, axis=1)
        use = ring.ravel() & (resid < max(20.0, 2.5 * np.median(resid[ring.ravel()])))
    return (design @ coef).reshape(h, w, 3)


def classify(image) -> Reading:
    """Read a demo image (PIL image or uint8 array (H, W, 3); any size, judged at 64×64)."""
    array = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)) if hasattr(image, "convert") else image)
    array = array.astype(np.float64)
    plane = _background(array)
    background = _nearest(plane[0, 0], PALETTE)
    distance = np.linalg.norm(array - plane, axis=2)
    peak = distance.max()
    if peak < 40:  # nothing stands out from the background
        return Reading(None, None, None, None, 0, background)
    mask = distance > max(35.0, 0.4 * peak)
    core = distance > max(35.0, 0.7 * peak)  # away from the anti-aliased edge
    mean = array[core].mean(axis=0)
    colour = _nearest(mean, COLOURS)

    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean(), cols.mean()
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cy) ** 2 + (POSITIONS[p][1] - cx) ** 2)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    height, width = bottom - top, right - left
    fill = len(rows) / (height * width)
    drop = (cy + 0.5 - (top + bottom) / 2) / height  # centroid below the box centre, in heights
    if fill > 0.9:
        shape = "square"
    elif fill > 0.66:
        shape = "circle"
    else:
        shape = "triangle" if drop > 0.1 else "star"
    radius = np.sqrt(len(rows) / AREA_FACTOR[shape])
    size = min(SIZES, key=lambda s: abs(SIZES[s] - radius))
    return Reading(colour, position, size, shape, int(len(rows)), background)
