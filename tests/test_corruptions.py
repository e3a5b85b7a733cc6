"""CIFAR-10-C: the published layout (good and each bad case) and a tiny generated suite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import corruptions
from pipeline.corruption_functions import FUNCTIONS
from pipeline.corruptions import (
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    FIDELITY,
    PARAMETERS,
    SEVERITIES,
    corrupt,
    corruption_rng,
    generate,
    load_published,
)
from pipeline.data import DataError
from pipeline.errors import ConfigError

PER_SEVERITY = 4


def tiny_images(count: int, *, seed: int = 0) -> np.ndarray:
    """Image-like uint8 pictures: a smooth colour gradient, a bright square and some noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 32)
    images = np.empty((count, 32, 32, 3))
    for index in range(count):
        colour = rng.uniform(40, 200, size=3)
        images[index] = colour * (0.6 + 0.4 * ramp[:, None, None] * ramp[None, :, None])
        top, left = rng.integers(4, 20, size=2)
        images[index, top : top + 10, left : left + 10] = rng.uniform(150, 255, size=3)
    images += rng.normal(0, 6, size=images.shape)
    return np.clip(images, 0, 255).astype(np.uint8)


def write_published(
    root: Path, names=CORRUPTIONS + EXTRA_CORRUPTIONS, *, per_severity=PER_SEVERITY
) -> dict:
    """Files in the published layout: `<name>.npy` (5 x per_severity images) and labels.npy."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for index, name in enumerate(names):
        arrays[name] = tiny_images(5 * per_severity, seed=index)
        np.save(root / f"{name}.npy", arrays[name])
    np.save(root / "labels.npy", np.tile(np.arange(per_severity) % 10, 5).astype(np.uint8))
    return arrays


def test_published_suite_reads_every_corruption_memory_mapped(tmp_path):
    arrays = write_published(tmp_path / "CIFAR-10-C")
    suite = load_published(tmp_path / "CIFAR-10-C")
    assert suite.corruptions == CORRUPTIONS and suite.missing == ()
    assert suite.extra == EXTRA_CORRUPTIONS
    assert suite.source == str(tmp_path / "CIFAR-10-C") and suite.seed is None
    assert len(suite) == PER_SEVERITY and suite.labels.dtype == np.int64
    assert suite.labels.tolist() == [0, 1, 2, 3]
    assert isinstance(suite.arrays["fog"], np.memmap)
    np.testing.assert_array_equal(suite.images("fog", 3), arrays["fog"][8:12])
    assert len(list(suite.items())) == 15 * 5
    assert len(list(suite.items(extra=True))) == 19 * 5


def test_published_suite_with_some_corruptions_says_which_are_missing(tmp_path):
    write_published(tmp_path, ("fog", "snow", "saturate"))
    suite = load_published(tmp_path)
    assert suite.corruptions == ("snow", "fog")
    assert suite.missing == tuple(name for name in CORRUPTIONS if name not in ("fog", "snow"))
    assert suite.extra == ("saturate",)
    with pytest.raises(ConfigError, match="corruption must be one of snow, fog, saturate"):
        suite.images("frost", 1)
    with pytest.raises(ConfigError, match="severity must be one of 1, 2, 3, 4, 5"):
        suite.images("fog", 6)


def test_a_broken_extra_file_is_skipped_not_an_error(tmp_path):
    write_published(tmp_path, ("fog",))
    np.save(tmp_path / "spatter.npy", np.zeros((3, 32, 32, 3), dtype=np.uint8))
    suite = load_published(tmp_path)
    assert suite.corruptions == ("fog",) and suite.extra == ()


def _save(path: Path, array: np.ndarray) -> None:
    np.save(path, array)


BAD_CASES = {
    "missing directory": (lambda root: None, "does not exist"),
    "none of the 15": (
        lambda root: (root.mkdir(), _save(root / "labels.npy", np.zeros(20, np.uint8))),
        "holds none of the 15 CIFAR-10-C files",
    ),
    "no labels": (
        lambda root: (root.mkdir(), _save(root / "fog.npy", tiny_images(20))),
        "labels.npy is missing",
    ),
    "wrong shape": (
        lambda root: (
            write_published(root, ("fog",)),
            _save(root / "fog.npy", tiny_images(20)[..., 0]),
        ),
        r"fog.npy: expected uint8 images of shape \(N, 32, 32, 3\), got uint8 \(20, 32, 32\)",
    ),
    "wrong dtype": (
        lambda root: (
            write_published(root, ("fog",)),
            _save(root / "fog.npy", tiny_images(20).astype(np.float32)),
        ),
        "got float32",
    ),
    "labels too short": (
        lambda root: (
            write_published(root, ("fog",)),
            _save(root / "labels.npy", np.zeros(15, np.uint8)),
        ),
        "fog.npy: holds 20 images but labels.npy has 15 labels",
    ),
    "not divisible by 5": (
        lambda root: (
            write_published(root, ("fog",), per_severity=4)
            and _save(root / "labels.npy", np.zeros(21, np.uint8))
        ),
        "21 labels is not a positive multiple of 5",
    ),
    "labels differ by severity": (
        lambda root: (
            write_published(root, ("fog",)),
            _save(root / "labels.npy", np.arange(20, dtype=np.uint8)),
        ),
        "blocks of labels must be the same",
    ),
    "not an array": (
        lambda root: (write_published(root, ("fog",)), (root / "fog.npy").write_text("no")),
        "fog.npy is not a readable .npy array",
    ),
}


@pytest.mark.parametrize("case", BAD_CASES, ids=list(BAD_CASES))
def test_bad_published_files_give_a_one_line_error(tmp_path, case):
    make, message = BAD_CASES[case]
    root = tmp_path / "CIFAR-10-C"
    make(root)
    with pytest.raises(DataError, match=message) as raised:
        load_published(root)
    assert "\n" not in str(raised.value)


def test_every_corruption_has_its_severities_and_a_fidelity_entry():
    assert len(CORRUPTIONS) == 15 and set(FIDELITY) == set(CORRUPTIONS) == set(PARAMETERS)
    assert set(FUNCTIONS) == set(CORRUPTIONS) and not set(EXTRA_CORRUPTIONS) & set(FUNCTIONS)
    assert all(len(PARAMETERS[name]) == len(SEVERITIES) for name in CORRUPTIONS)
    assert all(entry.startswith(("as CIFAR-10-C", "differs: ")) for entry in FIDELITY.values())
    assert FIDELITY["frost"].startswith("differs: ")


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One tiny suite, built once for the module under its own cache folder."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIPELINE_CACHE_DIR", str(cache))
        images = tiny_images(12, seed=3)
        labels = np.arange(12) % 10
        yield images, labels, generate(images, labels, seed=7, progress=False)


def test_generated_suite_is_the_published_layout_and_deterministic(generated):
    images, labels, suite = generated
    assert suite.source == "generated" and suite.seed == 7 and suite.missing == ()
    assert suite.labels.tolist() == labels.tolist()
    # Everything lies in one complete folder under cache_dir(): no temporary left behind.
    assert sorted(p.name for p in suite.directory.parent.iterdir()) == sorted(
        [suite.directory.name, suite.directory.name + ".lock"]
    )
    for name, severity, corrupted in suite.items():
        assert corrupted.shape == images.shape and corrupted.dtype == np.uint8
        again = corrupt(images, name, severity, rng=corruption_rng(7, name, severity))
        assert again.tobytes() == np.asarray(corrupted).tobytes(), (name, severity)


def test_every_corruption_changes_the_images_more_at_severity_five(generated):
    images, _, suite = generated
    for name in CORRUPTIONS:
        change = [np.abs(suite.images(name, s).astype(float) - images).mean() for s in SEVERITIES]
        assert min(change) > 0.5, (name, change)
        if name != "elastic_transform":  # its CIFAR constants shrink the affine part as it rises
            assert change[4] > change[0], (name, change)


def test_a_second_generate_reads_the_cache(generated, monkeypatch):
    images, labels, suite = generated

    def no_build(*args, **kwargs):
        raise AssertionError("built again instead of reading the cache")

    monkeypatch.setattr(corruptions, "_build", no_build)
    # conftest gives each test its own cache: point this one at the module's
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(suite.directory.parents[1]))
    cached = generate(images, labels, seed=7, progress=False)
    assert cached.directory == suite.directory
    np.testing.assert_array_equal(cached.images("snow", 5), suite.images("snow", 5))
    with pytest.raises(AssertionError, match="built again"):  # another seed is another suite
        generate(images, labels, seed=8, progress=False)


def test_seeds_give_different_draws():
    images = tiny_images(6)
    first = corrupt(images, "gaussian_noise", 3, rng=corruption_rng(0, "gaussian_noise", 3))
    second = corrupt(images, "gaussian_noise", 3, rng=corruption_rng(1, "gaussian_noise", 3))
    assert not np.array_equal(first, second)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda x: corrupt(x, "blur", 1, rng=None), ConfigError, "corruption must be one of"),
        (lambda x: corrupt(x, "fog", 0, rng=None), ConfigError, "severity must be one of"),
        (
            lambda x: corrupt(x.astype(float), "fog", 1, rng=None),
            DataError,
            r"images must be uint8 of shape \(N, 32, 32, 3\) \(got float64",
        ),
        (lambda x: generate(x, np.zeros(3), seed=0), DataError, r"labels must be \(4,\)"),
        (lambda x: generate(x, np.zeros(4), seed=-1), ConfigError, "seed must be a non-negative"),
    ],
)
def test_bad_arguments_name_the_value(call, error, message):
    with pytest.raises(error, match=message):
        call(tiny_images(4))
