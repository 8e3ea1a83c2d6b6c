"""Synthetic feature stores with class structure, for tests and benchmarks of the stacker stage."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .paths import DatasetPaths
from .split import resolve_split
from .store import EntryWriter

# Each backbone's own noise in the shared latent space, by world (issue #19). "similar": four backbones of about
# the same quality; "strong_weak": one strong backbone and three weak ones. "hard" is the old generator, kept as a
# hard case: every backbone alone weak, only the concatenation strong.
WORLDS = {"similar": (0.8, 0.8, 0.9, 1.0), "strong_weak": (0.5, 1.6, 1.6, 2.0), "hard": None}


def world_latents(rng, y: np.ndarray, classes: int, latent: int, separation: float, ambiguity: float,
                  noises) -> list[np.ndarray]:
    """Each image's view by each backbone in a shared ``latent``-dim space, as pooled CNN features behave.

    An image is its class mean pulled toward one of its class's nearest neighbours (a breed that looks like another)
    by its own ambiguity t ~ Beta(1, 4) * ``ambiguity``, plus its own nuisance (pose, background): both shared by
    every backbone, so their errors fall on the same images. Each backbone then adds its own noise (``noises``), which
    the concatenation averages out: one backbone alone is good, the combination better.
    """
    means = rng.normal(0, separation, (classes, latent))
    dist = ((means[:, None] - means[None]) ** 2).sum(-1)
    np.fill_diagonal(dist, np.inf)
    neighbours = np.argsort(dist, axis=1)[:, :3]
    confuser = neighbours[y, rng.integers(0, neighbours.shape[1], len(y))]
    t = rng.beta(1.0, 4.0, len(y))[:, None] * ambiguity
    shared = (1 - t) * means[y] + t * means[confuser] + 0.5 * rng.standard_normal((len(y), latent))
    return [(shared + s * rng.standard_normal((len(y), latent))).astype(np.float32) for s in noises]


def write_synthetic_store(features_dir: str | Path, name: str, *, classes: int = 5, per_class: int = 30,
                          labelled: int | None = None,
                          test_rows: int = 20, widths: dict[str, int] | None = None, separation: float = 1.0,
                          random_labels: bool = False, holdout: float = 0.2, seed: int = 0, latent: int = 64,
                          shard_rows: int = 4096, world: str = "hard", ambiguity: float = 1.0) -> DatasetPaths:
    """A dataset store as extract_features.py writes it: split.csv, dataset.json and one file per backbone.

    ``world="hard"`` (the default, the old generator): each class has a mean in a ``latent``-dim space, mixed into
    each backbone's width with the backbone's own means, plus unit noise; ``separation`` scales the class means.
    ``world="similar"`` / ``"strong_weak"``: realistic pooled features (``world_latents``), one latent world seen
    by every backbone with its own noise. ``random_labels`` shuffles the labels to remove any signal.
    """
    if world not in WORLDS:
        raise ValueError(f"world {world!r}: one of {', '.join(WORLDS)}")
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
    views = None
    if world != "hard":
        noises = (list(WORLDS[world]) * len(widths))[:len(widths)]
        views = world_latents(rng, true_class, classes, latent, separation, ambiguity, noises)
    for b, (backbone, width) in enumerate(widths.items()):
        mixing = (rng.standard_normal((latent, width)) / np.sqrt(latent)).astype(np.float32)
        means = rng.normal(0, separation, (classes, latent)).astype(np.float32)
        writer = EntryWriter(paths, f"{backbone}_synthetic", {}, shard_rows=shard_rows)
        for start in range(0, len(ids), shard_rows):
            rows = slice(start, start + shard_rows)
            n = len(ids[rows])
            if views is None:
                latent_rows = means[true_class[rows]] + rng.standard_normal((n, latent), dtype=np.float32)
            else:
                latent_rows = views[b][rows]
            block = 2 * latent_rows @ mixing + rng.standard_normal((n, width), dtype=np.float32)
            writer.add(ids[rows], np.maximum(block, 0))  # pooled ReLU features are non-negative
        writer.attrs = {"backbone": backbone, "input_size": 224, "pooling": "avg", "tta": "none",
                        "precision": "float32", "weights": "random", "width": width,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        writer.merge()
    return paths
