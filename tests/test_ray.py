"""--engine ray: same features as the local engine on a local Ray instance, resume after kill -9, clear errors."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from featstack.errors import FeatstackError
from featstack.extract import ExtractConfig, extract
from featstack.paths import DatasetPaths
from featstack.store import read_entry

from conftest import ROOT, write_images

ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install "ray[data]"')
ARGS = dict(backbones=["resnet50", "vgg16"], weights="random", image_size=32, progress=False)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture
def forty(tmp_path):
    data = tmp_path / "data" / "forty"
    write_images(data / "train", [f"{c}.{n}.jpg" for c in ("cat", "dog") for n in range(20)])
    (data / "train" / "dog.99.jpg").write_bytes(b"")  # a bad image must be reported by this engine too
    return data


def assert_same_store(a_root, b_root, n):
    files = sorted(p.name for p in a_root.glob("*.h5"))
    assert files == sorted(p.name for p in b_root.glob("*.h5")) and files
    for name in files:
        a, b = read_entry(a_root / name), read_entry(b_root / name)
        assert len(a.ids) == len(b.ids) == n
        order = {i: k for k, i in enumerate(b.ids)}
        fb = b.features[[order[i] for i in a.ids]]
        rel = np.linalg.norm(a.features - fb) / np.linalg.norm(fb)
        assert rel <= 1e-5, (name, rel)


@pytest.mark.slow
def test_killed_ray_run_resumes_and_matches_the_local_engine(tmp_path, forty, local_ray):
    """A Ray run killed with -9 mid-run, then resumed on Ray: the store equals the local engine's (most rows come from
    the resumed Ray run), the bad image is reported by this engine too, and a rerun sends nothing to the cluster.
    One Ray run serves all three: each costs half a minute of Ray and TensorFlow start-up on 2 cores."""
    paths = DatasetPaths.of(tmp_path / "ray", "forty")
    cmd = [sys.executable, str(ROOT / "extract_features.py"), "--data", str(forty), "--features-dir",
           str(tmp_path / "ray"), "--backbones", "resnet50,vgg16", "--weights", "random", "--image-size", "32",
           "--engine", "ray", "--batch-size", "2", "--shard-rows", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(paths.root.glob(".shards/*/*.h5"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    assert not list(paths.root.glob("*.h5")), "killed before the merge: only shards exist"
    resumed = extract(ExtractConfig(forty, features_dir=tmp_path / "ray", engine="ray", batch_size=8, **ARGS))
    assert 0 < sum(j.cached for j in resumed.jobs) and all(j.extracted > 0 for j in resumed.jobs)
    assert sorted(resumed.bad.id) == ["dog.99"]
    extract(ExtractConfig(forty, features_dir=tmp_path / "local", **ARGS))
    assert_same_store(paths.root, tmp_path / "local" / "forty", 40)
    again = extract(ExtractConfig(forty, features_dir=tmp_path / "ray", engine="ray", **ARGS))
    assert [j.extracted for j in again.jobs] == [0, 0]  # ids in the store are not sent to the cluster


def test_missing_ray_is_a_clear_error(tmp_path, forty, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an install without the extra looks like
    with pytest.raises(FeatstackError, match=r'--engine ray needs Ray, an optional extra: pip install "ray\[data\]"'):
        extract(ExtractConfig(forty, features_dir=tmp_path, engine="ray", **ARGS))


def test_unreachable_address_is_a_clear_error(tmp_path, forty):
    if ray.is_initialized():
        ray.shutdown()
    with pytest.raises(FeatstackError, match=r"--ray-address 127\.0\.0\.1:1: cannot connect .*ray start --head"):
        extract(ExtractConfig(forty, features_dir=tmp_path, engine="ray", ray_address="127.0.0.1:1", **ARGS))
