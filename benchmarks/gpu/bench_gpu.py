#!/usr/bin/env python
"""GPU extraction benchmark (issue #15): dog-breed-sized JPEGs, decode and model ceilings, featstack end to end, \
timm side by side.

`bench_gpu.py all` runs every stage in its own process (JAX and PyTorch never share the GPU) under one deadline,
writes everything measured so far to OUT/gpu_bench.json after each stage, and prints a table. The stages:

  generate  N JPEGs in the dog-breed layout, sized like the Kaggle photos, on every core
  decode    (a) decode ceiling: featstack's decoder threads, and a process pool beside it
  extract   (c) extract_features.py end to end (KERAS_BACKEND=jax), with (e) GPU utilisation sampled meanwhile
  timm      (d) the same four architectures in timm: torch.compile, channels-last, bf16 autocast, same decode
  models    (b) model ceiling of each backbone on pre-decoded arrays: featstack's call and a device-resident jit

run.sh is the one command; see BENCHMARKS.md, section GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

BACKBONES = ("xception", "inception_v3", "resnet50", "vgg16")
# The newer registry entries (issue 22), measured when asked: `--optional` (run.sh: OPTIONAL=1) adds them.
OPTIONAL_BACKBONES = ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge",
                      "efficientnetv2_b0", "efficientnetv2_b1", "efficientnetv2_b2", "efficientnetv2_b3",
                      "efficientnetv2_s", "efficientnetv2_m", "efficientnetv2_l", "nasnet_large", "resnet152")
TIMM_NAMES = {"xception": "legacy_xception", "inception_v3": "inception_v3", "resnet50": "resnet50", "vgg16": "vgg16",
              "resnet152": "resnet152", "nasnet_large": "nasnetalarge",
              **{f"convnext_{v}": f"convnext_{v}" for v in ("tiny", "small", "base", "large", "xlarge")},
              **{f"efficientnetv2_{v}": f"tf_efficientnetv2_{v}" for v in ("b0", "b1", "b2", "b3", "s", "m", "l")}}
KAGGLE_TRAIN, KAGGLE_TEST, BREEDS = 10222, 10357, 120  # the Kaggle dog-breed competition: 20,579 photos in all
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# Stages in the order they run: the headline figures (c, d) before the ceilings, so a short deadline loses the least.
STAGES = ("generate", "decode", "extract", "timm", "models")
STAGE_CAP_S = {"generate": 120, "decode": 120, "extract": 240, "timm": 240, "models": 180}


# --------------------------------------------------------------------------------------------------- generate
_GRAIN: np.ndarray | None = None


def photo_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) drawn like the Kaggle dog-breed photos (Stanford Dogs): most 500 px on the long side."""
    u = rng.uniform()
    if u < 0.55:
        return 500, 375
    if u < 0.70:
        return 375, 500
    if u < 0.80:
        return 500, 333
    long_side, aspect = int(rng.integers(200, 501)), rng.uniform(1.0, 1.6)
    short = max(150, int(long_side / aspect))
    return (long_side, short) if rng.uniform() < 0.7 else (short, long_side)


def synthetic_photo(seed: int):
    """A JPEG-worthy image: two random colour fields at coarse and mid scale plus sensor-like grain."""
    from PIL import Image
    global _GRAIN
    if _GRAIN is None:  # one grain bank per process; crops of it are much cheaper than fresh normal draws
        _GRAIN = np.random.default_rng(12345).standard_normal((1024, 1024), dtype=np.float32)
    rng = np.random.default_rng(seed)
    w, h = photo_size(rng)

    def field(cells_w, cells_h, resample):
        small = rng.integers(0, 256, (max(2, cells_h), max(2, cells_w), 3), dtype=np.uint8)
        return np.asarray(Image.fromarray(small).resize((w, h), resample), dtype=np.float32)

    img = 0.6 * field(int(rng.integers(2, 6)), int(rng.integers(2, 6)), Image.BICUBIC)
    img += 0.4 * field(w // int(rng.integers(8, 24)), h // int(rng.integers(8, 24)), Image.BILINEAR)
    y, x = int(rng.integers(0, 1024 - h)), int(rng.integers(0, 1024 - w))
    img += _GRAIN[y:y + h, x:x + w, None] * rng.uniform(2, 6)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _image_id(k: int) -> str:
    import hashlib
    return hashlib.md5(f"featstack-gpu-{k}".encode()).hexdigest()  # Kaggle's ids are 32 hex digits too


def _write_photos(job: tuple[str, list[tuple[int, str]]]) -> int:
    folder, items = job
    total = 0
    for k, image_id in items:
        path = Path(folder) / f"{image_id}.jpg"
        synthetic_photo(k).save(path, quality=90)
        total += path.stat().st_size
    return total


def generate(data: Path, n: int, workers: int | None = None) -> dict:
    """N JPEGs in the dog-breed layout (labels.csv + train/, test/), split in Kaggle's train:test proportion."""
    from concurrent.futures import ProcessPoolExecutor
    marker = data / "generated.json"
    if marker.is_file() and json.loads(marker.read_text()).get("n") == n:
        return {**json.loads(marker.read_text()), "reused": True}
    if data.exists():
        shutil.rmtree(data)
    n_train = round(n * KAGGLE_TRAIN / (KAGGLE_TRAIN + KAGGLE_TEST))
    ids = [_image_id(k) for k in range(n)]
    for split in ("train", "test"):
        (data / split).mkdir(parents=True)
    t0 = time.perf_counter()
    jobs = []
    step = 64
    for start in range(0, n, step):
        items = [(k, ids[k]) for k in range(start, min(n, start + step))]
        for split, part in (("train", [(k, i) for k, i in items if k < n_train]),
                            ("test", [(k, i) for k, i in items if k >= n_train])):
            if part:
                jobs.append((str(data / split), part))
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        total = sum(map(_write_photos, jobs))
    else:
        with ProcessPoolExecutor(workers) as pool:
            total = sum(pool.map(_write_photos, jobs))
    breeds = [f"breed_{b:03d}" for b in range(BREEDS)]
    (data / "labels.csv").write_text("id,breed\n" + "".join(f"{ids[k]},{breeds[k % BREEDS]}\n" for k in range(n_train)))
    info = {"n": n, "train": n_train, "test": n - n_train, "seconds": time.perf_counter() - t0,
            "mean_kib": total / max(n, 1) / 1024, "workers": workers}
    marker.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------------------------------- helpers
def sizes_of(backbones: list[str], image_size: int | None) -> tuple[int, ...]:
    from featstack.backbones import REGISTRY
    return tuple(sorted({image_size or REGISTRY[b].input_size for b in backbones}))


def dataset(data: Path) -> tuple[list[str], list[str]]:
    from featstack.layouts import read_layout
    table, _ = read_layout(data, "dog-breed")
    return table["id"].tolist(), table["path"].tolist()


def resolve_batch(batch: str) -> int:
    from featstack.extract import auto_batch_size
    return auto_batch_size() if batch == "auto" else int(batch)


def jax_compiles() -> dict:
    """fun_name -> backend compiles, counted from here on (jax.monitoring's compile event)."""
    import jax
    counts: dict = {}

    def listen(event, seconds, **kw):
        if event == COMPILE_EVENT:
            counts[kw.get("fun_name", "?")] = counts.get(kw.get("fun_name", "?"), 0) + 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    return counts


# --------------------------------------------------------------------------------------------------- (a) decode
def _decode_count(job: tuple[list[str], tuple[int, ...]]) -> int:
    from featstack.decode import decode_batch
    arrays, _ = decode_batch(*job)
    return len(next(iter(arrays.values())))


def stage_decode(a) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    from featstack.extract import decoded_batches
    ids, paths = dataset(a.data)
    sizes = sizes_of(a.backbones, a.image_size)
    batch = int(a.batch_size) if a.batch_size != "auto" else 128
    threads = a.threads or os.cpu_count() or 1
    t0 = time.perf_counter()
    done = sum(len(arrays[sizes[0]]) for _, _, arrays, _ in decoded_batches(ids, paths, sizes, batch, threads))
    t_threads = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(threads) as pool:
        done_p = sum(pool.map(_decode_count, [(paths[s:s + batch], sizes) for s in range(0, len(paths), batch)]))
    t_procs = time.perf_counter() - t0
    assert done == done_p == len(paths), (done, done_p, len(paths))
    return {"images": len(paths), "sizes": sizes, "workers": threads,
            "threads_images_per_s": len(paths) / t_threads, "processes_images_per_s": len(paths) / t_procs}


# --------------------------------------------------------------------------------------------------- (b) models
def stage_models(a) -> dict:
    import keras

    from featstack import backbones as bb
    from featstack.extract import decoded_batches
    counts = jax_compiles() if keras.backend.backend() == "jax" else None
    batch = resolve_batch(a.batch_size)
    ids, paths = dataset(a.data)
    m = min(len(paths), a.model_images)
    m = max(batch, m - m % batch) if m >= batch else m  # whole batches, so every timed call has one shape
    sizes = sizes_of(a.backbones, a.image_size)
    decoded = {s: [] for s in sizes}
    for _, _, arrays, _ in decoded_batches(ids[:m], paths[:m], sizes, batch, a.threads or os.cpu_count() or 1):
        for s in sizes:
            decoded[s].append(arrays[s])
    decoded = {s: np.concatenate(v) for s, v in decoded.items()}
    out = {"images": m, "batch_size": batch, "precision": a.precision, "keras_backend": keras.backend.backend(),
           "per_backbone": {}}
    for b in bb.resolve(list(a.backbones), weights="random", image_size=a.image_size, precision=a.precision):
        row = {}
        t0 = time.perf_counter()
        b.build()
        row["build_s"] = time.perf_counter() - t0
        b.batch_rows = batch
        images = decoded[b.input_size]
        before = sum(counts.values()) if counts is not None else 0
        t0 = time.perf_counter()
        b.features(images[:batch])  # first call: trace and compile
        row["first_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for s in range(0, m, batch):
            b.features(images[s:s + batch])
        row["featstack_images_per_s"] = m / (time.perf_counter() - t0)  # host uint8 -> preprocess -> model -> host
        t0 = time.perf_counter()
        for s in range(0, m, batch):
            bb.preprocess(images[s:s + batch].astype(np.float32), b.preprocess)
        row["host_preprocess_images_per_s"] = m / (time.perf_counter() - t0)  # the host's share of that call
        if counts is not None:
            row["jax_compiles_featstack_call"] = sum(counts.values()) - before
            row.update(_device_ceiling(b, images, batch, m))
        out["per_backbone"][b.name] = row
        print(f"  {b.name}: {row}", flush=True)
        if a.part:  # kept as it grows: a stage stopped at its time limit still reports the backbones it finished
            Path(a.part).write_text(json.dumps(out))
        b.model = None
    per = out["per_backbone"].values()
    out["all_featstack_images_per_s"] = 1 / sum(1 / r["featstack_images_per_s"] for r in per)
    if all("device_images_per_s" in r for r in per):
        out["all_device_images_per_s"] = 1 / sum(1 / r["device_images_per_s"] for r in per)
    return out


def _device_ceiling(b, images: np.ndarray, batch: int, m: int) -> dict:
    """The GPU alone: one preprocessed batch already on the device, a jitted stateless forward pass, repeated."""
    import jax

    from featstack.backbones import preprocess
    reference = b.features(images[:batch])  # before the values are read: Keras's predict step donates its state
    model = b.model
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]
    forward = jax.jit(lambda t, f, x: model.stateless_call(t, f, x, training=False)[0])
    x = jax.device_put(preprocess(images[:batch].astype(np.float32), b.preprocess))
    t0 = time.perf_counter()
    forward(trainable, frozen, x).block_until_ready()
    compile_s = time.perf_counter() - t0
    reps = max(1, m // batch)
    t0 = time.perf_counter()
    for _ in range(reps):
        y = forward(trainable, frozen, x)
    y.block_until_ready()
    out = {"device_compile_s": compile_s, "device_images_per_s": reps * batch / (time.perf_counter() - t0)}

    # A candidate design, measured beside the current one: uint8 batches go to the device (a quarter of the bytes)
    # and the float32 preprocessing runs there, inside the same jit, before the model's own bf16 cast.
    def uint8_forward(t, f, x_uint8):
        x = jax.numpy.asarray(x_uint8, jax.numpy.float32)
        if b.preprocess != "none":
            x = imagenet_utils.preprocess_input(x, mode=b.preprocess)
        return model.stateless_call(t, f, x, training=False)[0]

    from keras.applications import imagenet_utils
    uint8_forward = jax.jit(uint8_forward)
    first = np.asarray(uint8_forward(trainable, frozen, images[:batch]), np.float32).reshape(batch, -1)
    out["uint8_in_max_rel_diff"] = float(np.abs(first - reference).max() / np.abs(reference).max())
    t0 = time.perf_counter()
    for s in range(0, m, batch):
        np.asarray(uint8_forward(trainable, frozen, images[s:s + batch]))
    out["uint8_in_images_per_s"] = m / (time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------------------------------- (d) timm
def stage_timm(a) -> dict:
    t_start = time.perf_counter()
    import timm
    import torch

    from featstack.backbones import REGISTRY
    from featstack.extract import decoded_batches
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = int(a.batch_size) if a.batch_size != "auto" else (128 if cuda else 32)
    ids, paths = dataset(a.data)
    sizes = sizes_of(a.backbones, a.image_size)
    compile_backend = a.timm_compile or ("inductor" if cuda else "eager")
    torch.backends.cudnn.benchmark = True
    models = {}
    for name in a.backbones:
        model = timm.create_model(TIMM_NAMES[name], pretrained=False, num_classes=0).eval().to(device)
        model = model.to(memory_format=torch.channels_last)
        cfg = model.pretrained_cfg
        mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1) * 255
        size = a.image_size or REGISTRY[name].input_size

        def run(x_uint8, model=model, mean=mean, std=std):
            x = x_uint8.permute(0, 3, 1, 2).float()  # NHWC bytes -> NCHW view in channels-last memory
            x = (x - mean) / std
            return model.forward_features(x).float().mean((2, 3))  # global average pool, as Keras's pooling="avg"

        models[name] = (torch.compile(run, backend=compile_backend, dynamic=False), size)
    built = time.perf_counter()

    def forward(name, arr, n):
        fn, _ = models[name]
        x = torch.from_numpy(arr)
        if len(x) < batch:  # the same fixed shape as featstack: the last batch padded, no recompilation
            x = torch.cat([x, x.new_zeros((batch - len(x), *x.shape[1:]))])
        x = x.to(device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            return fn(x)[:n].cpu().numpy()

    compile_s = {}
    for name, (_, size) in models.items():
        t0 = time.perf_counter()
        forward(name, np.zeros((batch, size, size, 3), np.uint8), batch)
        compile_s[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    width = {}
    for _, _, arrays, _ in decoded_batches(ids, paths, sizes, batch, a.threads or os.cpu_count() or 1):
        for name, (_, size) in models.items():
            width[name] = forward(name, arrays[size], len(arrays[size])).shape[1]
    if cuda:
        torch.cuda.synchronize()
    loop = time.perf_counter() - t0
    return {"images": len(paths), "batch_size": batch, "device": str(device), "torch": torch.__version__,
            "timm": timm.__version__, "compile_backend": compile_backend, "models": dict(TIMM_NAMES),
            "widths": width, "build_s": built - t_start, "compile_s": compile_s,
            "loop_s": loop, "loop_images_per_s": len(paths) / loop,
            "in_process_s": time.perf_counter() - t_start}


# --------------------------------------------------------------------------------------------------- (e) GPU sampler
class GpuSampler(threading.Thread):
    """GPU utilisation and memory every 0.1 s, through NVML (nvidia-ml-py) or else nvidia-smi."""

    def __init__(self):
        super().__init__(daemon=True)
        self.samples: list[tuple[float, float, float]] = []
        self.source = None
        self.stop_event = threading.Event()
        self.t0 = time.perf_counter()
        try:
            import pynvml
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)

            def read():
                u = pynvml.nvmlDeviceGetUtilizationRates(handle)
                return float(u.gpu), pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20

            read()
            self.read, self.source = read, "nvml"
        except Exception:
            if shutil.which("nvidia-smi") and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
                def read():
                    line = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                           "--format=csv,noheader,nounits", "-i", "0"],
                                          capture_output=True, text=True, timeout=5).stdout.split(",")
                    return float(line[0]), float(line[1])

                self.read, self.source = read, "nvidia-smi"

    def run(self):
        while self.source and not self.stop_event.wait(0.1):
            try:
                self.samples.append((time.perf_counter() - self.t0, *self.read()))
            except Exception:
                pass

    def summary(self) -> dict:
        self.stop_event.set()
        if not self.source:
            return {"source": None, "note": "no GPU: nothing to sample"}
        util = np.array([s[1] for s in self.samples]) if self.samples else np.zeros(0)
        out = {"source": self.source, "samples": len(util), "period_s": 0.1}
        if len(util):
            busy = np.flatnonzero(util > 0)
            window = util[busy[0]:busy[-1] + 1] if len(busy) else util
            out.update(mean_pct=float(util.mean()), max_pct=float(util.max()),
                       mean_busy_window_pct=float(window.mean()), busy_window_s=0.1 * len(window),
                       max_memory_mib=float(max(s[2] for s in self.samples)),
                       series=[[round(t, 2), u, round(mem)] for t, u, mem in self.samples])
        return out


# --------------------------------------------------------------------------------------------------- orchestrator
class Runner:
    """Runs each stage in a child process under the deadline, logs its output, keeps the JSON current."""

    def __init__(self, a):
        self.a = a
        self.started = time.perf_counter()
        self.out_dir = Path(a.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out_dir / "gpu_bench.json"
        self.log = open(self.out_dir / "gpu_bench.log", "a")
        self.res = {"machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.machine()}",
                    "date": time.strftime("%Y-%m-%d %H:%M"), "python": platform.python_version(),
                    "command": f"N={a.n} bash benchmarks/gpu/run.sh", "mode": a.mode, "n": a.n,
                    "backbones": list(a.backbones), "precision": a.precision, "batch_size": a.batch_size,
                    "image_size": a.image_size, "gpu": _gpu_name(), "stages": {}}
        self.save()

    def save(self):
        self.res["elapsed_s"] = time.perf_counter() - self.started
        self.json_path.write_text(json.dumps(self.res, indent=1))

    def left(self) -> float:
        return self.a.deadline - (time.perf_counter() - self.started)

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> dict | None:
        limit = min(STAGE_CAP_S[name] * (1 if self.a.mode == "gpu" else 10), self.left() - 10)
        record = {"ok": False, "command": " ".join(str(c) for c in cmd)}
        self.res["stages"][name] = record
        if limit < 20:
            record["error"] = "skipped: the deadline left too little time"
            self.save()
            return None
        self._print(f"\n=== {name} (limit {limit:.0f} s) ===")
        t0 = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env={**os.environ, **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        timer = threading.Timer(limit, lambda: os.killpg(proc.pid, 9))
        timer.start()
        tail = []
        for line in proc.stdout:
            if _noise(line):
                continue
            self._print(line.rstrip("\n"))
            tail = (tail + [line.rstrip("\n")])[-15:]
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        code = os.waitstatus_to_exitcode(status)
        record.update(wall_s=time.perf_counter() - t0, returncode=code, peak_rss_mib=usage.ru_maxrss / 1024)
        if code:
            record["error"] = (("killed at the stage's time limit" if code == -9 else "failed") + ": "
                               + " | ".join(tail[-3:]))
        else:
            record["ok"] = True
        self.save()
        return record

    def _print(self, line: str):
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()


def _noise(line: str) -> bool:
    """Start-up chatter of TensorFlow/XLA/absl: kept out of the log, which must stay readable at 12,000 characters."""
    return line.startswith(("I0000 ", "W0000 ", "WARNING: All log messages before absl")) or "cuda_dnn.cc" in line


def _gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_all(a) -> int:
    r = Runner(a)
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--data", a.data, "--backbones", ",".join(a.backbones), "--batch-size", a.batch_size,
              "--precision", a.precision] + (["--image-size", str(a.image_size)] if a.image_size else [])
    work = Path(a.work)
    parts = work / "parts"
    parts.mkdir(parents=True, exist_ok=True)

    def stage(name, extra=(), env=None):
        part = parts / f"{name}.json"
        part.unlink(missing_ok=True)
        rec = r.run(name, me + [name, "--part", str(part)] + list(extra), env)
        if rec is not None and part.is_file():  # also what a stage stopped at its limit wrote so far
            rec.update(json.loads(part.read_text()))
            r.save()
        return rec

    stage("generate", ["--n", str(a.n), "--data", a.data])
    if not r.res["stages"]["generate"]["ok"]:
        return finish(r, 1)
    stage("decode", common)

    # (c) end to end as a user runs it, with (e) the GPU sampled meanwhile. --holdout 0: the split costs nothing,
    # and a small N has too few photos per breed for a stratified holdout.
    features, summary = work / "features", work / "summary.json"
    shutil.rmtree(features, ignore_errors=True)
    summary.unlink(missing_ok=True)
    counts = work / "jax_compiles.json"
    cmd = [sys.executable, str(Path(__file__).parent / "count_compiles.py"), str(counts),
           str(ROOT / "extract_features.py"), "--data", a.data, "--features-dir", str(features),
           "--backbones", ",".join(a.backbones), "--weights", "random", "--precision", a.precision,
           "--batch-size", a.batch_size, "--holdout", "0", "--no-progress", "--summary-json", str(summary)]
    if a.image_size:
        cmd += ["--image-size", str(a.image_size)]
    sampler = GpuSampler()
    sampler.start()
    rec = r.run("extract", cmd)
    if rec is not None:
        rec["gpu_utilisation"] = sampler.summary()
        if summary.is_file():
            s = json.loads(summary.read_text())
            rec.update(loop_s=s["loop_seconds"], in_process_s=s["seconds"], images=s["images"],
                       loop_images_per_s=s["images"] / s["loop_seconds"], wall_images_per_s=s["images"] / rec["wall_s"],
                       per_backbone={b["name"]: {"extracted": b["extracted"], "seconds": b["seconds"]}
                                     for b in s["backbones"]})
        if counts.is_file():
            rec["jax_compiles"] = json.loads(counts.read_text())
        r.save()
    sampler.join(1)

    sampler = GpuSampler()
    sampler.start()
    rec = stage("timm", common + (["--timm-compile", a.timm_compile] if a.timm_compile else []))
    if rec is not None:
        rec["gpu_utilisation"] = sampler.summary()
        r.save()
    sampler.join(1)
    stage("models", common + ["--model-images", str(a.model_images)])
    ok = all(s.get("ok") for s in r.res["stages"].values())
    return finish(r, 0 if ok else 1)


def finish(r: Runner, code: int) -> int:
    r.res["ok"] = code == 0
    r.save()
    r._print(table(r.res))
    r._print(f"\n{r.json_path}")
    return code


def table(res: dict) -> str:
    st = res["stages"]
    n = res["n"]

    def get(stage, *keys):
        v = st.get(stage, {})
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        return v

    rows = [("data: generate N JPEGs", get("generate", "seconds"), None)]
    for key, label in (("threads_images_per_s", "(a) decode ceiling, featstack threads"),
                       ("processes_images_per_s", "(a) decode ceiling, process pool")):
        v = get("decode", key)
        rows.append((label, n / v if v else None, v))
    for key, label in (("all_featstack_images_per_s", "(b) model ceiling, all four, featstack call"),
                       ("all_device_images_per_s", "(b) model ceiling, all four, on-device jit")):
        v = get("models", key)
        rows.append((label, n / v if v else None, v))
    rows.append(("(c) featstack extract: loop", get("extract", "loop_s"), get("extract", "loop_images_per_s")))
    ok_c, ok_d = get("extract", "ok"), get("timm", "ok")
    rows.append(("(c) featstack extract: wall clock", get("extract", "wall_s") if ok_c else None,
                 get("extract", "wall_images_per_s")))
    loop = get("timm", "loop_s")
    rows.append(("(d) timm: loop after compile", loop, n / loop if loop else None))
    rows.append(("(d) timm: wall clock", get("timm", "wall_s") if ok_d else None,
                 n / get("timm", "wall_s") if ok_d else None))
    lines = [f"\n{'measure (N = ' + format(n, ',') + ')':<46}{'seconds':>10}{'images/s':>11}"]
    lines += [f"{label:<46}{_fmt(secs, 1):>10}{_fmt(ips, 0):>11}" for label, secs, ips in rows]
    util = get("extract", "gpu_utilisation") or {}
    lines.append(f"{'(e) GPU utilisation during (c)':<46}"
                 + (f"mean {util['mean_pct']:.0f}%, busy window {util['mean_busy_window_pct']:.0f}% over "
                    f"{util['busy_window_s']:.1f} s" if "mean_pct" in util else util.get("note", "n/a")))
    comp = get("extract", "jax_compiles")
    if comp:
        lines.append(f"{'(c) JAX compiles of predict_step':<46}{comp.get('jit(predict_step)', 0)} "
                     f"(one per backbone when every batch has one shape)")
    per = get("models", "per_backbone") or {}
    if per:
        cols = (("featstack_images_per_s", "featstack"), ("host_preprocess_images_per_s", "host prep"),
                ("uint8_in_images_per_s", "uint8 in"), ("device_images_per_s", "on device"))
        lines.append(f"\n{'(b) images/s per backbone':<26}" + "".join(f"{c:>11}" for _, c in cols)
                     + f"{'rel diff':>10}")
        for name, row in per.items():
            lines.append(f"{name:<26}" + "".join(f"{_fmt(row.get(k), 0):>11}" for k, _ in cols)
                         + format(format(row['uint8_in_max_rel_diff'], '.1e') if 'uint8_in_max_rel_diff' in row
                                  else '—', '>10'))
    failed = [k for k, v in st.items() if not v.get("ok")]
    lines.append("\nall stages ok" if not failed else "\nFAILED stages: " + ", ".join(
        f"{k} ({st[k].get('error', '')[-200:]})" for k in failed))
    return "\n".join(lines)


def _fmt(v, digits):
    return "—" if v is None else f"{v:,.{digits}f}"


# --------------------------------------------------------------------------------------------------- command line
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    for name in ("all",) + STAGES:
        s = sub.add_parser(name)
        s.add_argument("--data", default=None)
        s.add_argument("--part", default=None, help="where a stage writes its JSON")
        s.add_argument("--backbones", default=",".join(BACKBONES), type=lambda t: tuple(t.split(",")))
        s.add_argument("--batch-size", default="auto")
        s.add_argument("--precision", default="bf16")
        s.add_argument("--image-size", type=int, default=None, help="override every input size (CPU mode: small)")
        s.add_argument("--threads", type=int, default=None, help="decoder threads/processes (default: cores)")
        s.add_argument("--model-images", type=int, default=4096, help="(b): images timed per backbone")
        s.add_argument("--timm-compile", default=None,
                       help="torch.compile backend (default inductor on GPU, eager on CPU)")
        s.add_argument("--n", type=int, default=KAGGLE_TRAIN + KAGGLE_TEST)
        s.add_argument("--out-dir", default=os.environ.get("OUT") or "/tmp/gpuout")
        s.add_argument("--work", default="/tmp/featstack-gpu-bench", help="generated data, features, stage files")
        s.add_argument("--mode", default="gpu", choices=["gpu", "cpu"])
        s.add_argument("--deadline", type=float, default=450, help="seconds for all stages together")
        s.add_argument("--optional", action="store_true",
                       help=f"also the newer backbones: {', '.join(OPTIONAL_BACKBONES)}")
    a = p.parse_args(argv)
    if a.optional:
        a.backbones = tuple(dict.fromkeys((*a.backbones, *OPTIONAL_BACKBONES)))
    a.data = Path(a.data or Path(a.work) / "dog-breed")
    if a.stage == "all":
        a.data = str(a.data)
        return run_all(a)
    a.data = Path(a.data)
    if a.stage == "generate":
        result = generate(a.data, a.n)
    else:
        result = globals()[f"stage_{a.stage}"](a)
    print(json.dumps({k: v for k, v in result.items() if k != "per_backbone"}), flush=True)
    if a.part:
        Path(a.part).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
