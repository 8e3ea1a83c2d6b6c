"""Stacker: every model end to end, reports equal sklearn's numbers, no leakage, bad input refused."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, classification_report, log_loss, top_k_accuracy_score

from featstack.commands.stack import main as stack_main
from featstack.errors import FeatstackError
from featstack.paths import RunPaths
from featstack.stack import list_runs, run_stack
from featstack.synthetic import write_synthetic_store

from conftest import ROOT, run_main, set_attrs

FILES = ["model.joblib", "config.json", "oof_predictions.csv", "holdout_predictions.csv", "test_predictions.csv",
         "report.json", "report.md", "confusion.png"]


@pytest.fixture
def store(tmp_path):
    return write_synthetic_store(tmp_path / "features", "synth", classes=7, per_class=25)


@pytest.mark.parametrize("model, level2", [("logreg", "logreg"), ("lgbm", "logreg"), ("stack", "pool"),
                                           ("stack", "logreg"), ("stack", "lgbm"), ("avg", "logreg")])
def test_every_model_end_to_end(tmp_path, store, model, level2):
    run = RunPaths(run_stack(store.root, model=model, level2=level2, models_dir=tmp_path / "models"))
    assert sorted(p.name for p in run.root.iterdir()) == sorted(FILES)
    report = json.loads(run.report_json.read_text())
    assert report["holdout"]["accuracy"] > 0.8, report["holdout"]  # separable classes are learned
    test = pd.read_csv(run.test_csv, dtype={"id": str})
    split = pd.read_csv(store.split_csv, dtype=str)
    assert sorted(test.id) == sorted(split.id[split.split == "test"])
    assert list(test.columns) == ["id"] + [f"class_{k:03d}" for k in range(7)]
    np.testing.assert_allclose(test.iloc[:, 1:].sum(axis=1), 1, atol=1e-6)
    oof = pd.read_csv(run.oof_csv, dtype={"id": str})
    assert sorted(oof.id) == sorted(split.id[split.split == "train"])
    config = json.loads(run.config_json.read_text())
    assert (config["backbones"] == ["resnet50", "vgg16"] and config["folds"] == 5
            and "scikit-learn" in config["versions"])


def test_report_equals_sklearn_on_saved_predictions(tmp_path, store):
    run = RunPaths(run_stack(store.root, model="logreg", models_dir=tmp_path))
    report = json.loads(run.report_json.read_text())["holdout"]
    pred = pd.read_csv(run.holdout_csv, dtype={"id": str, "label": str})
    classes = list(pred.columns[2:])
    y = pred.label.map(classes.index).to_numpy()
    proba = pred[classes].to_numpy()
    assert report["accuracy"] == pytest.approx(accuracy_score(y, proba.argmax(1)), abs=1e-12)
    assert report["log_loss"] == pytest.approx(log_loss(y, proba, labels=range(len(classes))), abs=1e-6)
    assert report["top5_accuracy"] == pytest.approx(top_k_accuracy_score(y, proba, k=5, labels=range(len(classes))))
    sk = classification_report(y, proba.argmax(1), target_names=classes, output_dict=True, zero_division=0)
    for c in classes:
        assert report["per_class"][c] == pytest.approx(sk[c])
    assert report["averages"]["macro"] == pytest.approx(sk["macro avg"])
    assert report["averages"]["weighted"] == pytest.approx(sk["weighted avg"])
    assert report["averages"]["micro"]["f1-score"] == pytest.approx(sk["accuracy"])


def test_out_of_fold_predictions_do_not_leak(tmp_path):
    store = write_synthetic_store(tmp_path / "f", "noise", classes=4, per_class=60, widths={"resnet50": 400},
                                  random_labels=True)
    run = RunPaths(run_stack(store.root, model="logreg", models_dir=tmp_path / "m"))
    cv = json.loads(run.report_json.read_text())["cv"]
    assert cv["accuracy"] < 0.40, cv  # chance is 0.25
    import joblib

    from featstack.features import load_features
    fs = load_features(store.root)
    train = fs.rows("train")
    est = joblib.load(run.model_joblib)["estimator"]
    fit_acc = (np.array(fs.classes)[est.predict(fs.matrix[train])] == fs.labels[train]).mean()
    assert fit_acc > 0.95, fit_acc  # the model memorises its training rows; OOF does not see them


def _drop_ids(store):
    path = store.entry_file("vgg16_synthetic")
    with h5py.File(path, "r") as f:
        ids, feats, attrs = f["ids"].asstr()[:], f["features"][:], dict(f.attrs)
    with h5py.File(path, "w") as f:
        f["ids"] = np.asarray(ids[3:], dtype=object).astype("S")
        f["features"] = feats[3:]
        f.attrs.update({**attrs, "rows": len(ids) - 3})


def _truncate(store):
    path = store.entry_file("resnet50_synthetic")
    path.write_bytes(path.read_bytes()[:2000])


def _few_in_class(store):
    split = pd.read_csv(store.split_csv, dtype=str, keep_default_na=False)
    rows = split.index[(split.label == "class_000") & (split.split == "train")][3:]
    split.loc[rows, "label"] = "class_001"
    split.to_csv(store.split_csv, index=False)


def _no_labels(store):
    split = pd.read_csv(store.split_csv, dtype=str, keep_default_na=False)
    split["label"], split["split"] = "", "test"
    split.to_csv(store.split_csv, index=False)


def _holdout_only_class(store):
    """A manifest that puts one class only in the holdout."""
    split = pd.read_csv(store.split_csv, dtype=str, keep_default_na=False)
    split.loc[split.label == "class_000", "split"] = "holdout"
    split.to_csv(store.split_csv, index=False)


@pytest.mark.parametrize("mutate, kwargs, match", [
    (_drop_ids, {}, r"vgg16_synthetic\.h5: 3 of 195 ids of split\.csv have no vgg16 features; .*--allow-missing"),
    (_truncate, {}, r"resnet50_synthetic\.h5: damaged or unreadable feature file .*extract_features\.py"),
    (_few_in_class, {}, r"class 'class_000' has 3 training rows, fewer than --folds 5"),
    (_no_labels, {}, r"no labelled training rows"),
    (None, {"backbones": ["xception"]},
     r"'xception' is not cached in .*; cached: resnet50 \(resnet50_synthetic\), vgg16"),
    (None, {"model": "svm"}, r"--model svm: choose one of logreg, lgbm, stack, avg"),
    (None, {"model": "stack", "level2": "svm"}, r"--level2 svm: choose one of pool, logreg, lgbm"),
    (_holdout_only_class, {}, r"split\.csv: class 'class_000' has holdout rows but no training rows; put some"),
    (None, {"model": "stack", "members": ["concat", "xception"]},
     r"--members xception: choose from backbones, concat, lgbm or a backbone \(resnet50, vgg16\)"),
    (None, {"model": "logreg", "members": ["concat"]}, r"--members applies to --model stack, blend or avg"),
])
def test_bad_input(tmp_path, store, mutate, kwargs, match):
    if mutate:
        mutate(store)
    with pytest.raises(FeatstackError, match=match):
        run_stack(store.root, models_dir=tmp_path / "models", **kwargs)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_allow_missing_uses_the_intersection(tmp_path, store):
    _drop_ids(store)
    run = RunPaths(run_stack(store.root, allow_missing=True, models_dir=tmp_path))
    rows = json.loads(run.report_json.read_text())["rows"]
    assert sum(rows.values()) == 192


def test_existing_run_folder_is_not_overwritten(tmp_path, store):
    run = run_stack(store.root, run_id="mine", models_dir=tmp_path)
    before = (run / "report.json").read_text()
    with pytest.raises(FeatstackError, match=r"run folder .*mine already exists"):
        run_stack(store.root, run_id="mine", model="avg", models_dir=tmp_path)
    assert (run / "report.json").read_text() == before


def test_refuses_to_mix_configurations(tmp_path, store):
    path = store.entry_file("vgg16_synthetic")
    set_attrs(path, pooling="max")
    with pytest.raises(FeatstackError, match=r"different pooling: resnet50=avg, vgg16=max"):
        run_stack(store.root, models_dir=tmp_path)


def test_cli_last_line_is_run_folder_and_list_is_best_first(tmp_path, store, capsys):
    # The script once as a subprocess (what a shell's $(stack.py ... | tail -1) reads), then main() in this process.
    proc = subprocess.run([sys.executable, str(ROOT / "stack.py"), "--features", str(store.root), "--model", "avg",
                           "--models-dir", str(tmp_path)], capture_output=True, text=True, check=True)
    out = [proc.stdout.strip().splitlines()[-1]]
    code, stdout, _ = run_main(stack_main, ["--features", store.root, "--model", "logreg", "--models-dir", tmp_path],
                               capsys)
    out.append(stdout.strip().splitlines()[-1])
    assert code == 0 and all((tmp_path / o.split("/")[-1] / "report.json").exists() for o in out)
    table = list_runs(tmp_path, store.root)
    assert list(table.cv_log_loss) == sorted(table.cv_log_loss) and len(table) == 2
    code, stdout, _ = run_main(stack_main, ["--list", "--models-dir", tmp_path], capsys)
    assert code == 0 and "cv_log_loss" in stdout and all(o.split("/")[-1] in stdout for o in out)


def test_stack_members_level2_and_progress_in_console_and_report(tmp_path, store, capsys):
    """The concatenation is a member by default; a logreg level 2's C, the members and the CV figure's kind are
    reported; every phase says what it is doing (fold k of n, refit, level 2)."""
    run = RunPaths(run_stack(store.root, model="stack", level2="logreg", models_dir=tmp_path))
    out = capsys.readouterr().out
    report = json.loads(run.report_json.read_text())
    assert report["members"] == ["resnet50", "vgg16", "concat"]
    assert report["level2"]["C"] in [float(k) for k in report["level2"]["grid"]]
    assert report["cv"]["estimate"] == "optimistic: level 2's C chosen on it"
    for line in ["stack resnet50: fold 1 of 5 done", "stack concat: refit on all rows done", "stack: member 3 of 3",
                 "stack level 2: fold 5 of 5 done", "stack: level 2 done", "predicting ", "writing "]:
        assert line in out, line
    md = run.report_md.read_text()
    assert "level 2: logreg on the members' log-probabilities" in md and "members: resnet50, vgg16, concat" in md


def test_stack_default_level2_is_the_pool_with_its_weights_reported(tmp_path, store, capsys):
    """stack.py's default level 2 pools the members log-linearly: a weight >= 0 per member in report.json, the console
    and report.md, with the cap on their sum; nothing is chosen on its CV (weights and cap chosen inside each fold),
    so the figure is nested."""
    from featstack.commands import stack as stack_command
    stack_command.main(["--features", str(store.root), "--model", "stack", "--models-dir", str(tmp_path),
                        "--run-id", "pooled"])
    run = RunPaths(tmp_path / "pooled")
    out = capsys.readouterr().out
    report = json.loads(run.report_json.read_text())
    assert report["level2"]["model"] == "pool" and "C" not in report["level2"]
    weights = report["level2"]["weights"]
    assert list(weights) == report["members"] == ["resnet50", "vgg16", "concat"]
    assert all(w >= 0 for w in weights.values()) and max(weights.values()) > 0
    # the cap on the weights' sum, chosen by an inner CV inside each fold and for the refit (issue #31)
    from featstack.blend import POOL_CAPS
    cap = report["level2"]["cap"]
    assert cap in POOL_CAPS and sum(weights.values()) <= cap + 1e-9
    assert f"cap {cap:g}: chosen inside the CV)" in run.report_md.read_text()
    assert report["cv"]["estimate"] == "nested"
    assert json.loads(run.config_json.read_text())["level2"] == "pool"
    line = "level 2 pooling weights (one per member, >= 0): resnet50 "
    assert line in out and line in run.report_md.read_text()
    assert "level 2: pool on the members' log-probabilities" in run.report_md.read_text()


def test_members_option_chooses_them(tmp_path, store):
    run = RunPaths(run_stack(store.root, model="blend", members=["vgg16", "lgbm"], models_dir=tmp_path))
    assert sorted(json.loads(run.report_json.read_text())["blend_weights"]) == ["lgbm", "vgg16"]


def test_top5_left_out_with_five_classes_or_fewer(tmp_path, capsys):
    store = write_synthetic_store(tmp_path / "f", "s", classes=4, per_class=20)
    run = RunPaths(run_stack(store.root, models_dir=tmp_path / "m"))
    report = json.loads(run.report_json.read_text())
    assert "top5_accuracy" not in report["cv"] and "top5_accuracy" not in report["holdout"]
    assert "top-5" not in run.report_md.read_text() and "top-5" not in capsys.readouterr().out


def test_list_shows_what_makes_runs_comparable(tmp_path, store, capsys):
    run_stack(store.root, models_dir=tmp_path, run_id="plain")
    ids = pd.read_csv(store.split_csv, dtype=str).query("split == 'train'").id[:5]
    (tmp_path / "bad.csv").write_text("id\n" + "\n".join(ids) + "\n")
    run_stack(store.root, models_dir=tmp_path, run_id="excl", C="auto", exclude=tmp_path / "bad.csv")
    config = RunPaths(tmp_path / "plain").config_json
    # every run records the labels' digest in config.json (trained_on); --list shows its first 8 hex digits
    config.write_text(json.dumps({**json.loads(config.read_text()),
                                  "trained_on": {"rows": 140, "labels_sha256": "abcdef0123456789"}}))
    table = list_runs(tmp_path, store.root).set_index("id")
    assert table.loc["plain", "train_rows"] - 5 == table.loc["excl", "train_rows"]
    assert table.loc["plain", "exclude"] == "-" and table.loc["excl", "exclude"] == "bad.csv (5)"
    assert table.loc["plain", "C"] == "1" and table.loc["excl", "C"].startswith("auto:")
    excl = json.loads(RunPaths(tmp_path / "excl").config_json.read_text())["trained_on"]["labels_sha256"]
    assert table.loc["plain", "labels"] == "abcdef01" and table.loc["excl", "labels"] == excl[:8]
    assert table.loc["plain", "cv_estimate"] == "nested" and table.loc["excl", "cv_estimate"] == "optimistic"
    assert "not comparable" in capsys.readouterr().out


def test_help_recommends_stack_for_a_final_submission(capsys):
    """Issue #32: the default is the quick loop (logreg); --help says which model to submit."""
    with pytest.raises(SystemExit):
        stack_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default logreg: the quick loop to rerun). For a final submission use stack" in text
