"""predict.py: the run's own pipeline, proven by reproducing its holdout predictions; refusals and bad photos."""
import json
import time

import numpy as np
import pandas as pd
import pytest

from featstack.commands.predict import main as predict_main
from featstack.errors import FeatstackError
from featstack.extract import ExtractConfig, extract
from featstack.predict import Predictor
from featstack.stack import run_stack

from conftest import make_weights_dir, run_main


def test_holdout_photos_reproduce_holdout_predictions(demo):
    holdout = pd.read_csv(demo["run"] / "holdout_predictions.csv", dtype={"id": str, "label": str})
    classes = list(holdout.columns[2:])
    predictor = Predictor(demo["run"])
    assert predictor.classes == classes
    paths = [str(demo["data"] / "train" / f"{i}.jpg") for i in holdout.id]
    got = np.stack([p for _, p, _ in predictor.predict(paths, batch_size=50)])
    np.testing.assert_allclose(got, holdout[classes].to_numpy(), atol=2e-5)


def test_cli_top5_json_and_a_bad_photo(demo, tmp_path, capsys):
    # main() in this process: predict.py only calls it, and a subprocess would pay TensorFlow's import again.
    photos = sorted((demo["data"] / "test").glob("*.jpg"))[:3]
    code, out, err = run_main(predict_main, [*photos, "--run", demo["run"]], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith(str(photos[0])) and lines[0].count(" | ") == 4
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    code, out, err = run_main(predict_main, [photos[0], bad, photos[1], "--run", demo["run"], "--json"], capsys)
    assert code == 1
    assert f"error: {bad}: cannot read this photo" in err
    records = json.loads(out)
    assert [r["path"] for r in records] == [str(photos[0]), str(bad), str(photos[1])]
    good = [r for r in records if "predictions" in r]
    assert len(good) == 2 and "error" in records[1]
    for r in good:
        probs = [p["probability"] for p in r["predictions"]]
        assert len(probs) == 10 and abs(sum(probs) - 1) < 1e-6 and probs == sorted(probs, reverse=True)


def test_folder_argument_means_every_image(demo):
    predictor = Predictor(demo["run"])
    from featstack.predict import expand
    assert len(expand([str(demo["data"] / "test")])) == len(list((demo["data"] / "test").glob("*.jpg")))
    assert predictor.backbones[0].model is not None  # models are built once, at load


def test_refuses_other_weights(tmp_path, cats_dogs):
    weights = make_weights_dir(tmp_path / "w", ["vgg16"], 32)
    s = extract(ExtractConfig(cats_dogs, backbones=["vgg16"], weights=str(weights), image_size=32,
                              features_dir=tmp_path / "f", holdout=0, progress=False))
    run = run_stack(s.paths.root, folds=2, models_dir=tmp_path / "m")
    Predictor(run)  # the same weights: accepted
    file = next(weights.iterdir())
    make_weights_dir(tmp_path / "other", ["vgg16"], 32, seed=2000)  # another seed, the same canonical name
    file.write_bytes((tmp_path / "other" / file.name).read_bytes())
    with pytest.raises(FeatstackError,
                       match=r"vgg16: .* has sha256 .* but the run was trained on weights with sha256"):
        Predictor(run)
    file.unlink()
    with pytest.raises(FeatstackError,
                       match=r"vgg16: weights file vgg16_weights_tf_dim_ordering_tf_kernels_notop\.h5 "
                             r"is missing"):
        Predictor(run)


def test_cli_says_each_step_before_it_starts_and_while_a_slow_build_runs(demo, capsys, monkeypatch):
    # Issue #32: predict.py was silent 35-40 s before its first line on a loaded machine. Each model's build takes
    # 0.3 s here, the heartbeat's interval is 0.05 s.
    from featstack import backbones as bb
    from featstack import heartbeat
    monkeypatch.setattr(heartbeat, "INTERVAL", 0.05)
    monkeypatch.setattr(heartbeat, "ANNOUNCE_AFTER", 0)  # quick steps too are named: a loaded machine makes them slow
    build, told = bb.Backbone.build, []

    def slow_build(self):
        told.append(capsys.readouterr().err)  # what the user had been told when this build began
        time.sleep(0.3)
        return build(self)

    monkeypatch.setattr(bb.Backbone, "build", slow_build)
    photo = sorted((demo["data"] / "test").glob("*.jpg"))[0]
    code, out, err = run_main(predict_main, [photo, "--run", demo["run"]], capsys)
    assert code == 0 and out.startswith(str(photo)), err
    first = told[0].splitlines()
    assert first[0] == "loading the prediction libraries …"  # before anything slow, even the imports
    assert f"loading run {demo['run'].name} …" in first
    assert first[-1] == "loading resnet50 model (32 px, random weights) …"
    assert told[1].splitlines()[0].startswith("still loading resnet50 model (32 px, random weights) (")
    assert told[1].splitlines()[-1] == "loading vgg16 model (32 px, random weights) …"
    assert err.splitlines()[0].startswith("still loading vgg16 model")
    assert "predicting 1 photo …" in err.splitlines()
