"""Ray engine: the same reader -> backbones -> writer loop, spread by Ray Data over a cluster's CPUs and GPUs."""
from __future__ import annotations

import copy
import time

import numpy as np
import pandas as pd
from tqdm import tqdm

from .backbones import run_backbones
from .decode import decode_batch
from .errors import FeatstackError

INSTALL_HINT = 'pip install "ray[data]"'


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise FeatstackError(f"--engine ray needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


def connect(address: str | None):
    """Join the cluster at ``address`` (or start a local Ray); an unreachable address is one clear line."""
    import logging
    ray = _import_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # featstack's own bar counts images; Ray's would print per operator
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return ray
    if address and address != "auto":
        _probe(address)
    try:
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    except Exception as exc:
        where = f"--ray-address {address}" if address else "a local Ray"
        raise FeatstackError(f"{where}: cannot connect ({str(exc).splitlines()[0][:160]}); start the head with "
                             "`ray start --head` and pass its address, or omit --ray-address for a local Ray") from None
    return ray


def _probe(address: str) -> None:
    """Fail in seconds on an unreachable head: ray.init itself retries for many minutes."""
    import socket
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FeatstackError(f"--ray-address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise FeatstackError(f"--ray-address {address}: cannot connect ({exc}); start the head with "
                             "`ray start --head` and pass its address, or omit --ray-address for a local Ray") from None


class DecodeBatch:
    """CPU task: decode each image once, resize once per size; failed rows keep their id and reason."""

    def __init__(self, sizes: tuple[int, ...]):
        self.sizes = sizes

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        arrays, errors = decode_batch(paths, self.sizes)
        ok = np.array([e is None for e in errors])
        out = {"id": batch["id"], "path": batch["path"], "error": np.array([e or "" for e in errors], dtype=object)}
        for s, arr in arrays.items():
            full = np.zeros((len(paths), *arr.shape[1:]), arr.dtype)
            full[ok] = arr
            out[f"img{s}"] = full
        return out


class ExtractActor:
    """One per GPU (or CPU slot): holds every requested backbone, extracts all of them from each decoded batch."""

    def __init__(self, backbones: list, todo: list[set[str]]):
        self.backbones = backbones
        self.todo = todo
        for b in self.backbones:
            b.build()

    def __call__(self, batch: dict) -> dict:
        ids = [str(i) for i in batch["id"]]
        ok = np.array([e == "" for e in batch["error"]])
        out = {"id": batch["id"], "path": batch["path"], "error": batch["error"]}
        needs = [ok & np.array([i in todo for i in ids], dtype=bool) for todo in self.todo]
        arrays = {b.input_key: batch[f"img{b.input_key}"] for b in self.backbones}
        blocks, _ = run_backbones(self.backbones, arrays, needs)
        for k, (b, need, block) in enumerate(zip(self.backbones, needs, blocks)):
            feats = np.full((len(ids), b.width), np.nan, np.float32)  # NaN marks rows this backbone skips
            if block is not None:
                feats[need] = block
            out[f"feat{k}"] = feats
        return out


def run_jobs_ray(jobs, table: pd.DataFrame, *, batch_size: int, address: str | None, options: dict,
                 progress: bool = True) -> pd.DataFrame:
    """Extract with Ray Data; the driver writes results as shards, so a killed run resumes like the local one."""
    ray = connect(address)
    started = time.perf_counter()
    if not jobs:
        return pd.DataFrame(columns=["id", "path", "reason"])
    needed = set().union(*(j.todo for j in jobs))
    todo = table[table["id"].isin(needed)]
    sizes = tuple(sorted({j.backbone.input_key for j in jobs}, key=str))
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    decode_cpus = float(options.get("decode_cpus") or 1)
    actors = options.get("actors") or (gpus or max(1, int(resources.get("CPU", 1) - decode_cpus)))
    # Actors get a model-free copy of each backbone: they build their own, next to their own device.
    shipped = [copy.copy(j.backbone) for j in jobs]
    for b in shipped:
        b.model = None
    ds = ray.data.from_items(todo[["id", "path"]].to_dict("records"))
    ds = ds.map_batches(DecodeBatch, fn_constructor_kwargs={"sizes": sizes}, batch_size=batch_size,
                        num_cpus=decode_cpus, batch_format="numpy",
                        concurrency=(1, max(1, int(resources.get("CPU", 1)))))
    ds = ds.map_batches(ExtractActor, fn_constructor_kwargs={"backbones": shipped, "todo": [j.todo for j in jobs]},
                        batch_size=batch_size, batch_format="numpy", concurrency=actors,
                        num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1)
    bad_rows = []
    bar = tqdm(total=len(todo), unit="img", desc=f"extract (ray, {actors} actor{'s' * (actors > 1)})",
               disable=not progress)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ids = [str(i) for i in batch["id"]]
        for i, p, e in zip(ids, batch["path"], batch["error"]):
            if e:
                bad_rows.append((i, str(p), str(e)))
        for k, job in enumerate(jobs):
            feats = batch[f"feat{k}"]
            rows = [r for r, i in enumerate(ids) if i in job.todo and not batch["error"][r]]
            if rows:
                bad_rows += job.take([ids[r] for r in rows], [str(batch["path"][r]) for r in rows],
                                     np.ascontiguousarray(feats[rows]))
        bar.update(len(ids))
    bar.close()
    for job in jobs:
        job.seconds = time.perf_counter() - started  # backbones share the cluster's wall time
    return pd.DataFrame(bad_rows, columns=["id", "path", "reason"])
