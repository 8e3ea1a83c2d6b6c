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
                   help="cosine similarity of centred features from which two images are near duplicates (default "
                        "0.95, measured: see README)")
    p.add_argument("--models-dir", default=str(MODELS_DIR), help="where runs are (default models/)")
    a = parse_command(p, argv)
    from ..audit import run_audit
    run_main(run_audit, a.run, top=a.top, threshold=a.threshold, models_dir=a.models_dir)
