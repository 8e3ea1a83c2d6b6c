"""The demo competition through extraction and stacking, and the exploration notebook executed top to bottom."""
import json

import nbclient
import nbformat
import pandas as pd
from sklearn.metrics import accuracy_score, log_loss

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


def test_notebook_executes(demo, monkeypatch):
    monkeypatch.setenv("FEATSTACK_FEATURES", str(demo["features"]))
    monkeypatch.setenv("FEATSTACK_RUN", str(demo["run"]))
    nb = nbformat.read(ROOT / "notebooks" / "explore_features.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert demo["run"].name in outputs
