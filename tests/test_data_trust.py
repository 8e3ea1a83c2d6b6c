"""Files a user can edit by hand are read strictly (#30 item 3): split.csv and dataset.json, --exclude and --holdout
are one line naming the file, the line and the fix, never a silent drop, a double count or a traceback."""
import re

import pandas as pd
import pytest

from featstack.commands.extract import main as extract_main
from featstack.errors import FeatstackError
from featstack.features import EXCLUDE_MAX_BYTES, exclude_training_rows, load_features
from featstack.paths import DatasetPaths
from featstack.split import plan_split, read_dataset_meta, read_split, resolve_split
from featstack.synthetic import write_synthetic_store

from conftest import run_main

HEADER = "id,split,label\n"
GOOD = "a,train,cat\nb,train,dog\nc,holdout,cat\nd,test,\n"


@pytest.fixture
def paths(tmp_path):
    paths = DatasetPaths.of(tmp_path, "ds")
    paths.root.mkdir()
    return paths


def _write(paths, text):
    data = text if isinstance(text, bytes) else text.encode()
    paths.split_csv.write_bytes(data)


@pytest.mark.parametrize("text, match", [
    (HEADER + "a,Train,cat\nb,train,dog\n",
     r"split\.csv: line 2: split 'Train' of id 'a' is not one of train, holdout, test \(lower case\); fix the line"),
    (HEADER + GOOD + "e,validation,dog\n", r"split\.csv: line 6: split 'validation' of id 'e' is not one of"),
    (HEADER + GOOD + "c,train,cat\n",
     r"split\.csv: line 6: id 'c' is listed again \(first on line 4\); .*remove one of the two lines"),
    (GOOD, r"split\.csv: line 1: the header must be id,split,label, found 'a,train,cat'; restore that header line"),
    (HEADER + "a,train,cat\nb,train,d\xe9\n", None),  # Latin-1 bytes below
    ("", r"split\.csv: empty; delete it and rerun extract_features\.py"),
    (HEADER + "a,train,\nb,train,dog\n", r"split\.csv: line 2: a train row has no label \(id 'a'\)"),
    (HEADER + "a,train,cat\nb,test,dog\n", r"split\.csv: line 3: a test row has a label \(id 'b'\)"),
    (HEADER + ",train,cat\n", r"split\.csv: line 2: empty id"),
])
def test_split_csv_is_read_strictly(paths, text, match):
    if match is None:  # not UTF-8: a Latin-1 é on line 3
        text, match = text.encode("latin-1"), r"split\.csv: line 3: not UTF-8 text; save it as UTF-8"
    _write(paths, text)
    with pytest.raises(FeatstackError, match=match) as info:
        read_split(paths)
    assert "\n" not in str(info.value)


def test_a_good_split_csv_reads_as_before(paths):
    _write(paths, "\ufeff" + HEADER + GOOD)  # a byte-order mark, as a spreadsheet saves UTF-8
    split = read_split(paths)
    assert split["id"].tolist() == list("abcd") and split["label"].tolist() == ["cat", "dog", "cat", None]


@pytest.mark.parametrize("text, match", [
    ("", r"dataset\.json: empty; restore it, or delete it and rerun extract_features\.py"),
    ('{"name": "ds",\n "classes": [1,]\n}', r"dataset\.json: line 2: invalid JSON \(.*\); restore it"),
    ("[1, 2]", r"dataset\.json: line 1: not a JSON object \(list\)"),
    (b"\xff\xfe{}", r"dataset\.json: not UTF-8 text"),
    ('{"name": "ds", "seed": 0}', r"dataset\.json: no 'layout', 'holdout' \(not what extract_features\.py writes\); "
                                  r"restore it"),
])
def test_dataset_json_is_read_strictly(paths, text, match):
    paths.dataset_json.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(FeatstackError, match=match) as info:
        read_dataset_meta(paths)
    assert "\n" not in str(info.value)


def _table():
    ids = [f"i{k}" for k in range(12)]
    return pd.DataFrame({"id": ids, "path": "", "label": ["cat", "dog"] * 5 + [None, None],
                         "split": [None] * 10 + ["test"] * 2})


def test_extraction_refuses_a_typo_in_split_csv_instead_of_keeping_it(tmp_path):
    """The next extraction read the typo'd split back and kept it for good; now it stops at the line."""
    paths = DatasetPaths.of(tmp_path, "ds")
    resolve_split(paths, _table(), holdout=0.2, seed=0, layout="manifest", data=tmp_path)
    text = paths.split_csv.read_text()
    paths.split_csv.write_text(text.replace(",train,", ",Train,", 1))
    line = next(k for k, row in enumerate(text.splitlines(), 1) if ",train," in row)
    with pytest.raises(FeatstackError, match=rf"split\.csv: line {line}: split 'Train' of id"):
        plan_split(paths, _table(), holdout=0.2, seed=0, layout="manifest", data=tmp_path)


@pytest.fixture
def store(tmp_path):
    return write_synthetic_store(tmp_path / "features", "syn", classes=2, per_class=10, test_rows=3,
                                 widths={"resnet50": 4}, latent=4)


def test_stack_never_sees_an_id_twice_nor_drops_a_typo(store):
    """An id listed twice landed in both the OOF and the holdout predictions; 'Train' dropped rows from every model."""
    split = pd.read_csv(store.split_csv, dtype=str, keep_default_na=False)
    train_id = split.loc[split.split == "train", "id"].iloc[0]
    doubled = pd.concat([split, pd.DataFrame({"id": [train_id], "split": ["holdout"],
                                              "label": [split.loc[split.id == train_id, "label"].iloc[0]]})])
    doubled.to_csv(store.split_csv, index=False)
    with pytest.raises(FeatstackError, match=rf"line {len(split) + 2}: id '{train_id}' is listed again"):
        load_features(store.root)
    split.assign(split=split.split.replace({"train": "Train"})).to_csv(store.split_csv, index=False)
    with pytest.raises(FeatstackError, match=r"split 'Train' of id"):
        load_features(store.root)


def test_exclude_reads_at_most_its_limit(store, tmp_path):
    fs = load_features(store.root)
    big = tmp_path / "big.csv"
    big.write_bytes(b"id\n" + b"x" * EXCLUDE_MAX_BYTES)
    with pytest.raises(FeatstackError, match=r"--exclude .*big\.csv: larger than 16 MiB, far more than a list of ids"):
        exclude_training_rows(fs, big)
    with pytest.raises(FeatstackError, match=r"--exclude /dev/zero: larger than 16 MiB"):
        exclude_training_rows(fs, "/dev/zero")  # read until the memory ran out
    with pytest.raises(FeatstackError, match=r"--exclude .*: a folder; pass a CSV with an id column"):
        exclude_training_rows(fs, tmp_path)
    ok = tmp_path / "ok.csv"
    ok.write_text("id\n" + fs.ids[fs.split == "train"][0] + "\n")
    assert exclude_training_rows(fs, ok)["train_rows"] == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.1", "1", "1.5"])
def test_holdout_outside_zero_to_one_is_one_line(tmp_path, cats_dogs, value, capsys):
    code, out, err = run_main(extract_main, ["--data", cats_dogs, f"--holdout={value}", "--backbones", "vgg16",
                                             "--features-dir", tmp_path / "f", "--no-progress"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert re.fullmatch(rf"error: --holdout {re.escape(str(float(value)))}: must be at least 0 and below 1 .*",
                        lines[0]), lines[0]
    assert not (tmp_path / "f").exists()


def test_holdout_nan_through_the_library_is_one_line_too(tmp_path, cats_dogs, capsys):
    """ExtractConfig(holdout=nan): the detection summary crashed on round(nan) before the refusal could speak."""
    from featstack.extract import ExtractConfig, extract
    with pytest.raises(FeatstackError, match=r"--holdout nan: must be at least 0 and below 1"):
        extract(ExtractConfig(cats_dogs, backbones=["vgg16"], weights="random", image_size=32,
                              holdout=float("nan"), features_dir=tmp_path / "f", progress=False))
    assert "12 labelled (--holdout nan is refused)" in capsys.readouterr().out
    assert not list((tmp_path / "f").rglob("split.csv"))
