"""Layouts are read from the whole folder, odd files are reported (never dropped), one-class datasets are refused,
and Stanford Dogs is read with its official split and plain breed names."""
import json
import os
import shutil

import pandas as pd
import pytest

from featstack.errors import FeatstackError
from featstack.extract import ExtractConfig, extract
from featstack.layouts import describe, read_layout, scan_images
from featstack.paths import DatasetPaths
from featstack.predict import expand, predict
from featstack.split import read_split, resolve_split
from featstack.stack import run_stack

from conftest import write_images

TINY = dict(backbones=["resnet50"], weights="random", image_size=32, progress=False)


def test_one_odd_file_name_does_not_change_the_layout(cats_dogs):
    write_images(cats_dogs / "train", ["cat.914 é.jpg"], start_seed=77)
    table, layout = read_layout(cats_dogs)
    assert layout == "cats-dogs"
    assert set(table.label.dropna()) == {"cat", "dog"}
    assert table.attrs["left_out"] == [("train/cat.914 é.jpg", "name is not cat.<n> or dog.<n>")]
    text = describe(table, holdout=0.1)
    assert "layout: cats-dogs (detected)" in text and "classes: 2 (cat, dog)" in text
    assert "images: 12 labelled: about 1 holdout (--holdout 0.1, stratified), the rest train, 4 test" in text
    assert "1 name is not cat.<n> or dog.<n>: train/cat.914 é.jpg" in text


def test_files_outside_the_layout_are_reported_with_a_reason(dog_breed):
    write_images(dog_breed / "train", ["extra1.jpg"], start_seed=90)       # not in labels.csv
    write_images(dog_breed / "test" / "nested", ["t9.jpg"], start_seed=91)
    write_images(dog_breed / "stray", ["s.png"], start_seed=92)
    write_images(dog_breed / ".cache", ["c.jpg"], start_seed=93)
    table, _ = read_layout(dog_breed)
    assert dict(table.attrs["left_out"]) == {
        ".cache/c.jpg": "in a hidden folder",
        "stray/s.png": "not part of the dog-breed layout (images go in train/ and test/)",
        "test/nested/t9.jpg": "in a subfolder of test/ (test images go directly in it)",
        "train/extra1.jpg": "not in labels.csv",
    }
    # Nothing vanishes: every image-named file is in the table or left out with its reason.
    assert len(table) + len(table.attrs["left_out"]) == len(scan_images(dog_breed))


def _folders_one_class(tmp_path):
    data = tmp_path / "one"
    write_images(data / "train", ["a.jpg", "b.jpg"])
    return data


def _cats_only(tmp_path):
    data = tmp_path / "cats"
    write_images(data / "train", ["cat.1.jpg", "cat.2.jpg", "odd.jpg"])
    return data


def _manifest_one_label(tmp_path):
    write_images(tmp_path / "m", ["p0.jpg", "p1.jpg", "p2.jpg"])
    (tmp_path / "m" / "manifest.csv").write_text("path,label\np0.jpg,x\np1.jpg,x\np2.jpg,\n")
    return tmp_path / "m" / "manifest.csv"


@pytest.mark.parametrize("make, match", [
    (_folders_one_class, r"one: read as the folders layout, every labelled image has the one class 'train'\. "
                         r"A classifier needs at least 2 classes"),
    (_cats_only, r"cats: read as the cats-dogs layout, every labelled image has the one class 'cat'; 1 file\(s\) "
                 r"left out, e\.g\. train/odd\.jpg \(name is not cat\.<n> or dog\.<n>\)"),
    (_manifest_one_label, r"manifest\.csv: read as the manifest layout, every labelled image has the one class 'x'"),
])
def test_single_class_datasets_are_refused(tmp_path, make, match):
    with pytest.raises(FeatstackError, match=match):
        read_layout(make(tmp_path))


def test_detection_summary_is_printed_before_the_long_work(cats_dogs, tmp_path, capsys):
    write_images(cats_dogs / "train", ["cat.914 é.jpg"], start_seed=77)
    with pytest.raises(FeatstackError, match="unknown backbone 'nosuch'"):  # fails before any model is built
        extract(ExtractConfig(cats_dogs, backbones=["nosuch"], features_dir=tmp_path / "f", progress=False))
    out = capsys.readouterr().out
    assert "layout: cats-dogs (detected)" in out and "classes: 2 (cat, dog)" in out
    assert "left out: 1 file named like images, with the reason" in out and "train/cat.914 é.jpg" in out


def _add_unreadable(folder):
    """A dangling symlink and a named pipe, both named like images (root reads mode-000 files, so no chmod)."""
    (folder / "cat.90.jpg").symlink_to(folder / "gone.jpg")
    os.mkfifo(folder / "dog.90.jpg")


def test_unreadable_images_are_listed_in_bad_images_csv(cats_dogs, tmp_path):
    _add_unreadable(cats_dogs / "train")
    s = extract(ExtractConfig(cats_dogs, features_dir=tmp_path / "f", holdout=0, **TINY))
    bad = pd.read_csv(s.paths.bad_images_csv).set_index("id")["reason"].to_dict()
    assert bad == {"cat.90": f"file not found (dangling link to {cats_dogs / 'train' / 'gone.jpg'})",
                   "dog.90": "not a regular file (a named pipe)"}
    split = read_split(s.paths)
    assert {"cat.90", "dog.90"} <= set(split.id) and s.images == 18 == len(scan_images(cats_dogs))


def test_predict_answers_every_image_named_file_of_a_folder(demo, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(sorted((demo["data"] / "test").glob("*.jpg"))[0], folder / "good.jpg")
    _add_unreadable(folder)
    assert expand([str(folder)]) == [str(folder / n) for n in ("cat.90.jpg", "dog.90.jpg", "good.jpg")]
    failed = predict([str(folder)], run=demo["run"])
    out, err = capsys.readouterr()
    assert failed == 2 and out.startswith(f"{folder / 'good.jpg'}  ")
    assert f"error: {folder / 'cat.90.jpg'}: cannot read this photo (file not found (dangling link to" in err
    assert f"error: {folder / 'dog.90.jpg'}: cannot read this photo (not a regular file (a named pipe))" in err


def test_predict_checks_photos_exist_before_loading_anything(tmp_path):
    # The run does not exist either: the photo is checked first, so its message is the one given.
    with pytest.raises(FeatstackError, match=r"nope\.jpg: no such file or folder; check the photo's path"):
        predict([str(tmp_path / "nope.jpg")], run=tmp_path / "no-run")


def test_stanford_dogs_is_detected_with_its_official_split(stanford_dogs):
    table, layout = read_layout(stanford_dogs)
    assert layout == "stanford-dogs"
    assert table.split.value_counts().to_dict() == {"train": 9, "holdout": 6}
    assert set(table.label) == {"Chihuahua", "Japanese_spaniel", "beagle"}
    row = table.set_index("id").loc["Images/n02085620-Chihuahua/n02085620_3.jpg"]
    assert (row.label, row.split) == ("Chihuahua", "holdout")
    assert sorted(r for _, r in table.attrs["left_out"]) == ["in neither train_list.mat nor test_list.mat"] * 3
    text = describe(table, holdout=0.1)
    assert "layout: stanford-dogs (detected)" in text
    assert "images: 9 train, 6 holdout (the official test list, lists/test_list.mat), 0 test" in text
    assert "--holdout applies to nothing" in text
    assert "n02085620-Chihuahua -> Chihuahua" in text


def test_stanford_dogs_listed_image_missing_is_refused(stanford_dogs):
    (stanford_dogs / "Images" / "n02088364-beagle" / "n02088364_4.jpg").unlink()
    with pytest.raises(FeatstackError, match=r"test_list\.mat: entry 6: n02088364-beagle/n02088364_4\.jpg has no "
                                             r"image .*; restore the image"):
        read_layout(stanford_dogs)


def test_stanford_dogs_end_to_end_shows_plain_breed_names(stanford_dogs, tmp_path):
    # --holdout 0.1 (default) applies to nothing
    s = extract(ExtractConfig(stanford_dogs, features_dir=tmp_path / "f", **TINY))
    split = read_split(s.paths)
    official = {f"Images/{f}" for f in _mat_files(stanford_dogs / "lists" / "test_list.mat")}
    assert set(split.loc[split.split == "holdout", "id"]) == official
    assert set(split.label) == {"Chihuahua", "Japanese_spaniel", "beagle"}
    meta = json.loads(s.paths.dataset_json.read_text())
    assert meta["classes"] == ["Chihuahua", "Japanese_spaniel", "beagle"]
    assert meta["class_folders"]["Chihuahua"] == "n02085620-Chihuahua" and meta["layout"] == "stanford-dogs"
    run = run_stack(s.paths.root, folds=2, models_dir=tmp_path / "m")
    holdout = pd.read_csv(run / "holdout_predictions.csv")
    assert list(holdout.columns[2:]) == ["Chihuahua", "Japanese_spaniel", "beagle"]
    assert set(holdout.label) <= {"Chihuahua", "Japanese_spaniel", "beagle"}
    assert "n020" not in (run / "report.md").read_text()


def _mat_files(mat):
    from scipy.io import loadmat
    return [str(x.ravel()[0]) for x in loadmat(mat)["file_list"].ravel()]


@pytest.mark.parametrize("folders, labels", [
    (["n00000001-terrier", "n00000002-terrier", "n00000003-beagle"],
     {"n00000001-terrier", "n00000002-terrier", "beagle"}),  # a collision keeps both ids; never merges classes
    (["n00000003-beagle", "pug"], {"n00000003-beagle", "pug"}),  # not every folder has the form: unchanged
])
def test_wordnet_ids_dropped_only_when_safe(tmp_path, folders, labels):
    for k, f in enumerate(folders):
        write_images(tmp_path / "d" / f, ["a.jpg", "b.jpg"], start_seed=k)
    table, layout = read_layout(tmp_path / "d")
    assert layout == "folders" and set(table.label) == labels


def test_split_keeps_the_original_folder_names(folders, tmp_path):
    table, layout = read_layout(folders)
    paths = DatasetPaths.of(tmp_path / "f", "stanford")
    resolve_split(paths, table, holdout=0, seed=0, layout=layout, data=folders)
    meta = json.loads(paths.dataset_json.read_text())
    assert meta["class_folders"] == {"Chihuahua": "n02085620-Chihuahua",
                                     "Japanese_spaniel": "n02085782-Japanese_spaniel"}
    assert set(read_split(paths).label) == {"Chihuahua", "Japanese_spaniel"}


# --- #30 item 2: a manifest's paths resolve from the manifest's own folder, as written --------------------------------

def test_manifest_given_with_a_relative_path_keeps_every_image(tmp_path, monkeypatch):
    """`--data data/man1/manifest.csv` from the folder above joined the path twice: every image "not found", exit 0."""
    man = tmp_path / "data" / "man1"
    write_images(man / "pics", ["p0.jpg", "p1.jpg", "p2.jpg"])
    write_images(tmp_path / "elsewhere", ["abs.jpg"], start_seed=9)
    (man / "manifest.csv").write_text("path,label\npics/p0.jpg,a\npics/p1.jpg,b\npics/p2.jpg,\n"
                                      f"{tmp_path / 'elsewhere' / 'abs.jpg'},b\n")  # an absolute path stays itself
    monkeypatch.chdir(tmp_path)
    table, layout = read_layout("data/man1/manifest.csv")
    assert layout == "manifest"
    assert table.path.tolist() == [str(man / "pics" / "p0.jpg"), str(man / "pics" / "p1.jpg"),
                                   str(man / "pics" / "p2.jpg"), str(tmp_path / "elsewhere" / "abs.jpg")]
    assert all(os.path.isfile(p) for p in table.path)
    monkeypatch.chdir(man)  # the same manifest from its own folder, and from anywhere else, reads the same paths
    assert read_layout("manifest.csv")[0].path.tolist() == table.path.tolist()


def test_a_dataset_whose_every_image_is_missing_is_refused(tmp_path):
    """Every row a dangling link: the run extracted nothing, listed every image as not found, and exited 0."""
    man = tmp_path / "m"
    man.mkdir()
    for k in range(3):
        (man / f"p{k}.jpg").symlink_to(tmp_path / "moved" / f"p{k}.jpg")
    (man / "manifest.csv").write_text("path,label\np0.jpg,a\np1.jpg,b\np2.jpg,a\n")
    with pytest.raises(FeatstackError, match=r"manifest\.csv: none of its 3 images can be opened \(first: .*p0\.jpg, "
                                             r"a broken link or a wrong path\); fix the paths"):
        read_layout(man / "manifest.csv")


# --- #32: --layout dog-breed without labels.csv says what is missing ----------------------------------------------

def test_dog_breed_without_labels_csv_says_what_is_missing(cats_dogs):
    with pytest.raises(FeatstackError) as info:
        read_layout(cats_dogs, "dog-breed")
    assert str(info.value) == (
        f"{cats_dogs}: --layout dog-breed needs labels.csv (columns id,breed) beside train/, and there is none; add "
        "it, or leave --layout out: auto-detection is the default (--layout auto), which would read this folder as "
        "the cats-dogs layout")


def test_manifest_layout_on_a_folder_without_manifest_csv_says_what_is_missing(cats_dogs):
    with pytest.raises(FeatstackError) as info:
        read_layout(cats_dogs, "manifest")
    assert str(info.value) == (
        f"{cats_dogs}: --layout manifest needs manifest.csv (columns path,label[,split]) in the folder, or --data "
        "naming the manifest CSV itself, and there is none; add it, or leave --layout out: auto-detection is the "
        "default (--layout auto), which would read this folder as the cats-dogs layout")


# --- #28: a folder is never a class unless the layout says so -------------------------------------------------------

def _plant_seedlings(tmp_path):
    data = tmp_path / "plant"
    for k, species in enumerate(["Black-grass", "Charlock", "Cleavers"]):
        write_images(data / "train" / species, ["a.png", "b.png"], start_seed=10 * k)
    write_images(data / "test", ["x1.png", "x2.png"], start_seed=50)
    (data / "sample_submission.csv").write_text("file,species\nx1.png,Charlock\nx2.png,Charlock\n")
    return data


def test_train_of_class_folders_beside_test_reads_test_as_the_test_split(tmp_path):
    """plant-seedlings: train/<species>/*.png + test/*.png was one class 'train' (or test/ a class)."""
    data = _plant_seedlings(tmp_path)
    for layout in ("auto", "folders"):
        table, read_as = read_layout(data, layout)
        assert read_as == "folders"
        assert set(table.label.dropna()) == {"Black-grass", "Charlock", "Cleavers"}
        assert sorted(table.loc[table.split.eq("test"), "id"]) == ["test/x1.png", "test/x2.png"]
        assert table.loc[table.split.eq("test"), "label"].isna().all() and table.attrs["left_out"] == []


def _cassava(tmp_path):
    data = tmp_path / "cassava"
    write_images(data / "train_images", ["1.jpg", "2.jpg", "3.jpg"])
    write_images(data / "test_images", ["9.jpg"], start_seed=20)
    (data / "train.csv").write_text("image_id,label\n1.jpg,0\n2.jpg,1\n3.jpg,0\n")
    (data / "sample_submission.csv").write_text("image_id,label\n9.jpg,0\n")
    return data


def _test2019(tmp_path):
    data = tmp_path / "herbarium"
    for k, c in enumerate(["fern", "moss"]):
        write_images(data / c, ["a.jpg", "b.jpg"], start_seed=k)
    write_images(data / "test2019", ["t.jpg"], start_seed=9)
    return data


def _images_folder(tmp_path):
    data = tmp_path / "melanoma"
    for k, c in enumerate(["benign", "malignant"]):
        write_images(data / c, ["a.jpg", "b.jpg"], start_seed=k)
    write_images(data / "jpeg", ["t.jpg"], start_seed=9)
    return data


@pytest.mark.parametrize("make, match", [
    (_cassava, r"cassava: train\.csv lies beside the image folders test_images/, train_images/, so their names are "
               r"not taken as the classes; .*write a manifest\.csv \(path,label\[,split\]\) from it and pass --data "
               r"that manifest \(--layout manifest\); if the folders are the classes, pass --layout folders$"),
    (_test2019, r"herbarium: the folder test2019/ is named like a test split or an image store, not a class; put "
                r"unlabelled test images directly in test/, .*if test2019/ really is a class, pass --layout folders$"),
    (_images_folder, r"melanoma: the folder jpeg/ is named like a test split or an image store, not a class"),
])
def test_folders_are_not_guessed_as_classes_where_the_data_says_otherwise(tmp_path, make, match):
    data = make(tmp_path)
    with pytest.raises(FeatstackError, match=match) as info:
        read_layout(data)
    assert "\n" not in str(info.value)
    table, layout = read_layout(data, "folders")  # the layout says so: read as asked
    assert layout == "folders" and table.label.notna().all()
