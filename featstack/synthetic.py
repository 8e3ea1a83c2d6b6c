"""Synthetic feature stores with class structure, for tests and benchmarks of the stacker stage."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .paths import DatasetPaths
from .split import resolve_split
from .store import EntryWriter


def write_synthetic_store(features_dir: str | Path, name: str, *, classes: int = 5, per_class: int = 30,
                          labelled: int | None = None,
                          test_rows: int = 20, widths: dict[str, int] | None = None, separation: float = 1.0,
                          random_labels: bool = False, holdout: float = 0.2, seed: int = 0, latent: int = 64,
                          shard_rows: int = 4096) -> DatasetPaths:
    """A dataset store as extract_features.py writes it: split.csv, dataset.json and one file per backbone.

    Like pooled CNN features, the values are low-rank: each class has a mean in a ``latent``-dim space, mixed
    into the backbone's width, plus shared latent variation and unit noise; ``separation`` scales the class
    means. ``random_labels`` shuffles the labels to remove any signal.
    """
    rng = np.random.default_rng(seed)
    widths = widths or {"resnet50": 64, "vgg16": 32}
    names = [f"class_{k:03d}" for k in range(classes)]
    y = np.arange(labelled) % classes if labelled else np.repeat(np.arange(classes), per_class)
    n_train = len(y)
    ids = [f"img{k:06d}" for k in range(n_train + test_rows)]
    labels = [names[k] for k in (rng.permutation(y) if random_labels else y)] + [None] * test_rows
    table = pd.DataFrame({"id": ids, "path": "", "label": labels, "split": [None] * n_train + ["test"] * test_rows})
    paths = DatasetPaths.of(features_dir, name)
    resolve_split(paths, table, holdout=holdout, seed=seed, layout="manifest", data=Path(features_dir))
    true_class = np.concatenate([y, rng.integers(0, classes, test_rows)])
    for backbone, width in widths.items():
        mixing = (rng.standard_normal((latent, width)) / np.sqrt(latent)).astype(np.float32)
        means = rng.normal(0, separation, (classes, latent)).astype(np.float32)
        writer = EntryWriter(paths, f"{backbone}_synthetic", {}, shard_rows=shard_rows)
        for start in range(0, len(ids), shard_rows):
            rows = slice(start, start + shard_rows)
            n = len(ids[rows])
            latent_rows = means[true_class[rows]] + rng.standard_normal((n, latent), dtype=np.float32)
            block = 2 * latent_rows @ mixing + rng.standard_normal((n, width), dtype=np.float32)
            writer.add(ids[rows], np.maximum(block, 0))  # pooled ReLU features are non-negative
        writer.attrs = {"backbone": backbone, "input_size": 224, "pooling": "avg", "tta": "none",
                        "precision": "float32", "weights": "random", "width": width,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        writer.merge()
    return paths
