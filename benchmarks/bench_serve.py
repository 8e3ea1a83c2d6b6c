"""serve.py throughput: photos/s at 1, 4 and 16 concurrent clients against predict.py's batch loop on the same photos,
and where a request's time goes (the server's Server-Timing header: multipart parsing, decode, resize, queue wait,
forward pass, classifier, JSON).

A small run is trained first (random weights, the chosen backbones) on real photos from ../shared/data when present,
else on the embedded demo. `--light` uses a light model instead: a MobileNetV2 (random weights) saved here as a Keras
model file and given as `--backbones PATH:LAYER`, as a user's own model would be, at each of `--sizes` (one model
file and one run per size; default 96,160,224). predict.py is timed as its Predictor.predict loop (models loaded and
warm; batch 32) before the servers and after each of `--rounds` rounds of them, so drift of a shared machine
shows; with `--baseline DIR`, another checkout's serve.py is timed in turn in each round (an interleaved A/B). The
server is the real `serve.py` process, warmed by 8 requests, each client a thread sending one photo per request.
The last line per size is its ratio: the server at the most clients (median of the rounds) against the fastest of
predict.py's loops (the stricter comparison) and against their median.

    python benchmarks/bench_serve.py --light --clients 16      # the ratio at 96, 160 and 224 px
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import header, write_json  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "dogs-vs-cats-sample"
MARK_END = "<!-- bench_serve:end -->"


def light_model_file(work: Path, size: int = 224) -> str:
    """MobileNetV2 at ``size`` px with random weights, saved as a Keras model file: `PATH:LAYER` for --backbones."""
    import keras
    model = keras.applications.MobileNetV2(weights=None, include_top=True, input_shape=(size, size, 3))
    path = work / f"mobilenet_v2_{size}.keras"
    model.save(path)
    pooled = [layer.name for layer in model.layers if isinstance(layer, keras.layers.GlobalAveragePooling2D)][-1]
    return f"{path}:{pooled}"


def make_run(work: Path, backbones: list[str], image_size: int | None, per_class: int) -> tuple[Path, list[Path], str]:
    from featstack.extract import ExtractConfig, extract
    from featstack.stack import run_stack
    work.mkdir(parents=True, exist_ok=True)
    if SHARED.is_dir():
        data = work / "data"
        (data / "train").mkdir(parents=True)
        for kind in ("cat", "dog"):
            for k in range(per_class):
                shutil.copy(SHARED / "train" / f"{kind}.{k}.jpg", data / "train")
        photos = sorted((SHARED / "test1").glob("*.jpg"), key=lambda p: int(p.stem))
        source = f"{len(photos)} real dogs-vs-cats test photos (../shared/data)"
    else:
        from featstack.demo import write_demo
        data = write_demo(work / "data")
        photos = sorted((data / "test").glob("*.jpg"))
        source = "demo digit photos (../shared/data absent)"
    light = any(":" in b for b in backbones)
    summary = extract(ExtractConfig(data, backbones=backbones, weights="random", image_size=image_size,
                                    preprocess="tf" if light else None, features_dir=work / "features",
                                    batch_size=32, progress=False))
    run = run_stack(summary.paths.root, model="logreg", models_dir=work / "models", folds=3)
    return run, photos, source


def time_predict_loop(predictor, photos: list[Path]) -> float:
    predictor.predict([str(p) for p in photos], batch_size=32)  # warm-up: each batch shape is traced once
    t0 = time.perf_counter()
    out = predictor.predict([str(p) for p in photos], batch_size=32)
    seconds = time.perf_counter() - t0
    assert all(err is None for _, _, err in out)
    return len(photos) / seconds


def start_server(run: Path, max_batch: int, log: Path, root: Path = ROOT) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(root / "serve.py"), "--run", str(run), "--port", "0",
                             "--max-batch", str(max_batch)], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    for line in proc.stdout:
        found = re.search(r"at (http://\S+/) ", line)
        if found:
            return proc, found.group(1)
    raise SystemExit(f"serve.py did not start: {log.read_text()[-2000:]}")


STAGES = ("parse", "decode", "resize", "queue", "forward", "classifier", "json", "total")


def time_clients(url: str, photos: list[Path], clients: int, profile: list | None = None) -> float:
    import httpx
    payloads = [(p.name, p.read_bytes()) for p in photos]
    errors = []

    def client(share):
        with httpx.Client(timeout=600) as http:
            for name, data in share:
                t0 = time.perf_counter()
                r = http.post(url + "api/predict", files={"file": (name, data, "image/jpeg")})
                if r.status_code != 200:
                    errors.append(r.text)
                elif profile is not None:
                    timing = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
                    profile.append({**{k: float(v) for k, v in timing.items()},
                                    "client": 1000 * (time.perf_counter() - t0)})

    threads = [threading.Thread(target=client, args=(payloads[k::clients],)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"server errors: {errors[:3]}")
    return len(photos) / seconds


def measure(a, work: Path, backbones: list[str], label: str, image_size: int | None) -> tuple[dict, str]:
    """One run: predict.py's loop, the server at each client count, predict.py's loop again; the results and their
    BENCHMARKS.md table."""
    import httpx

    from featstack.predict import Predictor
    load = {"start": os.getloadavg()}
    run, photos, source = make_run(work, backbones, image_size, a.per_class)
    photos = (photos * (a.n // len(photos) + 1))[:a.n]
    predictor = Predictor(run)
    loops = [time_predict_loop(predictor, photos)]
    print(f"predict.py loop: {loops[-1]:.2f} photos/s")
    t0 = time.perf_counter()
    proc, url = start_server(run, a.max_batch, work / "serve.log")
    start_s = time.perf_counter() - t0
    procs, base_url = [proc], None
    try:
        if a.baseline:  # another checkout's serve.py on the same run, timed in turn with this one
            base_proc, base_url = start_server(run, a.max_batch, work / "baseline.log", Path(a.baseline))
            procs.append(base_proc)
        first = []
        for k in range(8):  # warm-up requests; the first is timed against the later ones
            t0 = time.perf_counter()
            httpx.post(url + "api/predict", files={"file": (photos[k].name, photos[k].read_bytes())}, timeout=600)
            first.append(time.perf_counter() - t0)
            if base_url:
                httpx.post(base_url + "api/predict", files={"file": (photos[k].name, photos[k].read_bytes())},
                           timeout=600)
        print(f"first request {first[0]:.3f} s, later ones {sorted(first[1:])[3]:.3f} s (median)")
        clients = list(map(int, a.clients.split(",")))
        rounds: dict[int, list[float]] = {c: [] for c in clients}
        base_rounds, profiles = [], {c: [] for c in clients}
        for r in range(a.rounds):  # interleaved: this server, the baseline, predict.py, again
            for c in clients:
                rounds[c].append(time_clients(url, photos, c, profiles[c]))
                print(f"round {r + 1}: serve.py, {c} client(s): {rounds[c][-1]:.2f} photos/s")
            if base_url:
                base_rounds.append(time_clients(base_url, photos, max(clients)))
                print(f"round {r + 1}: baseline serve.py ({a.baseline}), {max(clients)} client(s): "
                      f"{base_rounds[-1]:.2f} photos/s")
            loops.append(time_predict_loop(predictor, photos))
            print(f"round {r + 1}: predict.py loop: {loops[-1]:.2f} photos/s")
        health = httpx.get(url + "api/health").json()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
    served = {c: statistics.median(v) for c, v in rounds.items()}
    baseline = statistics.median(base_rounds) if base_rounds else None
    load["end"] = os.getloadavg()
    mean = {c: {k: sum(r[k] for r in rows) / len(rows) for k in (*STAGES, "client")} for c, rows in profiles.items()}
    reference = max(loops)  # the stricter comparison on a drifting machine
    most = max(served)
    results = {**header(), "photos": a.n, "source": source, "backbones": label, "image_size": image_size,
               "max_batch": a.max_batch, "load_average": {k: [round(x, 2) for x in v] for k, v in load.items()},
               "server_start_s": round(start_s, 1), "first_request_s": round(first[0], 3),
               "later_request_s_median": round(sorted(first[1:])[3], 3),
               "profile_ms_mean": {str(c): {k: round(v, 2) for k, v in m.items()} for c, m in mean.items()},
               "predict_loop_photos_per_s": [round(x, 3) for x in loops], "rounds": a.rounds,
               "ratio_at_most_clients_median": round(served[most] / statistics.median(loops), 3),
               "serve_photos_per_s": {str(c): round(v, 3) for c, v in served.items()},
               "ratio_at_most_clients": round(served[most] / reference, 3),
               **({"baseline": a.baseline, "baseline_photos_per_s": round(baseline, 3),
                   "baseline_ratio": round(baseline / reference, 3)} if baseline else {}),
               "server_batches": health["batches"],
               "server_images": health["images"], "largest_batch": health["largest_batch"]}
    size = f"{image_size} px" if image_size else "own input size"
    rows = [f"| `predict.py` batch loop (batch 32), each time | {' / '.join(f'{x:.2f}' for x in loops)} | |"]
    rows += [f"| `serve.py`, {c} concurrent client{'s' if c > 1 else ''} | {v:.2f} | {v / reference:.2f} |"
             for c, v in served.items()]
    if baseline:
        rows.append(f"| baseline `serve.py` ({a.baseline}), {most} clients | {baseline:.2f} "
                    f"| {baseline / reference:.2f} |")
    stages = " | ".join(STAGES)
    profile_rows = [f"| {c} | " + " | ".join(f"{m[k]:.1f}" for k in (*STAGES, "client")) + " |"
                    for c, m in mean.items()]
    la = " / ".join(f"{x:.1f}" for x in load["start"])
    table = "\n".join([f"{a.n} photos: {source}; backbones {label} ({size}), random weights; run `logreg`; load "
                       f"average at the start {la} (1 / 5 / 15 min). Server start (load, compile every batch shape) "
                       f"{start_s:.1f} s; first request {first[0]:.3f} s, later ones {sorted(first[1:])[3]:.3f} s "
                       f"(median). The server answered {health['images']} photos in {health['batches']} forward "
                       f"passes (largest {health['largest_batch']}; compiled after start: "
                       f"{health['compiled_since_start']}).", "",
                       f"| measure | photos/s (median of {a.rounds} rounds) | ÷ `predict.py` (the fastest of its "
                       "loops) |", "|---|---|---|", *rows, "",
                       "Where a request's time goes (mean ms per request, from the server's `Server-Timing` header; "
                       "queue, forward and classifier are those of the request's batch; client: as the client saw it):",
                       "", f"| clients | {stages} | client |", "|---" * (len(STAGES) + 2) + "|", *profile_rows])
    return results, table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=64, help="photos per measurement")
    p.add_argument("--backbones", default="resnet50")
    p.add_argument("--light", action="store_true", help="MobileNetV2 as a model file (PATH:LAYER) at each of --sizes "
                                                        "instead of --backbones")
    p.add_argument("--sizes", default="96,160,224", help="--light: the input sizes, one run each (default 96,160,224)")
    p.add_argument("--image-size", type=int, default=None, help="default: each backbone's own")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--per-class", type=int, default=20, help="training photos per class for the run")
    p.add_argument("--baseline", default=None, help="a checkout of another version (git worktree or archive): its "
                                                     "serve.py is timed too, at the most clients, between the same "
                                                     "predict.py loops (an interleaved A/B)")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each server, interleaved with predict.py's "
                                                         "loop; the median is reported (default 3)")
    p.add_argument("--out", default="benchmarks/results/serve.json")
    p.add_argument("--write-md", action="store_true", help="replace the marked table in BENCHMARKS.md")
    p.add_argument("--mark", default="bench_serve", help="which marked table of BENCHMARKS.md to replace")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    measured = {}
    try:
        if a.light:
            for size in map(int, a.sizes.split(",")):
                print(f"\n== MobileNetV2 model file at {size} px ==")
                case = work / str(size)
                case.mkdir()
                measured[size] = measure(a, case, [light_model_file(case, size)],
                                         f"MobileNetV2 ({size} px) as a model file", size)
        else:
            measured[a.image_size] = measure(a, work, a.backbones.split(","), a.backbones, a.image_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for _, table in measured.values():
        print("\n" + table)
    ratios = {size: results["ratio_at_most_clients"] for size, (results, _) in measured.items()}
    write_json(measured[next(iter(measured))][0] if len(measured) == 1 else
               {str(size): results for size, (results, _) in measured.items()}, a.out)
    print()
    most = max(map(int, a.clients.split(",")))
    for size, ratio in ratios.items():
        base = measured[size][0].get("baseline_ratio")
        median = measured[size][0]["ratio_at_most_clients_median"]
        print(f"ratio at {size or 'own'} px: serve.py at {most} clients / predict.py = {ratio:.2f} against its "
              f"fastest loop, {median:.2f} against its median" + (f" (baseline {base:.2f})" if base else ""))
    if a.write_md:
        md = ROOT / "BENCHMARKS.md"
        text = md.read_text()
        begin, end_mark = f"<!-- {a.mark}:begin -->", f"<!-- {a.mark}:end -->"
        if begin not in text:
            text = text.replace(MARK_END, f"{MARK_END}\n\n{begin}\n{end_mark}")
        start, end = text.index(begin) + len(begin), text.index(end_mark)
        tables = "\n\n".join(table for _, table in measured.values())
        md.write_text(text[:start] + "\n" + tables + "\n" + text[end:])


if __name__ == "__main__":
    main()
