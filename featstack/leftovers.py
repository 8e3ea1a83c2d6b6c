"""Hidden work folders (``….tmp<pid>``) and the lease that tells a live writer's from what a killed run left.

A process id alone cannot say whether a writer lives when the folder is shared between containers or machines:
another PID namespace's process is invisible here. So a writer also holds a lease beside its work folder,
``.featstack-lease<folder>``: an exclusive ``flock`` (released by the kernel, or the NFS lock manager, when the
writer dies) plus a heartbeat, the lease file's modification time, refreshed every ``HEARTBEAT_S`` seconds while it
lives. A leftover is removed only when its lease can be locked AND either it was written from this machine's PID
namespace by a process that has exited, or its heartbeat is older than ``STALE_S`` (where locks are not shared
between the machines, the heartbeat alone keeps a live folder).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from .errors import FeatstackError

try:
    import fcntl
except ImportError:  # Windows: no flock; the heartbeat alone keeps a live writer's folder
    fcntl = None

HEARTBEAT_S = 10.0
STALE_S = 120.0  # a dozen missed heartbeats: a writer this late is gone, not slow
LOCK_WAIT_S = 10.0  # a cleanup holds a dead writer's lease only while it deletes that writer's folder
LEASE = ".featstack-lease"  # a prefix: globs of the work folders' names (.<run>.tmp*) do not find leases


def alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts)."""
    if pid <= 0:
        return True  # not a name featstack gives: never treated as a leftover
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False
    return True


def _where() -> dict:
    """What makes a process id meaningful: the machine (its boot) and the PID namespace it was given in."""
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    pidns = ""
    with contextlib.suppress(OSError):
        pidns = os.readlink("/proc/self/ns/pid")
    return {"host": socket.gethostname(), "boot": boot, "pidns": pidns}


def lease_path(folder: Path) -> Path:
    return folder.with_name(LEASE + folder.name)


@contextlib.contextmanager
def lease(folder: Path):
    """Hold the lease of the work folder ``folder`` (created before it, removed after it) while the body runs."""
    path = lease_path(Path(folder))
    fd = _take(path)
    stop = threading.Event()
    beat = None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({**_where(), "pid": os.getpid()}).encode())

        def heartbeat():
            while not stop.wait(HEARTBEAT_S):
                with contextlib.suppress(OSError):
                    os.utime(fd)

        beat = threading.Thread(target=heartbeat, name=f"lease {path.name}", daemon=True)
        beat.start()
        yield path
    finally:
        stop.set()
        if beat is not None:
            beat.join()
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: no cleaner can take it for a dead writer's meanwhile
        os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a lease unlinked meanwhile locks nothing)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except OSError:
        return False


def _take(path: Path) -> int:
    """An open descriptor of lease ``path``, exclusively locked, that ``path`` still names when it is returned."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() > deadline:
                # The same work folder name (run id and process id) in use by a writer elsewhere.
                raise FeatstackError(f"{path}: another process (in another container or on another machine sharing "
                                     "this folder) holds this lease and writes the same work folder now; wait for it "
                                     "to finish (or, for stack.py, pass another --run-id)") from None
            time.sleep(0.05)  # a cleanup holds it for an instant while it removes a dead writer's folder
            continue
        except BaseException:
            os.close(fd)
            raise
        if _same_file(path, fd):
            return fd
        os.close(fd)  # removed by a cleanup while we waited: lock the file that is there now


def _folder_now(folder: Path) -> float | None:
    """The time as the folder's file system stamps it (a network share's server clock, not this machine's)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".featstack-clock") as f:
            return os.fstat(f.fileno()).st_mtime
    except OSError:
        return None


def _lease_dead(path: Path, pid: int, now: list) -> bool | None:
    """Whether the writer that holds (held) lease ``path`` is gone; None when there is no lease file. While it
    returns True the lease stays locked by this process (the caller removes it), so no writer can come back."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    except OSError:
        return False  # cannot look: never delete
    try:
        before = os.fstat(fd).st_mtime
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False  # the writer holds it: alive
        if not _same_file(path, fd):
            os.close(fd)
            return False  # released and removed meanwhile: looked at again next time
        try:
            facts = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            facts = {}
        here = _where()
        if facts and all(facts.get(k) == here[k] for k in ("host", "boot", "pidns")) and here["boot"] and here["pidns"]:
            dead = not alive(int(facts.get("pid", pid)))  # the same machine and namespace: the pid says it
        else:
            if not now:
                now.append(_folder_now(path.parent))
            clock = now[0] if now[0] is not None else before
            dead = clock - before > STALE_S
        if not dead:
            os.close(fd)
            return False
        _held[path] = fd
        return True
    except OSError:
        os.close(fd)
        return False


_held: dict[Path, int] = {}  # leases of dead writers, locked here until remove_leftover deletes their folder


def dead_leftovers(folder: Path, pattern: str) -> list[Path]:
    """Entries of ``folder`` whose name fully matches ``pattern`` (its group ``pid`` the writer's process id) and
    whose writer has exited: what a killed run left. A live run's work folder is never among them, even when it
    was written from another container or machine sharing the folder (see the module's note on leases). An
    orphaned lease of a dead writer is listed as its folder's name."""
    rx = re.compile(pattern)
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    names = {p.name[len(LEASE):] if p.name.startswith(LEASE) else p.name for p in entries}
    found, now = [], []
    for name in sorted(names):
        match = rx.fullmatch(name)
        if not match or int(match["pid"]) == os.getpid() and not os.path.lexists(lease_path(Path(folder) / name)):
            continue
        path = Path(folder) / name
        dead = _lease_dead(lease_path(path), int(match["pid"]), now)
        if dead is None:  # no lease: written by a featstack before leases, or its lease is already gone
            dead = int(match["pid"]) != os.getpid() and not alive(int(match["pid"]))
        if dead:
            found.append(path)
    return found


def remove_leftover(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    drop_lease(path)


def drop_lease(path: Path) -> None:
    """Delete the lease of a dead writer's folder ``path`` (gone or moved), then unlock it."""
    lease = lease_path(path)
    fd = _held.pop(lease, None)
    with contextlib.suppress(OSError):
        lease.unlink()
    if fd is not None:
        os.close(fd)


def release(paths: list[Path]) -> None:
    """Give up the locks taken on dead writers' leases whose folders are not removed after all."""
    for path in paths:
        fd = _held.pop(lease_path(path), None)
        if fd is not None:
            os.close(fd)
