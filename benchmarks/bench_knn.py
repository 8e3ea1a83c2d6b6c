#!/usr/bin/env python
"""Retrieval benchmark: featstack.neighbours' exact cosine search against scikit-learn's brute-force
NearestNeighbors(metric="cosine"), against audit.py's own blocked search, and the knn head's MAP@5 on an identity
world, in one run.

speed: queries per second against gallery size (float32, 2,048 dims, up to 100k rows), BLAS held to 2 threads.
The two searches take turns (A B B A ...) and each figure is the median of its turns: the machine is shared, so
a burst of someone else's load falls on both. Each search's results are compared (same neighbours).

memory: peak bytes allocated (tracemalloc; numpy reports its buffers to it) during one query call, beyond the inputs,
for 256 and 1,024 queries against each gallery: it grows with the gallery, not with the queries.

audit: audit.py's Neighbours (its hand-written blocked search) and top_k on audit's shape: same neighbours, time
(interleaved), peak memory.

map: a realistic identity world: pooled-CNN-like photos (non-negative, a large shared mean, an identity centre plus
photo noise), 1-4 photos per identity, test photos of known identities plus a share of new identities. MAP@5 of
KNNRetrieval (threshold for "new" chosen out of fold; CV MAP@5 with the choice made inside each fold), of the same
answers found through scikit-learn's NearestNeighbors, of no "new" answer, and of the all-"new" baseline.
"""
import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, write_json  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from featstack.knn import KNNRetrieval, cross_val_map, expected_answers, insert_new, map_at_k  # noqa: E402
from featstack.neighbours import top_k, unit_rows  # noqa: E402

K = 5


def features(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d), dtype=np.float32)


def ours(gallery_unit: np.ndarray, queries: np.ndarray, k: int):
    return top_k(unit_rows(queries), gallery_unit, k)


def sklearn_search(nn, queries: np.ndarray, k: int):
    distances, index = nn.kneighbors(queries, k)
    return index, 1 - distances


def speed(sizes, d, n_queries, rounds, k=K) -> list[dict]:
    from sklearn.neighbors import NearestNeighbors
    out = []
    for n in sizes:
        gallery = features(n, d, 0)
        queries = features(n_queries, d, 1)
        t = time.perf_counter()
        unit = unit_rows(gallery)
        fit_ours = time.perf_counter() - t
        t = time.perf_counter()
        nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(gallery)
        fit_sklearn = time.perf_counter() - t
        times = {"ours": [], "sklearn": []}
        results = {}
        for r in range(rounds):
            order = ("ours", "sklearn") if r % 2 == 0 else ("sklearn", "ours")
            for name in order:
                gc.collect()
                t = time.perf_counter()
                results[name] = ours(unit, queries, k) if name == "ours" else sklearn_search(nn, queries, k)
                times[name].append(time.perf_counter() - t)
        same = float((results["ours"][0] == results["sklearn"][0]).mean())
        gap = float(np.abs(results["ours"][1] - results["sklearn"][1]).max())
        row = {"gallery": n, "dims": d, "queries": n_queries, "k": k,
               "ours_qps": n_queries / float(np.median(times["ours"])),
               "sklearn_qps": n_queries / float(np.median(times["sklearn"])),
               "ours_s": times["ours"], "sklearn_s": times["sklearn"],
               "fit_ours_s": fit_ours, "fit_sklearn_s": fit_sklearn,
               "same_neighbours": same, "max_similarity_gap": gap}
        row["speedup"] = row["ours_qps"] / row["sklearn_qps"]
        print(f"gallery {n:>7} x {d}: ours {row['ours_qps']:9.1f} q/s  sklearn {row['sklearn_qps']:9.1f} q/s  "
              f"x{row['speedup']:.2f}  same neighbours {same:.4f}  max sim gap {gap:.1e}", flush=True)
        out.append(row)
        del gallery, unit, nn, results
        gc.collect()
    return out


def peak(call, *args) -> int:
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = call(*args)
    top = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return top - base


def memory(sizes, d, query_counts, k=K) -> list[dict]:
    from sklearn.neighbors import NearestNeighbors
    out = []
    for n in sizes:
        gallery = features(n, d, 0)
        unit = unit_rows(gallery)
        nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(gallery)
        for q in query_counts:
            queries = features(q, d, 1)
            row = {"gallery": n, "dims": d, "queries": q, "gallery_mib": gallery.nbytes / 2 ** 20,
                   "ours_peak_mib": peak(ours, unit, queries, k) / 2 ** 20,
                   "sklearn_peak_mib": peak(sklearn_search, nn, queries, k) / 2 ** 20}
            print(f"gallery {n:>7} x {d} ({row['gallery_mib']:.0f} MiB), {q:>5} queries: peak beyond inputs "
                  f"ours {row['ours_peak_mib']:.0f} MiB, sklearn {row['sklearn_peak_mib']:.0f} MiB", flush=True)
            out.append(row)
        del gallery, unit, nn
        gc.collect()
    return out


def identity_world(identities: int, d: int, test_known: int, test_new_share: float, seed: int = 0,
                   spread: float = 0.4, noise: float = 1.0):
    """(train X, train y, test X, test y): photos = relu(shared mean + identity offset + photo noise)."""
    rng = np.random.default_rng(seed)
    mean = np.abs(rng.normal(size=d)) * 2  # pooled ReLU features share a large positive mean
    n_new = int(round(test_known * test_new_share / (1 - test_new_share)))
    centres = mean + spread * rng.normal(size=(identities + n_new, d)) * np.sqrt(mean)
    per = np.minimum(rng.geometric(0.5, identities), 4)  # 1-4 photos, half the identities seen once

    def photos(c, n):
        return np.maximum(centres[c] + noise * rng.normal(size=(n, d)) * np.sqrt(mean), 0).astype(np.float32)

    X = np.concatenate([photos(c, p) for c, p in enumerate(per)])
    y = np.repeat([f"id{c:05d}" for c in range(identities)], per).astype(object)
    known = rng.choice(identities, test_known)
    Xt = np.concatenate([photos(c, 1) for c in known] + [photos(identities + c, 1) for c in range(n_new)])
    yt = np.array([f"id{c:05d}" for c in known] + [f"id{identities + c:05d}" for c in range(n_new)], object)
    return X, y, Xt, yt


def sklearn_ranked(model: KNNRetrieval, X: np.ndarray, k: int, candidates: int = 50) -> tuple[np.ndarray, float]:
    """The same answers through scikit-learn: nearest photos by NearestNeighbors, their first k distinct identities,
    "new" inserted at the model's threshold."""
    from sklearn.neighbors import NearestNeighbors
    t = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=candidates, metric="cosine", algorithm="brute").fit(model.gallery_)
    distances, index = nn.kneighbors(model.space_.transform(X))
    labels = np.full((len(X), k), None, object)
    sims = np.full((len(X), k), -np.inf)
    for r in range(len(X)):
        seen = []
        for j in range(candidates):
            label = model.identities_[model.gallery_codes_[index[r, j]]]
            if label not in seen:
                labels[r, len(seen)], sims[r, len(seen)] = label, 1 - distances[r, j]
                seen.append(label)
                if len(seen) == k:
                    break
    if model.threshold_ is not None:
        labels = insert_new(labels, sims, model.threshold_, model.new_label, k)
    return labels, time.perf_counter() - t


def retrieval(identities: int, d: int, test_known: int, new_share: float) -> dict:
    X, y, Xt, yt = identity_world(identities, d, test_known, new_share)
    truth = expected_answers(y, yt, "new")
    out = {"train_rows": len(y), "identities": identities, "dims": d, "test_rows": len(yt),
           "test_new_share": float((truth == "new").mean()),
           "train_single_photo_identities": int((np.unique(y, return_counts=True)[1] == 1).sum()),
           "all_new_map5": map_at_k(truth, np.full((len(yt), 1), "new", object), K)}
    print(f"identity world: {len(y)} training photos of {identities} identities x {d} dims, {len(yt)} test photos "
          f"({out['test_new_share']:.0%} new); all-new MAP@5 {out['all_new_map5']:.4f}", flush=True)
    for name, params in (("plain", {}), ("whiten256", {"whiten": True, "n_components": 256})):
        t = time.perf_counter()
        model = KNNRetrieval(new_label="new", **params).fit(X, y)
        fit_s = time.perf_counter() - t
        t = time.perf_counter()
        ranked = model.rank(Xt, K)
        rank_s = time.perf_counter() - t
        via_sklearn, sklearn_s = sklearn_ranked(model, Xt, K)
        no_new = KNNRetrieval(threshold=None, **params).fit(X, y).rank(Xt, K)
        t = time.perf_counter()
        cv = cross_val_map(KNNRetrieval(new_label="new", **params), X, y, K)
        cv_s = time.perf_counter() - t
        row = {"test_map5": map_at_k(truth, ranked, K), "sklearn_test_map5": map_at_k(truth, via_sklearn, K),
               "same_answers_as_sklearn": float((ranked == via_sklearn).all(axis=1).mean()),
               "no_new_test_map5": map_at_k(truth, no_new, K), "top1_accuracy": map_at_k(truth, ranked, 1),
               "cv_map5": cv["map"], "cv_fold_map5": cv["fold_map"], "cv_thresholds": cv["thresholds"],
               "threshold": model.threshold_, "temperature": model.temperature_, "fit_s": fit_s,
               "rank_s": rank_s, "sklearn_rank_s": sklearn_s, "cv_s": cv_s}
        out[name] = row
        print(f"  {name:9}: test MAP@5 {row['test_map5']:.4f} (via sklearn {row['sklearn_test_map5']:.4f}, same "
              f"answers {row['same_answers_as_sklearn']:.3f}; without 'new' {row['no_new_test_map5']:.4f}), "
              f"CV MAP@5 {row['cv_map5']:.4f}, threshold {row['threshold']:.4f}, T {row['temperature']:.4f}; "
              f"rank {rank_s:.2f} s vs sklearn {sklearn_s:.2f} s", flush=True)
    return out


def audit_parity(n: int, d: int, rounds: int, k: int = 10) -> dict:
    """audit.py's own blocked search (Neighbours) against top_k with the row itself excluded, on audit's shape:
    the dog-breed run's 20,579 rows in its 256 PCA dims, low-rank like CNN features."""
    from featstack.audit import Neighbours
    rng = np.random.default_rng(0)
    rows = unit_rows(rng.normal(size=(n, 32)).astype(np.float32) @ rng.normal(size=(32, d)).astype(np.float32)
                     + 0.3 * rng.normal(size=(n, d)).astype(np.float32))
    times = {"audit": [], "ours": []}
    for r in range(rounds):
        for name in (("audit", "ours") if r % 2 == 0 else ("ours", "audit")):
            gc.collect()
            t = time.perf_counter()
            if name == "audit":
                old = Neighbours(rows, k)
            else:
                index, sims = top_k(rows, rows, k, exclude=np.arange(n))
            times[name].append(time.perf_counter() - t)
    row = {"rows": n, "dims": d, "k": k, "audit_s": times["audit"], "ours_s": times["ours"],
           "same_indices": float((index == old.indices).mean()),
           "max_distance_gap": float(np.abs(np.maximum(1 - sims, 0) - old.distances).max()),
           "audit_peak_mib": peak(Neighbours, rows, k) / 2 ** 20,
           "ours_peak_mib": peak(top_k, rows, rows, k, np.arange(n)) / 2 ** 20}
    print(f"audit shape {n} x {d}, k {k}: audit.Neighbours {np.median(times['audit']):.2f} s, top_k "
          f"{np.median(times['ours']):.2f} s (medians); same indices {row['same_indices']:.5f}, max distance gap "
          f"{row['max_distance_gap']:.1e}; peak {row['audit_peak_mib']:.0f} vs {row['ours_peak_mib']:.0f} MiB",
          flush=True)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,30000,100000")
    ap.add_argument("--dims", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--memory-sizes", default="10000,30000,100000")
    ap.add_argument("--identities", type=int, default=3000)
    ap.add_argument("--test-known", type=int, default=1400)
    ap.add_argument("--new-share", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="speed,memory,audit,map")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "knn.json"))
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    results = header() | {"threads": args.threads}
    run = {"speed": lambda: speed([int(s) for s in args.sizes.split(",")], args.dims, args.queries, args.rounds),
           "memory": lambda: memory([int(s) for s in args.memory_sizes.split(",")], args.dims, (256, 1024)),
           "audit": lambda: audit_parity(20579, 256, args.rounds),
           "map": lambda: retrieval(args.identities, args.dims, args.test_known, args.new_share)}
    with threadpool_limits(args.threads):
        for part in parts:
            results[part] = run[part]()
            write_json(results, args.out)  # after each part: a long run stopped early keeps what it measured
    return results


if __name__ == "__main__":
    main()
