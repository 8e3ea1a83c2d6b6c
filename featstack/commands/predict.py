"""`featstack predict` (and predict.py):
which class (breed) is in this photo? Answers one or many photos through a trained stack.py run.
"""
import argparse
import sys

from ..cli import batch_size_arg, parse_command, run_main
from ..paths import MODELS_DIR

DESCRIPTION = 'Which class (breed) is in this photo? Answers one or many photos through a trained stack.py run.'
EXAMPLES = """examples:
  %(prog)s photo.jpg
  %(prog)s photos/ --run models/RUN_ID --top 3
  %(prog)s photo.jpg --json --models-dir models
"""


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photos", nargs="+", help="image files or folders of images")
    p.add_argument("--run", default=None, help="a stack.py run folder (default: the newest under --models-dir)")
    p.add_argument("--top", type=int, default=5, help="classes to print per photo (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON: every class with its probability, sorted")
    p.add_argument("--batch-size", type=batch_size_arg, default=32,
                   help="photos per forward pass, or auto (32 on CPU, 128 on GPU; default 32)")
    p.add_argument("--models-dir", default=str(MODELS_DIR), help="where runs are (default models/)")
    a = parse_command(p, argv)
    from ..heartbeat import heartbeat, printer
    with heartbeat("loading the prediction libraries", printer("stderr")):  # the first line within a second
        from ..predict import predict
    failed = run_main(predict, a.photos, run=a.run, top=a.top, as_json=a.json, batch_size=a.batch_size,
                      models_dir=a.models_dir)
    if failed:
        print(f"{failed} photo(s) could not be answered", file=sys.stderr)
        sys.exit(1)

