"""Images in: read, check and size the `image=`, `mask_image=` and `outpaint=` of one pipeline call.

Everything here happens before any model work, so a bad input costs nothing:
  * an image is a PIL image, a path, or a float tensor (B, 3, H, W) in [0, 1]; files are read with
    their EXIF orientation applied, and RGBA / LA / palette (with or without transparency) are
    composited over white, greyscale, 16-bit and CMYK converted to 8-bit RGB;
  * the output size defaults to the image's size rounded to multiples of 16 (a warning says when
    that resizes); an explicit width / height resizes the image to it;
  * a mask is white where the image is repainted, black where it is kept; a mask of another size
    with the image's aspect ratio is resized, another aspect ratio or an all-black mask is an error;
  * outpaint=(left, top, right, bottom) pads the canvas (edge pixels repeated, for the encoder) and
    masks the new area; right / bottom grow to reach multiples of 16 so the original stays in place.
Errors are `ImageInputError` (naming the file or argument) or the argument errors of checks.py.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checks
from .errors import ImageInputError

SIZE_MULTIPLE = 16  # VAE factor 8 × patch 2 (as the pipeline)
DEFAULT_STRENGTH = 0.6  # img2img; inpainting and outpainting default to 1.0 (the masked area is new)
MAX_MASK_BLUR = 256.0  # pixels of Gaussian sigma; more blurs the whole mask away
MAX_OUTPAINT = 4096  # pixels per side (the pipeline's largest side)
ASPECT_TOLERANCE = 0.01  # a mask's aspect ratio may differ from the image's by this share (rounding)
MAX_INPUT_PIXELS = checks.MAX_CALL_PIXELS  # a file's pixels, checked from its header before decoding


@dataclass
class ImageIn:
    """One call's prepared inputs, at the output size (height × width)."""

    pixels: torch.Tensor  # (1 or B, 3, H, W) float32 in [0, 1] on the 8-bit grid: what is encoded and kept
    mask: torch.Tensor | None  # (1 or B, 1, H, W) float32 in [0, 1], blurred; 1 = repaint; None = img2img
    strength: float
    mask_blur: float
    outpaint: tuple[int, int, int, int] | None
    image_file: dict | None  # {"path", "sha256"} when the image came from a file, else None
    mask_file: dict | None

    def metadata(self) -> dict:
        """The settings every image of the call records (PNG metadata)."""
        return dict(strength=self.strength, mask_blur=self.mask_blur if self.mask is not None else None,
                    outpaint=list(self.outpaint) if self.outpaint else None, image=self.image_file,
                    mask=self.mask_file)


def file_record(path: str | os.PathLike) -> dict:
    """{"path": as given, "sha256": of the file's bytes}: how --from-png finds and checks an input again."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": os.fspath(path), "sha256": digest.hexdigest()}


# ---- reading ----------------------------------------------------------------------------------
def _open(path, what: str):
    from PIL import Image, ImageOps

    if os.fspath(path) == "":
        raise ImageInputError(f"{what}: the path is empty; name an image file")
    p = Path(path)
    if not p.is_file():
        raise ImageInputError(f"{what} {p}: no such file" if not p.exists() else f"{what} {p}: not a file")
    try:
        with Image.open(p) as img:
            check_header_size(img.size, f"{what} {p}")  # before decoding: a small file may declare a huge image
            img.load()
            return ImageOps.exif_transpose(img)
    except ImageInputError:
        raise
    except Exception as exc:  # PIL raises many types for damaged files (SyntaxError, struct.error, ...)
        raise ImageInputError(f"{what} {p}: cannot be read as an image ({exc})") from None


def check_header_size(size: tuple[int, int], where: str) -> None:
    """An image's declared (width, height), refused above MAX_INPUT_PIXELS before any pixel is decoded."""
    width, height = size
    if width * height > MAX_INPUT_PIXELS:
        raise ImageInputError(f"{where}: the image is {width}×{height} ({width * height / 2**20:.0f} Mi pixels); "
                              f"at most {MAX_INPUT_PIXELS // 2**20} Mi pixels are read: resize it first")


def _sixteen_bit(img) -> np.ndarray | None:
    """8-bit values of a 16/32-bit integer or float greyscale image (PIL's own convert clips them)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        return np.clip(np.asarray(img, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
    if img.mode == "F":
        return np.clip(np.asarray(img, dtype=np.float64), 0, 255).round().astype(np.uint8)
    return None


def to_rgb_array(img) -> np.ndarray:
    """Any PIL image → (H, W, 3) uint8 RGB: transparency over white, 16-bit scaled, CMYK / palette converted."""
    from PIL import Image

    grey = _sixteen_bit(img)
    if grey is not None:
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _mask_array(img) -> np.ndarray:
    """Any PIL image → (H, W) uint8 luminance; white = repaint."""
    grey = _sixteen_bit(img)
    if grey is not None:
        return grey
    if img.mode in ("RGBA", "LA", "PA", "P"):
        img = img.convert("RGBA").convert("RGB")  # a mask is read by its colour, never its alpha
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _opened(value, what: str):
    """(the value, None), or for a path (its decoded PIL image, its file record)."""
    if isinstance(value, (str, os.PathLike)):
        return _open(value, what), file_record(value)
    return value, None


def read_image(image, what: str = "image") -> tuple[torch.Tensor, dict | None]:
    """(pixels (B, 3, H, W) float32 in [0, 1], file record or None) of a PIL image, path or tensor."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        return _check_tensor(image, what, channels=3), None
    image, record = _opened(image, what)
    if not isinstance(image, Image.Image):
        raise ImageInputError(f"{what} must be a PIL image, a path or a float tensor (B, 3, H, W) in [0, 1], "
                              f"got {type(image).__name__}")
    array = to_rgb_array(image)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255.0, record


def read_mask(mask, what: str = "mask_image") -> tuple[torch.Tensor, dict | None]:
    """(mask (B, 1, H, W) float32 in [0, 1], file record or None); 1 = repaint."""
    from PIL import Image

    if isinstance(mask, torch.Tensor):
        t = mask[:, None] if mask.ndim == 3 else mask
        return _check_tensor(t, what, channels=1), None
    mask, record = _opened(mask, what)
    if not isinstance(mask, Image.Image):
        raise ImageInputError(f"{what} must be a PIL image, a path or a float tensor (B, 1, H, W) in [0, 1], "
                              f"got {type(mask).__name__}")
    return torch.from_numpy(_mask_array(mask).copy())[None, None].float() / 255.0, record


def _check_tensor(t: torch.Tensor, what: str, channels: int) -> torch.Tensor:
    if t.ndim != 4 or t.shape[1] != channels or t.shape[0] < 1 or min(t.shape[-2:]) < 1:
        raise ImageInputError(f"{what} must be a tensor (B, {channels}, H, W), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ImageInputError(f"{what} must be a float tensor with values in [0, 1], got {t.dtype}")
    t = t.detach().float().cpu()
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise ImageInputError(f"{what} must hold finite values in [0, 1], got [{t.min().item():g}, "
                              f"{t.max().item():g}]")
    return t


# ---- sizing -----------------------------------------------------------------------------------
def _round16(value: int) -> int:
    return max(SIZE_MULTIPLE, SIZE_MULTIPLE * math.floor(value / SIZE_MULTIPLE + 0.5))  # halves up


def resize(pixels: torch.Tensor, height: int, width: int, *, mode: str = "bicubic") -> torch.Tensor:
    """Resampled to (height, width), clamped to [0, 1], and for images put back on the 8-bit grid (so
    the kept pixels of the output equal the resized input exactly)."""
    if pixels.shape[-2:] == (height, width):
        return pixels
    out = F.interpolate(pixels, size=(height, width), mode=mode, align_corners=False, antialias=True).clamp_(0, 1)
    return out if mode != "bicubic" else (out * 255).round_().div_(255)


def output_size(pixels: torch.Tensor, width: int | None, height: int | None, max_side: int) -> tuple[int, int]:
    """(width, height): as given, else the image's own rounded to multiples of 16 (with a warning)."""
    h, w = pixels.shape[-2:]
    out_w = _round16(w) if width is None else width
    out_h = _round16(h) if height is None else height
    if (width is None or height is None) and (out_w, out_h) != (w, h) and (width, height) == (None, None):
        warnings.warn(f"image is {w}×{h}; resizing it to {out_w}×{out_h} (multiples of {SIZE_MULTIPLE}); pass "
                      "width= and height= to choose", stacklevel=4)
    if max(out_w, out_h) > max_side:
        raise ImageInputError(f"image is {w}×{h}, an output of {out_w}×{out_h}; sides are limited to {max_side} "
                              "pixels: resize it first or pass width= / height=")
    return out_w, out_h


def check_aspect(mask: torch.Tensor, image_hw: tuple[int, int], what: str) -> None:
    mh, mw = mask.shape[-2:]
    ih, iw = image_hw
    if abs(mw / mh - iw / ih) > ASPECT_TOLERANCE * (iw / ih) and (mh, mw) != (ih, iw):
        raise ImageInputError(f"{what} is {mw}×{mh} but the image is {iw}×{ih}: another aspect ratio "
                              f"({mw / mh:.3f} vs {iw / ih:.3f}); a mask must cover the same picture")


def gaussian_blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (replicated edges), support ±ceil(3·sigma): values beyond stay exactly 0."""
    if sigma <= 0:
        return mask
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = (kernel / kernel.sum()).float()
    b, c, h, w = mask.shape
    m = mask.reshape(b * c, 1, h, w)
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return m.reshape(b, c, h, w).clamp_(0, 1)


# ---- one call's inputs ------------------------------------------------------------------------
def check_outpaint(outpaint) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): four ints ≥ 0, not all 0."""
    if not isinstance(outpaint, (tuple, list)) or len(outpaint) != 4:
        raise ImageInputError(f"outpaint must be (left, top, right, bottom) in pixels, got {outpaint!r}")
    sides = tuple(checks.check_int(f"outpaint {name}", v, 0, MAX_OUTPAINT)
                  for name, v in zip(("left", "top", "right", "bottom"), outpaint))
    if not any(sides):
        raise ImageInputError("outpaint pads nothing (all four sides are 0)")
    return sides


def _outpaint(pixels: torch.Tensor, sides, width, height, max_side: int):
    """The padded canvas (edges repeated), its mask (1 on the new area) and the final padding."""
    left, top, right, bottom = sides
    h, w = pixels.shape[-2:]
    canvas_w, canvas_h = w + left + right, h + top + bottom
    grown_w = SIZE_MULTIPLE * math.ceil(canvas_w / SIZE_MULTIPLE)
    grown_h = SIZE_MULTIPLE * math.ceil(canvas_h / SIZE_MULTIPLE)
    if (grown_w, grown_h) != (canvas_w, canvas_h):
        warnings.warn(f"outpainted canvas {canvas_w}×{canvas_h} grows to {grown_w}×{grown_h} (multiples of "
                      f"{SIZE_MULTIPLE}) on the right / bottom", stacklevel=4)
        right, bottom = right + grown_w - canvas_w, bottom + grown_h - canvas_h
    if (width is not None and width != grown_w) or (height is not None and height != grown_h):
        raise ImageInputError(f"outpaint makes the canvas {grown_w}×{grown_h}; width / height must be left out "
                              f"or equal it, got {width}×{height}")
    if max(grown_w, grown_h) > max_side:
        raise ImageInputError(f"outpaint makes the canvas {grown_w}×{grown_h}; sides are limited to {max_side}")
    canvas = F.pad(pixels, (left, right, top, bottom), mode="replicate")  # edges go on: calmer latents to start from
    mask = torch.ones(1, 1, grown_h, grown_w)
    mask[:, :, top:top + h, left:left + w] = 0
    return canvas, mask, (left, top, right, bottom)


def _batch(t: torch.Tensor, total: int, what: str) -> torch.Tensor:
    if t.shape[0] not in (1, total):
        raise ImageInputError(f"{what} holds {t.shape[0]} images; the call makes {total} (give 1 or {total})")
    return t


def prepare(image, *, mask_image=None, outpaint=None, strength=None, mask_blur=0, width=None, height=None,
            total: int = 1, max_side: int = 4096) -> tuple[ImageIn, int, int]:
    """(prepared inputs, width, height) of one call; width / height None = from the image (see module doc)."""
    if image is None:
        if mask_image is not None or outpaint is not None or strength is not None:
            raise ImageInputError("mask_image=, outpaint= and strength= need an image= to work on")
        return None, width, height
    masked = mask_image is not None or outpaint is not None
    strength = checks.check_number("strength", (1.0 if masked else DEFAULT_STRENGTH) if strength is None
                                      else strength, 0.0, 1.0, low_open=True)
    mask_blur = checks.check_number("mask_blur", mask_blur, 0.0, MAX_MASK_BLUR)
    if mask_blur and not masked:  # it would blur nothing: said, not silently ignored
        raise ImageInputError(f"mask_blur={mask_blur:g} softens a mask's edge; give mask_image= or outpaint= too")
    if mask_image is not None and outpaint is not None:
        raise ImageInputError("give mask_image= or outpaint=, not both (outpaint masks the new area itself)")
    pixels, image_file = read_image(image)
    pixels = _batch(pixels, total, "image")
    mask, mask_file = None, None
    if outpaint is not None:
        pixels, mask, outpaint = _outpaint(pixels, check_outpaint(outpaint), width, height, max_side)
        width, height = pixels.shape[-1], pixels.shape[-2]
    else:
        width, height = output_size(pixels, width, height, max_side)
        if mask_image is not None:
            mask, mask_file = read_mask(mask_image)
            mask = _batch(mask, total, "mask_image")
            check_aspect(mask, tuple(pixels.shape[-2:]), "mask_image")
            if not (mask > 0).any():
                raise ImageInputError(f"mask_image{' ' + mask_file['path'] if mask_file else ''} is all black: "
                                      "nothing to repaint (white = repaint, black = keep)")
            mask = resize(mask, height, width, mode="bilinear")
        pixels = resize(pixels, height, width)
    if mask is not None:
        mask = gaussian_blur(mask, mask_blur)
    return ImageIn(pixels, mask, strength, mask_blur, outpaint, image_file, mask_file), width, height
