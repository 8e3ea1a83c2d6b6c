"""Extraction runner: canonical table -> decode each image once -> every backbone -> feature store."""
from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import backbones as bb
from .decode import decode_batch, empty
from .errors import FeatstackError
from .heartbeat import heartbeat, printer
from .layouts import describe, read_layout
from .paths import DEMO_DATA_DIR, DEMO_NAME, DatasetPaths
from .split import plan_split, write_atomic
from .store import EntryWriter, photo_content, read_attrs, remove_stray_tmp, stack_names, writer_lock

NONFINITE = "non-finite features (inf or NaN) from"  # the start of bad_images.csv's reason for such a photo
# A backbone is refused, not its photos, once more than half of the photos it has seen gave inf or NaN (after at
# least this many, or all it had to do): an overflow that one photo's pixels cause is rare, while a broken model
# (an extreme scale layer, the wrong --preprocess) fails nearly every photo. Half leaves a wide margin both ways,
# and a handful of photos keeps one unlucky first batch from deciding.
MANY_SEEN = 8


@dataclass
class Job:
    """One backbone configuration's share of the run: which ids it still needs and where they go."""

    backbone: bb.Backbone
    writer: EntryWriter
    todo: set[str]
    cached: int
    changed: int = 0  # photos in todo whose stored features were made from other bytes (replaced under their name)
    seconds: float = 0.0
    extracted: int = 0
    stored: int = 0
    seen: int = 0  # photos this run's forward passes gave features of
    nonfinite: int = 0  # of which inf or NaN

    @property
    def nonfinite_reason(self) -> str:
        return f"{NONFINITE} {self.backbone.model_path or self.backbone.name} ({self.writer.final.name})"

    def take(self, ids: list[str], files: list[str], block: np.ndarray) -> list[tuple[str, str, str]]:
        """Store one batch of this backbone's features. Rows with inf or NaN are never stored: they come back as
        bad images, and so many of them that the model itself must be broken stop the run in one line."""
        finite = np.isfinite(block).all(axis=1)
        self.seen += len(block)
        self.nonfinite += int((~finite).sum())
        if self.nonfinite * 2 > self.seen and self.seen >= min(MANY_SEEN, len(self.todo)):
            b = self.backbone
            raise FeatstackError(
                f"backbone {b.model_path or b.name}: {self.nonfinite} of the {self.seen} photos it has seen gave "
                "non-finite features (inf or NaN), so the model is broken for these inputs, not the photos; check "
                "its --preprocess (the input scale it was trained on), choose another layer (PATH:LAYER), or leave "
                "it out of --backbones")
        kept = [i for i, ok in zip(ids, finite) if ok]
        if kept:
            self.writer.add(kept, block if finite.all() else block[finite])
            self.extracted += len(kept)
        return [(i, p, self.nonfinite_reason) for i, p, ok in zip(ids, files, finite) if not ok]


@dataclass
class Summary:
    paths: DatasetPaths
    jobs: list[Job]
    images: int
    bad: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["id", "path", "reason"]))
    seconds: float = 0.0
    loop_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"dataset": str(self.paths.root), "images": self.images, "bad": len(self.bad),
                "seconds": self.seconds, "loop_seconds": self.loop_seconds,
                "backbones": [{"name": j.backbone.name, "file": j.writer.final.name, "stored": j.stored,
                               "width": j.backbone.width, "extracted": j.extracted, "changed": j.changed,
                               "cached": j.cached,
                               "seconds": j.seconds} for j in self.jobs]}


def auto_batch_size() -> int:
    try:
        import keras
        gpus = keras.distribution.list_devices("gpu")
    except Exception:
        gpus = []
    return 128 if gpus else 32


def decoded_batches(ids: list[str], paths: list[str], sizes: tuple, batch_size: int,
                    threads: int) -> Iterator[tuple[list[str], list[str], dict, list]]:
    """Decoded batches in order, decoding up to ``threads + 1`` batches ahead of the consumer."""
    starts = iter(range(0, len(ids), batch_size))
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="decode") as pool:
        pending: deque = deque()

        def submit():
            start = next(starts, None)
            if start is not None:
                chunk = slice(start, start + batch_size)
                pending.append((ids[chunk], paths[chunk], pool.submit(decode_batch, paths[chunk], sizes)))

        for _ in range(max(1, threads) + 1):
            submit()
        while pending:
            batch_ids, batch_paths, future = pending.popleft()
            submit()
            arrays, errors = future.result()
            yield batch_ids, batch_paths, arrays, errors


def run_jobs(jobs: list[Job], table: pd.DataFrame, *, batch_size: int, threads: int,
             progress: bool = True) -> pd.DataFrame:
    """The local engine: only loops reader -> backbones -> writers. Returns the images that failed to decode."""
    needed = set().union(*(j.todo for j in jobs)) if jobs else set()
    todo = table[table["id"].isin(needed)]
    sizes = tuple(sorted({j.backbone.input_key for j in jobs if j.todo}, key=str))
    bad_rows = []
    bar = tqdm(total=len(todo), unit="img", desc="extract", disable=not progress, smoothing=0.1)
    batches = -(-len(todo) // batch_size)
    # The bar's last field names the backbone at work on which batch; where one forward pass (or a decode) runs
    # past INTERVAL seconds, the heartbeat says so there: on a loaded machine one batch of a slow backbone took 99 s.
    with heartbeat(f"decoding batch 1 of {batches}", bar.set_postfix_str, announce=False) as beat:
        def starting(b: bb.Backbone) -> None:
            beat.set(f"running {b.name} on batch {number} of {batches}")
            bar.set_postfix_str(beat.doing)
            beat.said()

        for number, (batch_ids, batch_paths, arrays, errors) in enumerate(decoded_batches(
                todo["id"].tolist(), todo["path"].tolist(), sizes, batch_size, threads), 1):
            ok_ids = [i for i, e in zip(batch_ids, errors) if e is None]
            ok_paths = [p for p, e in zip(batch_paths, errors) if e is None]
            bad_rows += [(i, p, e) for i, p, e in zip(batch_ids, batch_paths, errors) if e is not None]
            wanted = [np.array([i in job.todo for i in ok_ids], dtype=bool) for job in jobs]
            feats, seconds = bb.run_backbones([job.backbone for job in jobs], arrays, wanted,
                                              starting if progress else None)
            for job, mask, block, spent in zip(jobs, wanted, feats, seconds):
                if block is None:
                    continue
                job.seconds += spent
                bad_rows += job.take([i for i, w in zip(ok_ids, mask) if w],
                                     [p for p, w in zip(ok_paths, mask) if w], block)
            bar.update(len(batch_ids))
            beat.set(f"decoding batch {number + 1} of {batches}")
            beat.said()
    bar.close()
    return pd.DataFrame(bad_rows, columns=["id", "path", "reason"])


def plan_jobs(paths: DatasetPaths, backbones: list[bb.Backbone], ids: set[str], shard_rows: int,
              content: dict[str, str] | None = None) -> list[Job]:
    """A job per backbone; ``content`` (id -> sha256 of the photo's bytes) makes a replaced photo's row stale."""
    jobs = []
    for b in backbones:
        writer = EntryWriter(paths, b.entry, {}, shard_rows=shard_rows, content=content)
        done = writer.recover()  # damaged files moved aside, shards a killed merge absorbed deleted
        jobs.append(Job(b, writer, ids - done, cached=len(ids & done), changed=len(ids & writer.changed)))
    return jobs


def still_bad(paths: DatasetPaths, jobs: list[Job], table: pd.DataFrame,
              changed: set[str] = frozenset()) -> pd.DataFrame:
    """Images the last run could not use that still cannot be used: taken out of the to-do lists.

    Bad images are in no feature file, so each run would otherwise build every model to retry them. They are
    decoded again here (a fixed file is extracted as usual); the ones that still fail stay in bad_images.csv. A
    photo a backbone gave non-finite features of stays out of that backbone's to-do list until its bytes change.
    """
    empty_bad = pd.DataFrame(columns=["id", "path", "reason"])
    todo = set().union(*(j.todo for j in jobs)) if jobs else set()
    if not todo or not paths.bad_images_csv.is_file():
        return empty_bad
    try:
        listed = pd.read_csv(paths.bad_images_csv, dtype=str, keep_default_na=False)[["id", "path", "reason"]]
    except (OSError, ValueError, KeyError):
        listed = empty_bad
    nonfinite = []
    for job in jobs:
        mine = listed[(listed["reason"] == job.nonfinite_reason) & listed["id"].isin(job.todo - set(changed))]
        job.todo -= set(mine["id"])
        nonfinite.append(mine)
    nonfinite = pd.concat(nonfinite, ignore_index=True) if nonfinite else empty_bad
    todo = set().union(*(j.todo for j in jobs))
    retry = table[table["id"].isin(set(listed["id"][~listed["reason"].str.startswith(NONFINITE)]) & todo)]
    if retry.empty:
        return nonfinite
    size = min(j.backbone.input_size for j in jobs)
    _, errors = decode_batch(retry["path"].astype(str).tolist(), (size,))
    bad = pd.DataFrame([(i, p, e) for i, p, e in zip(retry["id"], retry["path"], errors) if e is not None],
                       columns=["id", "path", "reason"])
    for job in jobs:
        job.todo -= set(bad["id"])
    return pd.concat([nonfinite, bad], ignore_index=True) if len(nonfinite) else bad


@dataclass(frozen=True)
class ExtractConfig:
    """One extraction run as `extract_features.py` is asked for it; the command-line parser builds it."""

    data: str | Path | None = None
    layout: str = "auto"
    backbones: list[str] | None = None  # None: DEFAULT_BACKBONES
    weights: str = "imagenet"
    preprocess: str | None = None
    image_size: int | None = None
    pooling: str | None = None  # None: avg for registry backbones, a hub encoder's own readout (class token, embedding)
    tta: str = "none"
    features_dir: str | Path = "features"
    name: str | None = None
    holdout: float = 0.1
    seed: int = 0
    batch_size: int | str = 32
    precision: str = "float32"
    decode_threads: int | None = None
    demo: bool = False
    engine: str = "local"
    ray_address: str | None = None
    ray_options: dict = field(default_factory=dict)
    shard_rows: int = 1024
    progress: bool = True

    def resolve_backbones(self, names: list[str] | None = None, weights: str | None = None) -> list[bb.Backbone]:
        return bb.resolve(list(names or self.backbones or bb.DEFAULT_BACKBONES), weights=weights or self.weights,
                          image_size=self.image_size, pooling=self.pooling, tta=self.tta,
                          preprocess_mode=self.preprocess, precision=self.precision, seed=self.seed)


def extract(config: ExtractConfig) -> Summary:
    """Extract (or complete) the cached features of every image for every requested backbone."""
    started = time.perf_counter()
    c = config
    if c.demo:
        from . import demo as demo_competition
        # light backbones at a small size: the quick start stays quick
        c = replace(c, data=demo_competition.write_demo(Path(c.data) if c.data else DEMO_DATA_DIR),
                    name=c.name or DEMO_NAME, backbones=c.backbones or list(demo_competition.BACKBONES),
                    image_size=c.image_size or demo_competition.BACKBONE_PX)
    data = c.data
    if data is None:
        raise FeatstackError("--data: name the dataset folder (or use --demo)")
    table, layout = read_layout(data, c.layout)
    print(describe(table, c.holdout), flush=True)  # what was detected, before the long work starts
    name = c.name or (Path(data).stem if Path(data).is_file() else Path(data).resolve().name)
    paths = DatasetPaths.of(c.features_dir, name)
    batch_size = auto_batch_size() if c.batch_size == "auto" else c.batch_size
    batch_size = int(batch_size)
    if batch_size < 1:
        raise FeatstackError(f"--batch-size {batch_size}: must be at least 1")
    threads = c.decode_threads or os.cpu_count() or 1
    if c.engine not in ("local", "ray"):
        raise FeatstackError(f"--engine {c.engine}: choose local or ray")
    resolved = c.resolve_backbones()
    with writer_lock(paths):
        remove_stray_tmp(paths)  # temporary files of writes a killed run left behind
        # Everything that can fail is decided before split.csv and dataset.json are written.
        split = plan_split(paths, table, holdout=c.holdout, seed=c.seed, layout=layout, data=Path(data))
        table = split.table
        ids = set(table["id"])
        content, changed = photo_content(paths, table, threads)
        jobs = plan_jobs(paths, resolved, ids, c.shard_rows, content)
        known_bad = still_bad(paths, jobs, table, changed)
        if c.demo and c.weights == "imagenet":
            jobs = _demo_weights_or_random(jobs, paths, resolved, ids, c, batch_size, content)
            known_bad = still_bad(paths, jobs, table, changed)
        mix = weights_mix_warning(paths, jobs)
        if mix:
            print(mix, file=sys.stderr, flush=True)
        if c.engine == "local":
            build_models(jobs, batch_size)  # the Ray engine builds on its actors instead
        split.write(paths)
        active = [j for j in jobs if j.todo]
        for job in active:
            job.backbone.batch_rows = batch_size  # every forward pass gets one shape: each model compiles once
        loop_started = time.perf_counter()
        if c.engine == "ray":
            from .ray_engine import run_jobs_ray
            bad = run_jobs_ray(active, table, batch_size=batch_size, address=c.ray_address,
                               options=c.ray_options or {}, progress=c.progress)
        else:
            bad = run_jobs(active, table, batch_size=batch_size, threads=threads, progress=c.progress)
        if len(known_bad):
            bad = pd.concat([known_bad, bad], ignore_index=True) if len(bad) else known_bad
        loop_seconds = time.perf_counter() - loop_started
        for job in jobs:
            if not job.extracted and job.writer.final.exists():
                job.writer.attrs = read_attrs(job.writer.final)
            else:
                # Forward-pass seconds, summed over the runs that filled the file (unknown if an earlier run kept none).
                before = read_attrs(job.writer.final).get("extract_seconds") if job.writer.final.exists() else 0.0
                job.writer.attrs = {**job.backbone.attrs(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                    "extract_seconds": None if before is None else round(before + job.seconds, 3)}
            job.stored = job.writer.merge()
        # Always rewritten, also by a fully cached run: it lists the current table's bad images, no others.
        write_atomic(paths.bad_images_csv, lambda p: bad.to_csv(p, index=False))
    summary = Summary(paths, jobs, len(table), bad, time.perf_counter() - started, loop_seconds)
    print_summary(summary)
    return summary


def _demo_weights_or_random(jobs, paths, resolved, ids, config: ExtractConfig, batch_size: int, content=None):
    """The demo may not stop for want of ImageNet weights: it says so loudly and records seeded random weights."""
    try:
        build_models(jobs, batch_size)
        return jobs
    except FeatstackError as exc:
        bar = "!" * 78
        print(f"{bar}\nDEMO: ImageNet weights are not available here, so the demo goes on with SEEDED RANDOM\n"
              f"weights (--weights random). Features and scores will be far below ImageNet ones.\n"
              f"Reason: {exc}\n{bar}")
        randoms = config.resolve_backbones([b.model_path or b.name for b in resolved], weights="random")
        return plan_jobs(paths, randoms, ids, config.shard_rows, content)


def weights_mix_warning(paths: DatasetPaths, jobs: list[Job]) -> str | None:
    """One line when this run adds random-weight features to a store that holds trained-weight ones, or the reverse:
    stack.py refuses to mix the two, so the user learns it now, with the --backbones value that stacks each kind."""
    adding = {j.backbone.weights == "random" for j in jobs if j.todo}
    if not adding:
        return None
    files = {j.writer.final: (j.backbone.name, j.backbone.weights == "random") for j in jobs}
    for path in paths.entry_files():
        if path not in files:
            try:
                attrs = read_attrs(path)
            except FeatstackError:
                continue  # a damaged file is reported where it is read
            files[path] = (attrs.get("backbone", path.stem), attrs.get("weights") == "random")
    names = stack_names({p: b for p, (b, _) in files.items()})
    group = {kind: ",".join(names[p] for p, (_, r) in files.items() if r == kind) for kind in (True, False)}
    if not group[True] or not group[False]:
        return None
    if len(adding) > 1:
        return (f"warning: this run adds random-weight ({group[True]}) and trained-weight ({group[False]}) features to "
                f"{paths.root}; stack.py stacks one kind at a time: --backbones {group[True]} or --backbones "
                f"{group[False]}")
    added = ",".join(names[j.writer.final] for j in jobs if j.todo)
    kind, other = ("random", "trained") if True in adding else ("trained", "random")
    return (f"warning: adding {kind}-weight features ({added}) to {paths.root}, which holds {other}-weight features; "
            f"stack.py refuses to mix the two, so stack each kind on its own: --backbones {group[True]} (random "
            f"weights) or --backbones {group[False]} (trained weights)")


def build_models(jobs: list[Job], batch_rows: int) -> None:
    """Build each needed model once and compile its forward pass, one line each.

    Building (and downloading weights) and the first forward pass of each model (tracing, graph optimisation) take
    seconds to tens of seconds on a small machine: said model by model here, not hidden in the first batch.
    """
    for job in jobs:
        b = job.backbone
        if job.todo and b.model is None:
            started = time.perf_counter()
            print(f"model {b.name} ({b.input_size} px, {b.weights} weights): building and compiling ...", end=" ",
                  flush=True)
            try:
                # On this same line, every INTERVAL seconds: "10 s ... 20 s ..." (a minute on a loaded machine).
                with heartbeat(b.name, printer(end=" "), announce=False, still="{seconds:.0f} s ..."):
                    b.build()
                    b.batch_rows = batch_rows  # the one shape every batch will have: compiled once, here
                    b.features(np.zeros((1, *empty(b.input_key).shape[1:]), empty(b.input_key).dtype))
            finally:
                print(f"{time.perf_counter() - started:.1f} s" if b.model is not None else "failed", flush=True)


def print_summary(summary: Summary) -> None:
    print(f"\n{summary.paths.root}: {summary.images} images, {len(summary.bad)} bad "
          f"(see {summary.paths.bad_images_csv.name})" if len(summary.bad) else
          f"\n{summary.paths.root}: {summary.images} images, 0 bad")
    print(f"{'backbone':<24}{'stored':>8}{'width':>7}{'new':>7}{'changed':>8}{'cached':>8}{'seconds':>9}"
          f"{'img/s':>8}  file")
    for j in summary.jobs:
        rate = j.extracted / j.seconds if j.seconds else float("nan")
        print(f"{j.backbone.name:<24}{j.stored:>8}{j.backbone.width or 0:>7}{j.extracted:>7}{j.changed:>8}{j.cached:>8}"
              f"{j.seconds:>9.1f}{rate:>8.1f}  {j.writer.final.name}")
    print(f"total {summary.seconds:.1f} s")
