"""Reading a run's prediction file: the checked reader (one line naming file and row on a bad row) against plain
pandas, interleaved, on the dog-breed shape (10,357 test rows x 120 classes, written as stack.py writes them).

    python benchmarks/bench_read_predictions.py --out benchmarks/results/read_predictions.json
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import header, write_json  # noqa: E402
from featstack import reports  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=10357)
    p.add_argument("--classes", type=int, default=120)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--out", default="benchmarks/results/read_predictions.json")
    a = p.parse_args()
    rng = np.random.default_rng(0)
    classes = [f"breed_{k:03d}" for k in range(a.classes)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test_predictions.csv"
        reports.predictions_frame([f"{k:032x}" for k in range(a.rows)], rng.dirichlet(np.ones(a.classes), a.rows),
                                  classes).to_csv(path, index=False)
        times = {"pandas_read_csv_s": [], "checked_reader_s": []}
        readers = {"pandas_read_csv_s": lambda: pd.read_csv(path, dtype={"id": str}),
                   "checked_reader_s": lambda: reports.read_predictions(path)}
        for k in range(a.repeats):  # interleaved, each first in turn: the host's speed drifts
            for name in sorted(readers, reverse=bool(k % 2)):
                t = time.perf_counter()
                readers[name]()
                times[name].append(time.perf_counter() - t)
        size = path.stat().st_size
    medians = {k: float(np.median(v)) for k, v in times.items()}
    results = {**header(), "load_average_after": os.getloadavg(), "rows": a.rows, "classes": a.classes,
               "file_bytes": size, "repeats": a.repeats, **medians,
               "ratio_checked_to_pandas": medians["checked_reader_s"] / medians["pandas_read_csv_s"], "all": times}
    for k, v in medians.items():
        print(f"{k}: {v:.3f}")
    print(f"ratio: {results['ratio_checked_to_pandas']:.2f}")
    write_json(results, a.out)


if __name__ == "__main__":
    main()
