"""split.csv follows the data: corrected labels, removed and new photos, another folder under the same --name."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featstack.commands import audit as audit_command
from featstack.errors import FeatstackError
from featstack.extract import ExtractConfig, extract
from featstack.paths import AuditPaths, RunPaths
from featstack.stack import run_stack

from conftest import write_images

RUN = dict(backbones=["vgg16"], weights="random", image_size=32, progress=False, batch_size=8)


def _split(summary) -> pd.DataFrame:
    return pd.read_csv(summary.paths.split_csv, dtype=str, keep_default_na=False)


def _labels(data) -> pd.DataFrame:
    return pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)


def test_corrected_labels_are_followed_and_class_lists_with_them(tmp_path, dog_breed, capsys):
    first = extract(ExtractConfig(dog_breed, features_dir=tmp_path, **RUN))
    before = _split(first)
    labels = _labels(dog_breed)
    whippets = labels.index[labels.breed == "whippet"]
    labels.loc[whippets, "breed"] = "beagle"  # a class disappears
    labels.at[1, "breed"] = "corgi"  # and one appears
    labels.to_csv(dog_breed / "labels.csv", index=False)
    capsys.readouterr()
    again = extract(ExtractConfig(dog_breed, features_dir=tmp_path, **RUN))
    out = capsys.readouterr().out
    first_changed = labels.id[min(whippets[0], 1)]
    old = dict(zip(before.id, before.label))
    assert (f"5 labels changed since the last run (first: {first_changed} {old[first_changed]} → "
            f"{dict(zip(labels.id, labels.breed))[first_changed]})") in out
    after = _split(again)
    assert dict(zip(after.id, after.label)) == {**old, **dict(zip(labels.id, labels.breed))}
    assert list(after.id) == list(before.id) and list(after.split) == list(before.split), "relabelled ids keep splits"
    assert json.loads(again.paths.dataset_json.read_text())["classes"] == ["beagle", "corgi", "pug"]
    assert [j.extracted for j in again.jobs] == [0] and again.jobs[0].backbone.model is None


def test_removed_photos_leave_the_split_and_the_next_run(tmp_path, cats_dogs, capsys):
    extract(ExtractConfig(cats_dogs, features_dir=tmp_path / "f", **RUN))
    for rel in ("train/cat.3.jpg", "train/dog.4.jpg", "test1/2.jpg"):
        (cats_dogs / rel).unlink()
    capsys.readouterr()
    again = extract(ExtractConfig(cats_dogs, features_dir=tmp_path / "f", **RUN))
    assert "3 images gone since the last run (first: cat.3)" in capsys.readouterr().out
    split = _split(again)
    assert not {"cat.3", "dog.4", "2"} & set(split.id) and len(split) == 13
    assert again.jobs[0].extracted == 0 and again.jobs[0].stored == 16  # their features stay, unused
    run = RunPaths(run_stack(again.paths.root, model="logreg", folds=2, models_dir=tmp_path / "m"))
    trained = set(pd.read_csv(run.oof_csv, dtype=str).id) | set(pd.read_csv(run.holdout_csv, dtype=str).id)
    predicted = set(pd.read_csv(run.test_csv, dtype=str).id)
    assert trained == set(split.id[split.split != "test"]) and not {"cat.3", "dog.4"} & trained
    assert predicted == {"1", "3", "4"}
    assert json.loads(run.config_json.read_text())["trained_on"]["rows"] == int((split.split == "train").sum())


def test_another_folder_under_the_same_name_is_refused(tmp_path, cats_dogs):
    first = extract(ExtractConfig(cats_dogs, features_dir=tmp_path / "f", **RUN))
    before = first.paths.split_csv.read_bytes()
    other = tmp_path / "elsewhere" / cats_dogs.name  # same folder name: same default --name
    write_images(other / "train", [f"{c}.{n}.jpg" for c in ("cat", "dog") for n in range(20, 26)], start_seed=300)
    write_images(other / "test1", ["90.jpg", "91.jpg"], start_seed=400)
    with pytest.raises(FeatstackError, match=rf"^--name catsdogs: {first.paths.root} holds the features of "
                                             rf"{cats_dogs.resolve()}, not of {other.resolve()}; pass another --name "
                                             rf"for this folder, or delete {first.paths.root} to rebuild"):
        extract(ExtractConfig(other, features_dir=tmp_path / "f", **RUN))
    assert first.paths.split_csv.read_bytes() == before
    mine = extract(ExtractConfig(other, features_dir=tmp_path / "f", name="elsewhere", **RUN))
    assert set(_split(mine).id) == {f"{c}.{n}" for c in ("cat", "dog") for n in range(20, 26)} | {"90", "91"}


def test_unchanged_ids_keep_their_split_and_new_ids_are_stratified(tmp_path, cats_dogs, capsys):
    first = extract(ExtractConfig(cats_dogs, features_dir=tmp_path, holdout=0.2, **RUN))
    before = _split(first)
    (cats_dogs / "train" / "cat.5.jpg").unlink()
    (cats_dogs / "train" / "dog.0.jpg").rename(cats_dogs / "train" / "cat.40.jpg")  # relabelled by its name
    write_images(cats_dogs / "train", [f"{c}.{n}.jpg" for c in ("cat", "dog") for n in range(100, 110)],
                 start_seed=500)
    capsys.readouterr()
    again = extract(ExtractConfig(cats_dogs, features_dir=tmp_path, holdout=0.2, **RUN))
    out = capsys.readouterr().out
    assert "2 images gone since the last run (first: cat.5)" in out
    assert "21 new images since the last run" in out
    after = _split(again)
    unchanged = before[~before.id.isin(["cat.5", "dog.0"])]
    assert after.iloc[:len(unchanged)].reset_index(drop=True).equals(unchanged.reset_index(drop=True))
    assert set(after.id) == set(unchanged.id) | {"cat.40"} | {f"{c}.{n}" for c in ("cat", "dog")
                                                               for n in range(100, 110)}
    # New labelled ids top up each class's holdout to its share (stratified), without moving an old id.
    for cls in ("cat", "dog"):
        rows = after[after.label == cls]
        assert (rows.split == "holdout").sum() == max(round(0.2 * len(rows)),
                                                      (unchanged[unchanged.label == cls].split == "holdout").sum())
    assert again.jobs[0].extracted == 21 and again.jobs[0].cached == 14


def _tinted(seed: int, rgb) -> Image.Image:
    """A noisy photo dominated by one colour: random-weight features separate such classes well."""
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(rgb, np.float32) + rng.normal(0, 25, (40, 48, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def test_workflow_audit_correct_labels_rerun(tmp_path, capsys):
    """The user's workflow: extract, stack, audit, correct in labels.csv what the audit lists, extract and stack
    again: the new run trains on the corrected labels, extraction says how many changed, no photo twice."""
    data = tmp_path / "data" / "colours"
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
    truth = {}
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    for c, (name, rgb) in enumerate(colours.items()):
        for n in range(12):
            image_id = f"{name[0]}{n:02d}"
            _tinted(100 * c + n, rgb).save(data / "train" / f"{image_id}.jpg", quality=92)
            truth[image_id] = name
        _tinted(900 + c, rgb).save(data / "test" / f"t{c}.jpg", quality=92)
    wrong = {"r01": "green", "g02": "blue", "b03": "red"}
    given = {**truth, **wrong}
    pd.DataFrame({"id": list(given), "breed": list(given.values())}).to_csv(data / "labels.csv", index=False)
    features = tmp_path / "features"
    first = extract(ExtractConfig(data, features_dir=features, holdout=0.2, **RUN))
    run1 = run_stack(first.paths.root, model="logreg", folds=3, models_dir=tmp_path / "models")
    audit_command.main(["--run", str(run1)])  # audit.py on the run
    issues = pd.read_csv(AuditPaths(RunPaths(run1).audit_dir).label_issues_csv, dtype=str, keep_default_na=False)
    trained_on_wrong = {i for i in wrong if _split(first).set_index("id").at[i, "split"] == "train"}
    assert trained_on_wrong and trained_on_wrong <= set(issues.id), "the audit lists the flipped training labels"
    labels = _labels(data)
    fixes = dict(zip(issues.id, issues.suggested_label))
    labels["breed"] = [fixes.get(i, b) for i, b in zip(labels.id, labels.breed)]
    labels.to_csv(data / "labels.csv", index=False)
    capsys.readouterr()
    again = extract(ExtractConfig(data, features_dir=features, holdout=0.2, **RUN))
    out = capsys.readouterr().out
    assert f"{len(fixes)} label{'s' if len(fixes) != 1 else ''} changed since the last run" in out
    assert [j.extracted for j in again.jobs] == [0] and [j.cached for j in again.jobs] == [39]
    assert again.jobs[0].backbone.model is None, "nothing decoded or run through a backbone again"
    run2 = RunPaths(run_stack(again.paths.root, model="logreg", folds=3, models_dir=tmp_path / "models"))
    oof = pd.read_csv(run2.oof_csv, dtype=str)
    corrected = dict(zip(labels.id, labels.breed))
    assert all(corrected[i] == label for i, label in zip(oof.id, oof.label))
    assert all(oof.label[oof.id.isin(trained_on_wrong)] == [truth[i] for i in oof.id[oof.id.isin(trained_on_wrong)]])
    old, new = (json.loads((RunPaths(r).config_json).read_text())["trained_on"] for r in (run1, run2.root))
    assert old["rows"] == new["rows"] and old["labels_sha256"] != new["labels_sha256"]
