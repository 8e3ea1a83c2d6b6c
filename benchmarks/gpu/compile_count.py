#!/usr/bin/env python
"""How many times JAX compiles a backbone's forward pass for batches of 4, 4 and 1 rows: unpadded, then padded.

KERAS_BACKEND=jax python benchmarks/gpu/compile_count.py   (CPU JAX is enough: compile counts are the same on a GPU)
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from bench_gpu import jax_compiles  # noqa: E402

from featstack import backbones as bb  # noqa: E402

counts = jax_compiles()
images = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
for batch_rows in (None, 4):
    b, = bb.resolve(["resnet50"], weights="random", image_size=32)
    b.build()
    b.batch_rows = batch_rows
    counts.clear()
    for chunk in (images[:4], images[4:8], images[8:]):
        b.features(chunk)
    print(f"batch_rows={batch_rows}: batches of 4, 4, 1 rows -> JAX compiled predict_step "
          f"{counts.get('jit(predict_step)', 0)} times")
