"""Prediction stage: photos -> the run's exact feature pipeline -> its fitted model -> top-k classes."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import joblib
import numpy as np

from .backbones import Backbone, keras_cache_dir, run_backbones, sha256_of
from .decode import decode_batch, is_image_file
from .errors import FeatstackError
from .stack import newest_run


def backbone_from_attrs(attrs: dict) -> Backbone:
    """The Backbone a feature file was made with, rebuilt from the attributes the file records."""
    return Backbone(name=attrs["backbone"], input_size=int(attrs["input_size"]), preprocess=attrs["preprocess"],
                    pooling=attrs["pooling"], tta=attrs["tta"], precision=attrs["precision"], weights=attrs["weights"],
                    weights_file=attrs.get("weights_file") or None, weights_sha256=attrs.get("weights_sha256") or None,
                    seed=int(attrs.get("weights_seed", 0)), model_path=attrs.get("model_path") or None,
                    layer=attrs.get("layer") or None, width=int(attrs.get("width", 0)) or None)


def check_weights(b: Backbone, attrs: dict) -> None:
    """Refuse to predict from other weights than the run was trained on: other weights make other features."""
    import keras
    if b.weights == "random":
        if attrs.get("keras_backend") != keras.backend.backend():
            raise FeatstackError(f"{b.name}: the run used random weights drawn by the {attrs.get('keras_backend')} "
                                 f"backend; this is {keras.backend.backend()}. Set KERAS_BACKEND={attrs.get('keras_backend')}")
        return
    path = Path(b.weights_file) if b.weights != "imagenet" else keras_cache_dir() / Path(b.weights_file).name
    if not path.is_file():
        where = f"{keras_cache_dir()} (Keras's cache)" if b.weights == "imagenet" else str(path.parent)
        raise FeatstackError(f"{b.name}: weights file {path.name} is missing; the run was trained with sha256 "
                             f"{b.weights_sha256[:12]}…; put that exact file in {where}")
    sha = sha256_of(path)
    if sha != b.weights_sha256:
        raise FeatstackError(f"{b.name}: {path} has sha256 {sha[:12]}…, but the run was trained on weights with sha256 "
                             f"{b.weights_sha256[:12]}…; predicting from other weights would give wrong answers. "
                             "Restore the original file or train a new run on features from these weights")
    b.weights_file = str(path)


def expand(photos: list[str]) -> list[str]:
    out = []
    for p in photos:
        path = Path(p)
        if path.is_dir():
            out += [str(q) for q in sorted(path.iterdir()) if is_image_file(q)]
        else:
            out.append(p)  # missing or unreadable files are reported per photo by the decoder
    if not out:
        raise FeatstackError(f"no photos given (folders searched: {', '.join(photos)})")
    return out


class Predictor:
    """A run's backbones and fitted model, loaded once, answering batches of photos."""

    def __init__(self, run: str | Path | None = None, models_dir: str | Path = "models"):
        self.run = Path(run) if run else newest_run(models_dir)
        config_path = self.run / "config.json"
        if not config_path.is_file():
            raise FeatstackError(f"--run {self.run}: not a stack.py run folder (no config.json)")
        self.config = json.loads(config_path.read_text())
        fitted = joblib.load(self.run / "model.joblib")
        self.estimator, self.classes = fitted["estimator"], fitted["classes"]
        self.backbones = []
        for name in self.config["backbones"]:
            attrs = self.config["feature_files"][name]
            b = backbone_from_attrs(attrs)
            check_weights(b, attrs)
            self.backbones.append(b)
        if any(b.weights == "random" for b in self.backbones):
            print(f"note: run {self.run.name} was trained on features of RANDOM weights (a smoke test or the offline "
                  "demo); its answers mean nothing for real photos", file=sys.stderr)
        for b in self.backbones:
            b.build()

    def predict(self, paths: list[str], batch_size: int = 32) -> list[tuple[str, np.ndarray | None, str | None]]:
        """(path, probabilities in self.classes order or None, error or None) for every path, in order."""
        sizes = tuple(sorted({b.input_size for b in self.backbones}))
        results = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            arrays, errors = decode_batch(chunk, sizes)
            proba = None
            if any(e is None for e in errors):
                X = np.hstack(run_backbones(self.backbones, arrays)[0])
                proba = self.estimator.predict_proba(X)
            k = 0
            for path, err in zip(chunk, errors):
                if err is None:
                    results.append((path, proba[k], None))
                    k += 1
                else:
                    results.append((path, None, err))
        return results


def predict(photos: list[str], *, run: str | Path | None = None, top: int = 5, as_json: bool = False,
            batch_size: int = 32, models_dir: str | Path = "models") -> int:
    """Print the top classes of every photo; returns the number of photos that could not be answered."""
    if top < 1:
        raise FeatstackError(f"--top {top}: must be at least 1")
    paths = expand(photos)
    predictor = Predictor(run, models_dir)
    classes = np.array(predictor.classes)
    failed = 0
    records = []
    for path, proba, err in predictor.predict(paths, batch_size):
        if err is not None:
            failed += 1
            print(f"error: {path}: cannot read this photo ({err})", file=sys.stderr)
            records.append({"path": path, "error": err})
            continue
        order = np.argsort(-proba, kind="stable")
        if as_json:
            records.append({"path": path, "predictions": [{"class": str(classes[i]), "probability": float(proba[i])}
                                                          for i in order]})
        else:
            print(f"{path}  " + " | ".join(f"{classes[i]} {proba[i]:.2f}" for i in order[:top]))
    if as_json:
        print(json.dumps(records, indent=1))
    return failed
