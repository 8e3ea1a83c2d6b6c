"""The demo competition through extraction and stacking, and the exploration notebook executed top to bottom."""
import json
import shutil

import nbclient
import nbformat
import pandas as pd
from sklearn.metrics import accuracy_score, log_loss

from featstack.stack import run_stack
from featstack.synthetic import write_synthetic_store

from conftest import ROOT


def test_demo_competition_layout(demo):
    data = demo["data"]
    labels = pd.read_csv(data / "labels.csv", dtype=str)
    sample = pd.read_csv(data / "sample_submission.csv", dtype={"id": str})
    assert len(labels) + len(sample) == 1797 and labels.breed.nunique() == 10
    assert list(sample.columns[1:]) == sorted(labels.breed.unique())
    assert len(list((data / "test").glob("*.jpg"))) == len(sample)
    attrs = demo["summary"].jobs[0].backbone.attrs()
    assert attrs["weights"] == "random"  # recorded, so reports and predictions know


def test_demo_stack_run_matches_sklearn(demo):
    run = demo["run"]
    report = json.loads((run / "report.json").read_text())
    pred = pd.read_csv(run / "holdout_predictions.csv", dtype={"id": str, "label": str})
    classes = list(pred.columns[2:])
    y = pred.label.map(classes.index)
    assert report["holdout"]["accuracy"] == accuracy_score(y, pred[classes].to_numpy().argmax(1))
    assert abs(report["holdout"]["log_loss"] - log_loss(y, pred[classes].to_numpy(), labels=range(10))) < 1e-6
    assert report["holdout"]["accuracy"] > 0.8  # even random-weight CNN features separate the digits


def test_notebook_plots_inline_and_opens_a_run_of_its_own_dataset(demo, tmp_path, monkeypatch):
    # A newer run of another dataset sits beside the demo's: the notebook must still open the demo's run.
    models = tmp_path / "models"
    shutil.copytree(demo["run"], models / demo["run"].name)
    other = write_synthetic_store(tmp_path / "features", "other", classes=3, per_class=12, test_rows=4)
    other_run = run_stack(other.root, model="logreg", folds=2, models_dir=models, run_id="zz-other-newest")
    monkeypatch.setenv("FEATSTACK_FEATURES", str(demo["features"]))
    monkeypatch.setenv("FEATSTACK_MODELS", str(models))
    monkeypatch.delenv("FEATSTACK_RUN", raising=False)
    nb = nbformat.read(ROOT / "notebooks" / "explore_features.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"run: {demo['run'].name}" in text and other_run.name not in text
    report = json.loads((demo["run"] / "report.json").read_text())
    # class balance, image sizes, PCA, and the most-confused pair's examples when the holdout has one
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3 + bool(report["holdout"]["most_confused"])
