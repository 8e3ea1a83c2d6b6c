"""serve.py: every endpoint, every bad input, micro-batching, the token, and answers equal to predict.py --json's."""
import asyncio
import base64
import contextlib
import io
import json
import logging
import re
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import featstack.serve
from featstack.decode import decode_batch
from featstack.errors import FeatstackError
from featstack.predict import Predictor, batch_buckets
from featstack.serve import ServeConfig, bind, check_access, create_app, make_server

from conftest import ROOT, photo


def predict_py_json(run, photos) -> dict[str, dict[str, float]]:
    """What `predict.py --json --run RUN PHOTOS` prints, as {path: {class: probability}}."""
    from featstack.commands.predict import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["--json", "--run", str(run), *map(str, photos)])
    return {r["path"]: {p["class"]: p["probability"] for p in r["predictions"]} for r in json.loads(out.getvalue())}


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG that claims width x height pixels but holds one row: a decompression bomb's header, cheaply."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * (width + 1))) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def photos(demo):
    return sorted((demo["data"] / "test").glob("*.jpg"))[:4]


@pytest.fixture(scope="module")
def expected(demo, photos):
    return predict_py_json(demo["run"], photos)


@pytest.fixture(scope="module")
def predictor(demo):
    return Predictor(demo["run"])


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(ServeConfig(max_upload_mb=1, max_megapixels=50), predictor)) as c:
        yield c


def files(*paths):
    return [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def assert_equal_to(predictions, expected_probs):
    probs = [p["probability"] for p in predictions]
    assert [p["class"] for p in predictions] and len(predictions) == len(expected_probs)  # every class
    assert probs == sorted(probs, reverse=True)  # most probable first
    for p in predictions:
        assert abs(p["probability"] - expected_probs[p["class"]]) < 1e-5


def test_predict_equals_predict_py_json(client, demo, photos, expected):
    r = client.post("/api/predict", files=files(*photos[:3]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["run"] == demo["run"].name and len(body["results"]) == 3
    for path, result in zip(photos, body["results"]):
        assert result["filename"] == path.name and "image" not in result
        assert_equal_to(result["predictions"], expected[str(path)])


def test_concurrent_requests_are_batched_and_answered_exactly(predictor, photos, expected):
    n = 12
    app = create_app(ServeConfig(max_batch=8, max_wait_ms=500), predictor)
    with TestClient(app) as c, ThreadPoolExecutor(n) as pool:
        chosen = [photos[k % len(photos)] for k in range(n)]
        responses = list(pool.map(lambda p: c.post("/api/predict", files=files(p)), chosen))
        health = c.get("/api/health").json()
    assert [r.status_code for r in responses] == [200] * n
    for path, r in zip(chosen, responses):
        assert_equal_to(r.json()["results"][0]["predictions"], expected[str(path)])
    assert health["images"] == n
    assert health["batches"] < n and 1 < health["largest_batch"] <= 8  # requests shared forward passes


def test_preview_is_the_photo_as_decoded_with_exif_orientation(client, predictor, tmp_path):
    path = tmp_path / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90 degrees
    photo(7, size=(60, 30)).save(path, quality=95, exif=exif)
    r = client.post("/api/predict?preview=true", files=files(path))
    result = r.json()["results"][0]
    assert result["image"].startswith("data:image/jpeg;base64,")
    shown = Image.open(io.BytesIO(base64.b64decode(result["image"].split(",", 1)[1])))
    assert shown.size == (30, 60)
    [(_, proba, _)] = predictor.predict([str(path)])
    assert_equal_to(result["predictions"], dict(zip(predictor.classes, proba)))


JPEG = photo(3, size=(40, 40))
_buffer = io.BytesIO()
JPEG.save(_buffer, "JPEG")
GOOD = _buffer.getvalue()

BAD_UPLOADS = [  # (what, request keyword arguments, status, detail pattern)
    ("not an image", dict(files=[("file", ("notes.jpg", b"hello, not a photo"))]), 422, r"notes\.jpg: .*not an image"),
    ("empty", dict(files=[("file", ("empty.jpg", b""))]), 422, r"empty\.jpg: .*empty file"),
    ("truncated", dict(files=[("file", ("cut.jpg", GOOD[: len(GOOD) // 2]))]), 422, r"cut\.jpg: .*truncated"),
    ("bomb over our limit", dict(files=[("file", ("bomb.png", png_header_only(8_000, 8_000)))]), 422,
     r"bomb\.png: .*8000 x 8000 pixels is more than the limit of 50,000,000"),
    ("bomb over PIL's limit", dict(files=[("file", ("huge.png", png_header_only(30_000, 30_000)))]), 422,
     r"huge\.png: .*too large"),
    ("too large", dict(files=[("file", ("big.jpg", b"\xff" * (1024 * 1024 + 1)))]), 413,
     r"larger than --max-upload-mb 1 MB"),
    ("not multipart", dict(json={"file": "photo.jpg"}), 415, r"'application/json'.*multipart/form-data"),
    ("no file field", dict(files=[("photo", ("a.jpg", GOOD))]), 422, r"^file: .*fields named file"),
    ("broken multipart", dict(content=b"garbage", headers={"content-type": "multipart/form-data; boundary=x"}), 400,
     r"could not be parsed"),
    ("over 1000 files", dict(files=[("file", (f"{k}.jpg", b"x")) for k in range(1001)]), 413,
     r"^more than 1000 photos in one request: send at most 1000"),
]


@pytest.mark.parametrize("what, request_kwargs, status, pattern", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_input_is_one_line_of_json_and_the_server_goes_on(client, what, request_kwargs, status, pattern):
    r = client.post("/api/predict", **request_kwargs)
    assert r.status_code == status, r.text
    assert "\n" not in r.text and list(r.json()) == ["detail"]
    assert re.search(pattern, r.json()["detail"]), r.json()["detail"]
    assert client.get("/api/health").json()["status"] == "ok"


def test_one_bad_file_fails_only_its_own_result(client, photos, expected):
    r = client.post("/api/predict", files=[*files(photos[0]), ("file", ("broken.jpg", b"\xff\xd8\xff junk")),
                                           *files(photos[1])])
    assert r.status_code == 200
    good, bad, other = r.json()["results"]
    assert bad["filename"] == "broken.jpg" and "cannot read this photo" in bad["error"] and "predictions" not in bad
    assert_equal_to(good["predictions"], expected[str(photos[0])])
    assert_equal_to(other["predictions"], expected[str(photos[1])])


def test_streamed_body_over_the_limit_is_refused_before_it_is_all_read(client):
    """A body without Content-Length is counted as it arrives: 413 after about --max-upload-mb, not at its end."""
    app = client.app
    chunk, chunks = b"x" * 65536, 64  # 4 MiB offered against a 1 MiB limit
    read, sent = 0, []

    async def receive():
        nonlocal read
        read += 1
        if read == 1:
            return {"type": "http.request", "body": b"--b\r\nContent-Disposition: form-data; name=\"file\"; "
                                                    b"filename=\"big.jpg\"\r\n\r\n", "more_body": True}
        return {"type": "http.request", "body": chunk, "more_body": read <= chunks}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/predict", "raw_path": b"/api/predict", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {}}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 413
    assert "--max-upload-mb" in json.loads(sent[1]["body"])["detail"]
    assert read <= 1 + 1024 * 1024 // len(chunk) + 1  # stopped reading at the limit


def test_health_classes_run_report_and_confusion(client, demo, predictor):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["run"] == demo["run"].name
    assert health["classes"] == len(predictor.classes) and health["backbones"] == ["resnet50", "vgg16"]
    classes = client.get("/api/classes").json()
    assert [c["class"] for c in classes["classes"]] == list(predictor.classes)
    report = json.loads((demo["run"] / "report.json").read_text())
    run = client.get("/api/run").json()
    assert run["random_weights"] is True  # the demo fixture's features come from random weights
    assert run["holdout"]["accuracy"] == report["holdout"]["accuracy"]
    assert run["holdout"]["log_loss"] == report["holdout"]["log_loss"]
    html = client.get(run["report"])
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    assert "<table>" in html.text and f"{report['holdout']['log_loss']:.4f}" in html.text
    assert 'src="data:image/png;base64,' in html.text  # the confusion matrix travels inside the page
    png = client.get(run["confusion"])
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_example_photos_are_served_by_dataset_id_only(client, demo):
    split = pd.read_csv(demo["features"] / "split.csv", dtype=str, keep_default_na=False)
    label_of_train = dict(zip(split.loc[split.split == "train", "id"], split.loc[split.split == "train", "label"]))
    classes = client.get("/api/classes").json()["classes"]
    for c in classes:
        assert len(c["examples"]) == 3 and all(label_of_train[i] == c["class"] for i in c["examples"])
    r = client.get(f"/api/examples/{classes[0]['examples'][0]}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == Image.open(
        demo["data"] / "train" / f"{classes[0]['examples'][0]}.jpg").size
    test_id = split.loc[split.split == "test", "id"].iloc[0]
    for wrong in (test_id, "../../etc/passwd", "%2Fetc%2Fpasswd", str(demo["data"] / "train" / f"{test_id}.jpg")):
        r = client.get(f"/api/examples/{wrong}")
        assert r.status_code == 404 and list(r.json()) == ["detail"]


def test_page_docs_and_no_server_path_in_any_response(client, demo, photos):
    page = client.get("/")
    assert page.status_code == 200 and 'data-testid="file-input"' in page.text and "/static/app.js" in page.text
    for name in ("index.html", "app.js", "app.css"):  # works offline: nothing from another host
        assert not re.search(r"(?:https?:)?//[a-z]", (ROOT / "featstack" / "static" / name).read_text())
    assert 'dataset.testid = "prediction"' in client.get("/static/app.js").text
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/health", "/api/classes"} <= set(schema["paths"])
    bodies = [page.text, client.get("/openapi.json").text, client.get("/api/health").text,
              client.get("/api/classes").text, client.get("/api/run").text, client.get("/api/report").text,
              client.post("/api/predict", files=files(photos[0])).text,
              client.post("/api/predict", files=[("file", ("x.jpg", b"nope"))]).text,
              client.get("/api/examples/nope").text, client.get("/nope").text]
    for secret in {str(demo["base"]), str(ROOT), str(demo["base"].resolve()), str(ROOT.resolve())}:
        assert not any(secret in b for b in bodies)


def test_token_guards_the_api(predictor, photos):
    app = create_app(ServeConfig(token="s3cret"), predictor)
    with TestClient(app) as c:
        assert c.get("/api/health").status_code == 200  # liveness stays open
        assert c.get("/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/api/predict", files=files(photos[0]), headers=headers)
            assert r.status_code == 401 and "Authorization: Bearer" in r.json()["detail"]
            assert c.get("/api/classes", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert c.post("/api/predict", files=files(photos[0]), headers=ok).status_code == 200
        assert c.get("/api/classes", headers=ok).status_code == 200


def test_command_reads_token_from_the_environment_and_refuses_a_busy_port(monkeypatch, demo, capsys):
    import featstack.serve
    from featstack.commands.serve import main
    seen = {}
    monkeypatch.setattr(featstack.serve, "serve", lambda config, host, port: seen.update(config=config, host=host))
    monkeypatch.setenv("FEATSTACK_TOKEN", "from-env")
    main(["--run", str(demo["run"])])
    assert seen["config"].token == "from-env" and seen["host"] == "127.0.0.1"
    monkeypatch.undo()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit) as exit_info:
            main(["--run", str(demo["run"]), "--port", str(busy.getsockname()[1])])
    assert exit_info.value.code == 2
    assert re.search(r"error: --host 127\.0\.0\.1 --port \d+: cannot listen there", capsys.readouterr().err)


# --- issue 23: fixed batch shapes, compiled at start ---------------------------------------------------------------

def all_demo_photos(demo, n):
    found = sorted(demo["data"].rglob("*.jpg"))
    assert len(found) >= n
    return [str(p) for p in found[:n]]


def test_batch_buckets_cover_every_size():
    for max_batch in (1, 2, 5, 8, 17, 32, 64):
        buckets = batch_buckets(max_batch)
        assert buckets[0] == 1 and buckets[-1] == max_batch and list(buckets) == sorted(set(buckets))
        for n in range(1, max_batch + 1):  # the bucket a batch is padded to is at most a third padding
            rows = next(b for b in buckets if b >= n)
            assert rows - n <= rows / 3 or rows <= 3


@pytest.mark.slow
def test_every_batch_size_gives_one_at_a_time_answers(predictor, demo):
    """A batch of every size 1..--max-batch (32, the default), padded to its compiled shape, answers each photo as
    that photo alone does."""
    max_batch = ServeConfig().max_batch
    predictor.set_max_batch(max_batch)
    predictor.pad = True  # padded to the buckets (as on JAX; warm() finds TensorFlow needs none)
    arrays, errors = decode_batch(all_demo_photos(demo, max_batch), predictor.sizes)
    assert errors == [None] * max_batch
    alone = [predictor.predict_arrays({s: a[k:k + 1] for s, a in arrays.items()})[0] for k in range(max_batch)]
    for n in range(1, max_batch + 1):
        together = predictor.predict_arrays({s: a[:n] for s, a in arrays.items()})
        assert together.shape == (n, len(predictor.classes))
        for k in range(n):
            assert abs(together[k] - alone[k]).max() < 1e-5, (n, k)


@pytest.mark.slow
def test_no_forward_pass_is_compiled_after_start_for_any_batch_size(predictor, demo):
    """Counted, not timed: Python runs a model's predict_step only while TensorFlow/JAX traces (compiles) it."""
    for b in predictor.backbones:
        b.model.predict_function = None  # Keras makes (and traces) a new one: as a freshly loaded model would
    before = predictor.traces
    max_batch = 12
    app = create_app(ServeConfig(max_batch=max_batch, max_wait_ms=300), predictor)
    assert predictor.traces > before  # the counter sees compiles: warm-up compiled the batch shapes
    chosen = [Path(p) for p in all_demo_photos(demo, max_batch)]
    with TestClient(app) as c:
        for n in range(1, max_batch + 1):  # one request of n photos: one batch of n (or fewer, if one is slow)
            r = c.post("/api/predict", files=files(*chosen[:n]))
            assert r.status_code == 200 and len(r.json()["results"]) == n
        arrays, _ = decode_batch([str(p) for p in chosen], predictor.sizes)
        for n in range(1, max_batch + 1):  # and every size as the forward thread calls it
            app.state.batcher._forward({s: a[:n] for s, a in arrays.items()})
        health = c.get("/api/health").json()
    assert health["compiled_since_start"] == 0 and health["largest_batch"] == max_batch
    assert health["batch_shapes"] == list(batch_buckets(max_batch))
    predictor.pad = True  # also with every batch padded to a bucket: no compile after start
    for n in range(1, max_batch + 1):
        app.state.batcher._forward({s: a[:n] for s, a in arrays.items()})
    assert predictor.traces == app.state.batcher.traces_at_start


def test_server_timing_header_profiles_the_request(client, photos):
    r = client.post("/api/predict", files=files(photos[0]))
    timing = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
    assert set(timing) == {"parse", "decode", "resize", "queue", "forward", "classifier", "json", "total"}
    assert all(float(v) >= 0 for v in timing.values())
    assert float(timing["forward"]) > 0 and float(timing["total"]) >= float(timing["forward"])


def test_blas_threads_times_forward_workers_fit_the_cores(client):
    from threadpoolctl import threadpool_info
    threads = client.get("/api/health").json()["threads"]
    assert threads["forward"] * threads["blas_per_forward"] <= threads["cores"]
    assert threads["decode"] <= threads["cores"]
    for lib in threadpool_info():
        if lib["user_api"] == "blas":
            assert lib["num_threads"] <= threads["blas_per_forward"]


# --- issue 20: tokens, bounded memory, stalled connections ---------------------------------------------------------

def test_pixels_of_one_request_are_bounded_and_the_message_names_the_option(predictor, tmp_path):
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"p{k}.jpg")
        photo(k, size=(60, 60)).save(paths[-1])
    app = create_app(ServeConfig(max_request_megapixels=0.01), predictor)  # 10,000 pixels; the 3 have 10,800
    with TestClient(app) as c:
        r = c.post("/api/predict", files=files(*paths))
        assert r.status_code == 413
        assert re.search(r"3 photo\(s\) of this request have 0\.0\d? megapixels together, more than "
                         r"--max-request-megapixels 0\.01", r.json()["detail"]), r.json()
        assert c.post("/api/predict", files=files(*paths[:2])).status_code == 200  # 7,200 pixels: answered


def test_photos_are_decoded_a_few_at_a_time_not_all_at_once(predictor, photos, monkeypatch):
    """Full-size bitmaps in memory at once are bounded by the decode workers, not by the photos of a request."""
    decode, active, most = featstack.serve.decode_bytes, [0], [0]
    lock = threading.Lock()

    def counted(data, max_pixels=None):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.05)  # long enough that photos decoded side by side would overlap
            return decode(data, max_pixels)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(featstack.serve, "decode_bytes", counted)
    with TestClient(create_app(ServeConfig(decode_workers=2), predictor)) as c:
        r = c.post("/api/predict", files=files(*(photos * 2)))
    assert r.status_code == 200 and len(r.json()["results"]) == 8
    assert 1 <= most[0] <= 2


def raw_connection(port):
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(10)
    return s


def closed_by_server(s) -> bool:
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.fixture(scope="module")
def live(predictor):
    """A real uvicorn server of the app on a free loopback port (1 s stall timeout, 1.5 s request timeout); yields
    its port."""
    config = ServeConfig(stall_timeout_s=1.0, request_timeout_s=1.5, listen_host="127.0.0.1")
    sock = bind("127.0.0.1", 0)
    server = make_server(create_app(config, predictor), config, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        yield sock.getsockname()[1]
    finally:
        # Later tests' uvicorn configs (main()) bound uvicorn's log handlers to their captured, now closed, stderr.
        quiet = {name: logging.getLogger(name).level for name in ("uvicorn", "uvicorn.error", "uvicorn.access")}
        for name in quiet:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        server.should_exit = True
        thread.join(timeout=30)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def test_stalled_connections_are_closed_after_the_timeout(live, photos):
    port = live
    silent = raw_connection(port)
    half_headers = raw_connection(port)
    half_headers.sendall(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Ty")
    half_body = raw_connection(port)
    half_body.sendall(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
                      b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; "
                      b"name=\"file\"; filename=\"a.jpg\"\r\n\r\nxxxx")
    started = time.time()
    for s in (silent, half_headers, half_body):
        assert closed_by_server(s)
    assert time.time() - started < 8
    import httpx  # a client that sends its request is answered as ever
    r = httpx.post(f"http://127.0.0.1:{port}/api/predict", files=files(photos[0]), timeout=60)
    assert r.status_code == 200


def drip_until_closed(s, data: bytes, every: float, give_up: float) -> float | None:
    """Send ``data`` one byte every ``every`` seconds until the server closes the connection (returns the seconds it
    took) or ``give_up`` seconds pass (None)."""
    s.settimeout(every)
    started = time.time()
    for k in range(len(data)):
        if time.time() - started > give_up:
            return None
        try:
            s.sendall(data[k:k + 1])
            if not s.recv(65536):
                return time.time() - started
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.time() - started
    return None


def test_a_client_dripping_its_request_is_closed_after_the_request_timeout(live):
    """A byte every 0.3 s never trips the 1 s stall timeout; the 1.5 s request timeout closes the connection, in the
    headers and in the body (both dripped at once)."""
    head = b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    in_headers, in_body = raw_connection(live), raw_connection(live)
    in_body.sendall(head + b"Content-Length: 100000\r\n\r\n")
    drips = [(in_headers, head + b"X-Padding: " + b"x" * 1000), (in_body, b"x" * 1000)]
    with ThreadPoolExecutor(2) as pool:
        took = list(pool.map(lambda d: drip_until_closed(d[0], d[1], every=0.3, give_up=6.0), drips))
    for s in (in_headers, in_body):
        s.close()
    assert all(t is not None and 1.2 < t < 4.0 for t in took), took


def test_answers_are_not_held_by_nagle_and_delayed_acks(live):
    """The listening socket says TCP, so asyncio sets TCP_NODELAY on each connection; before, every answer of a
    kept-alive connection waited ~40 ms for the client's delayed ACK (headers and body are two writes)."""
    assert bind("127.0.0.1", 0).proto == socket.IPPROTO_TCP
    seconds = []
    with raw_connection(live) as s:
        for _ in range(9):
            t0 = time.perf_counter()
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            reply = b""
            while not reply.endswith(b"}"):
                reply += s.recv(65536)
            seconds.append(time.perf_counter() - t0)
    assert sorted(seconds)[4] < 0.03, seconds  # the median; 0.04 s or more with Nagle's stall


def raw_status(port: int, request: bytes) -> tuple[int, str]:
    with raw_connection(port) as s:
        s.sendall(request)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), head.decode("latin-1") + "\n\n" + body.decode("utf-8", "replace")


def test_a_real_server_refuses_a_host_header_that_does_not_name_it(live):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    for host in (b"evil.example", b"evil.example:%d" % live):
        status, text = raw_status(live, b"GET /api/run HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert status == 400 and "--allowed-hosts evil.example" in text and '"run"' not in text, text
    for host in (b"127.0.0.1:%d" % live, b"localhost:%d" % live, b"localhost", b"[::1]:%d" % live):
        status, text = raw_status(live, b"GET /api/run HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        assert status == 200 and '"run"' in text, (host, text)


TOKEN_ERRORS = [  # (argv after --run, FEATSTACK_TOKEN or None, one-line message pattern)
    (["--token", ""], None, r"^error: the token is empty \(--token \"\" or an empty FEATSTACK_TOKEN"),
    (["--token", "  "], None, r"^error: the token is empty"),
    ([], "", r"^error: the token is empty"),
    (["--host", "0.0.0.0"], None, r"^error: --host 0\.0\.0\.0 listens beyond this machine and no token is set: .*"
                                  r"FEATSTACK_TOKEN.*--no-token"),
    (["--host", "0.0.0.0", "--token", ""], None, r"^error: the token is empty"),
]


@pytest.mark.parametrize("argv, env, pattern", TOKEN_ERRORS, ids=[" ".join(c[0]) + f" env={c[1]!r}"
                                                                   for c in TOKEN_ERRORS])
def test_empty_tokens_and_open_network_addresses_are_refused(monkeypatch, demo, capsys, argv, env, pattern):
    import uvicorn

    from featstack.commands.serve import main
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: pytest.fail("the server started"))
    monkeypatch.delenv("FEATSTACK_TOKEN", raising=False)
    if env is not None:
        monkeypatch.setenv("FEATSTACK_TOKEN", env)
    with pytest.raises(SystemExit) as exit_info:
        main(["--run", str(demo["run"]), "--port", "0", *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and re.search(pattern, err), err


def test_empty_token_is_refused_by_the_library_too(predictor):
    for call in (lambda: create_app(ServeConfig(token=""), predictor),
                 lambda: check_access(ServeConfig(token=""), "127.0.0.1")):
        with pytest.raises(FeatstackError, match="the token is empty"):
            call()


def test_no_token_on_a_network_address_is_said_in_the_log_and_the_page(monkeypatch, demo, predictor, capsys):
    import uvicorn

    from featstack.commands.serve import main
    ran = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: ran.append(self.config.app))
    monkeypatch.delenv("FEATSTACK_TOKEN", raising=False)
    main(["--run", str(demo["run"]), "--host", "0.0.0.0", "--port", "0", "--no-token"])
    assert ran and "the API is open: no token, listening on 0.0.0.0" in capsys.readouterr().err
    with TestClient(create_app(ServeConfig(open_api=True), predictor)) as c:
        assert c.get("/api/run").json()["open_api"] is True
        assert 'data-testid="open-api-banner"' in c.get("/").text
    with TestClient(create_app(ServeConfig(), predictor)) as c:
        assert c.get("/api/run").json()["open_api"] is False
    config = ServeConfig(open_api=True)
    check_access(config, "localhost")  # loopback: --no-token changes nothing, nothing to warn about
    assert config.open_api is False
    with pytest.raises(SystemExit):  # a token and --no-token contradict each other
        main(["--run", str(demo["run"]), "--token", "abc", "--no-token"])


def test_page_title_says_class_unless_the_dataset_is_of_breeds(client, predictor, monkeypatch):
    assert client.get("/api/run").json()["noun"] == "class"  # the demo: handwritten digits in the dog-breed layout
    assert "breed" not in client.get("/").text.lower()
    from featstack.serve import noun_of
    for layout, name, noun in (("dog-breed", "dog-breed-identification", "breed"), ("stanford-dogs", "sd", "breed"),
                               ("dog-breed", "demo", "class"), ("cats-dogs", "dogs-vs-cats", "class"),
                               ("folders", "flowers", "class")):
        monkeypatch.setitem(predictor.config, "dataset_meta", {**predictor.config["dataset_meta"], "layout": layout})
        monkeypatch.setitem(predictor.config, "dataset", name)
        assert noun_of(predictor) == noun, (layout, name)


def test_start_says_each_step_before_it_starts_and_while_the_compile_runs(monkeypatch, demo, capsys):
    # Issue #32: serve.py was silent 60 s after "compiling the forward pass…" on a loaded machine. The compile
    # takes 0.3 s more here, the heartbeat's interval is 0.05 s.
    from types import SimpleNamespace

    from featstack import heartbeat
    from featstack.commands.serve import main
    monkeypatch.setattr(heartbeat, "INTERVAL", 0.05)
    monkeypatch.setattr(heartbeat, "ANNOUNCE_AFTER", 0)  # quick steps too are named: a loaded machine makes them slow
    warm = Predictor.warm

    def slow_warm(self):
        time.sleep(0.3)
        return warm(self)

    monkeypatch.setattr(Predictor, "warm", slow_warm)
    # No uvicorn.Config: its logging.config.dictConfig closes the handlers TensorFlow's import set up, and with
    # them pytest's capture of stderr where that import ran under it (absl's handler closes its stream).
    monkeypatch.setattr(featstack.serve, "make_server", lambda app, config: SimpleNamespace(run=lambda sockets: None))
    main(["--run", str(demo["run"]), "--port", "0", "--max-batch", "1"])  # one shape to compile: the quickest
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "featstack: loading the app's libraries …"
    compiling = "featstack: compiling the forward pass for batches of 1 photos …"
    assert lines.index("featstack: loading resnet50 model (32 px, random weights) …") < lines.index(compiling)
    still = [l for l in lines[lines.index(compiling):]
             if l.startswith("featstack: still compiling the forward pass for batches of 1 photos (")]
    assert len(still) >= 2, lines


def test_host_header_must_name_the_server_and_allowed_hosts_extends_it(client, predictor):
    """TestClient's requests come to the server "testserver" (the address they arrived at), so that name passes."""
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example",
                 "localhost@evil.example", ""):
        r = client.get("/", headers={"Host": host})
        assert r.status_code == 400 and "DNS rebinding" in r.json()["detail"], (host, r.text)
        assert "<html" not in r.text.lower()
    assert client.get("/api/run", headers={"Host": "evil.example"}).status_code == 400
    assert "--allowed-hosts evil.example" in client.get("/api/run", headers={"Host": "evil.example:1"}).json()["detail"]
    for host in ("testserver", "localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "[::1]", "LocalHost"):
        assert client.get("/api/run", headers={"Host": host}).status_code == 200, host


def gated(config: ServeConfig) -> TestClient:
    """The app's Host check (its Gate) in front of a page that says ok: the check alone, without a model."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from featstack.serve import Gate
    return TestClient(Gate(Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))]), config))


@pytest.mark.parametrize("config, cases", [
    (ServeConfig(allowed_hosts=("photos.lan", "*.example.org"), listen_host="192.0.2.7"),
     [("photos.lan:8000", 200), ("a.example.org", 200), ("b.a.example.org", 200), ("example.org", 400),
      ("192.0.2.7:8000", 200), ("localhost", 200), ("evil.example", 400), ("photos.lan.evil.example", 400)]),
    (ServeConfig(allowed_hosts=("*",)), [("evil.example", 200), ("localhost", 200)]),
    (ServeConfig(allowed_hosts=("::1",), listen_host="::1"), [("[::1]:80", 200), ("evil.example", 400)]),
    (ServeConfig(listen_host="0.0.0.0"), [(f"{socket.gethostname()}:8000", 200), ("evil.example", 400),
                                          ("0.0.0.0:8000", 200)]),
    (ServeConfig(listen_host="photos.lan"), [("photos.lan:8000", 200), (f"{socket.gethostname()}.evil", 400)]),
], ids=["names and a domain", "any", "ipv6", "every interface", "a name"])
def test_allowed_hosts_extends_the_names_the_host_header_may_give(config, cases):
    c = gated(config)
    for host, status in cases:
        assert c.get("/", headers={"Host": host}).status_code == status, host


def test_no_permissive_cors_on_the_page_or_the_api(client, photos):
    origin = {"Origin": "http://evil.example"}
    responses = [client.get("/", headers=origin), client.get("/api/run", headers=origin),
                 client.post("/api/predict", files=files(photos[0]), headers=origin),
                 client.options("/api/predict", headers={**origin, "Access-Control-Request-Method": "POST"})]
    for r in responses:
        assert not any(k.lower().startswith("access-control-") for k in r.headers), r.headers
    assert responses[2].status_code == 200 and responses[3].status_code >= 400  # no preflight is granted


def test_command_passes_allowed_hosts_and_timeouts_and_refuses_bad_patterns(monkeypatch, capsys):
    from featstack.commands.serve import main
    seen = []
    monkeypatch.setattr(featstack.serve, "serve", lambda config, host, port: seen.append((config, host)))
    main(["--allowed-hosts", "photos.lan, *.Example.org,[::1]", "--request-timeout", "60"])
    config, host = seen[0]
    assert config.allowed_hosts == ("photos.lan", "*.example.org", "::1") and config.request_timeout_s == 60
    assert ServeConfig().request_timeout_s == 120 and ServeConfig().allowed_hosts == ()
    for bad in ("http://photos.lan", "photos.lan:8000", "a*.example.org", ","):
        with pytest.raises(SystemExit) as exit_info:
            main(["--allowed-hosts", bad])
        assert exit_info.value.code == 2 and "--allowed-hosts" in capsys.readouterr().err


def test_a_photo_with_none_other_on_its_way_does_not_wait_for_a_batch(client, photos, monkeypatch):
    """A lone client's photo (the last batch had one photo, none is being decoded) goes at once; --max-wait-ms is
    for the photos of concurrent clients."""
    monkeypatch.setattr(client.app.state.batcher, "max_wait_s", 5.0)
    monkeypatch.setattr(client.app.state.batcher, "last_batch", 1)
    for _ in range(2):
        r = client.post("/api/predict", files=files(photos[0]))
        timing = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", "))
        assert r.status_code == 200 and float(timing["queue"]) < 1000, timing
    monkeypatch.setattr(client.app.state.batcher, "max_wait_s", 0.3)
    monkeypatch.setattr(client.app.state.batcher, "last_batch", 4)  # four came together last time: wait for them
    timing = dict(part.split(";dur=") for part in
                  client.post("/api/predict", files=files(photos[0])).headers["server-timing"].split(", "))
    assert float(timing["queue"]) >= 250, timing
