"""Data: labels from the ImageNet-1k synset order, clear errors, one seeded split."""

import numpy as np
import pytest
import torch

from data import (
    DataError,
    SplitFractions,
    imagenet_synsets,
    load_digits_source,
    scan_imagenet_folder,
    split_indices,
    split_lists,
)
from data.sources import digits_file, read_digits_file
from tests.conftest import SYNSETS, write_image


def test_labels_are_the_synset_index_in_imagenet_1k_not_the_folder_position(image_folder):
    source = scan_imagenet_folder(image_folder)
    assert len(source.ids) == 40
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and synsets[0] == "n01440764" and synsets[999] == "n15075141"
    by_folder = {i.split("/")[0]: label for i, label in zip(source.ids, source.labels, strict=True)}
    assert by_folder == {s: synsets.index(s) for s in SYNSETS}
    assert sorted(set(source.labels)) == [0, 1, 100, 500, 999]


def test_fingerprint_changes_when_an_image_changes(tmp_path):
    folder = tmp_path / SYNSETS[0]
    folder.mkdir()
    write_image(folder / "a.JPEG", seed=1)
    before = scan_imagenet_folder(tmp_path).fingerprint
    assert scan_imagenet_folder(tmp_path).fingerprint == before
    write_image(folder / "a.JPEG", seed=2, size=30)
    assert scan_imagenet_folder(tmp_path).fingerprint != before


@pytest.mark.parametrize(
    "layout,fragment",
    [
        ({"cats": 2, "dogs": 2}, "one folder per ImageNet-1k synset"),
        ({SYNSETS[0]: 2, "extra": 1}, "found e.g. extra"),
        ({}, "one folder per ImageNet-1k synset"),
        ({SYNSETS[0]: 0}, "no images"),
    ],
)
def test_folders_that_are_not_synset_folders_are_refused(tmp_path, layout, fragment):
    for name, count in layout.items():
        (tmp_path / name).mkdir()
        for i in range(count):
            write_image(tmp_path / name / f"{i}.png", seed=i, fmt="PNG")
    with pytest.raises(DataError, match=fragment):
        scan_imagenet_folder(tmp_path)


def test_entries_named_like_images_are_kept_even_when_they_are_not_files(tmp_path):
    # Loading them fails, so the feature pass skips and lists them (tests/test_features.py).
    folder = tmp_path / SYNSETS[0]
    folder.mkdir()
    write_image(folder / "a.JPEG", seed=1)
    (folder / "b.JPEG").symlink_to(tmp_path / "moved-away.JPEG")  # dangling
    (folder / "c.png").mkdir()
    (folder / "notes.txt").write_text("not an image\n")
    source = scan_imagenet_folder(tmp_path)
    assert source.ids == tuple(f"{SYNSETS[0]}/{name}" for name in ("a.JPEG", "b.JPEG", "c.png"))
    with pytest.raises(FileNotFoundError):
        source.load(1)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_imagenet_folder(tmp_path / "nowhere")


def test_split_is_disjoint_covering_and_seeded():
    fractions = SplitFractions()
    split = split_indices(1797, fractions, seed=3)
    sizes = {name: len(index) for name, index in split.items()}
    assert sizes == {"train": 1150, "val": 287, "test": 360}
    union = torch.cat(list(split.values()))
    assert sorted(union.tolist()) == list(range(1797))  # disjoint and covering
    again = split_indices(1797, fractions, seed=3)
    assert all(torch.equal(split[n], again[n]) for n in split)
    other = split_indices(1797, fractions, seed=4)
    assert not torch.equal(split["test"], other["test"])


def test_split_lists_name_each_image_once():
    ids = [f"img{i}" for i in range(50)]
    lists = split_lists(ids, split_indices(50, SplitFractions(0.5, 0.25, 0.25), seed=0))
    names = [line for text in lists.values() for line in text.splitlines()]
    assert sorted(names) == sorted(ids)


@pytest.mark.parametrize(
    "fractions,count,fragment",
    [
        ((0.5, 0.5, 0.5), 100, "sum to 1"),
        ((0.8, 0.2, 0.0), 100, "positive"),
        ((0.9, 0.05, 0.05), 10, "leaves val empty"),
    ],
)
def test_bad_split_fractions_are_refused(fractions, count, fragment):
    with pytest.raises(ValueError, match=fragment):
        SplitFractions(*fractions).sizes(count)


def test_digits_demo_data_ships_with_scikit_learn():
    source = load_digits_source()
    assert len(source.ids) == 1797 and sorted(set(source.labels)) == list(range(10))
    image = source.load(0)
    assert image.size == (8, 8) and image.mode == "L"
    assert source.images.max() == 255


def test_the_digits_read_directly_are_scikit_learns():
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels, labels = read_digits_file(digits_file())
    assert np.array_equal(pixels, digits.images) and np.array_equal(labels, digits.target)


def test_a_damaged_digits_file_is_refused(tmp_path):
    import gzip

    lines = gzip.decompress(digits_file().read_bytes()).decode().splitlines()
    damaged = {
        "truncated": lines[:-1],
        "a pixel out of range": [lines[0].replace("0", "17", 1), *lines[1:]],
        "not numbers": ["x" + lines[0], *lines[1:]],
    }
    for case, rows in damaged.items():
        path = tmp_path / f"{case}.csv.gz"
        path.write_bytes(gzip.compress("\n".join(rows).encode()))
        with pytest.raises(DataError, match="reinstall scikit-learn"):
            read_digits_file(path)
    cut = tmp_path / "cut.csv.gz"  # the gzip stream itself cut short
    cut.write_bytes(digits_file().read_bytes()[:5000])
    with pytest.raises(DataError, match="reinstall scikit-learn"):
        read_digits_file(cut)
