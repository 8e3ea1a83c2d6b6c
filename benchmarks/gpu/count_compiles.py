#!/usr/bin/env python
"""Run a Python program (extract_features.py) unchanged, and write how often JAX compiled each function to a JSON file.

Usage: count_compiles.py COUNTS.json PROGRAM.py [ARGS...]. The listener is jax.monitoring's backend-compile event;
where JAX is absent the program still runs and the file says so.
"""
import atexit
import json
import runpy
import sys
from pathlib import Path

counts_file, program, args = sys.argv[1], sys.argv[2], sys.argv[3:]
counts: dict = {}
try:
    import jax.monitoring

    def listen(event, seconds, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            name = kw.get("fun_name", "?")
            counts[name] = counts.get(name, 0) + 1

    jax.monitoring.register_event_duration_secs_listener(listen)
except ImportError:
    counts["note"] = "JAX is not installed"
atexit.register(lambda: Path(counts_file).write_text(json.dumps(counts, indent=1)))
sys.argv = [program] + args
sys.path.insert(0, str(Path(program).resolve().parent))
runpy.run_path(program, run_name="__main__")
