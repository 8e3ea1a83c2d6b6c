"""The embedded demo competition: scikit-learn's handwritten digits written in the Kaggle dog-breed layout."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .layouts import class_order
from .split import write_atomic

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEST_FRACTION = 1 / 6
IMAGE_PX = 32
# What `extract_features.py --demo` extracts unless told otherwise: three backbone families (residual, inception,
# EfficientNet) at 75 px, the least InceptionV3 takes. Chosen by measurement (benchmarks/bench_demo.py, README "Quick
# start"): the four default backbones at 96 px took 204 s on 2 quiet cores, VGG16 alone costing 4-5x EfficientNetB0.
BACKBONES = ("resnet50", "inception_v3", "efficientnet_b0")
BACKBONE_PX = 75


def write_demo(folder: Path) -> Path:
    """Write (once) labels.csv, train/, test/ and sample_submission.csv of the digits competition; return the folder."""
    from sklearn.datasets import load_digits

    folder = Path(folder)
    if (folder / "sample_submission.csv").exists():
        return folder  # written last, so its presence means the demo is complete
    digits = load_digits()
    rng = np.random.default_rng(0)
    is_test = rng.random(len(digits.target)) < TEST_FRACTION
    ids = [hashlib.md5(f"digits-{i}".encode()).hexdigest() for i in range(len(digits.target))]
    for sub in ("train", "test"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for image_id, pixels, test in zip(ids, digits.images, is_test):
        grey = (255 - pixels * (255 / 16)).astype(np.uint8)  # dark ink on white paper, as the digits were written
        img = Image.fromarray(grey, "L").resize((IMAGE_PX, IMAGE_PX), Image.BICUBIC)
        img.save(folder / ("test" if test else "train") / f"{image_id}.jpg", quality=95)
    train_ids = [i for i, t in zip(ids, is_test) if not t]
    labels = pd.DataFrame({"id": train_ids, "breed": [CLASS_NAMES[y] for y, t in zip(digits.target, is_test) if not t]})
    write_atomic(folder / "labels.csv", lambda p: labels.to_csv(p, index=False))
    test_ids = [i for i, t in zip(ids, is_test) if t]
    classes = class_order(CLASS_NAMES)
    sample = pd.DataFrame(1 / len(classes), index=pd.Index(test_ids, name="id"), columns=classes).reset_index()
    write_atomic(folder / "sample_submission.csv", lambda p: sample.to_csv(p, index=False))
    print(f"demo competition written to {folder}: {len(train_ids)} labelled, {len(test_ids)} test images, 10 classes")
    return folder
