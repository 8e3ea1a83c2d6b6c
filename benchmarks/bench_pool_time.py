#!/usr/bin/env python
"""Seconds of stack's level 2 (LogPool: its 5-fold CV and refit) at the dog-breed shape's level 2, 9,199 rows x 5
members x 120 classes, with the cap fixed at 3 (the behaviour before issue #31) and chosen from blend.POOL_CAPS by the
inner CV, interleaved. Members are synthetic: a true posterior's logits plus each member's own noise, divided by
--softness (1: members about right, the weights sum below 3 and no inner CV runs; 8: far too soft, the inner CV runs).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, write_json  # noqa: E402

from featstack import models as M  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=9199)
    p.add_argument("--classes", type=int, default=120)
    p.add_argument("--softness", default="1,8")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/pool_time.json")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    logits = 3 * rng.standard_normal((a.rows, a.classes))
    y = np.array([rng.choice(a.classes, p=q) for q in softmax(logits, axis=1)])
    results = {**header(), "runs": []}
    for soft in [float(s) for s in a.softness.split(",")]:
        X = M.level2_inputs([softmax((logits + s * rng.standard_normal(logits.shape)) / soft, axis=1)
                             for s in (0.5, 1, 1, 1.5, 2)])
        for rep in range(a.repeats):
            for caps in ((3.0,), M.POOL_CAPS):
                t0 = time.perf_counter()
                pool = M.LogPool(caps=caps).fit(X, y)
                r = {"softness": soft, "caps": list(caps), "repeat": rep, "seconds": time.perf_counter() - t0,
                     "weight_sum": float(pool.weights_.sum()), "cap": pool.cap_}
                results["runs"].append(r)
                print(r, flush=True)
    write_json(results, a.out)


if __name__ == "__main__":
    main()
