"""CIFAR-10-C: the 15 corruptions x 5 severities of Hendrycks & Dietterich (ICLR 2019), read from
the published files where a user has them, otherwise built here from the test images (no MLflow).

Which path, and why. `imagecorruptions` 1.1.2 fails here (glass_blur passes scikit-image's removed
`multichannel`, fog uses NumPy 2's removed `np.float_`); its fork `imagecorruptions-imaug` 1.1.5
runs, but both carry the ImageNet-C severity constants (e.g. a defocus radius of 3-10 pixels on a
32-pixel image), draw from the global `np.random` state one image at a time, and pull in OpenCV,
scikit-image and numba. So the corruptions are written in `pipeline.corruption_functions` from
the definitions in `make_cifar_c.py` (hendrycks/robustness), with its CIFAR constants, on
numpy/scipy/Pillow, each vectorised over the batch: every random draw comes from one
`numpy.random.Generator` per (seed, corruption, severity), so the same images, labels and seed
give byte-identical files. This module holds the suite: the names, the published files, the
cache of generated suites and `corrupt`, the one entry to the functions.

Severities are CIFAR-10-C's throughout; `FIDELITY` says, per corruption, where the result is not
the reference's up to floating-point rounding: motion blur (and the streaks of snow) stand in for
ImageMagick's motion blur, and frost uses a procedural texture instead of the frost photographs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock
from tqdm import tqdm

from pipeline.corruption_functions import FUNCTIONS, PARAMETERS
from pipeline.data import DataError, cache_dir
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
# Held out by the paper for validation; the published set ships them, this module never builds them.
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
IMAGE_SHAPE = (32, 32, 3)
# Bump when any function in corruption_functions.py changes its output: it keys the cache.
IMPLEMENTATION_VERSION = 1
CHUNK = 1000  # images per vectorised call: bounds memory at a few hundred MB of float64

_SAME = "as CIFAR-10-C"
FIDELITY = {
    "gaussian_noise": _SAME,
    "shot_noise": _SAME,
    "impulse_noise": _SAME + " (scikit-image's salt & pepper, per channel)",
    "defocus_blur": _SAME + " (OpenCV's anti-aliased disk kernel, reflect-101 border)",
    "glass_blur": _SAME + " (including its 'swap', which copies the neighbour's pixel)",
    "motion_blur": "differs: ImageMagick's MotionBlurImage is re-implemented (one-sided Gaussian "
    "line kernel, offsets rounded, edge pixels repeated), not called",
    "zoom_blur": _SAME,
    "snow": "differs: its streaks use the motion-blur stand-in above",
    "frost": "differs: the frost photographs are not shipped; a procedural texture (fractal "
    "noise + blurred needle strokes) with each photograph's mean colour and contrast stands in",
    "fog": _SAME + " (diamond-square plasma fractal)",
    "brightness": _SAME + " (the HSV value shift computed as an exact RGB rescale)",
    "contrast": _SAME,
    "elastic_transform": _SAME + " (affine warp with exact, not 1/32-pixel, interpolation)",
    "pixelate": _SAME,
    "jpeg_compression": _SAME + " (Pillow's libjpeg)",
}


# --------------------------------------------------------------------------- the suite


@dataclass(frozen=True)
class CorruptionSuite:
    """Corrupted copies of one set of test images, laid out as the published CIFAR-10-C files."""

    arrays: Mapping[str, np.ndarray]  # name -> (5 * N, 32, 32, 3) uint8, severity 1 first
    labels: np.ndarray  # (N,) int64, the same for every severity
    source: str  # "generated", or the directory the published files were read from
    missing: tuple[str, ...] = ()  # of CORRUPTIONS, absent from `arrays`
    extra: tuple[str, ...] = ()  # of EXTRA_CORRUPTIONS, present in `arrays`
    seed: int | None = None  # the seed a generated suite was drawn with
    directory: Path | None = field(default=None, compare=False)  # where the .npy files lie

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def corruptions(self) -> tuple[str, ...]:
        """The CORRUPTIONS this suite holds, in the paper's order."""
        return tuple(name for name in CORRUPTIONS if name in self.arrays)

    def images(self, corruption: str, severity: int) -> np.ndarray:
        """The `(N, 32, 32, 3)` uint8 images of one corruption at one severity (a view)."""
        if corruption not in self.arrays:
            held = ", ".join(self.corruptions + self.extra)
            raise ConfigError(f"corruption must be one of {held} (got {corruption!r})")
        _check_severity(severity)
        count = len(self.labels)
        return self.arrays[corruption][(severity - 1) * count : severity * count]

    def items(self, *, extra: bool = False) -> Iterator[tuple[str, int, np.ndarray]]:
        """(corruption, severity, images) for every held corruption and severity, in order."""
        for name in self.corruptions + (self.extra if extra else ()):
            for severity in SEVERITIES:
                yield name, severity, self.images(name, severity)


def _check_severity(severity: int) -> None:
    if severity not in SEVERITIES:
        raise ConfigError(f"severity must be one of 1, 2, 3, 4, 5 (got {severity!r})")


# --------------------------------------------------------------------------- published files


def load_published(directory: str | os.PathLike) -> CorruptionSuite:
    """Read CIFAR-10-C as published: `<corruption>.npy` (uint8, `(N, 32, 32, 3)`, N/5 images per
    severity, severity 1 first) and `labels.npy` (N), memory-mapped, not read whole."""
    root = Path(directory).expanduser()
    layout = "one <corruption>.npy per corruption and labels.npy"
    if not root.is_dir():
        raise DataError(f"corruption directory {root} does not exist (expected {layout})")
    found = [name for name in CORRUPTIONS if (root / f"{name}.npy").is_file()]
    if not found:
        raise DataError(
            f"{root} holds none of the 15 CIFAR-10-C files (expected {layout}, "
            f"e.g. gaussian_noise.npy)"
        )
    labels = _read_labels(root / "labels.npy")
    arrays = {name: _read_images(root / f"{name}.npy", count=len(labels)) for name in found}
    extra = []
    for name in EXTRA_CORRUPTIONS:
        if (root / f"{name}.npy").is_file():
            try:  # the held-out four never stop an evaluation of the fifteen
                arrays[name] = _read_images(root / f"{name}.npy", count=len(labels))
                extra.append(name)
            except DataError as error:
                log.warning("skipping %s", error)
    missing = tuple(name for name in CORRUPTIONS if name not in arrays)
    if missing:
        log.warning("%s lacks %d of the 15 corruptions: %s", root, len(missing), ", ".join(missing))
    per_severity = len(labels) // len(SEVERITIES)
    return CorruptionSuite(
        arrays=arrays,
        labels=np.asarray(labels[:per_severity], dtype=np.int64),
        source=str(root),
        missing=missing,
        extra=tuple(extra),
        directory=root,
    )


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not a readable .npy array: {error}") from None


def _read_labels(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing: CIFAR-10-C needs labels.npy beside the images")
    labels = _load(path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: expected a 1-D integer array, got {labels.dtype} {labels.shape}")
    count = len(labels)
    if count == 0 or count % len(SEVERITIES):
        raise DataError(
            f"{path}: {count} labels is not a positive multiple of 5 (one per severity)"
        )
    blocks = np.asarray(labels).reshape(len(SEVERITIES), -1)
    if (blocks != blocks[0]).any():
        raise DataError(f"{path}: the 5 severities' blocks of labels must be the same")
    return labels


def _read_images(path: Path, *, count: int) -> np.ndarray:
    images = _load(path)
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE or images.ndim != 4:
        raise DataError(
            f"{path}: expected uint8 images of shape (N, 32, 32, 3), "
            f"got {images.dtype} {images.shape}"
        )
    if len(images) != count:
        raise DataError(f"{path}: holds {len(images)} images but labels.npy has {count} labels")
    return images


# --------------------------------------------------------------------------- generated suite


def generate(
    images: np.ndarray, labels: np.ndarray, *, seed: int = 0, progress: bool = True
) -> CorruptionSuite:
    """The 15 x 5 suite built from `images` (uint8 `(N, 32, 32, 3)`) and their `labels`, cached
    under `cache_dir()` by (the images' and labels' digest, seed, IMPLEMENTATION_VERSION)."""
    images = _checked_images(images)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),):
        raise DataError(f"labels must be ({len(images)},) to match the images (got {labels.shape})")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer (got {seed!r})")
    digest = hashlib.sha256()
    digest.update(repr(images.shape).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    digest.update(labels.tobytes())
    key = f"v{IMPLEMENTATION_VERSION}-{digest.hexdigest()[:16]}-seed{seed}"
    target = cache_dir() / "cifar10-c" / key
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock makes a second process wait for the first's build instead of repeating it.
    with FileLock(str(target) + ".lock"):
        if not (target / "labels.npy").is_file():
            shutil.rmtree(target, ignore_errors=True)  # never complete: renamed in whole
            _build(images, labels, seed=seed, target=target, progress=progress)
        else:
            log.info("reading the cached corruption suite %s", target)
    suite = load_published(target)
    return CorruptionSuite(
        arrays=suite.arrays,
        labels=suite.labels,
        source="generated",
        seed=seed,
        directory=target,
    )


def _build(images: np.ndarray, labels: np.ndarray, *, seed: int, target: Path, progress: bool):
    """Write every corruption into a temporary folder beside `target`, then rename it: a reader
    sees the whole suite or none of it."""
    log.info("building CIFAR-10-C from %d images once; later runs read %s", len(images), target)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        pairs = [(name, severity) for name in CORRUPTIONS for severity in SEVERITIES]
        count = len(images)
        outputs = {}
        for name, severity in tqdm(pairs, desc="corruptions", disable=not progress, leave=False):
            if name not in outputs:
                outputs[name] = np.lib.format.open_memmap(
                    building / f"{name}.npy",
                    mode="w+",
                    dtype=np.uint8,
                    shape=(5 * count, 32, 32, 3),
                )
            rng = corruption_rng(seed, name, severity)
            for start in range(0, count, CHUNK):
                chunk = images[start : start + CHUNK]
                offset = (severity - 1) * count + start
                outputs[name][offset : offset + len(chunk)] = corrupt(
                    chunk, name, severity, rng=rng
                )
        for array in outputs.values():
            array.flush()
        del outputs
        np.save(building / "labels.npy", np.tile(labels, len(SEVERITIES)))
        os.replace(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)


def corruption_rng(seed: int, corruption: str, severity: int) -> np.random.Generator:
    """The generator for one (seed, corruption, severity): independent of the others' order."""
    return np.random.default_rng([seed, zlib.crc32(corruption.encode()), severity])


def _checked_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(
            f"images must be uint8 of shape (N, 32, 32, 3) (got {images.dtype} {images.shape})"
        )
    return images


def corrupt(
    images: np.ndarray, corruption: str, severity: int, *, rng: np.random.Generator
) -> np.ndarray:
    """`images` (uint8 `(N, 32, 32, 3)`) corrupted by one corruption at one severity, as uint8."""
    if corruption not in CORRUPTIONS:
        raise ConfigError(
            f"corruption must be one of {', '.join(CORRUPTIONS)} (got {corruption!r})"
        )
    _check_severity(severity)
    images = _checked_images(images)
    if len(images) == 0:
        return images.copy()
    result = FUNCTIONS[corruption](images, PARAMETERS[corruption][severity - 1], rng)
    if result.dtype == np.uint8:
        return result
    # np.uint8 of the [0, 255] float truncates, as make_cifar_c.py's np.uint8(...) does
    return (np.clip(result, 0, 1) * 255).astype(np.uint8)
