import io
import tarfile

import numpy as np
import pytest
import torch
from conftest import CLASSES, TEST_PER_CLASS, TRAIN_PER_CLASS, make_split_arrays, write_image_folder
from PIL import Image
from reference_training import reference_batches

from pipeline import batches as batching
from pipeline import data
from pipeline.data import DataError, DatasetStats


def test_image_folder_loads_every_image_with_its_class(image_folder):
    dataset = data.load_dataset(image_folder)
    expected = make_split_arrays()
    assert dataset.classes == CLASSES
    assert dataset.train_images.shape == (TRAIN_PER_CLASS * 10, 32, 32, 3)
    assert dataset.test_images.shape == (TEST_PER_CLASS * 10, 32, 32, 3)
    # PNG is lossless: the decoded pixels are the written ones, labels follow the folders.
    np.testing.assert_array_equal(dataset.train_images, expected["train_images"])
    np.testing.assert_array_equal(dataset.train_labels, expected["train_labels"])
    np.testing.assert_array_equal(dataset.test_labels, expected["test_labels"])


def test_archive_with_a_wrapping_folder_loads(image_archive):
    dataset = data.load_dataset(image_archive)
    assert dataset.classes == CLASSES
    assert dataset.train_images.shape == (TRAIN_PER_CLASS * 10, 32, 32, 3)
    # JPEG is lossy, so compare loosely with the source pixels.
    expected = make_split_arrays()["train_images"].astype(float)
    assert np.abs(dataset.train_images.astype(float) - expected).mean() < 20


def test_cifar_pickle_directory_loads_exactly(cifar_pickles):
    dataset = data.load_dataset(cifar_pickles)
    expected = make_split_arrays(seed=3)
    np.testing.assert_array_equal(dataset.train_images, expected["train_images"])
    np.testing.assert_array_equal(dataset.test_labels, expected["test_labels"])
    assert dataset.classes == CLASSES


def test_second_load_reads_the_cache_without_decoding(image_folder, monkeypatch):
    first = data.load_dataset(image_folder)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache holds the arrays")

    monkeypatch.setattr(data, "_read_image_folder", no_decoding)
    second = data.load_dataset(image_folder)
    assert second.digest == first.digest
    np.testing.assert_array_equal(second.train_images, first.train_images)


def test_changing_an_image_changes_the_digest(tmp_path):
    root = write_image_folder(tmp_path / "data")
    before = data.load_dataset(root).digest
    target = next((root / "train" / "cat").iterdir())
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(target)
    assert data.load_dataset(root).digest != before


def _corrupt(root, name="00000.png", content=b"not an image"):
    (root / "train" / "cat" / name).write_bytes(content)


def _resized(root, size, mode):
    target = next((root / "train" / "dog").iterdir())
    Image.new(mode, size).save(target)


def _image_bytes(size=(32, 32), mode="RGB"):
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: (root / "train").mkdir(parents=True), "has no test/ folder"),
        (lambda root: (root / "other").mkdir(parents=True), "neither"),
        (
            lambda root: (write_image_folder(root), (root / "test" / "cat").rename(root / "x")),
            "different classes",
        ),
        (
            lambda root: (
                write_image_folder(root),
                [f.unlink() for f in (root / "train" / "frog").iterdir()],
            ),
            "train/frog has no images",
        ),
        (lambda root: (write_image_folder(root), _corrupt(root)), "cannot read image"),
        (lambda root: (write_image_folder(root), _resized(root, (28, 28), "RGB")), "28x28"),
        (lambda root: (write_image_folder(root), _resized(root, (32, 32), "L")), "32x32 L"),
    ],
    ids=[
        "missing",
        "no-test",
        "no-layout",
        "class-mismatch",
        "empty-class",
        "corrupt",
        "28x28",
        "grayscale",
    ],
)
def test_bad_image_folders_fail_naming_the_problem(tmp_path, make, message):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError, match=message) as error:
        data.load_dataset(root, download=False)
    assert "\n" not in str(error.value)


def test_garbage_file_and_truncated_archive_fail_clearly(tmp_path, image_archive):
    garbage = tmp_path / "data.tar.gz"
    garbage.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DataError, match="cannot read archive"):
        data.load_dataset(garbage)
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(image_archive.read_bytes()[:5000])
    with pytest.raises(DataError, match="cannot read archive"):
        data.load_dataset(truncated)
    not_archive = tmp_path / "images.zip"
    not_archive.write_bytes(b"PK")
    with pytest.raises(DataError, match="is not a .tar.gz"):
        data.load_dataset(not_archive)


def test_archive_with_a_corrupt_member_names_it(tmp_path):
    root = write_image_folder(tmp_path / "src")
    _corrupt(root)
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        handle.add(root, arcname=".")
    with pytest.raises(DataError, match=r"cannot read image .*train/cat/00000.png"):
        data.load_dataset(archive)


def test_stats_match_numpy_and_round_trip_through_json():
    images = np.random.default_rng(0).integers(0, 256, size=(50, 32, 32, 3), dtype=np.uint8)
    stats = data.compute_stats(images)
    scaled = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(stats.mean, scaled.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose(stats.std, scaled.std(axis=0), rtol=1e-6)
    assert DatasetStats.from_json(stats.to_json()) == stats
    with pytest.raises(DataError, match="mean"):
        DatasetStats.from_json("{}")


def _split(count=16):
    arrays = make_split_arrays()
    return batching.to_device(
        arrays["train_images"][:count], arrays["train_labels"][:count], device=torch.device("cpu")
    )


def _identity_normalizer():
    stats = DatasetStats(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    return batching.Normalizer(stats, device=torch.device("cpu"), memory_format=torch.channels_last)


def test_batches_without_augmentation_are_the_normalised_images_in_shuffled_order():
    split = _split()
    batches = list(
        batching.train_batches(
            split,
            batch_size=8,
            generator=torch.Generator().manual_seed(0),
            normalize=_identity_normalizer(),
            translate=0,
            flip=False,
        )
    )
    assert len(batches) == 2
    images = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert images.dtype == torch.float32 and images.shape == (16, 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last)
    # Every source image appears exactly once, with its own label.
    for image, label in zip(images, labels, strict=True):
        matches = (split.images.float() == image).flatten(1).all(dim=1).nonzero().flatten()
        assert len(matches) == 1 and split.labels[matches[0]] == label


def test_augmented_images_are_shifted_or_mirrored_copies_of_their_source():
    split = _split(8)
    generator = torch.Generator().manual_seed(1)
    (images, labels), *_ = batching.train_batches(
        split, batch_size=8, generator=generator, normalize=_identity_normalizer(), translate=4
    )
    padded = torch.nn.functional.pad(split.images.float(), (4, 4, 4, 4))
    moved = 0
    for image, label in zip(images, labels, strict=True):
        sources = [i for i in range(8) if split.labels[i] == label]
        candidates = [
            view
            for i in sources
            for dy in range(9)
            for dx in range(9)
            for view in (
                padded[i, :, dy : dy + 32, dx : dx + 32],
                padded[i, :, dy : dy + 32, dx : dx + 32].flip(2),
            )
        ]
        assert any(torch.equal(image, c) for c in candidates)
        moved += not any(torch.equal(image, split.images[i].float()) for i in sources)
    assert moved > 0  # augmentation actually changed something


def test_batches_are_reproducible_from_the_generator_seed():
    def first_batch(seed):
        generator = torch.Generator().manual_seed(seed)
        return next(
            batching.train_batches(
                _split(), batch_size=8, generator=generator, normalize=_identity_normalizer()
            )
        )[0]

    assert torch.equal(first_batch(5), first_batch(5))
    assert not torch.equal(first_batch(5), first_batch(6))


def test_default_directory_downloads_through_torchvision_then_reads_the_pickles(
    tmp_path, monkeypatch, cifar_pickles
):
    """The users' default path: an empty CIFAR-10 directory is filled by torchvision."""
    import shutil

    import torchvision

    calls = []

    def fake_download(root, train, download):
        calls.append((root, download))
        shutil.copytree(cifar_pickles / data.CIFAR_BATCHES, f"{root}/{data.CIFAR_BATCHES}")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    target = tmp_path / "cifar10"
    target.mkdir()
    dataset = data.load_dataset(target)
    assert calls == [(str(target), True)]
    assert dataset.train_images.shape == (TRAIN_PER_CLASS * 10, 32, 32, 3)


def test_failed_download_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    import torchvision

    def offline(root, train, download):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    target = tmp_path / "cifar10"
    target.mkdir()
    with pytest.raises(DataError, match="downloading it failed .*pass data=<folder or .tar.gz>"):
        data.load_dataset(target)


def test_cutout_blanks_one_square_per_image_to_the_mean():
    split = _split(8)
    generator = torch.Generator().manual_seed(2)
    stats = DatasetStats(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    normalize = batching.Normalizer(
        stats, device=torch.device("cpu"), memory_format=torch.channels_last
    )
    (images, _), *_ = batching.train_batches(
        split,
        batch_size=8,
        generator=generator,
        normalize=normalize,
        translate=0,
        flip=False,
        cutout=8,
    )
    blank = (images == 0).all(dim=1)  # (B, H, W): the mean pixel normalises to 0 in every channel
    for mask in blank:
        rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
        assert 4 <= len(rows) <= 8 and 4 <= len(cols) <= 8  # a square, clipped at most to half
        assert mask.sum() == len(rows) * len(cols)
        assert rows.max() - rows.min() + 1 == len(rows)  # contiguous


@pytest.mark.parametrize("translate, flip, cutout", [(4, True, 0), (2, False, 8), (0, True, 6)])
def test_an_epoch_drawn_ahead_gives_the_batches_and_generator_of_drawing_batch_by_batch(
    translate, flip, cutout
):
    """Moving the draws to the epoch's start changes no batch, and leaves the generator where
    drawing batch by batch leaves it (the next epoch, and a checkpoint, see the same state)."""
    split = _split(40)
    options = dict(
        batch_size=8, normalize=_identity_normalizer(), translate=translate, cutout=cutout
    )
    ours, theirs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    drawn = list(batching.train_batches(split, generator=ours, flip=flip, **options))
    expected = list(reference_batches(split, generator=theirs, flip=flip, **options))
    assert len(drawn) == len(expected) == 5
    for (images, labels), (want_images, want_labels) in zip(drawn, expected, strict=True):
        assert torch.equal(images, want_images) and torch.equal(labels, want_labels)
    assert torch.equal(ours.get_state(), theirs.get_state())


# --------------------------------------------------------------------------- validation split


def test_the_validation_split_is_stratified_and_set_by_its_seed_alone():
    labels = np.repeat(np.arange(10), 450)
    split = data.validation_split(labels, 500, seed=0, dataset_digest="cifar")
    assert len(split) == 500 and np.all(np.diff(split.indices) > 0)  # sorted, no repeats
    assert np.bincount(labels[split.indices]).tolist() == [50] * 10  # per class
    again = data.validation_split(labels, 500, seed=0, dataset_digest="cifar")
    assert np.array_equal(split.indices, again.indices) and split.digest == again.digest
    other = data.validation_split(labels, 500, seed=1, dataset_digest="cifar")
    assert not np.array_equal(split.indices, other.indices) and other.digest != split.digest
    assert data.validation_split(labels, 500, seed=0, dataset_digest="x").digest != split.digest
    # Uneven classes: each gives in proportion to its size, the remainders to the largest.
    uneven = np.concatenate([np.zeros(30, int), np.ones(20, int), np.full(10, 2)])
    counts = np.bincount(uneven[data.validation_split(uneven, 7, seed=0).indices])
    assert counts.tolist() == [4, 2, 1]  # shares 3.5, 2.33, 1.17


def test_the_validation_images_leave_the_training_split_and_never_come_from_test(image_folder):
    from pipeline import training
    from pipeline.config import TrainConfig

    config = TrainConfig(data=str(image_folder), device="cpu", val_size=40, seed=3)
    setup = training.prepare_training(config)
    dataset = setup.dataset
    assert len(setup.splits.val) == 40 and len(setup.splits.train) == len(dataset.train_labels) - 40
    assert np.bincount(setup.splits.val.labels.numpy()).tolist() == [4] * 10

    def rows(images) -> set[bytes]:
        return {image.tobytes() for image in np.asarray(images)}

    val = rows(setup.splits.val.images.permute(0, 2, 3, 1).numpy())
    train = rows(setup.splits.train.images.permute(0, 2, 3, 1).numpy())
    assert val <= rows(dataset.train_images) and not val & train
    assert not val & rows(dataset.test_images)
    # The training seed does not move the split.
    other = training.prepare_training(TrainConfig(data=str(image_folder), val_size=40, seed=4))
    assert other.validation.digest == setup.validation.digest
    assert (
        training.prepare_training(TrainConfig(data=str(image_folder), val_size=0)).splits.val
        is None
    )


def test_a_validation_split_that_leaves_too_few_training_images_is_refused():
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(DataError, match="class a would keep 4 of its 10 .at least half"):
        data.validation_split(labels, 18, seed=0, class_names=("a", "b", "c"))
    with pytest.raises(DataError, match="val_size 31 is more than the 30 training images"):
        data.validation_split(labels, 31, seed=0)
    assert len(data.validation_split(labels, 15, seed=0)) == 15  # half of each class: allowed
