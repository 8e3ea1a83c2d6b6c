"""Independent generators of realistic pooled-CNN feature stores: issue #19's two worlds for the acceptance checks of
stack, and issue #32's third ("pooled", spatially pooled patch features) for LightGBM's defaults."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from featstack.paths import DatasetPaths
from featstack.split import resolve_split
from featstack.store import EntryWriter

# Each backbone's own noise on the image's latent, by world: "similar", four backbones of about the same quality;
# "strong_weak", one strong backbone and three weak ones.
WORLDS = {"similar": (0.5, 0.6, 0.6, 0.8), "strong_weak": (0.3, 1.6, 1.6, 1.9)}
# "pooled": each backbone alone good, their combination a little better (pooled_backbone_features).
POOLED_NOISES = (0.15, 0.2, 0.2, 0.3)


def image_latents(rng, y: np.ndarray, classes: int, latent: int, groups: int, modes: int,
                  nuisance: float) -> np.ndarray:
    """Each image's point in a ``latent``-dim space: a Gaussian mixture, not featstack.synthetic's construction.

    Classes come in ``groups`` of look-alikes (dog breeds of one family): a class centre is its group's centre plus
    a smaller offset, so a class's nearest confusers are its group mates. Each class has ``modes`` sub-modes (pose,
    coat, age) and each image sits at one of them plus its own nuisance. All of that is the image's own, shared by
    every backbone: their errors fall on the same images.
    """
    group_of = rng.integers(0, groups, classes)
    group_centres = rng.normal(0, 1.6, (groups, latent))
    class_centres = group_centres[group_of] + rng.normal(0, 0.9, (classes, latent))
    mode_centres = class_centres[:, None] + rng.normal(0, 0.6, (classes, modes, latent))
    mode = rng.integers(0, modes, len(y))
    return mode_centres[y, mode] + rng.normal(0, nuisance, (len(y), latent))


def backbone_features(rng, z: np.ndarray, width: int, noise: float, hidden: int = 128) -> np.ndarray:
    """One backbone's pooled features of latents ``z``: its own noise, then its own random two-layer ReLU network.

    The noise is the backbone's quality (a weaker network sees a blurrier image). The non-negative, sparse-ish
    outputs with a heavy-tailed scale per channel are what global average pooling of ReLU maps gives.
    """
    seen = z + noise * rng.standard_normal(z.shape)
    w1 = rng.standard_normal((z.shape[1], hidden)) / np.sqrt(z.shape[1])
    h = np.maximum(seen @ w1 + rng.normal(0, 0.5, hidden), 0)
    w2 = rng.standard_normal((hidden, width)) / np.sqrt(hidden / 2)
    scale = rng.lognormal(0, 0.5, width)
    return (np.maximum(h @ w2 - 0.3, 0) * scale).astype(np.float32)


def pooled_backbone_features(rng, z: np.ndarray, width: int, noise: float, common: tuple[np.ndarray, np.ndarray],
                             patches: int = 16, object_share: float = 0.4, shared: float = 0.8) -> np.ndarray:
    """One backbone's globally average-pooled features, built the way a CNN's are: the image is ``patches`` spatial
    cells, of which about ``object_share`` show the object (the image's latent ``z`` plus a per-cell view change)
    and the rest background clutter; the backbone sees each cell with its own noise, maps it through its own
    two-layer ReLU network and averages over the cells. Both layers are ``shared`` of the way ``common`` (what every
    ImageNet network learns: edges, textures, parts), the rest their own.

    Unlike backbone_features (one latent per image), the object's size and the clutter vary per image, and the
    pooled activations mix object and background: what global average pooling of a real feature map does. Every
    backbone shares the image's cells, so their errors fall on the same images; each one's own noise is small, so
    each is good alone and their combination only a little better.
    """
    n, latent = z.shape
    common_in, common_out = common
    hidden = common_in.shape[1]
    share = np.clip(rng.normal(object_share, 0.15, n), 0.1, 0.9)
    on_object = rng.random((n, patches)) < share[:, None]
    clutter = rng.normal(0, 1.0, (n, patches, latent))
    cells = np.where(on_object[..., None], z[:, None, :] + rng.normal(0, 0.5, (n, patches, latent)), clutter)
    seen = cells + noise * rng.standard_normal(cells.shape)
    w1 = (np.sqrt(shared) * common_in + np.sqrt(1 - shared) * rng.standard_normal(common_in.shape)) / np.sqrt(latent)
    h = np.maximum(seen @ w1 + rng.normal(0, 0.5, hidden), 0)
    w2 = (np.sqrt(shared) * common_out[:, :width] + np.sqrt(1 - shared) * rng.standard_normal((hidden, width))) \
        / np.sqrt(hidden / 2)
    scale = rng.lognormal(0, 0.5, width)
    return (np.maximum(h @ w2 - 0.3, 0).mean(axis=1) * scale).astype(np.float32)


def write_world_store(features_dir: str | Path, name: str, world: str, *, classes: int = 20, labelled: int = 2000,
                      test_rows: int = 200, widths: dict[str, int] | None = None, holdout: float = 0.25,
                      seed: int = 0, latent: int = 32, groups: int = 5, modes: int = 3,
                      nuisance: float = 1.4) -> DatasetPaths:
    """A dataset store as extract_features.py writes it (split.csv, dataset.json, one file per backbone) of a
    ``world`` of WORLDS or ``"pooled"``; the backbones take their noise levels from it in order."""
    if world not in (*WORLDS, "pooled"):
        raise ValueError(f"world {world!r}: one of {', '.join(WORLDS)}, pooled")
    rng = np.random.default_rng(seed)
    # the pooled world's backbones are wider: a pooled feature mixes object and clutter, and a narrow backbone alone
    # would lose most of the object (each alone is to be good there)
    widths = widths or ({"xception": 512, "inception_v3": 512, "resnet50": 512, "vgg16": 256} if world == "pooled"
                        else {"xception": 64, "inception_v3": 64, "resnet50": 64, "vgg16": 32})
    names = [f"class_{k:03d}" for k in range(classes)]
    y = np.arange(labelled) % classes
    ids = [f"img{k:06d}" for k in range(labelled + test_rows)]
    table = pd.DataFrame({"id": ids, "path": "", "label": [names[k] for k in y] + [None] * test_rows,
                          "split": [None] * labelled + ["test"] * test_rows})
    paths = DatasetPaths.of(features_dir, name)
    resolve_split(paths, table, holdout=holdout, seed=seed, layout="manifest", data=Path(features_dir))
    z = image_latents(rng, np.concatenate([y, rng.integers(0, classes, test_rows)]), classes, latent, groups, modes,
                      nuisance)
    noises = (list(POOLED_NOISES if world == "pooled" else WORLDS[world]) * len(widths))[:len(widths)]
    if world == "pooled":  # drawn for this world only: the other worlds' stores stay as they were
        common = rng.standard_normal((latent, 256)), rng.standard_normal((256, max(widths.values())))
    features = ((lambda rng, z, width, noise: pooled_backbone_features(rng, z, width, noise, common))
                if world == "pooled" else backbone_features)
    for (backbone, width), noise in zip(widths.items(), noises):
        writer = EntryWriter(paths, f"{backbone}_world", {}, shard_rows=len(ids))
        writer.add(ids, features(rng, z, width, noise))
        writer.attrs = {"backbone": backbone, "input_size": 224, "pooling": "avg", "tta": "none",
                        "precision": "float32", "weights": "random", "width": width,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        writer.merge()
    return paths
