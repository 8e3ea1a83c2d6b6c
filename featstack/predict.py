"""Prediction stage: photos -> the run's exact feature pipeline -> its fitted model -> top-k classes."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import joblib
import numpy as np

from . import hub
from .backbones import Backbone, keras_cache_dir, resolve, run_backbones, sha256_of
from .decode import decode_batch, empty, is_image_file
from .errors import FeatstackError
from .heartbeat import heartbeat, printer
from .stack import RUN_CONFIG_KEYS, newest_run, read_run_json
from .store import attrs_damage


def backbone_from_attrs(attrs: dict) -> Backbone:
    """The Backbone a feature file was made with, rebuilt from the attributes the file records."""
    if attrs.get("preset"):
        return _hub_from_attrs(attrs)
    return Backbone(name=attrs["backbone"], input_size=int(attrs["input_size"]), preprocess=attrs["preprocess"],
                    pooling=attrs["pooling"], tta=attrs["tta"], precision=attrs["precision"], weights=attrs["weights"],
                    weights_file=attrs.get("weights_file") or None, weights_sha256=attrs.get("weights_sha256") or None,
                    seed=int(attrs.get("weights_seed", 0)), model_path=attrs.get("model_path") or None,
                    layer=attrs.get("layer") or None, width=int(attrs.get("width", 0)) or None)


def _hub_from_attrs(attrs: dict) -> Backbone:
    """A hub backbone: the preset is found again (its folder, or keras-hub's download) and must be the same files."""
    name, preset = attrs["backbone"], attrs["preset"]
    b = resolve([hub.PREFIX + preset], weights="preset", pooling=attrs["pooling"], tta=attrs["tta"],
                precision=attrs["precision"])[0]
    if b.weights_sha256 != attrs.get("weights_sha256"):
        trained = json.loads(attrs.get("preset_files") or "{}")
        changed = sorted(set(trained.items()) ^ set(b.hub_facts.files.items()))
        raise FeatstackError(f"{name}: the preset at {b.hub_facts.folder} is not the one the run was trained on "
                             f"(differs in {', '.join(sorted({f for f, _ in changed}))}); predicting from other "
                             "weights would give wrong answers. Attach the original preset or train a new run")
    b.name = name
    return b


def check_weights(b: Backbone, attrs: dict) -> None:
    """Refuse to predict from other weights than the run was trained on: other weights make other features."""
    import keras
    if b.preset:
        return  # checked file by file when it was resolved
    if b.weights == "random":
        if attrs.get("keras_backend") != keras.backend.backend():
            raise FeatstackError(f"{b.name}: the run used random weights drawn by the {attrs.get('keras_backend')} "
                                 f"backend; this is {keras.backend.backend()}. "
                                 f"Set KERAS_BACKEND={attrs.get('keras_backend')}")
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
        elif not path.exists() and not path.is_symlink():  # checked before seconds go into loading backbones
            raise FeatstackError(f"{p}: no such file or folder; check the photo's path")
        else:
            out.append(p)  # unreadable files (and dangling links) are reported per photo by the decoder
    if not out:
        raise FeatstackError(f"no photos given (folders searched: {', '.join(photos)})")
    return out


def check_model_file(run: Path, config: dict) -> None:
    """Refuse a model.joblib other than the one stack.py wrote (the sha256 its config.json records) before anything
    unpickles it. A run folder written before the sha256 was recorded is loaded with a warning: the record guards
    against a changed or swapped file, not against a folder made by someone else (see the README on trusting run
    folders), so refusing old folders would protect nothing."""
    path = run / "model.joblib"
    recorded = config.get("model_sha256")
    if recorded is None:
        print(f"warning: {run / 'config.json'} records no sha256 of model.joblib (a run from before featstack "
              "recorded it): loaded unchecked; rerun stack.py to have it checked", file=sys.stderr)
        return
    if path.exists() and not path.is_file():
        # a device or named pipe (e.g. a link to /dev/zero) would be hashed for ever instead of refused
        raise FeatstackError(f"{path}: not a regular file; rebuild the run with: {rebuild_run_command(config)}")
    try:
        sha = sha256_of(path)
    except OSError as exc:
        raise FeatstackError(f"{path}: cannot be read ({exc.strerror or exc}); rebuild the run with: "
                             f"{rebuild_run_command(config)}") from None
    if sha != recorded:
        raise FeatstackError(f"{path}: damaged or unreadable (sha256 {sha[:12]}… is not the {str(recorded)[:12]}… "
                             "that config.json records: the model file was changed or replaced after stack.py wrote "
                             "it, and loading a pickle runs its code, so it is not loaded); rebuild the run with: "
                             f"{rebuild_run_command(config)}")


def load_fitted(run: Path, config: dict):
    """The run's fitted estimator and classes, or one line naming a damaged model.joblib and how to rebuild it."""
    path = run / "model.joblib"
    check_model_file(run, config)
    try:
        fitted = joblib.load(path)
        return fitted["estimator"], fitted["classes"]
    except Exception as exc:  # a truncated pickle fails in many ways (EOFError, UnpicklingError, KeyError, ...)
        raise FeatstackError(f"{path}: damaged or unreadable ({type(exc).__name__}); rebuild the run with: "
                             f"{rebuild_run_command(config)}") from None


def rebuild_run_command(config: dict) -> str:
    return (f"stack.py --features {config.get('features_dir')} --model {config.get('model')} "
            f"--backbones {','.join(config.get('backbones') or [])}")


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch shapes a server compiles: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ... (powers of two and 1.5 times them)
    below ``max_batch``, and ``max_batch``. A batch is padded to the next one, so at most a third of a forward pass
    is padding, and every shape is compiled once, at start."""
    sizes, k = {max_batch}, 1
    while k < max_batch:
        sizes.add(k)
        if k >= 2 and k * 3 // 2 < max_batch:
            sizes.add(k * 3 // 2)
        k *= 2
    return tuple(sorted(sizes))


def _count_traces(model) -> None:
    """Count in ``model._featstack_traces`` each time the backend traces (compiles) its forward pass."""
    if hasattr(model, "_featstack_traces"):
        return
    step = model.predict_step

    def counted(*args, **kwargs):
        model._featstack_traces += 1
        return step(*args, **kwargs)

    model._featstack_traces = 0
    model.predict_step = counted  # read by Keras's predict function each time it traces


class Predictor:
    """A run's backbones and fitted model, loaded once, answering batches of photos.

    With ``max_batch``, every batch is padded with blank rows to the next of a fixed set of shapes (batch_buckets),
    and the padding's rows are dropped from the answer: a server compiles each shape once, in ``warm()``, instead
    of on the first request of each new size (where the backend compiles any size once it has seen two, as
    TensorFlow does, warm() finds so and stops padding). ``traces`` counts the forward passes compiled (Python
    runs a model's predict_step only while TensorFlow or JAX traces it), so a compile after start can be seen.
    """

    def __init__(self, run: str | Path | None = None, models_dir: str | Path = "models", max_batch: int | None = None,
                 say: Callable[[str], None] | None = None):
        self.run = Path(run) if run else newest_run(models_dir)
        config_path = self.run / "config.json"
        if not config_path.is_file():
            raise FeatstackError(f"--run {self.run}: not a stack.py run folder (no config.json)")
        self.config = read_run_json(config_path, RUN_CONFIG_KEYS)
        for name in self.config["backbones"]:
            if not isinstance(self.config["feature_files"].get(name), dict):
                raise FeatstackError(f"{config_path}: damaged or unreadable (no feature_files entry for backbone "
                                     f"{name!r}); remove the run folder {self.run} and rerun stack.py to rebuild it")
        say = say or printer("stderr")  # stdout is the answers' (--json)
        with heartbeat(f"loading run {self.run.name}", say):
            self.estimator, self.classes = load_fitted(self.run, self.config)
        if "keras" not in sys.modules:  # tens of seconds on a loaded machine: said, not silent
            with heartbeat("loading Keras and its backend", say):
                import keras  # noqa: F401
        self.backbones = []
        for name in self.config["backbones"]:
            attrs = self.config["feature_files"][name]
            damage = attrs_damage(attrs.get("file", ""), attrs)
            if damage:  # what the run records of its features decides how photos are resized and fed
                raise FeatstackError(f"{config_path}: damaged: the attributes it records for {attrs.get('file')}: "
                                     f"{damage}; rebuild the run with: {rebuild_run_command(self.config)}")
            b = backbone_from_attrs(attrs)
            check_weights(b, attrs)
            self.backbones.append(b)
        if any(b.weights == "random" for b in self.backbones):
            print(f"note: run {self.run.name} was trained on features of RANDOM weights (a smoke test or the offline "
                  "demo); its answers mean nothing for real photos", file=sys.stderr)
        for b in self.backbones:
            with heartbeat(f"loading {b.name} model ({b.input_size} px, {b.weights} weights)", say):
                b.build()
            _count_traces(b.model)
        self.buckets: tuple[int, ...] = ()
        self.pad = True  # pad batches to the buckets (warm() turns it off where any batch size runs uncompiled)
        if max_batch is not None:
            self.set_max_batch(max_batch)

    @property
    def traces(self) -> int:
        """Forward passes compiled so far by this run's models (counted per model: a model may serve two Predictors)."""
        return sum(b.model._featstack_traces for b in self.backbones)

    def set_max_batch(self, max_batch: int) -> None:
        if max_batch < 1:
            raise FeatstackError(f"--max-batch {max_batch}: must be at least 1")
        self.buckets = batch_buckets(max_batch)

    @property
    def sizes(self) -> tuple:
        """The distinct input keys the run's backbones take (sizes, hub resizes): each photo is resized once to each."""
        return tuple(sorted({b.input_key for b in self.backbones}, key=str))

    def warm(self) -> float:
        """Run a blank batch of every bucket's shape (compiling each forward pass now); returns the seconds taken.

        Then one batch of a size between the buckets: when it compiles nothing (TensorFlow relaxes a function traced
        at two batch sizes to any batch size), padding would only cost forward work, and it is turned off."""
        t0 = time.perf_counter()
        self.pad = True
        for rows in self.buckets:
            self.predict_arrays(self._blank(rows))
        between = next((n for n in range(2, self.buckets[-1]) if n not in self.buckets), None) if self.buckets else None
        if between is not None:
            traces, self.pad = self.traces, False
            self.predict_arrays(self._blank(between))
            self.pad = self.traces != traces
        return time.perf_counter() - t0

    def _blank(self, rows: int) -> dict:
        return {key: np.zeros((rows, *empty(key).shape[1:]), empty(key).dtype) for key in self.sizes}

    def predict_arrays(self, arrays: dict, timings: dict | None = None) -> np.ndarray:
        """Class probabilities (n, classes) of one decoded batch, given as decode_batch's {key: (n, h, w, 3)}.

        ``timings``, when given, receives the seconds of the backbones' forward passes ("forward") and of the
        fitted model ("classifier")."""
        n = len(next(iter(arrays.values())))
        if self.buckets and n > self.buckets[-1]:  # larger than any compiled shape: in pieces that are compiled
            step = self.buckets[-1]
            parts = [self.predict_arrays({s: a[k:k + step] for s, a in arrays.items()}, timings)
                     for k in range(0, n, step)]
            return np.concatenate(parts)
        rows = next((b for b in self.buckets if b >= n), n) if self.pad else n
        if rows > n:
            # Blank rows make the shape a compiled one; inference treats each row alone, so the real rows'
            # features are those of the batch without them (tested to 1e-5), and the blank rows are dropped.
            arrays = {s: np.concatenate([a, np.zeros((rows - n, *a.shape[1:]), a.dtype)]) for s, a in arrays.items()}
        t0 = time.perf_counter()
        X = np.hstack([f[:n] for f in run_backbones(self.backbones, arrays)[0]])
        t1 = time.perf_counter()
        proba = self.estimator.predict_proba(X)
        if timings is not None:
            timings["forward"] = timings.get("forward", 0.0) + t1 - t0
            timings["classifier"] = timings.get("classifier", 0.0) + time.perf_counter() - t1
        return proba

    def predict(self, paths: list[str], batch_size: int = 32) -> list[tuple[str, np.ndarray | None, str | None]]:
        """(path, probabilities in self.classes order or None, error or None) for every path, in order."""
        results = []
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            arrays, errors = decode_batch(chunk, self.sizes)
            proba = None
            if any(e is None for e in errors):
                proba = self.predict_arrays(arrays)
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
    if batch_size == "auto":
        from .extract import auto_batch_size
        batch_size = auto_batch_size()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise FeatstackError(f"--batch-size {batch_size}: give a positive whole number or auto")
    paths = expand(photos)
    predictor = Predictor(run, models_dir)
    classes = np.array(predictor.classes)
    failed = 0
    records = []
    # The first batch compiles each model's forward pass: seconds, tens of them on a loaded machine.
    with heartbeat(f"predicting {len(paths)} photo{'s' if len(paths) != 1 else ''}", printer("stderr")):
        answers = predictor.predict(paths, batch_size)
    for path, proba, err in answers:
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
