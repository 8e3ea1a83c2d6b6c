"""`featstack submit` (and submit.py):
write a run's Kaggle submission, validated, and optionally submit it with the official kaggle tool.
"""
import argparse

from ..cli import parse_command, run_main
from ..paths import MODELS_DIR, SUBMISSIONS_DIR

DESCRIPTION = "Write a run's Kaggle submission, validated, and optionally submit it with the official kaggle tool."
EXAMPLES = """examples:
  %(prog)s
  %(prog)s --run models/RUN_ID --format cats-dogs --clip 0.005 --out submissions/cats.csv.gz
  %(prog)s --submit dog-breed-identification -m "stack, 4 backbones" --submissions-dir submissions
"""


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=None, help="a stack.py run folder (default: the newest under --models-dir)")
    p.add_argument("--format", default="auto", help="auto|dog-breed|cats-dogs|generic (default auto: from the layout)")
    p.add_argument("--sample", default=None, help="the competition's sample_submission.csv (default: from the dataset)")
    p.add_argument("--out", default=None, help="file to write (default submissions/<run-id>.csv; .csv.gz compresses)")
    p.add_argument("--clip", type=float, default=None,
                   help="clip probabilities to [P, 1-P] before renormalising (default none; 0.005 is common for the "
                        "binary dogs-vs-cats log loss)")
    p.add_argument("--labels", action="store_true", help="generic format: id,label with the predicted class")
    p.add_argument("--submit", metavar="COMPETITION", default=None, help="submit with: kaggle competitions submit")
    p.add_argument("-m", "--message", default=None, help="submission message")
    p.add_argument("--force", action="store_true",
                   help="--submit even a run trained on random-weight features, or write a --format (or --sample) "
                        "that does not fit the run's dataset (both refused without it)")
    p.add_argument("--models-dir", default=str(MODELS_DIR), help="where runs are (default models/)")
    p.add_argument("--submissions-dir", default=str(SUBMISSIONS_DIR), help="default output folder and log.csv")
    a = parse_command(p, argv)
    from ..submission import submit
    run_main(submit, a.run, fmt=a.format, sample=a.sample, out=a.out, clip=a.clip, labels=a.labels,
             competition=a.submit, message=a.message, models_dir=a.models_dir, submissions_dir=a.submissions_dir,
             force=a.force)

