"""What every benchmark records beside its numbers: machine, date, command; and where the JSON goes."""
import json
import os
import platform
import sys
import time
from pathlib import Path


def header() -> dict:
    return {"machine": f"{platform.node()}, {os.cpu_count()} cores, {platform.machine()}",
            "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python " + " ".join(sys.argv)}


def write_json(results: dict, out: str) -> None:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"\n{path}")
