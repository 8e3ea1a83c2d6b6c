#!/usr/bin/env python
"""Which backbones and size the demo extracts: seconds (build, first batch, the rest) and holdout accuracy of each
candidate on the digits demo with seeded random weights, and of the probability-averaged ensembles of a few sets.

    python benchmarks/bench_demo.py --candidates resnet50@64,mobilenet_v2@64 --out benchmarks/results/demo.json
"""
import argparse
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from common import header, write_json  # noqa: E402

DEFAULT = ("xception@96,inception_v3@96,resnet50@96,vgg16@96,resnet50@64,vgg16@64,mobilenet_v2@64,"
           "efficientnet_b0@64,xception@75,inception_v3@75")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", default=DEFAULT, help="comma-separated name@px")
    ap.add_argument("--out", default="benchmarks/results/demo.json")
    a = ap.parse_args()
    import pandas as pd
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featstack import backbones as bb
    from featstack.decode import decode_batch
    from featstack.demo import write_demo

    data = write_demo(Path(tempfile.mkdtemp()) / "demo")
    labels = pd.read_csv(data / "labels.csv", dtype=str)
    paths = [str(data / "train" / f"{i}.jpg") for i in labels["id"]]
    y = labels["breed"].to_numpy()
    train, hold = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    n_all = len(paths) + len(list((data / "test").glob("*.jpg")))
    results, probs = {**header(), "images_timed": len(paths), "images_in_demo": n_all, "rows": []}, {}
    for cand in a.candidates.split(","):
        name, px = cand.split("@")
        (b,) = bb.resolve([name], weights="random", image_size=int(px))
        b.batch_rows = 32
        t0, c0 = time.perf_counter(), time.process_time()
        b.build()
        build = time.perf_counter() - t0
        feats, first, t1 = [], None, time.perf_counter()
        for s in range(0, len(paths), 32):
            arrays, _ = decode_batch(paths[s:s + 32], (int(px),))
            feats.append(b.features(arrays[int(px)]))
            if first is None:
                first = time.perf_counter() - t1
        rest = time.perf_counter() - t1 - first
        cpu = time.process_time() - c0  # CPU seconds (all threads): less at the mercy of a shared machine's load
        x = np.concatenate(feats)
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500)).fit(x[train], y[train])
        p = clf.predict_proba(x[hold])
        probs[cand] = (clf.classes_, p)
        acc = float((clf.classes_[p.argmax(1)] == y[hold]).mean())
        per_img = rest / max(1, len(paths) - 32)
        row = {"candidate": cand, "build_s": round(build, 2), "first_batch_s": round(first, 2),
               "per_image_ms": round(per_img * 1000, 2),
               "demo_seconds_est": round(build + first + per_img * (n_all - 32), 1),
               "cpu_s_labelled": round(cpu, 1), "holdout_acc": round(acc, 4)}
        results["rows"].append(row)
        print(row, flush=True)
        del b
    cands = list(probs)
    for k in (2, 3, 4):
        for combo in combinations(cands, k):
            classes = probs[combo[0]][0]
            mean = np.mean([probs[c][1] for c in combo], axis=0)
            acc = float((classes[mean.argmax(1)] == y[hold]).mean())
            results.setdefault("ensembles", []).append({"members": combo, "holdout_acc": round(acc, 4)})
    results["ensembles"] = sorted(results.get("ensembles", []), key=lambda r: -r["holdout_acc"])
    for r in results["ensembles"][:15]:
        print(r)
    write_json(results, a.out)


if __name__ == "__main__":
    main()
