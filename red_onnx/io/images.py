"""Calibration images: a folder of image files read as one normalised batch (``--calibration DIR``).

:func:`image_files` lists a folder's images (PNG, JPEG, BMP, WebP; not its subfolders) in file-name
order; :func:`read_images` decodes them with Pillow (imported when called: the ``red-onnx[images]``
extra), brings each to the model input's height and width, stacks them and scales the pixels by one of
the :data:`PRESETS` (``--preprocess``), all in numpy, never pixel by pixel. The batch is cached per
folder (its files' names, sizes and times), preset, size and layout: every feed built from the same
folder reuses one decoding.

Resizing: each image is scaled (bilinear) so that it covers the target, its shorter side onto the
target's (for a square target), keeping its aspect ratio, then centre-cropped to the target.

Imports nothing of red_onnx but :mod:`red_onnx.errors` (the bottom floor), and nothing of a model.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from red_onnx.errors import InputError, first_line

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

#: The file suffixes read as images (any case); other files in the folder are left out.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: How many decoded folders stay cached (each is the float32 batch the model is fed).
CACHED_FOLDERS = 2

Layout = Literal["NCHW", "NHWC"]


@dataclass(frozen=True)
class Preset:
    """How pixel values ``p`` in 0..255 become model inputs: ``(p·scale - mean[c]) / std[c]`` per channel.

    Attributes:
        scale: Factor on the raw 0..255 values.
        mean: Per-channel mean subtracted after scaling (R, G, B).
        std: Per-channel divisor after the mean (R, G, B).
        size: Height and width used where the model leaves them dynamic and ``--input-shape`` does not
            give them (None: they must be given).
    """

    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int | None = None

    def channel_stats(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        """The mean and std per channel as float32 arrays; one channel (grayscale) takes their averages."""
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        if channels == 1:
            return mean.mean(keepdims=True), std.mean(keepdims=True)
        return mean, std


#: The ``--preprocess`` presets, one per name of ``options.PREPROCESS_PRESETS``. ``imagenet``: RGB in
#: [0, 1], then torchvision's ImageNet mean and std (a grayscale model gets their averages, 0.449 and
#: 0.226), 224×224 where the model does not say.
PRESETS: dict[str, Preset] = {
    "imagenet": Preset(1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), size=224),
    "0-1": Preset(1 / 255, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "-1-1": Preset(1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "0-255": Preset(1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by file name.

    Raises:
        InputError: ``folder`` is not a folder, or holds no file with an image suffix.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"calibration folder {folder} not found; pass a folder of images to --calibration")
    files = sorted(
        (path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()),
        key=lambda path: path.name,
    )
    if not files:
        raise InputError(
            f"calibration folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the "
            "calibration images in it, or pass an .npz file"
        )
    return files


def read_images(
    folder: Path, *, height: int, width: int, channels: int, preset: str, layout: Layout = "NCHW"
) -> np.ndarray:
    """Every image of ``folder`` as one normalised float32 batch (read-only; cached).

    Args:
        folder: The folder (:func:`image_files` says which of its files are read, in which order).
        height: Height of every image fed.
        width: Width of every image fed.
        channels: 3 (RGB) or 1 (grayscale: Pillow's ``L`` mode).
        preset: A key of :data:`PRESETS`.
        layout: ``"NCHW"`` (``[N, C, H, W]``) or ``"NHWC"`` (``[N, H, W, C]``).

    Returns:
        The batch, one row per image in file-name order, in ``layout``.

    Raises:
        InputError: Pillow is missing, the folder holds no images, or an image cannot be read (named).
        ValueError: An unknown preset, channel count, layout or a non-positive size (a caller's bug).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if channels not in (1, 3) or layout not in ("NCHW", "NHWC") or height < 1 or width < 1:
        raise ValueError(f"cannot read images as {channels} channels of {height}x{width} in {layout}")
    files = image_files(folder)
    stamp = tuple(_stamp(path) for path in files)
    return _read_cached(Path(folder).resolve(), stamp, height, width, channels, preset, layout)


def _stamp(path: Path) -> tuple[str, int, int]:
    """What says a file changed: its name, size and modification time."""
    stats = path.stat()
    return path.name, stats.st_size, stats.st_mtime_ns


@functools.lru_cache(maxsize=CACHED_FOLDERS)
def _read_cached(
    folder: Path, stamp: tuple[tuple[str, int, int], ...], height: int, width: int, channels: int,
    preset: str, layout: Layout,
) -> np.ndarray:  # fmt: skip
    """:func:`read_images` once per folder state (``stamp``: its files' names, sizes and times)."""
    pixels = np.stack([_decode(folder / name, height, width, channels) for name, _, _ in stamp])
    batch = normalise(pixels, preset)
    if layout == "NCHW":
        batch = np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
    batch.flags.writeable = False  # shared by every feed built from the folder
    logger.info("read %d images from %s at %dx%d (%s, %s)", len(batch), folder.name, height, width,
                preset, layout)  # fmt: skip
    return batch


def normalise(pixels: np.ndarray, preset: str) -> np.ndarray:
    """Scale a ``[N, H, W, C]`` uint8 batch by ``preset`` (:data:`PRESETS`) into float32, vectorised."""
    chosen = PRESETS[preset]
    mean, std = chosen.channel_stats(pixels.shape[-1])
    batch = pixels.astype(np.float32)
    batch *= np.float32(chosen.scale)
    batch -= mean
    batch /= std
    return batch


def _decode(path: Path, height: int, width: int, channels: int) -> np.ndarray:
    """One image as ``[height, width, channels]`` uint8: converted, scaled to cover, centre-cropped."""
    try:
        from PIL import Image
    except ImportError as error:
        raise InputError("reading images needs Pillow: pip install 'red-onnx[images]'") from error
    try:
        with Image.open(path) as image:
            fitted = _fit(image.convert("RGB" if channels == 3 else "L"), height, width)
    except Exception as error:  # Pillow raises OSError, ValueError, DecompressionBombError, ...
        raise InputError(
            f"image {path} cannot be read: {first_line(error)}; remove it from the calibration folder or "
            "save it as PNG or JPEG"
        ) from error
    array = np.asarray(fitted, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _fit(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale ``image`` (bilinear, aspect kept) until it covers ``height``×``width``, then crop the centre."""
    from PIL import Image

    if image.size == (width, height):
        return image
    own_width, own_height = image.size
    if own_width < 1 or own_height < 1:
        raise ValueError(f"an image of {own_width}x{own_height} pixels cannot be resized")
    scale = max(width / own_width, height / own_height)
    size = (max(width, round(own_width * scale)), max(height, round(own_height * scale)))
    resized = image.resize(size, resample=Image.Resampling.BILINEAR)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return resized.crop((left, top, left + width, top + height))
