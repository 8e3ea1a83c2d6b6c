"""The demo competition through extraction and stacking, and the exploration notebook run as the README says."""
import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import accuracy_score, log_loss

from featstack.demo import CLASS_NAMES
from featstack.layouts import class_order
from featstack.stack import run_stack
from featstack.store import read_attrs
from featstack.synthetic import write_synthetic_store

from conftest import ROOT


def test_demo_competition_layout(demo):
    data = demo["data"]
    labels = pd.read_csv(data / "labels.csv", dtype=str)
    sample = pd.read_csv(data / "sample_submission.csv", dtype={"id": str})
    assert len(labels) + len(sample) == 1797 and labels.breed.nunique() == 10
    assert list(sample.columns[1:]) == class_order(labels.breed.unique())  # zero, one, ... nine
    assert len(list((data / "test").glob("*.jpg"))) == len(sample)
    entries = sorted(demo["features"].glob("*.h5"))
    assert len(entries) == 2 and all(read_attrs(e)["weights"] == "random" for e in entries)  # recorded, so reports
    # and predictions know


def test_demo_stack_run_matches_sklearn(demo):
    run = demo["run"]
    report = json.loads((run / "report.json").read_text())
    pred = pd.read_csv(run / "holdout_predictions.csv", dtype={"id": str, "label": str})
    classes = list(pred.columns[2:])
    y = pred.label.map(classes.index)
    assert report["holdout"]["accuracy"] == accuracy_score(y, pred[classes].to_numpy().argmax(1))
    assert abs(report["holdout"]["log_loss"] - log_loss(y, pred[classes].to_numpy(), labels=range(10))) < 1e-6
    assert report["holdout"]["accuracy"] > 0.8  # even random-weight CNN features separate the digits


def test_notebook_runs_as_the_readme_says_with_legend_and_own_colours(demo, tmp_path, monkeypatch):
    # A newer run of another dataset sits beside the demo's: the notebook must still open the demo's run.
    models = tmp_path / "models"
    shutil.copytree(demo["run"], models / demo["run"].name)
    other = write_synthetic_store(tmp_path / "features", "other", classes=3, per_class=12, test_rows=4)
    other_run = run_stack(other.root, model="logreg", folds=2, models_dir=models, run_id="zz-other-newest")
    env = {**os.environ, "FEATSTACK_FEATURES": str(demo["features"]), "FEATSTACK_MODELS": str(models)}
    env.pop("FEATSTACK_RUN", None)
    # The README's command, from the repository root, into a page with the plots inline.
    proc = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--execute",
                           "--ExecutePreprocessor.timeout=300", "notebooks/explore_features.ipynb",
                           "--output-dir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = (tmp_path / "explore_features.html").read_text()
    assert f"run: {demo['run'].name}" in page and other_run.name not in page
    report = json.loads((demo["run"] / "report.json").read_text())
    # class balance, image sizes, PCA, and the most-confused pair's examples when the holdout has one
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(pngs) == 3 + bool(report["holdout"]["most_confused"])
    legend = re.search(r"legend: ([^<\n]+)", page).group(1)
    assert set(legend.split(", ")) == set(CLASS_NAMES)  # every digit named in the PCA legend
    if report["holdout"]["most_confused"]:
        # The digits are greyscale files: drawn in grey, not in a false-colour palette (every pixel R = G = B).
        examples = np.asarray(Image.open(io.BytesIO(base64.b64decode(pngs[-1]))).convert("RGB")).astype(int)
        assert np.abs(np.diff(examples, axis=2)).max() <= 2


def test_demo_extracts_the_measured_light_backbones_unless_told(tmp_path, monkeypatch):
    # README "Quick start": resnet50, inception_v3 and efficientnet_b0 at 75 px (chosen by benchmarks/bench_demo.py).
    from featstack import backbones as bb
    from featstack import demo as demo_competition
    from featstack.errors import FeatstackError
    from featstack.extract import ExtractConfig, extract
    asked = []

    def resolve(names, **kwargs):
        asked.append((list(names), kwargs["image_size"]))
        raise FeatstackError("stop here: only the choice is tested")
    monkeypatch.setattr(bb, "resolve", resolve)
    for backbones, size in ((None, None), (["vgg16"], 48)):
        with pytest.raises(FeatstackError, match="stop here"):
            extract(ExtractConfig(tmp_path / "data", demo=True, backbones=backbones, image_size=size,
                                  features_dir=tmp_path / "features", progress=False))
    assert asked == [(["resnet50", "inception_v3", "efficientnet_b0"], 75), (["vgg16"], 48)]
    assert demo_competition.BACKBONES == ("resnet50", "inception_v3", "efficientnet_b0")
