"""Benchmark data and metrics: natural-image views, labelled test splits, agreement, bootstrap CIs.

Everything here is offline. The natural images come bundled with scikit-image and scikit-learn; the
MNIST-1D test split is written by ``python bench/models/train_mnist1d.py`` into the bench cache
(``RED_ONNX_BENCH``, default ``~/.cache/red-onnx/bench``); the digits split ships with red_onnx.

Heavy imports (scikit-image, scikit-learn, red_onnx) happen inside the functions that need them.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from red_onnx.errors import InputError

DEFAULT_CACHE = Path.home() / ".cache" / "red-onnx" / "bench"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

#: skimage.data functions bundled with the wheel (no download). ``cat`` is ``chelsea`` again: left out.
SKIMAGE_NAMES: tuple[str, ...] = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "brick", "grass", "gravel", "horse",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "clock", "coins", "colorwheel",
    "logo", "text", "retina", "microaneurysms", "cell", "stereo_motorcycle",
)  # fmt: skip
SKLEARN_NAMES: tuple[str, ...] = ("china.jpg", "flower.jpg")


class Interval(NamedTuple):
    """A point estimate and its two-sided confidence interval."""

    estimate: float
    low: float
    high: float


def cache_dir() -> Path:
    """The bench cache: ``RED_ONNX_BENCH`` if set, else ``~/.cache/red-onnx/bench``."""
    return Path(os.environ.get("RED_ONNX_BENCH", DEFAULT_CACHE))


def _to_rgb_float(image: np.ndarray) -> np.ndarray:
    """Any bundled image (bool, gray, RGB, RGBA; uint8 or float) as float32 [H, W, 3] in [0, 1]."""
    if image.dtype == bool:
        pixels = image.astype(np.float32)
    elif np.issubdtype(image.dtype, np.integer):
        pixels = image.astype(np.float32) / 255.0
    else:
        pixels = np.clip(image.astype(np.float32), 0.0, 1.0)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    if pixels.shape[2] == 4:  # composite RGBA on white
        alpha = pixels[:, :, 3:]
        pixels = pixels[:, :, :3] * alpha + (1.0 - alpha)
    return pixels


def natural_images() -> dict[str, np.ndarray]:
    """The bundled natural images, by name, as float32 RGB [H, W, 3] in [0, 1].

    Raises:
        InputError: If scikit-image is not installed.
    """
    os.environ.setdefault("MPLCONFIGDIR", tempfile.mkdtemp(prefix="mpl-"))  # skimage imports matplotlib
    try:
        import skimage.data
    except ImportError as error:
        hint = "run `pip install scikit-image`"
        raise InputError(f"natural images need scikit-image ({error}); {hint}") from error
    from sklearn.datasets import load_sample_image

    images = {}
    for name in SKIMAGE_NAMES:
        image = getattr(skimage.data, name)()
        images[name] = _to_rgb_float(image[0] if isinstance(image, tuple) else image)
    for name in SKLEARN_NAMES:
        images[name.removesuffix(".jpg")] = _to_rgb_float(load_sample_image(name))
    return images


def _view_recipes(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` crop recipes ``(side fraction, y position, x position, flip)``, rows of floats.

    The first two are the whole centred square and its mirror; the rest are random crops of 40-90 %
    of the shorter side at random positions, half of them mirrored.
    """
    fixed = np.array([[1.0, 0.5, 0.5, 0.0], [1.0, 0.5, 0.5, 1.0]])
    extra = max(count - 2, 0)
    fraction, place = rng.uniform(0.4, 0.9, extra), rng.uniform(0.0, 1.0, (extra, 2))
    random = np.column_stack([fraction, place, rng.integers(0, 2, extra)])
    return np.concatenate([fixed, random])[:count]


def _crop(image: np.ndarray, recipe: np.ndarray, size: int, resize: Callable) -> np.ndarray:
    """One square view of ``image`` [H, W, 3] per ``recipe``, resized to [size, size, 3]."""
    height, width = image.shape[:2]
    fraction, y_pos, x_pos, flip = recipe
    side = max(round(float(fraction) * min(height, width)), 1)
    top, left = round(float(y_pos) * (height - side)), round(float(x_pos) * (width - side))
    patch = image[top : top + side, left : left + side]
    patch = patch[:, ::-1] if flip else patch
    return resize(patch, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)


def natural_image_views(n_min: int = 100, size: int = 224, seed: int = 0) -> np.ndarray:
    """At least ``n_min`` deterministic square views of the bundled natural images, ImageNet-normalised.

    Every image gets the same number of views, ``ceil(n_min / images)``: the whole centred square,
    its mirror, then seeded random crops (40-90 % of the shorter side, random place, random mirror).

    Args:
        n_min: Least number of views wanted.
        size: Side of each view in pixels.
        seed: Seed of the random crops.

    Returns:
        float32 [N, 3, size, size], N >= n_min, normalised with the ImageNet mean and std.
    """
    from skimage.transform import resize

    images = natural_images()
    per_image = max(math.ceil(n_min / len(images)), 1)
    rng = np.random.default_rng(seed)
    views = [
        _crop(image, recipe, size, resize)
        for image in images.values()
        for recipe in _view_recipes(per_image, rng)
    ]
    stacked = (np.stack(views).astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))


#: Image files ``photo_sources`` reads (SVG is left out: it needs a renderer).
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: Files smaller than this on either side are placeholders, not photos (GNOME's flat 256x256 ``vnc-*.webp``).
PHOTO_MIN_SIDE = 300
#: Photos are shrunk to this shorter side when loaded (views are at most 224 pixels, from >= 40% crops).
PHOTO_LOAD_SIDE = 560


def photos_dir() -> Path:
    """Where the extracted wallpaper packages live: ``photos`` in the bench cache.

    Fill it with Debian's wallpaper packages (``apt-get download plasma-workspace-wallpapers
    gnome-backgrounds ukui-wallpapers``, then ``dpkg -x FILE.deb`` into this folder).
    """
    return cache_dir() / "photos"


def _source_key(path: Path, root: Path) -> str:
    """One key per source picture: a KDE wallpaper folder holds it at many sizes, GNOME as light and dark."""
    parts = path.relative_to(root).parts
    if "wallpapers" in parts and "contents" in parts:  # .../wallpapers/NAME/contents/images/WxH.png
        return "kde/" + parts[parts.index("contents") - 1]
    stem = path.stem.removesuffix("-l").removesuffix("-d") if "gnome" in parts else path.stem
    return f"{parts[-2]}/{stem}"


def photo_sources(root: Path | None = None, bundled: bool = True) -> dict[str, Path | np.ndarray]:
    """The source pictures by key: the largest file of each picture under ``root``, and the bundled images.

    Args:
        root: Folder searched recursively (default ``photos_dir()``); may be missing if ``bundled``.
        bundled: Also take scikit-image's and scikit-learn's bundled images (``natural_images``).

    Returns:
        ``{key: path or float32 RGB [H, W, 3] array}``, keys sorted.

    Raises:
        InputError: If no picture is found.
    """
    from PIL import Image

    root = root or photos_dir()
    best: dict[str, tuple[int, Path]] = {}
    files = sorted(root.rglob("*")) if root.is_dir() else []
    for path in files:
        if path.suffix.lower() not in PHOTO_SUFFIXES or not path.is_file():
            continue
        try:
            with Image.open(path) as image:
                width, height = image.size
        except OSError:
            continue
        key = _source_key(path, root)
        if min(width, height) >= PHOTO_MIN_SIDE and width * height > best.get(key, (0, path))[0]:
            best[key] = (width * height, path)
    sources: dict[str, Path | np.ndarray] = {key: path for key, (_, path) in best.items()}
    if bundled:
        sources |= {f"bundled/{name}": image for name, image in natural_images().items()}
    if not sources:
        raise InputError(f"no pictures under {root}; see bench/data.py's photos_dir for how to fill it")
    return dict(sorted(sources.items()))


def _read_photo(source: Path | np.ndarray) -> np.ndarray:
    """A source as float32 RGB [H, W, 3] in [0, 1], its shorter side at most ``PHOTO_LOAD_SIDE``."""
    if isinstance(source, np.ndarray):
        return source
    from PIL import Image

    with Image.open(source) as image:
        image = image.convert("RGBA") if image.mode in ("P", "LA", "RGBA") else image.convert("RGB")
        scale = PHOTO_LOAD_SIDE / min(image.size)
        if scale < 1:
            size = (round(image.size[0] * scale), round(image.size[1] * scale))
            image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        return _to_rgb_float(np.asarray(image))


def _views(
    sources: list[Path | np.ndarray], per_image: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """``per_image`` views of each source (``_view_recipes``), ImageNet-normalised [N, 3, size, size]."""
    from skimage.transform import resize

    views = [
        _crop(image, recipe, size, resize)
        for image in map(_read_photo, sources)
        for recipe in _view_recipes(per_image, rng)
    ]
    stacked = (np.stack(views).astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2))


def photo_views(
    calibration_views: int = 256,
    test_views_per_image: int = 8,
    calibration_fraction: float = 0.4,
    size: int = 224,
    seed: int = 0,
    root: Path | None = None,
    bundled: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Test and calibration views of the photos, drawn from **different** source pictures.

    The sources (``photo_sources``) are split by a seeded permutation: ``calibration_fraction`` of them
    give the calibration views, the rest the test views. Each picture gets the whole centred square,
    its mirror, then seeded random crops (40-90 % of the shorter side, random place, random mirror),
    resized to ``size`` and normalised with the ImageNet mean and std (as ``natural_image_views``).

    Args:
        calibration_views: Least number of calibration views (spread evenly over the calibration
            pictures; the first ``calibration_views`` are returned).
        test_views_per_image: Views of each test picture.
        calibration_fraction: Share of the pictures set aside for calibration.
        size: Side of each view in pixels.
        seed: Seed of the split and of the crops.
        root: Folder of the extracted wallpaper packages (default ``photos_dir()``).
        bundled: Also use the bundled images (``photo_sources``).

    Returns:
        ``(test [N, 3, size, size], calibration [calibration_views, 3, size, size], about)``; ``about``
        says in words what the test and calibration views come from, and lists their source keys.

    Raises:
        InputError: If there are fewer than two pictures or the fraction leaves a side empty.
    """
    sources = photo_sources(root, bundled)
    keys = list(sources)
    count = round(len(keys) * calibration_fraction)
    if not 0 < count < len(keys):
        raise InputError(
            f"{len(keys)} pictures and calibration_fraction={calibration_fraction} leave a side empty"
        )
    order = np.random.default_rng(seed).permutation(len(keys))
    calibration_keys = sorted(keys[i] for i in order[:count])
    test_keys = sorted(keys[i] for i in order[count:])
    rng = np.random.default_rng(seed + 1)
    test = _views([sources[k] for k in test_keys], test_views_per_image, size, rng)
    per_image = max(math.ceil(calibration_views / count), 1)
    calibration = _views([sources[k] for k in calibration_keys], per_image, size, rng)
    shuffled = calibration[np.random.default_rng(seed + 2).permutation(len(calibration))]
    about = {
        "test": f"{len(test_keys)} pictures ({test_views_per_image} views each)",
        "calibration": f"{count} other pictures ({per_image} views each)",
        "test_sources": ", ".join(test_keys),
        "calibration_sources": ", ".join(calibration_keys),
    }
    return test, np.ascontiguousarray(shuffled[:calibration_views]), about


def _load_split(path: Path, key: str, hint: str) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise InputError(f"{path} is missing; {hint}")
    with np.load(path) as split:
        return split[key], split["label"]


def load_mnist1d_test() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST-1D test split: signals float32 [1000, 1, 40] and labels int64 [1000].

    Raises:
        InputError: If ``python bench/models/train_mnist1d.py`` has not written the cache yet.
    """
    path = cache_dir() / "mnist1d_test.npz"
    return _load_split(path, "signal", "run `python bench/models/train_mnist1d.py` first")


def load_mnist1d_calibration(count: int, seed: int = 0) -> np.ndarray:
    """``count`` signals of the MNIST-1D **training** split (never the test split), float32 [count, 1, 40].

    The split is regenerated locally as ``bench/models/train_mnist1d.py`` does (``make_dataset`` with
    the package's default arguments, 4000 training signals); the signals are the first ``count`` of a
    seeded permutation, so a smaller count is a subset of a larger one.

    Raises:
        InputError: If the ``mnist1d`` package is missing or ``count`` is out of range.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise InputError(
            f"MNIST-1D calibration needs mnist1d ({error}); run `pip install mnist1d`"
        ) from error
    signals = make_dataset(get_dataset_args())["x"].astype(np.float32)[:, None, :]
    if not 0 < count <= len(signals):
        raise InputError(f"count={count} must be in [1, {len(signals)}] (MNIST-1D training signals)")
    order = np.random.default_rng(seed).permutation(len(signals))
    return np.ascontiguousarray(signals[order[:count]])


def load_digits_test() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits test split: images float32 [360, 1, 8, 8] and labels int64 [360]."""
    from red_onnx.demo import demo_path

    return _load_split(demo_path("digits_test.npz"), "image", "reinstall red-onnx")


def _check_logits(logits: np.ndarray, name: str) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2 or len(logits) == 0:
        raise InputError(f"{name} must be a non-empty [N, classes] array, got shape {logits.shape}")
    return logits


def top1_agreement(logits_a: np.ndarray, logits_b: np.ndarray) -> float:
    """Fraction of rows whose arg-max class is the same in both ``[N, classes]`` logit arrays."""
    a, b = _check_logits(logits_a, "logits_a"), _check_logits(logits_b, "logits_b")
    if a.shape[0] != b.shape[0]:
        raise InputError(f"logits_a has {a.shape[0]} rows but logits_b has {b.shape[0]}; pass paired outputs")
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1)))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``[N, classes]`` logits against ``[N]`` integer labels."""
    logits = _check_logits(logits, "logits")
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise InputError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels; pass paired arrays")
    return float(np.mean(logits.argmax(axis=1) == labels))


def paired_bootstrap_ci(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Interval:
    """Percentile bootstrap interval of ``mean(correct_a) - mean(correct_b)`` over paired samples.

    Resampling pairs of 0/1 values only changes how many pairs are (1, 0), (0, 1) or tied, so each
    bootstrap replicate is one multinomial draw of those three counts: exact, and O(n_boot) memory.

    Args:
        correct_a: 0/1 (or bool) per sample for system A.
        correct_b: 0/1 (or bool) per sample for system B, same samples in the same order.
        n_boot: Number of bootstrap replicates.
        seed: Seed of the resampling.
        confidence: Two-sided coverage of the interval.

    Returns:
        ``Interval(estimate, low, high)`` of the difference A - B.

    Raises:
        InputError: If the vectors differ in length, are empty, or hold values other than 0 and 1.
    """
    a, b = np.asarray(correct_a).reshape(-1), np.asarray(correct_b).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        sizes = f"correct_a has {a.size} values and correct_b {b.size}"
        raise InputError(f"{sizes}; pass two equal-length, non-empty vectors")
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise InputError("correct_a and correct_b must hold only 0/1 (or bool) values")
    if n_boot < 1 or not 0.0 < confidence < 1.0:
        raise InputError(f"n_boot={n_boot} must be >= 1 and confidence={confidence} in (0, 1)")
    diff = a.astype(np.int64) - b.astype(np.int64)
    probabilities = np.array([np.mean(diff == 1), np.mean(diff == -1), np.mean(diff == 0)])
    counts = np.random.default_rng(seed).multinomial(a.size, probabilities, size=n_boot)
    replicates = (counts[:, 0] - counts[:, 1]) / a.size
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return Interval(float(diff.mean()), float(low), float(high))


# ---------------------------------------------------------------- rendered text lines (PP-OCR cls)

#: Words of the calibration lines and of the test lines: two disjoint vocabularies, so no test line
#: repeats a calibration line (or even a word of one).
_CALIBRATION_TEXT = (
    "account address after again answer around basket before better bridge bring button cabinet "
    "camera candle carpet castle center chapter cheese circle coffee common corner country danger "
    "delivery desert dinner doctor double driver eleven engine evening family farmer figure finger "
    "flower forest garden glass golden harbor history holiday island journey kitchen ladder letter "
    "market meadow middle minute monkey morning number office orange palace pencil people picture "
    "planet pocket purple rabbit river"
)
_TEST_TEXT = (
    "advice balance battery blanket border bottle branch budget butter canvas cargo ceiling channel "
    "chicken climate cotton crystal custom decade design diamond dragon economy editor element "
    "energy fabric factor festival filter fortune frame galaxy guitar hammer hunter insect jacket "
    "jungle kettle lemon lesson library lizard machine magnet marble member method mirror motion "
    "museum needle notice object ocean oxygen paper parcel pepper pillow pirate portal powder "
    "quarter record rocket saddle salmon"
)
CALIBRATION_WORDS: tuple[str, ...] = tuple(_CALIBRATION_TEXT.split())
TEST_WORDS: tuple[str, ...] = tuple(_TEST_TEXT.split())
#: Fonts bundled with matplotlib (a dependency of scikit-image) by file name, and ``None`` for Pillow's
#: own scalable default font (Aileron). Calibration and test lines use different fonts and sizes.
CALIBRATION_FONTS: tuple[str | None, ...] = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
TEST_FONTS: tuple[str | None, ...] = (
    None, "STIXGeneral.ttf", "STIXGeneralBol.ttf", "DejaVuSans-BoldOblique.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono-Bold.ttf",
)  # fmt: skip
CALIBRATION_FONT_SIZES = (22, 28, 36)
TEST_FONT_SIZES = (18, 25, 32, 44)


def _number_token(rng: np.random.Generator) -> str:
    """A date, a price, a time, an order number or a plain count, as on receipts and forms."""
    kind = int(rng.integers(5))
    if kind == 0:
        return f"{rng.integers(1990, 2030)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
    if kind == 1:
        return f"{rng.integers(1, 1000)}.{rng.integers(0, 100):02d}"
    if kind == 2:
        return f"{rng.integers(0, 24)}:{rng.integers(0, 60):02d}"
    if kind == 3:
        return f"#{rng.integers(1000, 99999)}"
    return str(rng.integers(2, 500))


def text_strings(count: int, words: tuple[str, ...], seed: int) -> list[str]:
    """``count`` distinct seeded lines of 2-6 ``words``, half of them with a number, date or price."""
    rng = np.random.default_rng(seed)
    lines: list[str] = []
    while len(lines) < count:
        tokens = [words[i] for i in rng.integers(0, len(words), int(rng.integers(2, 7)))]
        if rng.random() < 0.5:
            tokens.insert(int(rng.integers(0, len(tokens) + 1)), _number_token(rng))
        line = " ".join(tokens)
        line = line[0].upper() + line[1:] + str(rng.choice(["", "", ".", ",", ":"]))
        if line not in lines:
            lines.append(line)
    return lines


def _font(name: str | None, size: int):  # a Pillow font
    from PIL import ImageFont

    if name is None:
        return ImageFont.load_default(size=size)
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def render_text_line(text: str, font_name: str | None, size: int, rng: np.random.Generator) -> np.ndarray:
    """``text`` as a detected-line crop: dark text on a light background, a random margin, RGB uint8.

    The crop is the text's bounding box plus 15-50 % of its height above and below and 10-60 % at the
    ends (a detector's box, unclipped), grey levels and a slight blur drawn from ``rng``.
    """
    from PIL import Image, ImageDraw, ImageFilter

    font = _font(font_name, size)
    left, top, right, bottom = font.getbbox(text)
    height = bottom - top
    pad_y, pad_x = round(rng.uniform(0.15, 0.5) * height), round(rng.uniform(0.1, 0.6) * height)
    image = Image.new("L", (right - left + 2 * pad_x, height + 2 * pad_y), int(rng.integers(190, 256)))
    ImageDraw.Draw(image).text((pad_x - left, pad_y - top), text, fill=int(rng.integers(0, 80)), font=font)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 0.8))))
    return np.repeat(np.asarray(image)[:, :, None], 3, axis=2)


def text_line_crops(
    strings: list[str], fonts: tuple[str | None, ...], sizes: tuple[int, ...], seed: int
) -> tuple[list[np.ndarray], list[str]]:
    """Each string rendered once (``render_text_line``) in a seeded font and size of those given.

    Returns:
        ``(crops, descriptions)``: RGB uint8 [h, w, 3] crops, upright, and ``"font@size"`` of each.
    """
    rng = np.random.default_rng(seed)
    crops, described = [], []
    for text in strings:
        font, size = fonts[int(rng.integers(len(fonts)))], int(sizes[int(rng.integers(len(sizes)))])
        crops.append(render_text_line(text, font, size, rng))
        described.append(f"{font or 'Pillow default'}@{size}")
    return crops, described
