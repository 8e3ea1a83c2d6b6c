#!/usr/bin/env python
"""What knowing each photo's bytes costs a rerun (#30 item 1): photo_content() on N files, in the states a rerun meets.

States, each timed on the same N files:
  first      no photo_stats.csv: every photo is hashed (a first run, or the first run on a store from before hashes)
  rerun      nothing changed: one stat per photo, no hash (every later run)
  touched    every photo's mtime changed, bytes not: every photo is hashed again, none is extracted again
Files are random bytes of --kib KiB each (hashing cost follows bytes, not pixels). Prints a table and writes JSON.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from common import write_json  # noqa: E402

from featstack.paths import DatasetPaths  # noqa: E402
from featstack.store import photo_content  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--kib", type=int, default=2, help="size of each file in KiB (default 2: tiny files)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_content_"))
    try:
        rng = np.random.default_rng(0)
        photos = work / "photos"
        photos.mkdir()
        files = []
        for k in range(a.n):
            f = photos / f"{k:06d}.jpg"
            f.write_bytes(rng.bytes(a.kib * 1024))
            files.append(str(f))
        table = pd.DataFrame({"id": [f"{k:06d}" for k in range(a.n)], "path": files})
        paths = DatasetPaths(work / "store")
        paths.root.mkdir()
        times = {"first": [], "rerun": [], "touched": []}
        for _ in range(a.repeats):  # interleaved, so a change of load hits every state alike
            paths.photo_stats_csv.unlink(missing_ok=True)
            for state in times:
                if state == "touched":
                    now = time.time_ns()
                    for f in files:
                        os.utime(f, ns=(now, now))
                started = time.perf_counter()
                photo_content(paths, table, a.threads)
                times[state].append(time.perf_counter() - started)
        result = {"n": a.n, "kib": a.kib, "threads": a.threads, "load": os.getloadavg()[0],
                  "seconds": {s: min(t) for s, t in times.items()}, "all": times}
        print(f"{a.n} files of {a.kib} KiB, {a.threads} hashing threads, load {result['load']:.1f}")
        print(f"{'state':<10}{'seconds':>9}{'us/photo':>10}")
        for s, t in result["seconds"].items():
            print(f"{s:<10}{t:>9.2f}{1e6 * t / a.n:>10.1f}")
        if a.out:
            write_json(result, a.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
