"""The one preprocessing path (decode, orient, RGB, resize, scale) shared by training and serving."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from malaria.spec import ModelSpec

# Formats a microscope or phone camera writes (TIFF includes 16-bit). Pillow is asked to recognise only
# these: formats that decode an embedded image while opening (ICO, ICNS, ...) never run.
ALLOWED_FORMATS = ("PNG", "JPEG", "TIFF", "BMP")
# Pillow's own decompression-bomb check, with its warning made an error in ``decode_image``: a ceiling
# above every route's limit (the explicit per-route check below gives the precise message).
Image.MAX_IMAGE_PIXELS = 100_000_000

ImageSource = bytes | str | Path | BinaryIO | Image.Image
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})  # files taken as images


class InvalidImageError(ValueError):
    """The input is not a decodable image (empty, truncated, not an image)."""


class ImageTooLargeError(InvalidImageError):
    """The image has more pixels than allowed (a decompression bomb guard)."""


def decode_image(source: ImageSource, max_pixels: int | None = 25_000_000) -> Image.Image:
    """Open and fully decode an image, upright (EXIF) and in 8-bit RGB."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, bytes):
            if not source:
                raise InvalidImageError("empty file")
            source = io.BytesIO(source)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(source, formats=ALLOWED_FORMATS)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"image is over {Image.MAX_IMAGE_PIXELS} pixels") from exc
        except UnidentifiedImageError as exc:
            raise InvalidImageError(f"not a recognised image format (accepted: {', '.join(ALLOWED_FORMATS)})") from exc
        except (OSError, ValueError) as exc:
            raise InvalidImageError(f"cannot read image: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError("image has no pixels")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"corrupt or truncated image: {exc}") from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        # 16-bit modes say their range; 32-bit ones ("I", "F") do not, so their values decide.
        peak = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        return Image.fromarray((np.clip(array, 0, peak) / peak * 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Cell crops sit on black; transparent pixels become background, not white.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize(image: Image.Image, size: int) -> Image.Image:
    """Square model input; box filter on down-scaling (the dataset was area-resized)."""
    if image.size == (size, size):
        return image
    shrinking = image.width >= size and image.height >= size
    return image.resize((size, size), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)


def to_model_input(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """A decoded RGB image -> float32 array (size, size, 3) scaled as the model expects."""
    return np.multiply(np.asarray(resize(image, spec.image_size)), np.float32(spec.scale), dtype=np.float32)


def preprocess(source: ImageSource, spec: ModelSpec, max_pixels: int | None = 25_000_000) -> np.ndarray:
    """Any image source -> model input: ``decode_image`` then ``to_model_input``."""
    return to_model_input(decode_image(source, max_pixels=max_pixels), spec)


def preprocess_batch(sources: list[ImageSource], spec: ModelSpec, max_pixels: int | None = 25_000_000) -> np.ndarray:
    """Several sources -> one float32 batch (n, size, size, 3)."""
    batch = np.empty((len(sources), spec.image_size, spec.image_size, 3), dtype=np.float32)
    for i, source in enumerate(sources):
        batch[i] = preprocess(source, spec, max_pixels=max_pixels)
    return batch
