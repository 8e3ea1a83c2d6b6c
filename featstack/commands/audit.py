"""`featstack audit` (and audit.py): find mislabelled photos, duplicates, train/test leakage and outliers of a run."""
import argparse

from ..cli import parse_command, run_main
from ..paths import MODELS_DIR

DESCRIPTION = "Find mislabelled photos, duplicates, train/test leakage and outliers of a run from its cached features."
EXAMPLES = """examples:
  %(prog)s
  %(prog)s --run models/RUN_ID --top 50
"""


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a stack.py run folder (default: the newest under --models-dir)")
    p.add_argument("--top", type=int, default=20, help="entries shown in audit.md and the contact sheets (default 20)")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="cosine similarity of centred features from which two images are candidate near duplicates, "
                        "which their pixels then confirm or not (default 0.95, measured: see README)")
    p.add_argument("--models-dir", default=str(MODELS_DIR), help="where runs are (default models/)")
    a = parse_command(p, argv)
    from ..heartbeat import heartbeat
    with heartbeat("loading the audit's libraries"):  # the first line within a second, not after the imports
        from ..audit import run_audit
    stack_command = _stack_command(prog)
    run_main(run_audit, a.run, top=a.top, threshold=a.threshold, models_dir=a.models_dir, stack_command=stack_command)


def _stack_command(prog: str | None) -> tuple[str, ...]:
    """How to run stack.py from here, the way this audit was run: `featstack stack` (or `python -m featstack stack`),
    or the stack.py beside the audit.py that ran."""
    import sys
    from pathlib import Path
    if (prog or "").startswith("featstack"):
        return ("python", "-m", "featstack", "stack") if sys.argv[0].endswith("__main__.py") else ("featstack", "stack")
    script = Path(sys.argv[0]).resolve().with_name("stack.py")
    if not script.is_file():
        return ("python", "stack.py")
    from ..audit import shown_path
    return ("python", shown_path(script))
