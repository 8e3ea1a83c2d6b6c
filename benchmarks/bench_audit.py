#!/usr/bin/env python
"""Audit benchmark: seconds of audit.py on the dog-breed shape, and the near-duplicate similarity study.

speed (default): 10,222 labelled rows (10% held out) + 10,357 test rows x 6,656 dims (xception 2048 + inception_v3
2048 + resnet50 2048 + vgg16 512), 120 classes, low-rank synthetic features (featstack.synthetic), a logreg run for
the out-of-fold probabilities, and one real photo file per id (the dogs-vs-cats sample cycled, each copy made
unique by trailing bytes JPEG readers ignore) so hashing and header reads touch real files. Only the audit is timed.

threshold: real dogs-vs-cats photos plus re-encoded copies of test photos placed in train (0.52-0.90x size, JPEG
quality 41-60), extracted with seeded random weights; prints the cosine similarity of the copies and of the closest
distinct photos, as audit.py computes it, and the pixel difference audit.py confirms candidates with: of the copies,
and of every distinct pair whose features pass the lowest threshold studied.

pixels: how a pair's pixels are compared, chosen here. Every pair among the 1,797 demo digits (none is a copy of
another) and among the 800 real photos, and the 20 re-encoded copies of the threshold study: the RMS difference over
contrast of greyscale thumbnails at 8, 16 and 32 px, the mean absolute difference, and a 64-bit DCT perceptual hash.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, write_json  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "dogs-vs-cats-sample"
WIDTHS = {"xception": 2048, "inception_v3": 2048, "resnet50": 2048, "vgg16": 512}
LIMIT = 60
THRESHOLDS = (0.85, 0.9, 0.95, 0.98)


def _photo_bytes() -> list[bytes]:
    if SHARED.is_dir():
        return [p.read_bytes() for p in sorted((SHARED / "train").glob("*.jpg"))]
    import io

    from PIL import Image
    rng = np.random.default_rng(0)
    out = []
    for _ in range(50):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def _write_images(store, data: Path) -> None:
    """A dog-breed layout folder holding one file per id of the store, and dataset.json pointed at it."""
    import pandas as pd

    from featstack.split import read_split
    split = read_split(store)
    photos = _photo_bytes()
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    for k, (image_id, part) in enumerate(zip(split["id"], split["split"])):
        folder = data / ("test" if part == "test" else "train")
        (folder / f"{image_id}.jpg").write_bytes(photos[k % len(photos)] + image_id.encode())
    labelled = split[split["split"] != "test"]
    pd.DataFrame({"id": labelled["id"], "breed": labelled["label"]}).to_csv(data / "labels.csv", index=False)
    meta = json.loads(store.dataset_json.read_text())
    store.dataset_json.write_text(json.dumps({**meta, "data": str(data), "layout": "dog-breed"}, indent=2))


def _prepared_run(work: Path, a) -> Path:
    """The synthetic dog-breed-shape store, its photo files and a logreg run in ``work``; reused when present."""
    from featstack.stack import newest_run, run_stack
    from featstack.synthetic import write_synthetic_store
    if (work / "models").is_dir() and any((work / "models").glob("*/config.json")):
        return newest_run(work / "models")
    shutil.rmtree(work, ignore_errors=True)
    store = write_synthetic_store(work / "features", "dogbreed_shape", classes=a.classes, labelled=a.labelled,
                                  test_rows=a.test_rows, widths=WIDTHS, separation=0.3, holdout=0.1)
    _write_images(store, work / "data")
    return run_stack(store.root, model="logreg", models_dir=work / "models")


def speed(a) -> dict:
    from featstack.audit import audit_run, write_audit
    results = {**header(), "shape": {}, "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run = _prepared_run(Path(a.workdir) if a.workdir else Path(tmp) / "work", a)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        audit = audit_run(run)
        with audit.clock("write"):
            folder = write_audit(audit, a.top)
        total = time.perf_counter() - t0
        results["load_average"] = {"before": round(load_before, 1), "after": round(os.getloadavg()[0], 1)}
        results["seconds"] = {**{k: round(v, 2) for k, v in audit.clock.wall.items()}, "total": round(total, 2)}
        results["cpu_seconds"] = {**{k: round(v, 2) for k, v in audit.clock.cpu.items()},
                                  "total": round(sum(audit.clock.cpu.values()), 2)}
        results["shape"] = {"rows": len(audit.fs.ids), "dims": sum(b.shape[1] for b in audit.fs.blocks.values()),
                            "classes": len(audit.fs.classes), "photos": "real" if SHARED.is_dir() else "generated"}
        results["found"] = {"label_issues": len(audit.label_issues), "duplicate_pairs": len(audit.duplicates),
                            "outliers": len(audit.outliers), "files": sorted(p.name for p in folder.iterdir())}
    print(f"\nshape: {results['shape']}, load average {results['load_average']}")
    print(f"{'stage':<14}{'wall s':>8}{'CPU s':>8}")
    for k, v in results["seconds"].items():
        print(f"{k:<14}{v:>8.2f}{results['cpu_seconds'][k]:>8.2f}")
    print(f"audit total {total:.1f} s wall, {results['cpu_seconds']['total']} CPU s (limit {LIMIT} s): "
          f"{'ok' if total <= LIMIT else 'OVER'}")
    return results


def threshold_study(a) -> dict:
    from PIL import Image

    from featstack.audit import PIXEL_DIFFERENCE, embedding, image_paths, pixel_difference, pixel_signature
    from featstack.extract import ExtractConfig, extract
    from featstack.features import load_features
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: the study needs the real photos")
    results = {**header(), "image_size": a.image_size, "backbones": a.backbones}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        (data / "train").mkdir(parents=True)
        (data / "test1").mkdir()
        for c in ("cat", "dog"):
            for n in range(a.photos // 2):
                shutil.copy(SHARED / "train" / f"{c}.{n}.jpg", data / "train" / f"{c}.{n}.jpg")
        for n in range(1, a.test + 1):
            shutil.copy(SHARED / "test1" / f"{n}.jpg", data / "test1" / f"{n}.jpg")
        copies = {}
        for k in range(1, a.copies + 1):
            img = Image.open(SHARED / "test1" / f"{k}.jpg")
            scale = 0.5 + 0.02 * k
            img.resize((int(img.width * scale), int(img.height * scale)), Image.BICUBIC).save(
                data / "train" / f"dog.{1000 + k}.jpg", quality=40 + k)
            copies[f"dog.{1000 + k}"] = str(k)
        summary = extract(ExtractConfig(data, backbones=a.backbones.split(","), weights="random",
                                        image_size=a.image_size, features_dir=Path(tmp) / "features", progress=False))
        fs = load_features(summary.paths.root)
        unit = embedding(fs).astype(np.float64)
        sim = unit @ unit.T
        row = {i: k for k, i in enumerate(fs.ids)}
        copy_pairs = {(row[c], row[t]) for c, t in copies.items()}
        copy_sims = np.array([sim[x, y] for x, y in copy_pairs])
        distinct = np.ones_like(sim, bool)
        np.fill_diagonal(distinct, False)
        for x, y in copy_pairs:
            distinct[x, y] = distinct[y, x] = False
        distinct_sims = sim[np.triu(distinct)]
        # Pixels of the copies, and of each distinct pair similar enough to be a candidate at the lowest threshold.
        path_of, _ = image_paths(fs)
        signature = {i: pixel_signature(path_of[i]) for i in fs.ids}
        copy_pixels = np.array([pixel_difference(signature[fs.ids[x]], signature[fs.ids[y]]) for x, y in copy_pairs])
        xs, ys = np.nonzero(np.triu(distinct) & (sim >= min(THRESHOLDS)))
        near_sims = sim[xs, ys]
        near_pixels = np.array([pixel_difference(signature[fs.ids[x]], signature[fs.ids[y]]) for x, y in zip(xs, ys)])
        if a.sheet:
            from featstack.audit import run_audit
            from featstack.stack import run_stack
            run = run_stack(summary.paths.root, models_dir=Path(tmp) / "models", folds=3)
            shutil.copy(run_audit(run, top=a.top) / "duplicates.png", a.sheet)
        results.update({
            "images": len(fs.ids), "copies": len(copy_pairs), "distinct_pairs": int(len(distinct_sims)),
            "copy_similarity": {"min": float(copy_sims.min()), "median": float(np.median(copy_sims))},
            "distinct_similarity": {"max": float(distinct_sims.max()),
                                    "p99.9": float(np.quantile(distinct_sims, 0.999))},
            "copy_pixel_difference": {"max": float(copy_pixels.max()), "median": float(np.median(copy_pixels))},
            "distinct_candidates_pixel_difference_min": float(near_pixels.min()) if len(near_pixels) else None,
            "pixel_difference_limit": PIXEL_DIFFERENCE,
            "at_threshold": {str(t): {"copies_found": int((copy_sims >= t).sum()),
                                      "distinct_pairs_above": int((distinct_sims >= t).sum()),
                                      "copies_confirmed_by_pixels": int(((copy_sims >= t) &
                                                                         (copy_pixels <= PIXEL_DIFFERENCE)).sum()),
                                      "distinct_pairs_confirmed_by_pixels": int(((near_sims >= t) &
                                                                                 (near_pixels <= PIXEL_DIFFERENCE)
                                                                                 ).sum())}
                             for t in THRESHOLDS}})
    print(json.dumps({k: results[k] for k in ("images", "copies", "copy_similarity", "distinct_similarity",
                                              "copy_pixel_difference", "distinct_candidates_pixel_difference_min",
                                              "at_threshold")}, indent=2))
    return results


def _thumb(img, side: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(img.convert("L").resize((side, side), Image.BOX), np.float32)


def _relative_rms(x: np.ndarray) -> np.ndarray:
    """Every pair's RMS difference over mean contrast (featstack.audit.pixel_difference), as an n x n matrix."""
    flat, var = x.reshape(len(x), -1), x.reshape(len(x), -1).var(axis=1)
    out = np.empty((len(x), len(x)), np.float32)
    for i in range(len(x)):
        out[i] = np.sqrt(((flat[i] - flat) ** 2).mean(axis=1)) / np.maximum(np.sqrt((var[i] + var) / 2), 1.0)
    return out


def _phash(img) -> np.ndarray:
    from scipy.fft import dctn
    d = dctn(_thumb(img, 32).astype(np.float64), norm="ortho")[:8, :8].ravel()[1:]
    return d > np.median(d)


def pixel_study(a) -> dict:
    import io

    from PIL import Image

    from featstack.audit import PIXEL_DIFFERENCE, pixel_difference, pixel_signature
    from featstack.decode import decode_rgb
    from featstack.demo import write_demo
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is absent: the study needs the real photos")
    results = {**header(), "limit": PIXEL_DIFFERENCE, "relative_rms": {}, "mean_abs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        demo = write_demo(Path(tmp) / "demo")
        digits = [decode_rgb(p) for p in sorted(demo.glob("*/*.jpg"))]
    photo_paths = sorted((SHARED / "train").glob("*.jpg")) + sorted((SHARED / "test1").glob("*.jpg"))
    photos = [decode_rgb(p) for p in photo_paths]
    copies = []
    for k in range(1, a.copies + 1):  # as the threshold study makes them
        img = Image.open(SHARED / "test1" / f"{k}.jpg")
        scale, buf = 0.5 + 0.02 * k, io.BytesIO()
        img.resize((int(img.width * scale), int(img.height * scale)), Image.BICUBIC).save(buf, "JPEG", quality=40 + k)
        copies.append((Image.open(buf).convert("RGB"),
                       photos[photo_paths.index(SHARED / "test1" / f"{k}.jpg")]))
    upper = np.triu_indices(len(digits), 1)
    upper_p = np.triu_indices(len(photos), 1)
    for side in (8, 16, 32):
        d = _relative_rms(np.stack([_thumb(im, side) for im in digits]))[upper]
        p = np.sort(_relative_rms(np.stack([_thumb(im, side) for im in photos]))[upper_p])
        c = [float(_relative_rms(np.stack([_thumb(x, side), _thumb(y, side)]))[0, 1]) for x, y in copies]
        results["relative_rms"][f"{side}px"] = {"copies_max": max(c), "digits_distinct_min": float(d.min()),
                                                "photos_closest_two": p[:2].tolist()}
        dm = np.stack([_thumb(im, side) for im in digits]).reshape(len(digits), -1)
        mad_digits = min(float(np.abs(dm[i] - dm[i + 1:]).mean(axis=1).min()) for i in range(len(dm) - 1))
        results["mean_abs"][f"{side}px"] = {
            "copies_max": max(float(np.abs(_thumb(x, side) - _thumb(y, side)).mean()) for x, y in copies),
            "digits_distinct_min": mad_digits}
    hd = np.stack([_phash(im) for im in digits])
    ham = (hd[:, None, :] != hd[None, :, :]).sum(-1)[upper]
    results["phash_bits"] = {"copies_max": int(max((_phash(x) != _phash(y)).sum() for x, y in copies)),
                             "digits_distinct_min": int(ham.min())}
    # The signature audit.py uses, through its own functions (16 px): every copy under the limit.
    chosen = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (x, y) in enumerate(copies):
            x.save(Path(tmp) / f"{k}.png")
            y.save(Path(tmp) / f"{k}o.png")
            chosen.append(pixel_difference(pixel_signature(str(Path(tmp) / f"{k}.png")),
                                           pixel_signature(str(Path(tmp) / f"{k}o.png"))))
    results["audit_pixel_difference_copies_max"] = max(chosen)
    print(json.dumps({k: v for k, v in results.items() if k not in header()}, indent=2))
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="speed", choices=["speed", "threshold", "pixels"])
    p.add_argument("--labelled", type=int, default=10222)
    p.add_argument("--test-rows", type=int, default=10357)
    p.add_argument("--classes", type=int, default=120)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--photos", type=int, default=160, help="threshold: distinct training photos")
    p.add_argument("--test", type=int, default=40, help="threshold: distinct test photos")
    p.add_argument("--copies", type=int, default=20, help="threshold: re-encoded test photos placed in train")
    p.add_argument("--image-size", type=int, default=None, help="threshold: input size (default each backbone's)")
    p.add_argument("--backbones", default="resnet50,vgg16", help="threshold: backbones")
    p.add_argument("--sheet", default=None, help="threshold: also audit the photos and copy duplicates.png here")
    p.add_argument("--workdir", default=None,
                   help="speed: keep the store, photos and run here and reuse them (default: a temporary folder)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    results = {"speed": speed, "threshold": threshold_study, "pixels": pixel_study}[a.mode](a)
    write_json(results, a.out or f"benchmarks/results/audit_{a.mode}.json")


if __name__ == "__main__":
    main()
