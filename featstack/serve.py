"""The photo app: a web page and a JSON API that answer photos through a run's Predictor, \
batching concurrent requests."""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import socket
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from .decode import BadImage, decode_bytes, decode_rgb, to_input
from .errors import FeatstackError
from .layouts import read_layout
from .paths import DatasetPaths, RunPaths
from .predict import Predictor
from .split import read_split

STATIC_DIR = Path(__file__).parent / "static"
PREVIEW_PX = 512  # the decoded photo sent back to the page: big enough to see, small enough to send
EXAMPLE_PX = 256


@dataclass
class ServeConfig:
    """What `serve.py` is asked for, besides where it listens."""

    run: str | None = None
    models_dir: str = "models"
    max_batch: int = 32
    max_wait_ms: float = 20.0
    max_upload_mb: float = 20.0
    max_megapixels: float = 50.0
    token: str | None = None
    examples_per_class: int = 3

    @property
    def max_body(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)


class MicroBatcher:
    """Photos from concurrent requests wait in one queue; up to max_batch of them, or whatever came within
    max_wait_ms of the first, go through the Predictor in one forward pass on one thread (Keras models are not
    called from two threads at once)."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_ms: float):
        self.predictor, self.max_batch, self.max_wait_s = predictor, max_batch, max_wait_ms / 1000
        self.batches = self.images = self.largest = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="featstack-forward")
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._executor.shutdown(wait=True)

    async def predict(self, resized: dict[int, np.ndarray]) -> np.ndarray:
        """The class probabilities of one decoded photo, given resized once to every input size."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((resized, future))
        return await future

    async def _collect(self) -> list:
        loop = asyncio.get_running_loop()
        items = [await self._queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(items) < self.max_batch:
            try:
                items.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(remaining):
                    items.append(await self._queue.get())
            except TimeoutError:
                break
        return [(r, f) for r, f in items if not f.done()]  # a client that went away cancelled its future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            if not items:
                continue
            arrays = {s: np.stack([r[s] for r, _ in items]) for s in self.predictor.sizes}
            try:
                proba = await loop.run_in_executor(self._executor, self.predictor.predict_arrays, arrays)
            except Exception as exc:  # answered as a 500 for these photos; the server goes on
                traceback.print_exc()
                for _, f in items:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.images += len(items)
            self.largest = max(self.largest, len(items))
            for k, (_, f) in enumerate(items):
                if not f.done():
                    f.set_result(proba[k])


def example_index(config: dict, classes: list[str], per_class: int) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """Up to ``per_class`` training ids of every class, and the image path of each: the dataset's split.csv names
    the ids, its layout finds their files. Empty when the data folder is not on this machine."""
    meta = config.get("dataset_meta") or {}
    try:
        split = read_split(DatasetPaths(Path(config["features_dir"])))
        table, _ = read_layout(meta["data"], meta.get("layout") or "auto")
    except (FeatstackError, OSError, KeyError, ValueError) as exc:
        print(f"note: no example training photos: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return {c: [] for c in classes}, {}
    path_of_id = dict(zip(table["id"].astype(str), table["path"]))
    train = split[split["split"] == "train"]
    examples, paths = {}, {}
    for c in classes:
        ids = [i for i in train.loc[train["label"] == str(c), "id"].astype(str) if i in path_of_id][:per_class]
        examples[c] = ids
        paths.update({i: Path(path_of_id[i]) for i in ids})
    return examples, paths


def jpeg_bytes(img, px: int, quality: int = 85) -> bytes:
    img = img.copy()
    img.thumbnail((px, px))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def render_report(run: RunPaths) -> str:
    """report.md as a small HTML page; the confusion matrix goes inline so the page stands alone."""
    from markdown_it import MarkdownIt

    text = run.report_md.read_text()
    if run.confusion_png.is_file():
        inline = "data:image/png;base64," + base64.b64encode(run.confusion_png.read_bytes()).decode()
        text = text.replace("(confusion.png)", f"({inline})")
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Run report</title>"
            "<link rel='stylesheet' href='/static/app.css'></head><body class='report'>" + body + "</body></html>")


def _error(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


class Gate:
    """Checks that need no body, before any of it is read: the token, the content type and the announced size."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if self.config.token and scope["path"] != "/api/health":
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                     self.config.token.encode()):
                response = _error(401, "this server needs its token: send the header Authorization: Bearer <token> "
                                  "(the --token or FEATSTACK_TOKEN it was started with)",
                                  {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        if scope["method"] == "POST" and scope["path"] == "/api/predict":
            content_type = headers.get("content-type", "")
            if not content_type.lower().startswith("multipart/form-data"):
                response = _error(415, f"content type {content_type or 'none'!r}: send the photos as "
                                  "multipart/form-data with one field named file per photo (curl -F file=@photo.jpg)")
                return await response(scope, receive, send)
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.config.max_body:
                return await too_large(self.config)(scope, receive, send)
        await self.app(scope, receive, send)


def too_large(config: ServeConfig) -> JSONResponse:
    return _error(413, f"request larger than --max-upload-mb {config.max_upload_mb:g} MB: send fewer or smaller photos "
                  "per request, or start the server with a larger --max-upload-mb")


def create_app(config: ServeConfig, predictor: Predictor | None = None) -> FastAPI:
    """The app of one run; the Predictor (backbones and fitted model) is loaded here, once, unless one is given."""
    predictor = predictor or Predictor(config.run, config.models_dir)
    run = RunPaths(predictor.run)
    classes = [str(c) for c in predictor.classes]
    random_weights = any(b.weights == "random" for b in predictor.backbones)
    report = json.loads(run.report_json.read_text()) if run.report_json.is_file() else {}
    examples, example_paths = example_index(predictor.config, classes, config.examples_per_class)
    example_cache: dict[str, bytes] = {}
    batcher = MicroBatcher(predictor, config.max_batch, config.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="featstack photo app", lifespan=lifespan,
        description=f"Which class is in this photo? Answers of run `{run.run_id}` ({len(classes)} classes), exactly "
                    "those of `predict.py --json`. With `--token`, every `/api/` path but `/api/health` needs "
                    "`Authorization: Bearer <token>`.")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 413:
            return too_large(config)
        if exc.status_code == 400:  # the multipart parser's "There was an error parsing the body"
            return _error(400, "the multipart body could not be parsed: send the photos as multipart/form-data "
                          "with one field named file per photo")
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query"))
            problems.append(f"{where}: {e.get('msg', 'invalid')}")
        hint = (" (send one or more photos as multipart fields named file)"
                if any(p.startswith("file") for p in problems) else "")
        return _error(422, "; ".join(problems) + hint)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        traceback.print_exception(exc)
        return _error(500, f"internal error ({type(exc).__name__}); the server goes on; "
                           "the server's log has the details")

    def prepare(data: bytes, preview: bool):
        img = decode_bytes(data, config.max_pixels)
        resized = {s: to_input(img, s) for s in predictor.sizes}  # decode once, resize once per key, as decode_batch
        url = "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(img, PREVIEW_PX)).decode() if preview else None
        return resized, url

    async def answer(upload: UploadFile, preview: bool) -> dict:
        name = upload.filename or ""
        try:
            resized, url = await run_in_threadpool(prepare, await upload.read(), preview)
        except BadImage as exc:
            return {"filename": name, "error": f"cannot read this photo ({exc})"}
        proba = await batcher.predict(resized)
        order = np.argsort(-proba, kind="stable")
        out = {"filename": name, "predictions": [{"class": classes[i], "probability": float(proba[i])} for i in order]}
        if url:
            out["image"] = url
        return out

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # The route's own body limit counts the bytes of a body sent without Content-Length as they stream in.
    @app.post("/api/predict", summary="Which class is in each photo?", max_body_size=config.max_body)
    async def predict(file: list[UploadFile] = File(..., description="one or more photos, each a field named file"),
                      preview: bool = Query(False, description="also return each photo as decoded (EXIF orientation "
                                                                "applied), as a JPEG data URL of at most 512 px")):
        """Every class with its probability, most probable first, for each photo; equal to `predict.py --json`.

        A photo that cannot be read gets `error` instead of `predictions`; the others are still answered. When no
        photo of the request can be read, the answer is 422.
        """
        results = await asyncio.gather(*(answer(f, preview) for f in file))
        if all("error" in r for r in results):
            return _error(422, "; ".join(f"{r['filename'] or 'file'}: {r['error']}" for r in results))
        return {"run": run.run_id, "results": results}

    @app.get("/api/health", summary="Is the server up, and with which run?")
    async def health():
        return {"status": "ok", "run": run.run_id, "classes": len(classes),
                "backbones": list(predictor.config["backbones"]), "batches": batcher.batches,
                "images": batcher.images, "largest_batch": batcher.largest}

    @app.get("/api/classes", summary="The run's classes, with example training ids of each")
    async def class_list():
        return {"run": run.run_id, "classes": [{"class": c, "examples": examples.get(c, [])} for c in classes]}

    @app.get("/api/run", summary="The run: model, backbones, scores, report links")
    async def run_info():
        def scores(part):
            s = report.get(part) or {}
            return {k: s[k] for k in ("accuracy", "log_loss", "top5_accuracy", "rows") if k in s} or None
        return {"run": run.run_id, "dataset": predictor.config.get("dataset"), "model": predictor.config.get("model"),
                "backbones": list(predictor.config["backbones"]), "classes": len(classes),
                "random_weights": random_weights, "cv": scores("cv"), "holdout": scores("holdout"),
                "report": "/api/report" if run.report_md.is_file() else None,
                "confusion": "/api/confusion.png" if run.confusion_png.is_file() else None}

    @app.get("/api/report", response_class=HTMLResponse, summary="The run's report.md as HTML")
    async def report_page():
        if not run.report_md.is_file():
            raise HTTPException(404, "this run has no report.md")
        return HTMLResponse(await run_in_threadpool(render_report, run))

    @app.get("/api/confusion.png", summary="The run's holdout confusion matrix")
    async def confusion():
        if not run.confusion_png.is_file():
            raise HTTPException(404, "this run has no confusion.png (no holdout rows)")
        return FileResponse(run.confusion_png, media_type="image/png")

    @app.get("/api/examples/{image_id:path}", summary="An example training photo, by dataset id")
    async def example(image_id: str):
        # Only ids the server chose as examples are served; the client never names a file.
        if image_id not in example_paths:
            raise HTTPException(404, f"no example photo with id {image_id!r}; /api/classes lists them")
        if image_id not in example_cache:
            try:
                example_cache[image_id] = await run_in_threadpool(
                    lambda: jpeg_bytes(decode_rgb(example_paths[image_id]), EXAMPLE_PX))
            except BadImage:
                raise HTTPException(404, f"example photo {image_id!r} cannot be read on the server") from None
        return Response(example_cache[image_id], media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    app.state.batcher, app.state.predictor = batcher, predictor
    app.add_middleware(Gate, config=config)
    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken before the (slow) model load so that a busy port fails at once."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise FeatstackError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                             "pick another --port (0 takes a free one) or --host") from None
    return sock


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the run once, then answer on host:port until stopped."""
    import uvicorn

    sock = bind(host, port)
    app = create_app(config)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"featstack: serving run {app.state.predictor.run.name} at http://{shown}:{bound}/ "
          f"(API docs: http://{shown}:{bound}/docs; Ctrl+C stops)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
