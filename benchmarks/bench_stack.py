#!/usr/bin/env python
"""Stacker benchmark: load, logreg, lgbm and stack seconds on features of the real dog-breed shape.

10,222 labelled rows (10% held out) x 6,656 dims (xception 2048 + inception_v3 2048 + resnet50 2048 + vgg16 512),
120 classes, plus 10,357 test rows; low-rank synthetic values with class structure (featstack.synthetic).
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, write_json  # noqa: E402

from featstack.features import load_features  # noqa: E402
from featstack.stack import run_stack  # noqa: E402
from featstack.synthetic import write_synthetic_store  # noqa: E402

WIDTHS = {"xception": 2048, "inception_v3": 2048, "resnet50": 2048, "vgg16": 512}
LIMITS = {"load": 2, "logreg": 20, "lgbm": 180, "stack": 180}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--labelled", type=int, default=10222)
    p.add_argument("--test-rows", type=int, default=10357)
    p.add_argument("--classes", type=int, default=120)
    p.add_argument("--models", default="logreg,lgbm,stack")
    p.add_argument("--separation", type=float, default=0.3, help="class-mean scale in the latent space")
    p.add_argument("--C", default="1.0", help="stack.py's --C (a number or auto)")
    p.add_argument("--out", default="benchmarks/results/stack.json")
    a = p.parse_args()
    # CPU seconds and the load average beside the wall clock: on a shared machine they say how much of the wall
    # clock was waiting for other people's processes.
    results = {**header(), "C": a.C, "shape": {}, "seconds": {}, "cpu_seconds": {}, "load_average": {}, "scores": {}}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        store = write_synthetic_store(Path(tmp) / "features", "dogbreed_shape", classes=a.classes,
                                      labelled=a.labelled, test_rows=a.test_rows, widths=WIDTHS,
                                      separation=a.separation, holdout=0.1)
        print(f"synthetic store written in {time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        fs = load_features(store.root)
        results["seconds"]["load"] = time.perf_counter() - t0
        results["shape"] = {"rows": len(fs.ids), "train": len(fs.rows("train")), "dims": fs.matrix.shape[1],
                            "classes": len(fs.classes)}
        del fs
        for model in a.models.split(","):
            t0, c0 = time.perf_counter(), time.process_time()
            run = run_stack(store.root, model=model, models_dir=Path(tmp) / "models", C=a.C)
            results["seconds"][model] = time.perf_counter() - t0
            results["cpu_seconds"][model] = time.process_time() - c0
            results["load_average"][model] = os.getloadavg()[0]
            rep = json.loads((run / "report.json").read_text())
            results["scores"][model] = {"cv_log_loss": rep["cv"]["log_loss"],
                                        "holdout_log_loss": rep["holdout"]["log_loss"],
                                        "holdout_accuracy": rep["holdout"]["accuracy"],
                                        **{k: rep[k] for k in ("C", "blend_weights") if k in rep}}
    print(f"\nshape: {results['shape']}")
    print(f"{'stage':<10}{'seconds':>10}{'cpu s':>8}{'load':>6}{'limit':>8}  ok  CV log loss")
    for k, v in results["seconds"].items():
        print(f"{k:<10}{v:>10.1f}{results['cpu_seconds'].get(k, float('nan')):>8.1f}"
              f"{results['load_average'].get(k, float('nan')):>6.1f}{LIMITS.get(k, float('nan')):>8}  "
              f"{'yes' if v <= LIMITS.get(k, 1e9) else 'NO '} {results['scores'].get(k, {}).get('cv_log_loss', '')}")
    write_json(results, a.out)


if __name__ == "__main__":
    main()
