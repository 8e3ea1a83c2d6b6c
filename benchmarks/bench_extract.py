#!/usr/bin/env python
"""Extraction benchmark: decode ceiling, model ceiling, our pipeline and the usual notebook loop, in one run.

Images: the real Kaggle photos in ../shared/data/dogs-vs-cats-sample/ repeated to N, or (where that folder is
absent, or with --source generated) 500x375 JPEGs of smooth, photo-like content. Prints a table, writes JSON.
Runs on any Keras backend (KERAS_BACKEND=tensorflow|jax|torch).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
from common import header, write_json  # noqa: E402

SHARED_PHOTOS = ROOT.parent / "shared" / "data" / "dogs-vs-cats-sample" / "train"


def generated_photo(seed: int, size=(500, 375)):
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = rng.uniform(0, 255, 3) + xx[..., None] * rng.uniform(-0.4, 0.4, 3) + yy[..., None] * rng.uniform(-0.4, 0.4, 3)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + rng.uniform(0, 255, 3) * blob
    img += rng.normal(0, 6, img.shape)  # sensor-like grain, so JPEG sizes are photo-like
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))


def prepare(n: int, source: str, folder: Path) -> tuple[list[str], str]:
    train = folder / "train"
    train.mkdir(parents=True)
    real = sorted(SHARED_PHOTOS.glob("*.jpg")) if SHARED_PHOTOS.is_dir() else []
    if source == "shared" and real:
        for k in range(n):
            src = real[k % len(real)]
            shutil.copyfile(src, train / f"{src.stem.split('.')[0]}.{k}.jpg")
        used = f"{len(real)} real Kaggle dogs-vs-cats photos repeated to {n}"
    else:
        for k in range(n):
            generated_photo(k).save(train / f"{'cat' if k % 2 else 'dog'}.{k}.jpg", quality=90)
        used = f"{n} generated 500x375 JPEGs"
    return sorted(str(p) for p in train.glob("*.jpg")), used


def peak_rss_run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process, measured for that child alone."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"pipeline failed: {' '.join(cmd)}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--backbones", default="xception,inception_v3,resnet50,vgg16")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batch-size", default="32")
    p.add_argument("--precision", default="float32")
    p.add_argument("--source", default="shared", choices=["shared", "generated"])
    p.add_argument("--stages", default="decode,model,pipeline,notebook")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default="benchmarks/results/extract.json")
    a = p.parse_args()
    stages = set(a.stages.split(","))

    import keras

    from featstack import backbones as bb
    from featstack.extract import auto_batch_size, decoded_batches

    batch = auto_batch_size() if a.batch_size == "auto" else int(a.batch_size)
    names = a.backbones.split(",")
    resolved = bb.resolve(names, weights="random", image_size=a.image_size, precision=a.precision)
    sizes = tuple(sorted({b.input_size for b in resolved}))
    res = {**header(), "keras_backend": keras.backend.backend(), "n": a.n,
           "backbones": names, "sizes": sizes, "batch_size": batch, "precision": a.precision,
           "images_per_s": {}, "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths, res["images"] = prepare(a.n, a.source, Path(tmp) / "data")
        ids = [Path(x).stem for x in paths]
        print(f"{res['images']}; backbones {names} at {sizes} px; batch {batch}; backend {res['keras_backend']}")

        if "decode" in stages or "model" in stages:
            t0 = time.perf_counter()
            decoded = {s: [] for s in sizes}
            for _, _, arrays, _ in decoded_batches(ids, paths, sizes, batch, a.threads):
                for s in sizes:
                    decoded[s].append(arrays[s])
            res["seconds"]["decode"] = time.perf_counter() - t0
            res["images_per_s"]["decode_ceiling"] = a.n / res["seconds"]["decode"]
            decoded = {s: np.concatenate(v) for s, v in decoded.items()}
            print(f"decode ceiling: {res['images_per_s']['decode_ceiling']:.1f} img/s ({a.threads} threads)")

        if "model" in stages:
            total = 0.0
            for b in resolved:
                b.build()
                x = bb.preprocess(decoded[b.input_size].astype(np.float32), b.preprocess)
                b.model.predict(x[:batch], batch_size=batch, verbose=0)  # warm-up: tracing / compilation
                t0 = time.perf_counter()
                b.model.predict(x, batch_size=batch, verbose=0)
                dt = time.perf_counter() - t0
                total += dt
                res["images_per_s"][f"model_ceiling_{b.name}"] = a.n / dt
                print(f"model ceiling {b.name}: {a.n / dt:.1f} img/s")
                b.model = None
            res["seconds"]["model_all"] = total
            res["images_per_s"]["model_ceiling_all"] = a.n / total
            print(f"model ceiling, all: {a.n / total:.1f} img/s")
            del decoded

        if "pipeline" in stages:
            summary_file = Path(tmp) / "summary.json"
            cmd = [sys.executable, str(ROOT / "extract_features.py"), "--data", str(Path(tmp) / "data"),
                   "--features-dir", str(Path(tmp) / "features"), "--backbones", a.backbones, "--weights", "random",
                   "--batch-size", str(batch), "--precision", a.precision, "--holdout", "0", "--no-progress",
                   "--decode-threads", str(a.threads), "--summary-json", str(summary_file)]
            if a.image_size:
                cmd += ["--image-size", str(a.image_size)]
            wall, rss = peak_rss_run(cmd)
            summary = json.loads(summary_file.read_text())
            res["seconds"].update(pipeline_wall=wall, pipeline_loop=summary["loop_seconds"])
            res["images_per_s"]["pipeline_loop"] = a.n / summary["loop_seconds"]
            res["images_per_s"]["pipeline_wall"] = a.n / wall
            res["pipeline_peak_rss_mib"] = rss
            print(f"pipeline: {a.n / summary['loop_seconds']:.1f} img/s in the extraction loop, {a.n / wall:.1f} img/s "
                  f"wall incl. start-up and model building ({wall:.1f} s); peak RSS {rss:.0f} MiB")

        if "notebook" in stages:
            t_all = 0.0
            for _name, b in zip(names, resolved):
                app = getattr(keras.applications, b.spec.constructor)
                model = app(include_top=False, weights=None, pooling="avg", input_shape=(b.input_size, b.input_size, 3))
                module = sys.modules[app.__module__]
                model.predict(np.zeros((1, b.input_size, b.input_size, 3), np.float32), verbose=0)
                t0 = time.perf_counter()
                x = np.array([keras.utils.img_to_array(
                                  keras.utils.load_img(q, target_size=(b.input_size, b.input_size)))
                              for q in paths])
                model.predict(module.preprocess_input(x), batch_size=32, verbose=0)
                t_all += time.perf_counter() - t0
            res["seconds"]["notebook"] = t_all
            res["images_per_s"]["notebook_loop"] = a.n / t_all
            print(f"notebook loop: {a.n / t_all:.1f} img/s")

    ips = res["images_per_s"]
    if "pipeline_loop" in ips and "model_ceiling_all" in ips:
        res["pipeline_over_model_ceiling"] = ips["pipeline_loop"] / ips["model_ceiling_all"]
    if "pipeline_loop" in ips and "notebook_loop" in ips:
        res["pipeline_over_notebook"] = ips["pipeline_loop"] / ips["notebook_loop"]
        res["pipeline_wall_over_notebook"] = ips["pipeline_wall"] / ips["notebook_loop"]
    print(f"\n{'measure':<28}{'img/s':>10}")
    for k, v in ips.items():
        print(f"{k:<28}{v:>10.1f}")
    for k in ("pipeline_over_model_ceiling", "pipeline_over_notebook", "pipeline_wall_over_notebook"):
        if k in res:
            print(f"{k:<28}{res[k]:>10.2f}")
    if "pipeline_peak_rss_mib" in res:
        print(f"{'pipeline peak RSS (MiB)':<28}{res['pipeline_peak_rss_mib']:>10.0f}")
    write_json(res, a.out)


if __name__ == "__main__":
    main()
