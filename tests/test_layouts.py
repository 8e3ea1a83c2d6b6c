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
