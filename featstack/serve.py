"""The photo app: a web page and a JSON API that answer photos through a run's Predictor, \
batching concurrent requests."""
from __future__ import annotations

import asyncio
import base64
import hmac
import io
import ipaddress
import json
import os
import re
import socket
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from .decode import BadImage, decode_bytes, decode_rgb, to_input
from .errors import FeatstackError
from .heartbeat import heartbeat, printer
from .layouts import read_layout
from .paths import DatasetPaths, RunPaths
from .predict import Predictor
from .split import read_split

STATIC_DIR = Path(__file__).parent / "static"
PREVIEW_PX = 512  # the decoded photo sent back to the page: big enough to see, small enough to send
EXAMPLE_PX = 256
MAX_FILES = 1000  # photos in one request (the multipart parser's own default, said in words when exceeded)
FORWARD_WORKERS = 1  # one thread calls the models: Keras models are not called from two threads at once


def cores() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class ServeConfig:
    """What `serve.py` is asked for, besides where it listens."""

    run: str | None = None
    models_dir: str = "models"
    max_batch: int = 32
    max_wait_ms: float = 20.0
    max_upload_mb: float = 20.0
    max_megapixels: float = 50.0
    max_request_megapixels: float = 100.0
    token: str | None = None
    open_api: bool = False  # --no-token on an address beyond this machine: the page and the log say so
    stall_timeout_s: float = 30.0
    request_timeout_s: float = 120.0  # from a request's first byte to its last, however steadily the bytes come
    listen_host: str | None = None  # the --host it listens on (set by serve()): a name the Host header may give
    allowed_hosts: tuple[str, ...] = ()  # more Host names (--allowed-hosts): "name", "*.domain" or "*" (any)
    decode_workers: int | None = None  # photos decoded at once, server-wide (default: the cores)
    verbose: bool = False
    examples_per_class: int = 3

    @property
    def max_body(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)

    @property
    def max_request_pixels(self) -> int:
        return int(self.max_request_megapixels * 1_000_000)


class MicroBatcher:
    """Photos from concurrent requests wait in one queue; up to max_batch of them go through the Predictor in one
    forward pass on one thread (Keras models are not called from two threads at once). The first photo waits up to
    max_wait_ms for others while others are being decoded (``incoming``) or fewer have come than the last batch
    had (concurrent clients, whose next photos are on their way: fewer, larger batches cost less per photo); once
    as many are in as last time and none is being decoded, the batch goes at once. So a lone client no longer pays
    max_wait_ms per photo, and concurrent clients no longer leave the forward thread idle for it on every batch:
    the waits that show most on a light model. The Predictor pads each batch to a shape compiled at start."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_ms: float, verbose: bool = False):
        self.predictor, self.max_batch, self.max_wait_s = predictor, max_batch, max_wait_ms / 1000
        self.verbose = verbose
        self.batches = self.images = self.largest = 0
        self.incoming = 0  # photos being decoded, each of which will join the queue (or fail to decode)
        self.last_batch = 0  # photos in the last forward pass
        self.traces_at_start: int | None = None
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(FORWARD_WORKERS, thread_name_prefix="featstack-forward")

    def warm(self) -> float:
        """Compile every batch shape on the thread that will run them (TensorFlow sets up each thread on its first
        call); returns the seconds taken."""
        seconds = self._executor.submit(self.predictor.warm).result()
        self.traces_at_start = self.predictor.traces
        return seconds

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._executor.shutdown(wait=True)

    @property
    def compiled_since_start(self) -> int:
        return self.predictor.traces - (self.traces_at_start or 0)

    async def predict(self, resized: dict[int, np.ndarray], timing: dict) -> np.ndarray:
        """The class probabilities of one decoded photo, given resized once to every input size; ``timing`` gets
        the seconds it waited in the queue and those of its batch's forward pass and classifier."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((resized, future, time.perf_counter()))
        proba, started, batch_timing = await future
        timing.update(batch_timing)
        timing["queue"] = started[0] - started[1]
        return proba

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
            if remaining <= 0 or (not self.incoming and len(items) >= self.last_batch):
                break
            try:
                async with asyncio.timeout(remaining):
                    items.append(await self._queue.get())
            except TimeoutError:
                break
        return [item for item in items if not item[1].done()]  # a client that went away cancelled its future

    def _forward(self, arrays: dict[int, np.ndarray]):
        started, traces, timings = time.perf_counter(), self.predictor.traces, {}
        proba = self.predictor.predict_arrays(arrays, timings)
        if self.predictor.traces != traces and self.traces_at_start is not None:
            print(f"featstack: note: a forward pass was compiled after start (a batch of {len(proba)} photos); "
                  "answers are right, this one was slow", file=sys.stderr, flush=True)
        return proba, started, timings

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            if not items:
                continue
            arrays = {s: np.stack([r[s] for r, _, _ in items]) for s in self.predictor.sizes}
            try:
                proba, started, timings = await loop.run_in_executor(self._executor, self._forward, arrays)
            except Exception as exc:  # answered as a 500 for these photos; the server goes on
                traceback.print_exc()
                for _, f, _ in items:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.last_batch = len(items)
            self.images += len(items)
            self.largest = max(self.largest, len(items))
            for k, (_, f, queued) in enumerate(items):
                if not f.done():
                    f.set_result((proba[k], (started, queued), timings))


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


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
HOST_HEADER = re.compile(r"[A-Za-z0-9._-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?")  # a name or [IPv6], a port


def host_names(config: ServeConfig) -> set[str]:
    """The names a request's Host header may give besides the address its connection came in on: localhost, the
    --host it listens on and, on every interface (0.0.0.0, ::), this machine's own name."""
    names = set(LOOPBACK_NAMES)
    if config.listen_host:
        names.add(config.listen_host.strip("[]").lower())
        if config.listen_host in ("0.0.0.0", "::", ""):
            names.add(socket.gethostname().lower())
    return names


def host_name(host: str | None) -> str | None:
    """The name of a Host header ("Name:8000" -> "name", "[::1]:8000" -> "::1"); None when it is not one."""
    if not host or len(host) > 300 or not HOST_HEADER.fullmatch(host):
        return None
    return urlsplit("//" + host).hostname or None


def host_allowed(host: str | None, server, names: set[str], patterns: tuple[str, ...]) -> bool:
    """Whether a Host header names this server: one of ``names``, the address the connection came in on (the ASGI
    scope's server), or a --allowed-hosts pattern ("name", "*.domain", "*"). A web page that reaches this server
    through a domain of its own (DNS rebinding) sends that domain and is refused. A request without the header
    (HTTP/1.0; h11 refuses an HTTP/1.1 one) passes: a browser always sends it."""
    if "*" in patterns or host is None:
        return True
    name = host_name(host)
    if name is None:
        return False
    if name in names or (server and name == str(server[0]).lower()):
        return True
    return any(name == p or (p.startswith("*.") and name.endswith(p[1:])) for p in patterns)


class Gate:
    """Checks that need no body, before any of it is read: the Host header, the token, the content type and the
    announced size."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config
        self.names, self.patterns = host_names(config), tuple(p.lower() for p in config.allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        host = headers.get("host")
        if not host_allowed(host, scope.get("server"), self.names, self.patterns):
            name = host_name(host)
            fix = f"start the server with --allowed-hosts {name}" if name else "send a valid Host header"
            response = _error(400, f"Host {(host or '')[:100]!r} does not name this server (a web page can reach a "
                              "local server through a domain of its own: DNS rebinding): open it by the address it "
                              f"printed or localhost, or, if that name is meant to reach it (a proxy, a DNS name), "
                              f"{fix}")
            return await response(scope, receive, send)
        if not scope["path"].startswith("/api/"):
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["arrived"] = time.perf_counter()  # the request's profile starts here
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


def header_pixels(data: bytes) -> int:
    """Width x height from an image's header alone (0 when it has none: the decoder says why later)."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width * img.height
    except Exception:  # not an image: answered per photo by the decoder
        return 0


def noun_of(predictor: Predictor) -> str:
    """What the page asks for: "breed" on a dataset of dog breeds (Stanford Dogs; Kaggle's dog-breed layout under a
    name that says dog or breed), else "class": the demo's digits come in the dog-breed layout too."""
    layout = (predictor.config.get("dataset_meta") or {}).get("layout")
    name = str(predictor.config.get("dataset") or "").lower()
    breeds = layout == "stanford-dogs" or (layout == "dog-breed" and ("breed" in name or "dog" in name))
    return "breed" if breeds else "class"


def check_token(token: str | None) -> None:
    if token is not None and not token.strip():
        raise FeatstackError("the token is empty (--token \"\" or an empty FEATSTACK_TOKEN, as `--token \"$T\"` gives "
                             "when T is unset): set FEATSTACK_TOKEN to a secret, or leave both out on 127.0.0.1")


def create_app(config: ServeConfig, predictor: Predictor | None = None) -> FastAPI:
    """The app of one run; the Predictor (backbones and fitted model) is loaded here, once, unless one is given, and
    every batch shape up to --max-batch is compiled here, so the first request is as fast as the next."""
    check_token(config.token)
    from threadpoolctl import threadpool_limits

    say = printer("stderr", prefix="featstack: ")
    predictor = predictor or Predictor(config.run, config.models_dir, say=say)
    predictor.set_max_batch(config.max_batch)
    run = RunPaths(predictor.run)
    classes = [str(c) for c in predictor.classes]
    random_weights = any(b.weights == "random" for b in predictor.backbones)
    report = json.loads(run.report_json.read_text()) if run.report_json.is_file() else {}
    examples, example_paths = example_index(predictor.config, classes, config.examples_per_class)
    example_cache: dict[str, bytes] = {}
    batcher = MicroBatcher(predictor, config.max_batch, config.max_wait_ms, config.verbose)
    # The forward thread's BLAS (the classifier's) may use the cores; TensorFlow sizes its own pool to them.
    blas_threads = max(1, cores() // FORWARD_WORKERS)
    threadpool_limits(limits=blas_threads, user_api="blas")
    decode_workers = config.decode_workers or cores()  # so at most this many full-size photos are in memory at once
    decode_pool: ThreadPoolExecutor | None = None

    traces = predictor.traces
    with heartbeat(f"compiling the forward pass for batches of {', '.join(map(str, predictor.buckets))} photos", say,
                   announce_after=0):
        seconds = batcher.warm()
    if config.verbose:
        print(f"featstack: {predictor.traces - traces} forward pass(es) compiled in {seconds:.1f} s", file=sys.stderr)

    @asynccontextmanager
    async def lifespan(app):
        nonlocal decode_pool
        decode_pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="featstack-decode")
        await batcher.start()
        # One photo through the whole path (decode thread, queue, forward thread, preview) before the first client's:
        # uvicorn accepts connections only after this, and bind() already listens, so early clients wait, not fail.
        await answer("warm-up", warm_photo, True, {})
        batcher.batches = batcher.images = batcher.largest = 0  # /api/health counts the clients' photos
        yield
        await batcher.stop()
        decode_pool.shutdown(wait=True)

    app = FastAPI(
        title="featstack photo app", lifespan=lifespan, docs_url=None, redoc_url=None,
        description=f"Which {noun_of(predictor)} is in this photo? Answers of run `{run.run_id}` ({len(classes)} "
                    "classes), exactly those of `predict.py --json`. With a token (FEATSTACK_TOKEN), every `/api/` "
                    "path but `/api/health` needs `Authorization: Bearer <token>`.")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 413:
            return too_large(config)
        if exc.status_code == 400:  # the multipart parser's errors
            detail = str(exc.detail)
            if detail.startswith("Too many files"):
                return _error(413, f"more than {MAX_FILES} photos in one request: send at most {MAX_FILES} photos "
                              "per request")
            if detail.startswith("Too many fields"):
                return _error(400, f"more than {MAX_FILES} form fields in one request: send only fields named file, "
                              "one per photo")
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

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect):
        return Response(status_code=400)  # the client went away (or was closed for stalling): nobody reads this

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        traceback.print_exception(exc)
        return _error(500, f"internal error ({type(exc).__name__}); the server goes on; "
                           "the server's log has the details")

    def prepare(data: bytes, preview: bool, timing: dict):
        t0 = time.perf_counter()
        img = decode_bytes(data, config.max_pixels)
        t1 = time.perf_counter()
        resized = {s: to_input(img, s) for s in predictor.sizes}  # decode once, resize once per key, as decode_batch
        t2 = time.perf_counter()
        url = "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(img, PREVIEW_PX)).decode() if preview else None
        timing["decode"], timing["resize"] = t1 - t0, t2 - t1
        if preview:
            timing["preview"] = time.perf_counter() - t2
        return resized, url  # the full-size bitmap is released here, before the photo waits for its batch

    from PIL import Image
    gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    warm_photo = jpeg_bytes(Image.fromarray(gradient, "RGB"), 64)

    async def answer(name: str, data: bytes, preview: bool, timing: dict) -> dict:
        loop = asyncio.get_running_loop()
        batcher.incoming += 1
        try:
            resized, url = await loop.run_in_executor(decode_pool, prepare, data, preview, timing)
        except BadImage as exc:
            return {"filename": name, "error": f"cannot read this photo ({exc})"}
        finally:
            batcher.incoming -= 1  # no await between this and the photo's joining the queue in predict()
        proba = await batcher.predict(resized, timing)
        order = np.argsort(-proba, kind="stable")
        out = {"filename": name, "predictions": [{"class": classes[i], "probability": float(proba[i])} for i in order]}
        if url:
            out["image"] = url
        return out

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    docs_assets = swagger_ui_dir()
    if docs_assets is not None:
        app.mount("/docs-static", StaticFiles(directory=docs_assets), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        """Swagger UI from the files of the swagger-ui-bundle package: it works offline (no CDN)."""
        if docs_assets is None:
            raise HTTPException(404, "the API docs need the swagger-ui-bundle-v2 package (pip install -r "
                                "requirements.txt); /openapi.json has the schema")
        from fastapi.openapi.docs import get_swagger_ui_html
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="featstack photo app: API",
                                   swagger_js_url="/docs-static/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-static/swagger-ui.css",
                                   swagger_favicon_url="/docs-static/favicon-32x32.png",
                                   swagger_ui_parameters={"validatorUrl": None})  # no badge from another host

    # The route's own body limit counts the bytes of a body sent without Content-Length as they stream in.
    @app.post("/api/predict", summary="Which class is in each photo?", max_body_size=config.max_body,
              form_limits={"max_files": MAX_FILES, "max_fields": MAX_FILES})
    async def predict(request: Request,
                      file: list[UploadFile] = File(..., description="one or more photos, each a field named file"),
                      preview: bool = Query(False, description="also return each photo as decoded (EXIF orientation "
                                                                "applied), as a JPEG data URL of at most 512 px")):
        """Every class with its probability, most probable first, for each photo; equal to `predict.py --json`.

        A photo that cannot be read gets `error` instead of `predictions`; the others are still answered. When no
        photo of the request can be read, the answer is 422. The photos of one request may have at most
        --max-request-megapixels together (413). The `Server-Timing` header says where the request's time went.
        """
        began = time.perf_counter()
        arrived = getattr(request.state, "arrived", began)
        datas = [(f.filename or "", await f.read()) for f in file]
        pixels = await asyncio.get_running_loop().run_in_executor(
            decode_pool, lambda: sum(header_pixels(d) for _, d in datas))
        if pixels > config.max_request_pixels:
            return _error(413, f"the {len(datas)} photo(s) of this request have {pixels / 1e6:.1f} megapixels "
                          f"together, more than --max-request-megapixels {config.max_request_megapixels:g}: send "
                          "fewer or smaller photos per request")
        timings = [{} for _ in datas]
        results = await asyncio.gather(*(answer(n, d, preview, t) for (n, d), t in zip(datas, timings)))
        if all("error" in r for r in results):
            return _error(422, "; ".join(f"{r['filename'] or 'file'}: {r['error']}" for r in results))
        t_json = time.perf_counter()
        body = json.dumps({"run": run.run_id, "results": results}).encode()
        done = time.perf_counter()
        profile = {"parse": began - arrived, **{k: sum(t.get(k, 0.0) for t in timings) for k in ("decode", "resize")},
                   **{k: max(t.get(k, 0.0) for t in timings) for k in ("queue", "forward", "classifier")},
                   "json": done - t_json, "total": done - arrived}
        server_timing = ", ".join(f"{k};dur={1000 * v:.2f}" for k, v in profile.items())
        return Response(body, media_type="application/json", headers={"Server-Timing": server_timing})

    @app.get("/api/health", summary="Is the server up, and with which run?")
    async def health():
        return {"status": "ok", "run": run.run_id, "classes": len(classes),
                "backbones": list(predictor.config["backbones"]), "batches": batcher.batches,
                "images": batcher.images, "largest_batch": batcher.largest, "batch_shapes": list(predictor.buckets),
                "compiled_since_start": batcher.compiled_since_start,
                "threads": {"cores": cores(), "forward": FORWARD_WORKERS, "blas_per_forward": blas_threads,
                            "decode": decode_workers}}

    @app.get("/api/classes", summary="The run's classes, with example training ids of each")
    async def class_list():
        return {"run": run.run_id, "classes": [{"class": c, "examples": examples.get(c, [])} for c in classes]}

    @app.get("/api/run", summary="The run: model, backbones, scores, report links")
    async def run_info():
        def scores(part):
            s = report.get(part) or {}
            return {k: s[k] for k in ("accuracy", "log_loss", "top5_accuracy", "rows") if k in s} or None
        return {"run": run.run_id, "dataset": predictor.config.get("dataset"), "noun": noun_of(predictor),
                "model": predictor.config.get("model"),
                "backbones": list(predictor.config["backbones"]), "classes": len(classes),
                "random_weights": random_weights, "open_api": config.open_api, "cv": scores("cv"),
                "holdout": scores("holdout"),
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


def swagger_ui_dir() -> Path | None:
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    return Path(swagger_ui_bundle.swagger_ui_path)


class StallGuard:
    """Mixed into uvicorn's h11 protocol: a connection that owes the server bytes (a request's headers or body) and
    sends none for ``stall_timeout`` seconds is closed, and so is one whose request is not all in ``request_timeout``
    seconds after its first byte, however steadily it drips. Uvicorn itself waits for ever on a half-sent request (its
    keep-alive timeout only starts after a response), so a few hundred stalled or dripping clients would hold the
    server."""

    stall_timeout = 30.0
    request_timeout = 120.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._last_data = self.loop.time()
        self._request_began: float | None = None  # the first byte of the request being received
        self._stall_timer = self.loop.call_later(self.stall_timeout, self._check_stall)

    def data_received(self, data: bytes) -> None:
        import h11
        self._last_data = self.loop.time()
        if self._request_began is None:
            self._request_began = self._last_data
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):  # the request is all in: the next one's clock
            self._request_began = None                              # starts at its own first byte

    def connection_lost(self, exc):
        self._stall_timer.cancel()
        super().connection_lost(exc)

    def _check_stall(self) -> None:
        import h11
        if self.transport.is_closing():
            return
        owing = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)  # DONE: the request is in; the app works on it
        now = self.loop.time()
        idle = now - self._last_data
        took = now - self._request_began if owing and self._request_began is not None else 0.0
        client = ":".join(map(str, self.client or ("?",)))
        if owing and idle >= self.stall_timeout:
            self.logger.info("closing a connection from %s: no bytes for %.0f s in the middle of a request "
                             "(--stall-timeout)", client, idle)
        elif owing and took >= self.request_timeout:
            self.logger.info("closing a connection from %s: its request was not all in after %.0f s "
                             "(--request-timeout)", client, took)
        else:
            wait = min(self.stall_timeout - idle, self.request_timeout - took) if owing else self.stall_timeout
            self._stall_timer = self.loop.call_later(max(wait, 0.1), self._check_stall)
            return
        self.transport.close()  # the app, if it was reading the body, sees the client disconnect


def make_server(app: FastAPI, config: ServeConfig, log_level: str = "info"):
    """The uvicorn server of serve(): h11 with the stall and request timeouts, uvicorn's 5 s keep-alive timeout."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    protocol = type("FeatstackH11Protocol", (StallGuard, H11Protocol),
                    {"stall_timeout": config.stall_timeout_s, "request_timeout": config.request_timeout_s})
    return uvicorn.Server(uvicorn.Config(app, http=protocol, log_level=log_level, timeout_keep_alive=5))


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is this machine's loopback (127.0.0.0/8, ::1)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    try:
        return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    except ValueError:
        return False


def check_access(config: ServeConfig, host: str) -> None:
    """An empty token is refused; an address beyond this machine needs a token or an explicit --no-token."""
    check_token(config.token)
    if config.token is None and not is_loopback(host):
        if not config.open_api:
            raise FeatstackError(f"--host {host} listens beyond this machine and no token is set: anyone who reaches "
                                 "it could use the API. Set FEATSTACK_TOKEN to a secret (export FEATSTACK_TOKEN="
                                 "$(openssl rand -hex 16)), or pass --no-token to serve it open")
    else:
        config.open_api = False  # on loopback, or with a token: nothing to warn about


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken before the (slow) model load so that a busy port fails at once."""
    try:
        family, _, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # The protocol named (TCP), not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and without it
        # every answer (headers and body, two writes) waited ~40 ms for the client's delayed ACK (Nagle).
        sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # from now on a client that connects waits until the app answers, instead of being refused
    except OSError as exc:
        raise FeatstackError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                             "pick another --port (0 takes a free one) or --host") from None
    return sock


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Load the run once and compile its forward passes, then answer on host:port until stopped."""
    check_access(config, host)
    config.listen_host = host
    sock = bind(host, port)
    app = create_app(config)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if config.open_api:
        print(f"featstack: WARNING: the API is open: no token, listening on {host}; anyone who reaches this address "
              "can use it (--no-token)", file=sys.stderr, flush=True)
    print(f"featstack: serving run {app.state.predictor.run.name} at http://{shown}:{bound}/ "
          f"(API docs: http://{shown}:{bound}/docs; Ctrl+C stops)", flush=True)
    make_server(app, config).run(sockets=[sock])
