"""serve.py throughput: photos/s at 1, 4 and 16 concurrent clients against predict.py's batch loop on the same photos.

A small run is trained first (random weights, the chosen backbones) on real photos from ../shared/data when present,
else on the embedded demo. predict.py is timed as its Predictor.predict loop (models loaded; batch 32) before and after
the server runs, so drift of a shared machine shows; the server is the real `serve.py` process, each client a thread
sending one photo per request.
"""
import argparse
import re
import shutil
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
MARK_BEGIN, MARK_END = "<!-- bench_serve:begin -->", "<!-- bench_serve:end -->"


def make_run(work: Path, backbones: list[str], image_size: int | None, per_class: int) -> tuple[Path, list[Path], str]:
    from featstack.extract import ExtractConfig, extract
    from featstack.stack import run_stack
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
    summary = extract(ExtractConfig(data, backbones=backbones, weights="random", image_size=image_size,
                                    features_dir=work / "features", batch_size=32, progress=False))
    run = run_stack(summary.paths.root, model="logreg", models_dir=work / "models", folds=3)
    return run, photos, source


def time_predict_loop(predictor, photos: list[Path]) -> float:
    predictor.predict([str(p) for p in photos[:4]])  # warm-up: first calls trace the models
    t0 = time.perf_counter()
    out = predictor.predict([str(p) for p in photos], batch_size=32)
    seconds = time.perf_counter() - t0
    assert all(err is None for _, _, err in out)
    return len(photos) / seconds


def start_server(run: Path, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--run", str(run), "--port", "0",
                             "--max-batch", str(max_batch)], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    for line in proc.stdout:
        found = re.search(r"at (http://\S+/) ", line)
        if found:
            return proc, found.group(1)
    raise SystemExit(f"serve.py did not start: {log.read_text()[-2000:]}")


def time_clients(url: str, photos: list[Path], clients: int) -> float:
    import httpx
    payloads = [(p.name, p.read_bytes()) for p in photos]
    errors = []

    def client(share):
        with httpx.Client(timeout=600) as http:
            for name, data in share:
                r = http.post(url + "api/predict", files={"file": (name, data, "image/jpeg")})
                if r.status_code != 200:
                    errors.append(r.text)

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


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=64, help="photos per measurement")
    p.add_argument("--backbones", default="resnet50")
    p.add_argument("--image-size", type=int, default=None, help="default: each backbone's own")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--per-class", type=int, default=20, help="training photos per class for the run")
    p.add_argument("--out", default="benchmarks/results/serve.json")
    p.add_argument("--write-md", action="store_true", help="replace the marked table in BENCHMARKS.md")
    a = p.parse_args()
    import httpx

    from featstack.predict import Predictor
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        run, photos, source = make_run(work, a.backbones.split(","), a.image_size, a.per_class)
        photos = (photos * (a.n // len(photos) + 1))[:a.n]
        predictor = Predictor(run)
        before = time_predict_loop(predictor, photos)
        print(f"predict.py loop: {before:.2f} photos/s")
        proc, url = start_server(run, a.max_batch, work / "serve.log")
        try:
            httpx.post(url + "api/predict", files={"file": (photos[0].name, photos[0].read_bytes())}, timeout=600)
            served = {}
            for c in map(int, a.clients.split(",")):
                served[c] = time_clients(url, photos, c)
                print(f"serve.py, {c} client(s): {served[c]:.2f} photos/s")
            health = httpx.get(url + "api/health").json()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        after = time_predict_loop(predictor, photos)
        print(f"predict.py loop again: {after:.2f} photos/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = max(before, after)  # the stricter comparison on a drifting machine
    most = max(served)
    results = {**header(), "photos": a.n, "source": source, "backbones": a.backbones, "image_size": a.image_size,
               "max_batch": a.max_batch,
               "predict_loop_photos_per_s": {"before": round(before, 3), "after": round(after, 3)},
               "serve_photos_per_s": {str(c): round(v, 3) for c, v in served.items()},
               "ratio_at_most_clients": round(served[most] / reference, 3), "server_batches": health["batches"],
               "server_images": health["images"], "largest_batch": health["largest_batch"]}
    write_json(results, a.out)
    size = f"{a.image_size} px" if a.image_size else "own input size"
    rows = [f"| `predict.py` batch loop (batch 32), before / after | {before:.2f} / {after:.2f} | |"]
    rows += [f"| `serve.py`, {c} concurrent client{'s' if c > 1 else ''} | {v:.2f} | {v / reference:.2f} |"
             for c, v in served.items()]
    table = "\n".join([f"{a.n} photos: {source}; backbones {a.backbones} ({size}), random weights; run `logreg`. "
                       f"The server answered {health['images']} photos in {health['batches']} forward passes "
                       f"(largest {health['largest_batch']}).", "",
                       "| measure | photos/s | ÷ `predict.py` (the faster of its two) |", "|---|---|---|", *rows])
    print("\n" + table)
    if a.write_md:
        md = ROOT / "BENCHMARKS.md"
        text = md.read_text()
        start, end = text.index(MARK_BEGIN) + len(MARK_BEGIN), text.index(MARK_END)
        md.write_text(text[:start] + "\n" + table + "\n" + text[end:])


if __name__ == "__main__":
    main()
