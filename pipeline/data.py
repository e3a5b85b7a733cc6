"""Dataset sources -> cached uint8 arrays, their statistics and the validation split; the
device-resident batches cut from them are `pipeline.batches`'.

Three sources are read, all into the same `ArrayDataset` (images as `(N, 32, 32, 3)` uint8):

* a torchvision CIFAR-10 directory (`cifar-10-batches-py/`), downloaded there when missing;
* an image-folder tree `train/<class>/*.{png,jpg}` + `test/<class>/*`;
* a `.tar.gz` (or `.tar`) of such a tree.

Decoding happens once; the arrays are cached in a `.npz` keyed by the source's digest, so later
runs load in well under a second.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import logging
import os
import pickle
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import DEFAULT_DATA

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached layout changes
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
CIFAR_BATCHES = "cifar-10-batches-py"
IMAGE_SHAPE = (32, 32, 3)


class DataError(ValueError):
    """The data source cannot be used; the message names the path and the problem."""


@dataclass(frozen=True)
class ArrayDataset:
    """Both splits of a dataset as uint8 arrays; `digest` identifies the source's content."""

    train_images: np.ndarray  # (N, 32, 32, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    digest: str
    source: str

    @property
    def name(self) -> str:
        return f"cifar10-{self.digest[:12]}"


@dataclass(frozen=True)
class DatasetStats:
    """Per-channel mean and std of the training split, on the [0, 1] scale."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> str:
        return json.dumps({"mean": list(self.mean), "std": list(self.std)}, indent=2)

    @classmethod
    def from_json(cls, text: str, *, origin: str = "stats") -> DatasetStats:
        try:
            payload = json.loads(text)
            mean = tuple(float(v) for v in payload["mean"])
            std = tuple(float(v) for v in payload["std"])
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(
                f"{origin} is not a stats.json with 'mean' and 'std': {error}"
            ) from None
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise DataError(f"{origin} must hold 3 means and 3 positive stds")
        return cls(mean=mean, std=std)  # type: ignore[arg-type]


def cache_dir() -> Path:
    """Where decoded arrays and stats are cached (`PIPELINE_CACHE_DIR` overrides)."""
    return Path(os.environ.get("PIPELINE_CACHE_DIR", "~/.cache/cifar10-pipeline")).expanduser()


# --------------------------------------------------------------------------- sources


def load_dataset(source: str | os.PathLike, *, download: bool = True) -> ArrayDataset:
    """Load a dataset from any supported source, decoding it only when it is not cached."""
    path = Path(source).expanduser()
    kind, digest = _identify(path, download=download)
    cached = cache_dir() / f"{digest}.npz"
    if cached.exists():
        try:
            return _read_cache(cached, digest=digest, source=str(path))
        except (OSError, ValueError, KeyError) as error:
            log.warning("ignoring unreadable cache %s (%s); decoding again", cached, error)
    log.info("decoding %s (%s) once; later runs read %s", path, kind, cached)
    if kind == "cifar":
        arrays = _read_cifar_batches(_cifar_root(path))
    elif kind == "archive":
        arrays = _read_image_archive(path)
    else:
        arrays = _read_image_folder(path)
    _write_cache(cached, arrays)
    return ArrayDataset(**arrays, digest=digest, source=str(path))


def _identify(path: Path, *, download: bool) -> tuple[str, str]:
    """Name the kind of source at `path` and digest its content (downloading CIFAR-10 if asked)."""
    if path.is_file():
        if not path.name.endswith(ARCHIVE_SUFFIXES):
            raise DataError(
                f"data file {str(path)!r} is not a .tar.gz, .tgz or .tar of an image-folder tree"
            )
        return "archive", _digest_files([path], tag="archive")
    if not path.exists():
        if download and path == Path(DEFAULT_DATA).expanduser():
            _download_cifar(path)
            return "cifar", _digest_files(_cifar_files(path), tag="cifar")
        raise DataError(f"data path {str(path)!r} does not exist")
    if not path.is_dir():
        raise DataError(f"data path {str(path)!r} is neither a directory nor an archive")
    if _cifar_root(path) is not None:
        return "cifar", _digest_files(_cifar_files(path), tag="cifar")
    if (path / "train").is_dir() or (path / "test").is_dir():
        for split in ("train", "test"):
            if not (path / split).is_dir():
                raise DataError(f"data path {str(path)!r} has no {split}/ folder")
        return "folder", _digest_listing(path)
    if not any(path.iterdir()) and download:
        _download_cifar(path)
        return "cifar", _digest_files(_cifar_files(path), tag="cifar")
    raise DataError(
        f"data path {str(path)!r} holds neither {CIFAR_BATCHES}/ nor train/ and test/ folders"
    )


def _download_cifar(root: Path) -> None:
    import torchvision  # imported late: only the download path needs it

    log.info("downloading CIFAR-10 into %s", root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as error:  # network errors come in many types
        raise DataError(
            f"data path {str(root)!r} has no CIFAR-10 and downloading it failed "
            f"({type(error).__name__}: {error}); pass data=<folder or .tar.gz> to use a local copy"
        ) from None


def _cifar_root(path: Path) -> Path | None:
    for candidate in (path / CIFAR_BATCHES, path):
        if (candidate / "data_batch_1").is_file() and (candidate / "test_batch").is_file():
            return candidate
    return None


def _cifar_files(path: Path) -> list[Path]:
    root = _cifar_root(path)
    if root is None:
        raise DataError(f"data path {str(path)!r} has no complete {CIFAR_BATCHES}/")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    return [root / name for name in names if (root / name).exists()]


def _digest_files(files: Iterable[Path], *, tag: str) -> str:
    digest = hashlib.sha256(f"{tag}:{CACHE_FORMAT}".encode())
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _digest_listing(root: Path) -> str:
    """Digest an image-folder tree by its listing (path, size, mtime): cheap, and any edit shows."""
    digest = hashlib.sha256(f"folder:{CACHE_FORMAT}".encode())
    for split in ("train", "test"):
        for file in sorted((root / split).rglob("*")):
            if file.is_file():
                stat = file.stat()
                digest.update(
                    f"{file.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns};".encode()
                )
    return digest.hexdigest()


def _read_cifar_batches(root: Path | None) -> dict:
    assert root is not None

    def read(name: str) -> dict:
        file = root / name
        try:
            with open(file, "rb") as handle:
                # The CIFAR-10 pickles hold only numpy arrays and lists (as torchvision reads them).
                return pickle.load(handle, encoding="latin1")
        except FileNotFoundError:
            raise DataError(f"CIFAR-10 directory {str(root)!r} is missing {name}") from None
        except Exception as error:
            raise DataError(f"cannot read CIFAR-10 batch {str(file)!r}: {error}") from None

    def split(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        batches = [read(name) for name in names]
        images = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
        return images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels

    train_images, train_labels = split([f"data_batch_{i}" for i in range(1, 6)])
    test_images, test_labels = split(["test_batch"])
    meta = root / "batches.meta"
    classes = tuple(read("batches.meta")["label_names"]) if meta.exists() else CIFAR10_CLASSES
    return {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
        "classes": classes,
    }


CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _read_image_folder(root: Path) -> dict:
    entries = {}
    for split in ("train", "test"):
        entries[split] = {
            d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            for d in sorted((root / split).iterdir())
            if d.is_dir()
        }

    def read_bytes(file: Path) -> bytes:
        return file.read_bytes()

    return _decode_splits(entries, read_bytes, origin=str(root))


def _read_image_archive(path: Path) -> dict:
    blobs: dict[str, bytes] = {}
    entries: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                parts = Path(member.name).parts
                # Accept both `train/...` and one wrapping folder `cifar10/train/...`.
                if len(parts) >= 2 and parts[0] not in entries and parts[1] in entries:
                    parts = parts[1:]
                if not parts or parts[0] not in entries:
                    continue
                if member.isdir() and len(parts) == 2:
                    entries[parts[0]].setdefault(parts[1], [])
                if not member.isfile() or len(parts) != 3:
                    continue
                if Path(parts[2]).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                handle = archive.extractfile(member)
                assert handle is not None
                blobs[member.name] = handle.read()
                entries[parts[0]].setdefault(parts[1], []).append(member.name)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise DataError(f"cannot read archive {str(path)!r}: {error}") from None
    for split in ("train", "test"):
        if not entries[split]:
            raise DataError(f"archive {str(path)!r} has no {split}/<class>/ images")
        entries[split] = {c: sorted(files) for c, files in sorted(entries[split].items())}
    return _decode_splits(entries, blobs.__getitem__, origin=str(path))


def _decode_splits(entries: dict, read_bytes, *, origin: str) -> dict:
    """Check the class layout of both splits, then decode every image into uint8 arrays."""
    train_classes, test_classes = tuple(entries["train"]), tuple(entries["test"])
    if not train_classes:
        raise DataError(f"{origin}: train/ has no class folders")
    if set(train_classes) != set(test_classes):
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(
            f"{origin}: train/ and test/ have different classes "
            f"(only in train: {only_train or '-'}; only in test: {only_test or '-'})"
        )
    for split in ("train", "test"):
        for name, files in entries[split].items():
            if not files:
                raise DataError(f"{origin}: class folder {split}/{name} has no images")
    arrays = {"classes": train_classes}
    workers = min(8, (os.cpu_count() or 1) + 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
        for split in ("train", "test"):
            files = [(f, label) for label, c in enumerate(train_classes) for f in entries[split][c]]
            images = np.empty((len(files), *IMAGE_SHAPE), dtype=np.uint8)

            def decode(index: int, files=files, images=images) -> None:
                name = files[index][0]
                images[index] = _decode_image(read_bytes(name), name=f"{origin}:{name}")

            list(pool.map(decode, range(len(files))))
            arrays[f"{split}_images"] = images
            arrays[f"{split}_labels"] = np.array([label for _, label in files], dtype=np.int64)
    return arrays


def _decode_image(blob: bytes, *, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
            mode, size = image.mode, image.size
            if mode != "RGB" or size != (32, 32):
                raise DataError(
                    f"image {name} is {size[0]}x{size[1]} {mode}; every image must be 32x32 RGB"
                )
            return np.asarray(image, dtype=np.uint8)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"cannot read image {name}: {error}") from None


def _write_cache(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(temporary, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(temporary, path)  # atomic: parallel runs never read half a cache


def _read_cache(path: Path, *, digest: str, source: str) -> ArrayDataset:
    with np.load(path) as cached:
        return ArrayDataset(
            train_images=cached["train_images"],
            train_labels=cached["train_labels"],
            test_images=cached["test_images"],
            test_labels=cached["test_labels"],
            classes=tuple(str(c) for c in cached["classes"]),
            digest=digest,
            source=source,
        )


# --------------------------------------------------------------------------- statistics


def compute_stats(images: np.ndarray) -> DatasetStats:
    """Per-channel mean and std of `(N, H, W, 3)` uint8 images on the [0, 1] scale."""
    pixels = images.reshape(-1, images.shape[-1])
    total = np.zeros(3, dtype=np.float64)
    squares = np.zeros(3, dtype=np.float64)
    for start in range(0, len(pixels), 1 << 22):  # chunked: float64 of 150M values is 1.2 GB
        chunk = pixels[start : start + (1 << 22)].astype(np.float64) / 255.0
        total += chunk.sum(axis=0)
        squares += (chunk * chunk).sum(axis=0)
    count = len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 1e-12))
    return DatasetStats(mean=tuple(mean.tolist()), std=tuple(std.tolist()))  # type: ignore[arg-type]


def cached_stats(dataset: ArrayDataset) -> DatasetStats:
    """The dataset's stats from the cache, computing and caching them on first use."""
    path = cache_dir() / f"{dataset.digest}.stats.json"
    if path.exists():
        return DatasetStats.from_json(path.read_text(), origin=str(path))
    stats = compute_stats(dataset.train_images)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(stats.to_json())
    os.replace(temporary, path)
    return stats


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class ValidationSplit:
    """Which training images are held out for validation: sorted indices into the training
    split, the seed that drew them and a digest that names the split (the same images of the
    same dataset give the same digest), so runs on different splits are never compared."""

    indices: np.ndarray  # (val_size,) int64, sorted
    seed: int
    digest: str

    def __len__(self) -> int:
        return len(self.indices)


def validation_split(
    labels: np.ndarray,
    size: int,
    *,
    seed: int,
    dataset_digest: str = "",
    class_names: tuple[str, ...] = (),
) -> ValidationSplit:
    """`size` training images held out for validation, drawn per class in proportion to the
    class's share of `labels` (largest remainders round), with `seed` alone.

    Each class keeps at least half its images for training; a `size` that leaves fewer is a
    DataError naming the first such class.
    """
    classes, counts = np.unique(labels, return_counts=True)
    if size > len(labels):
        raise DataError(
            f"val_size {size} is more than the {len(labels)} training images; lower val_size "
            "(0 turns validation off)"
        )
    shares = size * counts / counts.sum()
    taken = np.floor(shares).astype(np.int64)
    # Largest remainders first, then the lower class index: deterministic.
    order = sorted(range(len(classes)), key=lambda c: (-(shares[c] - taken[c]), c))
    for c in order[: size - int(taken.sum())]:
        taken[c] += 1
    for label, count, held in zip(classes, counts, taken, strict=True):
        if count - held < held:
            name = class_names[label] if label < len(class_names) else str(label)
            raise DataError(
                f"val_size {size} leaves too few training images: class {name} would keep "
                f"{count - held} of its {count} (at least half must stay for training); lower "
                "val_size or set it to 0"
            )
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(labels == label))[:held]
        for label, held in zip(classes, taken, strict=True)
    ]
    indices = np.sort(np.concatenate(chosen)).astype(np.int64)
    digest = hashlib.sha256(f"{dataset_digest}:{seed}:".encode() + indices.tobytes())
    return ValidationSplit(indices=indices, seed=seed, digest=digest.hexdigest()[:16])
