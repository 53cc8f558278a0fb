"""ImageNet-style image folder: `<root>/<class name>/<image>.<suffix>`, any size, any mode PIL opens.

Suffixes are torchvision ImageFolder's (jpg, jpeg, png, ppm, bmp, pgm, tif, tiff, webp). Every
image is converted to 8-bit gray or RGB by its meaning, never by clipping:
- 1, L: as is (1 -> 0/255). P: its palette expanded (with its transparency, if any).
- 16-bit grays (I;16*) and 32-bit integers (I) holding 0..65535: scaled by the 16-bit range
  (value / 257), so 65535 is white; an I image with values outside 0..65535 is refused.
- float (F): values in [0, 1] scaled by 255; other values (or NaN/inf) are refused.
- alpha (LA, La, PA, RGBA, RGBa, a palette with transparency): composited on white
  (`ALPHA_BACKGROUND`), so a transparent pixel is white, not whatever colour hides under it.
- RGB, RGBX, CMYK, YCbCr, LAB, HSV: converted to RGB by PIL; gray output is then ITU-R 601 luma.
- any other mode is refused.
Multi-frame files (GIF, TIFF) give their first frame. An image of more than `max_pixels` pixels is
refused before it is decoded. A refused or unreadable file is logged with its path and reason and
counted by the caller, never a crash that loses the folder.

Then, like the official VAR data pipeline, the image is resized so the short side matches the
target (LANCZOS) and center-cropped to a square. A JPEG that is already the target size in the
target mode (L for 1 channel, RGB for 3) needs neither: with `keep_jpeg` its file bytes are kept as
they are (decoded once, to prove the file whole), so no pixel is re-encoded.

Class ids: the sorted folder names (torchvision's rule), or a label manifest's
(`pipeline.data.sources.label_manifest`).
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.sources.label_manifest import LabelManifest

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS): ~9459 x 9459
ALPHA_BACKGROUND = 255  # transparent pixels are composited on white

SIXTEEN_BIT_GRAYS = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
COLOUR_MODES = ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")


class ImageRefused(ValueError):
    """This file will not become a sample; `reason` is a short, countable kind, the message the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def list_classes(root: str | Path) -> list[str]:
    """Sorted subfolder names: class i is the i-th name (torchvision ImageFolder's rule)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class subfolders")
    return classes


def list_images(root: str | Path, manifest: LabelManifest | None = None) -> tuple[list[tuple[Path, int]], list[str]]:
    """([(path, label)] sorted by label then file name, class names by label).

    Labels and names: the sorted folder names, or `manifest`'s (LabelManifestError, one line naming the
    folder, when it does not name a class folder)."""
    root = Path(root)
    folders = list_classes(root)
    if manifest is None:
        labels, classes = {name: label for label, name in enumerate(folders)}, folders
    else:
        manifest.check_folders(folders, str(root))
        labels, classes = {name: manifest.id_of(name) for name in folders}, list(manifest.names)
    items = [(path, labels[name]) for name in sorted(folders, key=labels.__getitem__)
             for path in sorted((root / name).rglob("*")) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise ValueError(f"image folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return items, classes


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale so the short side is `size`, then cut the central `size` x `size` square."""
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.LANCZOS)
        width, height = image.size
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image


def _gray_from_values(values: np.ndarray, scale: float) -> Image.Image:
    return Image.fromarray(np.rint(values * scale).astype(np.uint8), mode="L")


def to_gray_or_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit "L" or "RGB" by the rules in the module docstring; ImageRefused otherwise."""
    mode = image.mode
    if mode in ("1", "L"):
        return image.convert("L")
    if mode in SIXTEEN_BIT_GRAYS or mode == "I":
        values = np.asarray(image).astype(np.int64)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > 65535:
            raise ImageRefused("values out of range", f"mode {mode} values {low}..{high} outside 0..65535")
        return _gray_from_values(values, 255 / 65535)
    if mode == "F":
        values = np.asarray(image).astype(np.float64)
        if not np.isfinite(values).all():
            raise ImageRefused("values out of range", "mode F holds NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 1:
            raise ImageRefused("values out of range", f"mode F values {low:g}..{high:g} outside [0, 1]")
        return _gray_from_values(values, 255)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,))
        composited = Image.alpha_composite(background, rgba).convert("RGB")
        return composited.convert("L") if mode in ("LA", "La") else composited
    if mode in COLOUR_MODES:
        return image.convert("RGB")
    raise ImageRefused("unsupported mode", f"mode {mode}")


@contextmanager
def _own_pixel_limit():
    """PIL's global bomb check off while we apply `max_pixels` ourselves (it would raise past 2x its limit)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def load_image(path: str | Path, size: int, channels: int, max_pixels: int = MAX_PIXELS,
               keep_jpeg: bool = False) -> np.ndarray | bytes:
    """uint8 [size, size] (channels=1) or [size, size, 3] (channels=3); ImageRefused when it cannot be.
    With `keep_jpeg`, a JPEG that needs no resize and no mode conversion comes back as its file's bytes."""
    with _own_pixel_limit():
        try:
            data = Path(path).read_bytes()
            image = Image.open(io.BytesIO(data))  # reads the header only
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageRefused("unreadable", str(exc) or type(exc).__name__) from None
        with image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageRefused("too many pixels", f"{width} x {height} = {width * height} pixels, "
                                                      f"more than max_image_pixels {max_pixels}")
            if width < 1 or height < 1:
                raise ImageRefused("unreadable", f"size {width} x {height}")
            try:
                image.load()
                if keep_jpeg and image.format == "JPEG" and image.size == (size, size) \
                        and image.mode == ("L" if channels == 1 else "RGB"):
                    return data
                converted = to_gray_or_rgb(image)
            except ImageRefused:
                raise
            except Exception as exc:  # a damaged file can make any decoder raise anything
                raise ImageRefused("unreadable", f"{type(exc).__name__}: {exc}") from None
    converted = converted.convert("L" if channels == 1 else "RGB")
    return np.asarray(resize_center_crop(converted, size))


def read_image_or_refusal(path: Path, size: int, channels: int, max_pixels: int = MAX_PIXELS,
                          keep_jpeg: bool = False) -> tuple[np.ndarray | bytes | None, ImageRefused | None]:
    """(the image, or a kept JPEG's bytes, None), or (None, why) after logging a line that names the file."""
    try:
        return load_image(path, size, channels, max_pixels, keep_jpeg), None
    except ImageRefused as refusal:
        logger.warning("refusing image %s: %s", path, refusal)
        return None, refusal


def read_image_or_none(path: Path, size: int, channels: int, max_pixels: int = MAX_PIXELS) -> np.ndarray | None:
    """The image, or None (logged) when the file is refused."""
    return read_image_or_refusal(path, size, channels, max_pixels)[0]
