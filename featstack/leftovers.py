"""Hidden work folders named after the process writing them (``….tmp<pid>``), found again once that process is gone."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


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


def dead_leftovers(folder: Path, pattern: str) -> list[Path]:
    """Entries of ``folder`` whose name fully matches ``pattern`` (its group ``pid`` the writer's process id) and
    whose writer has exited: what a killed run left. A live run's work folder is never among them."""
    rx = re.compile(pattern)
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    found = []
    for path in entries:
        match = rx.fullmatch(path.name)
        if match and int(match["pid"]) != os.getpid() and not alive(int(match["pid"])):
            found.append(path)
    return sorted(found)


def remove_leftover(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
