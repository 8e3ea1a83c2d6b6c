"""Every dataset layout becomes the same canonical table; malformed datasets fail with one clear line."""
import pytest

from featstack.errors import FeatstackError
from featstack.layouts import read_layout


def test_cats_dogs(cats_dogs):
    table, layout = read_layout(cats_dogs)
    assert layout == "cats-dogs"
    assert list(table.columns) == ["id", "path", "label", "split"]
    assert set(table.loc[table.label.notna(), "label"]) == {"cat", "dog"}
    assert {"cat.0", "dog.5", "1", "4"} <= set(table.id)
    assert (table.loc[table.label.isna(), "split"] == "test").all() and table.label.isna().sum() == 4


def test_dog_breed(dog_breed):
    table, layout = read_layout(dog_breed)
    assert layout == "dog-breed"
    assert table.label.notna().sum() == 12 and table.label.isna().sum() == 5
    assert table.set_index("id").loc["0001ab", "label"] == "pug"


def test_folders_ids_are_relative_paths(folders):
    table, layout = read_layout(folders)
    assert layout == "folders"
    assert "Images/n02085620-Chihuahua/img0.jpg" in set(table.id)
    assert set(table.label) == {"Chihuahua", "Japanese_spaniel"}  # every folder has the WordNet form: ids dropped
    assert table.attrs["class_folders"] == {"Chihuahua": "n02085620-Chihuahua",
                                            "Japanese_spaniel": "n02085782-Japanese_spaniel"}


def test_manifest(manifest):
    table, layout = read_layout(manifest)
    assert layout == "manifest"
    assert table.split.tolist().count("test") == 2 and table.label.isna().sum() == 2


def _missing_image(d):
    (d / "train" / "0003ab.jpg").unlink()


def _duplicate_id(d):
    with open(d / "labels.csv", "a") as f:
        f.write("0002ab,pug\n")


def _unknown_layout(d):
    for p in (d / "train").iterdir():
        p.rename(d / p.name)
    (d / "labels.csv").unlink()
    import shutil
    shutil.rmtree(d / "train"), shutil.rmtree(d / "test")
    for p in d.glob("*.jpg"):
        p.unlink()
    (d / "notes.txt").write_text("hi")


@pytest.mark.parametrize("mutate, match", [
    (_missing_image, r"labels\.csv: row 5: id '0003ab' has no image"),
    (_duplicate_id, r"labels\.csv: row 14: duplicate id '0002ab'"),
    (_unknown_layout, r"unknown dataset layout; expected one of: dog-breed"),
])
def test_bad_datasets(dog_breed, mutate, match):
    mutate(dog_breed)
    with pytest.raises(FeatstackError, match=match):
        read_layout(dog_breed)


def test_empty_folder_and_unknown_layout_name(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatstackError, match=r"empty\b.*folder is empty"):
        read_layout(tmp_path / "empty")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_text("a")
    with pytest.raises(FeatstackError, match=r"--layout kaggle: unknown; choose auto or one of dog-breed"):
        read_layout(tmp_path / "x", "kaggle")


DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.mark.parametrize("names, expected", [
    (sorted(DIGITS), DIGITS),  # the demo's digits, not eight, five, four, ...
    (["10", "9", "1", "2.5"], ["1", "2.5", "9", "10"]),
    (["Twenty-one", "ten", "3", "Nine", "twenty"], ["3", "Nine", "ten", "twenty", "Twenty-one"]),
    (["ten", "one", "cat"], ["cat", "one", "ten"]),  # not every name is a number: alphabetical
    (["pug", "beagle", None, "pug"], ["beagle", "pug"]),
])
def test_class_order_is_natural_only_for_numbers(names, expected):
    from featstack.layouts import class_order
    assert class_order(names) == expected


def test_demo_digits_are_in_natural_order_everywhere(demo, tmp_path):
    import json

    import pandas as pd

    from featstack.submission import build

    meta = json.loads((demo["features"] / "dataset.json").read_text())
    config = json.loads((demo["run"] / "config.json").read_text())
    report = json.loads((demo["run"] / "report.json").read_text())
    assert meta["classes"] == config["classes"] == list(report["holdout"]["per_class"]) == DIGITS
    for csv in ("test_predictions.csv", "oof_predictions.csv"):
        assert [c for c in pd.read_csv(demo["run"] / csv, nrows=1).columns if c in DIGITS] == DIGITS
    assert list(build(demo["run"], fmt="generic")[0].columns) == ["id", *DIGITS]
    # The dog-breed format follows the competition's sample_submission.csv, whatever its order.
    sample = pd.read_csv(demo["data"] / "sample_submission.csv", dtype={"id": str})
    alphabetical = sample[["id", *sorted(DIGITS)]]
    alphabetical.to_csv(tmp_path / "sample.csv", index=False)
    assert list(build(demo["run"], fmt="dog-breed", sample=tmp_path / "sample.csv")[0].columns) == list(
        alphabetical.columns)
