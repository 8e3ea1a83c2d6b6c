"""Keras backends: features from the same weights file agree across TensorFlow and JAX, so they share a cache entry.

Runs under KERAS_BACKEND=jax (``.ci/run`` does); the TensorFlow side runs in a subprocess.
"""
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from featstack import backbones as bb
from featstack.extract import ExtractConfig, extract
from featstack.store import read_entry

from conftest import ROOT

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="run under KERAS_BACKEND=jax (the second pytest call of .ci/run)")

NAMES = ["resnet50", "vgg16"]
SIZE = 32

TENSORFLOW_SIDE = """
import json, sys
from pathlib import Path
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from conftest import make_weights_dir
from featstack import backbones as bb
from featstack.extract import ExtractConfig, extract
data, work, names, size = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4].split(","), int(sys.argv[5])
weights = make_weights_dir(work / "weights", names, size)
summary = extract(ExtractConfig(data, backbones=names, weights=str(weights), image_size=size,
                                features_dir=work / "features", batch_size=5, progress=False))
random_entry = bb.resolve(names[:1], weights="random", image_size=size)[0].entry
print(json.dumps({"files": [j.writer.final.name for j in summary.jobs], "random_entry": random_entry}))
"""


def test_tensorflow_and_jax_features_agree_and_share_the_cache_entry(tmp_path, cats_dogs):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "KERAS_HOME": str(tmp_path / "keras_home")}
    proc = subprocess.run([sys.executable, "-c", TENSORFLOW_SIDE, str(ROOT), str(cats_dogs), str(tmp_path),
                           ",".join(NAMES), str(SIZE)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tf_side = json.loads(proc.stdout.strip().splitlines()[-1])
    weights = tmp_path / "weights"

    ours = extract(ExtractConfig(cats_dogs, backbones=NAMES, weights=str(weights), image_size=SIZE,
                                 features_dir=tmp_path / "jax_features", batch_size=5, progress=False))
    assert [j.writer.final.name for j in ours.jobs] == tf_side["files"]  # same identity, same file name
    for job in ours.jobs:
        mine = read_entry(job.writer.final)
        theirs = read_entry(tmp_path / "features" / "catsdogs" / job.writer.final.name)
        assert (mine.attrs["keras_backend"], theirs.attrs["keras_backend"]) == ("jax", "tensorflow")
        assert list(mine.ids) == list(theirs.ids)
        err = np.linalg.norm(mine.features - theirs.features, axis=1) / np.linalg.norm(theirs.features, axis=1)
        assert err.max() <= 1e-4, (job.backbone.name, err.max())  # float32 noise, not a different model

    # So a JAX run reuses TensorFlow's features from the same weights file instead of extracting again...
    reused = extract(ExtractConfig(cats_dogs, backbones=NAMES, weights=str(weights), image_size=SIZE,
                                   features_dir=tmp_path / "features", batch_size=5, progress=False))
    assert [(j.extracted, j.cached) for j in reused.jobs] == [(0, 16)] * len(NAMES)
    # ...while random weights are drawn by each backend's own generator: a different entry.
    assert bb.resolve(NAMES[:1], weights="random", image_size=SIZE)[0].entry != tf_side["random_entry"]
