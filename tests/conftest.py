"""Shared fixtures: tiny datasets of every layout, generated in tmp_path, and weight files made here."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
SESSION_MARK = "FEATSTACK_TEST_SESSION"  # inherited by xdist workers and the loky workers they start
# Two xdist workers share 2 cores: an OpenMP thread that spins at a barrier while its partner waits for the other
# worker's core made LightGBM's 2-thread fit in the thread-count test 200x slower (23.7 s against 0.1 s passive).
# Set before any OpenMP runtime is loaded; featstack itself runs LightGBM on one thread.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# An interrupted run must leave no processes behind. joblib's loky workers (scikit-learn, cleanlab), and the servers
# and commands tests start, outlive a pytest-xdist worker that is torn down hard when the run is interrupted:
# orphaned, they idle for minutes (a server, for ever). So the process that runs the session (the xdist controller,
# or the single process with -n 0) marks its environment, turns SIGTERM into an interrupt, and at the end,
# interrupted or not, ends every other process carrying its mark.
def pytest_configure(config):
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller marked the environment it inherited
    import signal
    import uuid
    os.environ[SESSION_MARK] = uuid.uuid4().hex
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


# pytest-xdist hands whole files to its two workers in collection order (pytest.ini: --dist loadfile
# --no-loadscope-reorder). The longest files go first, so that no worker is left alone with a long file at the end
# while the other idles (test_ray.py last cost 60 s so). Seconds per file from `--durations=0` on 2 quiet cores;
# files not named here follow in name order. Only the order changes: every test still runs.
LONGEST_FILES_FIRST = ["test_ray.py", "test_submit.py", "test_backbones.py", "test_serve.py", "test_extract.py",
                       "test_audit.py", "test_stack.py", "test_package.py", "test_browser.py", "test_models.py",
                       "test_estimator_checks.py",
                       "test_hub.py", "test_stack_trust.py", "test_store_trust.py", "test_predict.py",
                       "test_demo_and_notebook.py", "test_gpu_script.py", "test_suite_hygiene.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: each file keeps its order


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_unconfigure(config):
    executor = sys.modules.get("joblib.externals.loky.reusable_executor")
    if executor is not None and getattr(executor, "_executor", None) is not None:
        executor._executor.shutdown(wait=False, kill_workers=True)  # this process's own loky workers
    if not hasattr(config, "workerinput"):
        end_marked_processes(os.environ.get(SESSION_MARK))


def end_marked_processes(mark: str | None) -> list[int]:
    """End every other process whose environment holds this session's mark: loky workers, and whatever a test
    started (a serve.py, an extract_features.py, a browser) whose xdist worker was killed before its teardown."""
    import psutil
    if not mark:
        return []
    ours = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get(SESSION_MARK) == mark:
                proc.terminate()
                ours.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    _, alive = psutil.wait_procs(ours, timeout=5)
    for proc in alive:
        proc.kill()
    return [p.pid for p in ours]


def photo(seed: int, size=(120, 90)) -> Image.Image:
    """A smooth, photo-like RGB image (gradients and a blob), different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    grad = rng.uniform(-1.5, 1.5, (2, 3))
    img = base + xx[..., None] * grad[0] + yy[..., None] * grad[1]
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 40)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
    img = img * (1 - blob) + rng.uniform(0, 255, 3) * blob
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_images(folder: Path, names, start_seed=0, size=(120, 90)):
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        photo(start_seed + k, size).save(folder / name, quality=90)


@pytest.fixture
def cats_dogs(tmp_path) -> Path:
    data = tmp_path / "data" / "catsdogs"
    write_images(data / "train", [f"{c}.{n}.jpg" for c in ("cat", "dog") for n in range(6)])
    write_images(data / "test1", [f"{n}.jpg" for n in range(1, 5)], start_seed=100)
    return data


@pytest.fixture
def dog_breed(tmp_path) -> Path:
    data = tmp_path / "data" / "dogbreed"
    breeds = ["beagle", "pug", "whippet"]
    ids = [f"{k:04x}ab" for k in range(12)]
    write_images(data / "train", [f"{i}.jpg" for i in ids])
    (data / "labels.csv").write_text("id,breed\n" + "".join(f"{i},{breeds[k % 3]}\n" for k, i in enumerate(ids)))
    test_ids = [f"t{k:03d}" for k in range(5)]
    write_images(data / "test", [f"{i}.jpg" for i in test_ids], start_seed=50)
    (data / "sample_submission.csv").write_text(
        "id," + ",".join(breeds) + "\n" + "".join(f"{i}," + ",".join(["0.3333"] * 3) + "\n" for i in test_ids))
    return data


@pytest.fixture
def folders(tmp_path) -> Path:
    data = tmp_path / "data" / "stanford"
    for k, cls in enumerate(["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]):
        write_images(data / "Images" / cls, [f"img{n}.jpg" for n in range(4)], start_seed=10 * k)
    return data


@pytest.fixture
def manifest(tmp_path) -> Path:
    data = tmp_path / "data" / "mine"
    write_images(data / "pics", [f"p{n}.jpg" for n in range(8)])
    rows = [f"pics/p{n}.jpg,{'a' if n % 2 else 'b'},{'test' if n >= 6 else 'train'}" for n in range(8)]
    (data / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return data / "manifest.csv"


def make_weights_dir(folder: Path, names, size: int, models: dict | None = None, seed: int = 1000) -> Path:
    """Keras's canonical notop weight files for ``names``, from seeded random models, in legacy HDF5 format; each
    model that wrote a file goes into ``models`` when given (a reference that needs no second build)."""
    import h5py
    import keras
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    from featstack.backbones import REGISTRY

    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        spec = REGISTRY[name]
        keras.utils.set_random_seed(seed + k)
        model = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
        with h5py.File(folder / spec.weights_file(size), "w") as f:
            save_weights_to_hdf5_group(f, model)
        if models is not None:
            models[name] = model
    return folder


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_hub_preset(folder: Path, kind: str) -> Path:
    """A tiny keras-hub preset with seeded random weights, saved with save_to_preset as a published one is: a DINOv2
    with 4 register tokens, or a SigLIP / CLIP with a text tower; each with its ImageConverter (crop, bicubic)."""
    import keras
    import keras_hub
    keras.utils.set_random_seed({"dinov2": 7, "siglip": 8, "clip": 9}[kind])
    vit = dict(hidden_dim=32, num_layers=2, num_heads=2, intermediate_dim=64, image_shape=(56, 56, 3))
    text = dict(vocabulary_size=50, embedding_dim=32, hidden_dim=32, num_layers=1, num_heads=2, intermediate_dim=64)
    if kind == "dinov2":
        backbone = keras_hub.models.DINOV2Backbone(patch_size=14, num_register_tokens=4,
                                                   position_embedding_shape=(56, 56, 3), **vit)
        converter = keras_hub.layers.DINOV2ImageConverter(
            image_size=(56, 56), scale=[1 / (255 * s) for s in STD], offset=[-m / s for m, s in zip(MEAN, STD)],
            interpolation="bicubic", antialias=True, crop_to_aspect_ratio=True)
    elif kind == "siglip":
        backbone = keras_hub.models.SigLIPBackbone(
            keras_hub.models.SigLIPVisionEncoder(patch_size=14, **vit),
            keras_hub.models.SigLIPTextEncoder(max_sequence_length=16, **text))
        converter = keras_hub.layers.SigLIPImageConverter(image_size=(56, 56), scale=1 / 127.5, offset=-1.0,
                                                          interpolation="bicubic", crop_to_aspect_ratio=False)
    else:
        backbone = keras_hub.models.CLIPBackbone(
            keras_hub.models.CLIPVisionEncoder(patch_size=14, **vit),
            keras_hub.models.CLIPTextEncoder(max_sequence_length=16, **text), projection_dim=24)
        converter = keras_hub.layers.CLIPImageConverter(
            image_size=(56, 56), scale=[1 / (255 * s) for s in STD], offset=[-m / s for m, s in zip(MEAN, STD)],
            interpolation="bicubic", crop_to_aspect_ratio=True)
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="session")
def hub_presets(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("keras_hub")
    base = tmp_path_factory.mktemp("presets")
    return {kind: make_hub_preset(base / kind, kind) for kind in ("dinov2", "siglip", "clip")}


def run_main(main, argv, capsys):
    """Run a command's main in this process: (exit code, stdout, stderr). An uncaught exception fails the test."""
    try:
        main(list(map(str, argv)))
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (a user's clone has no such folder)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_keras_home(tmp_path_factory, monkeypatch):
    # No test may read or fill the user's real ~/.keras weight cache.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path_factory.getbasetemp() / "keras_home"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory, worker_id):
    """The embedded demo competition, extracted small and fast, and one stacked run on it: built once per test run
    and shared by every pytest-xdist worker (the first to need it builds it under a lock, the others wait)."""
    from filelock import FileLock

    from featstack.extract import ExtractConfig, extract
    from featstack.stack import run_stack

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # the run's folder above the workers' own
    base = root / "demo"
    os.environ["KERAS_HOME"] = str(base / "keras_home")
    with FileLock(str(root / "demo.lock")):
        done = base / "run.txt"
        if not done.is_file():
            summary = extract(ExtractConfig(base / "data", demo=True, backbones=["resnet50", "vgg16"],
                                            weights="random", image_size=32, features_dir=base / "features",
                                            batch_size=64, progress=False))
            run = run_stack(summary.paths.root, model="stack", models_dir=base / "models")
            done.write_text(str(run))
    run = Path(done.read_text())
    return {"base": base, "data": base / "data", "features": base / "features" / "demo", "run": run,
            "models": base / "models"}


STANFORD_BREEDS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02088364-beagle"]


@pytest.fixture
def stanford_dogs(tmp_path) -> Path:
    """Stanford Dogs' official shape: Images/<wnid>-<breed>/<wnid>_<n>.jpg and lists/*.mat as scipy.io writes them
    (file_list and annotation_list: N x 1 cell arrays of strings; labels: N x 1 doubles, 1-based).
    Per breed, images 0-2 are in train_list.mat, 3-4 in test_list.mat, and 5 in neither."""
    from scipy.io import savemat

    data = tmp_path / "data" / "stanford"
    lists = {"train": [], "test": []}
    for k, folder in enumerate(STANFORD_BREEDS):
        wnid = folder.split("-")[0]
        names = [f"{wnid}_{n}.jpg" for n in range(6)]
        write_images(data / "Images" / folder, names, start_seed=20 * k, size=(60, 45))
        for n, name in enumerate(names[:5]):
            lists["train" if n < 3 else "test"].append((f"{folder}/{name}", k + 1))
    (data / "lists").mkdir()
    for split, entries in lists.items():
        files = [f for f, _ in entries]
        savemat(data / "lists" / f"{split}_list.mat", {
            "file_list": np.array([[f] for f in files], dtype=object),
            "annotation_list": np.array([[f[:-4]] for f in files], dtype=object),
            "labels": np.array([[float(label)] for _, label in entries])})
    return data


def set_attrs(path: Path, **changes) -> None:
    """Give a feature file other attributes, checksum included: a file made that way, not a damaged one."""
    import h5py

    from featstack.store import ATTRS_SHA256, _attrs_of, attrs_checksum

    with h5py.File(path, "a") as f:
        f.attrs.update(changes)
        f.attrs[ATTRS_SHA256] = attrs_checksum(_attrs_of(f))
