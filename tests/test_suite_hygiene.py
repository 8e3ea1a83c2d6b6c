"""The test suite itself: an interrupted run leaves no worker processes behind."""
import os
import signal
import subprocess
import sys
import time

import psutil

from conftest import ROOT

INNER = '''
import os, subprocess, sys, time
from joblib import Parallel, delayed

def test_starts_loky_workers_and_a_server_then_waits():
    pids = set(Parallel(n_jobs=2, backend="loky")(delayed(os.getpid)() for _ in range(8)))
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # as a serve.py would
    with open(os.environ["PIDS_FILE"], "w") as f:
        f.write(" ".join(map(str, [os.getpid(), server.pid, *pids])))
    time.sleep(300)
'''


def test_interrupted_run_leaves_no_worker_or_server_processes(tmp_path):
    # The worst case: the xdist worker that started loky workers and a server is killed outright, orphaning them,
    # and the run is then interrupted (Ctrl-C, or a timeout's SIGTERM to pytest). The suite's own conftest is loaded.
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    pids_file = tmp_path / "pids.txt"
    env = {**os.environ, "PIDS_FILE": str(pids_file), "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                             "-n", "1", "test_inner.py"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (pids_file.exists() and pids_file.read_text()) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        xdist_worker, server, *loky = map(int, pids_file.read_text().split())
        assert loky and xdist_worker not in loky
        os.kill(xdist_worker, signal.SIGKILL)
        time.sleep(1)
        assert psutil.pid_exists(server)  # orphaned, not ended by the worker's death
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        left = [psutil.Process(p) for p in (server, *loky) if psutil.pid_exists(p)]
        _, alive = psutil.wait_procs(left, timeout=10)
        assert not alive, f"processes left running: {[p.pid for p in alive]} (server {server}, loky {loky})"
    finally:
        if proc.poll() is None:
            proc.kill()
        for leftover in psutil.process_iter():  # what this test started, should it fail
            try:
                if leftover.environ().get("PIDS_FILE") == str(pids_file):
                    leftover.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
