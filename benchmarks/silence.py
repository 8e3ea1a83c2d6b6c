#!/usr/bin/env python
"""The longest stretch without output of a command, or of the README's quick start step by step, optionally under
an added CPU load: what the README's quick-start table records as "longest silence s" (issue #32: none over 30 s).

    python benchmarks/silence.py -- .venv/bin/python predict.py photo.jpg      # one command
    python benchmarks/silence.py --quickstart --workdir /tmp/qs --load 4       # the quick start, 4 busy loops

Every byte the command writes, on stdout or stderr, ends a silence (a progress bar's redraw counts: it is what the
user sees change). Wall seconds, CPU seconds (user + sys of the command and its children) and the longest silence,
with the output line before and after it, per step; the load average at the start and end of each step. --load N
runs N busy loops (`yes > /dev/null`) beside the steps, ended when they are: two per core is the issue's "load 10"
on a 2-core machine once the other work is counted; the load average says what it was.
"""
import argparse
import os
import re
import resource
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import header, write_json  # noqa: E402

DEMO_PHOTO = "data/demo/test/014818baa17d4a315bf0675bc48263b8.jpg"


def quickstart_steps(python: str) -> list[tuple[list[str], str | None]]:
    """The README's quick start after its pip install, then audit.py and serve.py up to "serving run" (the
    issue's other slow starts): (argv, regex on the output that ends the step, or None to wait for exit)."""
    script = lambda name: [python, str(ROOT / name)]  # noqa: E731
    return [([*script("extract_features.py"), "--demo"], None),
            ([*script("stack.py"), "--features", "features/demo", "--model", "stack"], None),
            (script("submit.py"), None),
            ([*script("predict.py"), DEMO_PHOTO], None),
            (script("audit.py"), None),
            ([*script("serve.py"), "--port", "0"], r"featstack: serving run ")]


def measure(argv: list[str], cwd: Path, until: str | None = None, echo: bool = True) -> dict:
    """Run ``argv``; the longest time between two writes of output (the start and the end count as writes). With
    ``until``, the command is stopped (SIGINT) once its output matches, and wall and silence end there."""
    started = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_start = os.getloadavg()[0]
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    sel = selectors.DefaultSelector()
    for stream in (proc.stdout, proc.stderr):
        os.set_blocking(stream.fileno(), False)
        sel.register(stream, selectors.EVENT_READ)
    last, longest, first, end = started, (0.0, "", ""), None, None
    previous_text, text_so_far, stopped = "(start)", b"", False
    while sel.get_map():
        for key, _ in sel.select(timeout=1.0):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            now = time.monotonic()
            first = now - started if first is None else first
            shown = _last_line(chunk) or previous_text
            if not stopped:  # after --until's line the command only shuts down: not measured
                if now - last > longest[0]:
                    longest = (now - last, previous_text, shown)
                last, previous_text = now, shown
            if echo:
                out = sys.stdout if key.fileobj is proc.stdout else sys.stderr
                out.write(chunk.decode(errors="replace"))
                out.flush()
            text_so_far = (text_so_far + chunk)[-4096:]
            if until and not stopped and re.search(until, text_so_far.decode(errors="replace")):
                os.killpg(proc.pid, signal.SIGINT)  # the server is up: stop it as Ctrl+C would
                stopped, end = True, now
    code = proc.wait()
    end = end if stopped else time.monotonic()
    if end - last > longest[0]:
        longest = (end - last, previous_text, "(exit)")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": shlex.join(argv), "exit": code, "stopped_at": until if stopped else None,
            "wall_s": round(end - started, 1), "cpu_s": round(cpu, 1),
            "first_output_s": round(first if first is not None else end - started, 1),
            "longest_silence_s": round(longest[0], 1), "silence_after": longest[1], "silence_before": longest[2],
            "load_start": round(load_start, 1), "load_end": round(os.getloadavg()[0], 1)}


def _last_line(chunk: bytes) -> str:
    lines = [t for t in re.split(r"[\r\n]+", chunk.decode(errors="replace")) if t.strip()]
    return lines[-1].strip()[:100] if lines else ""


def busy_loops(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, start_new_session=True) for _ in range(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="*", help="the command to measure (after --)")
    ap.add_argument("--quickstart", action="store_true", help="the README's quick start steps, then audit and serve")
    ap.add_argument("--workdir", default=".", help="where the steps run (the quick start writes data/, features/, "
                                                   "models/ and submissions/ there; default: here)")
    ap.add_argument("--python", default=sys.executable, help="the Python of the quick start's steps")
    ap.add_argument("--until", default=None, help="a regex on the output after which the command is stopped (SIGINT)")
    ap.add_argument("--load", type=int, default=0, help="busy loops (yes > /dev/null) beside the steps")
    ap.add_argument("--quiet", action="store_true", help="do not echo the steps' output")
    ap.add_argument("--out", default="benchmarks/results/silence.json")
    a = ap.parse_args()
    if a.quickstart == bool(a.command):
        ap.error("give a command after --, or --quickstart")
    python = str(Path(shutil.which(a.python) or a.python).absolute())  # not resolve(): a venv's python is a link
    steps = quickstart_steps(python) if a.quickstart else [(a.command, a.until)]
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    loops = busy_loops(a.load)
    rows = []
    try:
        time.sleep(5 if loops else 0)  # let the load average feel the loops before the first step
        for argv, until in steps:
            rows.append(measure(argv, workdir, until, echo=not a.quiet))
            if rows[-1]["exit"] not in (0, -signal.SIGINT, 130) and a.quickstart:
                break  # a failed step: the next ones need its output
    finally:
        for p in loops:
            p.kill()
            p.wait()
    print("\n| step | wall s | CPU s (user + sys) | first output s | longest silence s | load avg start-end |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        step = re.sub(r"^\S*python\S* (\S*/)?", "", r["command"])
        print(f"| `{step}` | {r['wall_s']} | {r['cpu_s']} | {r['first_output_s']} | {r['longest_silence_s']} | "
              f"{r['load_start']}-{r['load_end']} |")
    worst = max(rows, key=lambda r: r["longest_silence_s"])
    print(f"longest silence {worst['longest_silence_s']} s in `{worst['command']}`, after "
          f"{worst['silence_after']!r}, before {worst['silence_before']!r}")
    write_json({**header(), "busy_loops": a.load, "cores": os.cpu_count(), "steps": rows}, a.out)


if __name__ == "__main__":
    main()
