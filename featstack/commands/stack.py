"""`featstack stack` (and stack.py):
train logistic / LightGBM / stacked models on cached features and write an honest holdout report.
"""
import argparse

from ..cli import comma_list, parse_command, run_main, usage
from ..paths import MODELS_DIR

DESCRIPTION = 'Train logistic / LightGBM / stacked models on cached features and write an honest holdout report.'
EXAMPLES = """examples:
  %(prog)s --features features/demo --model stack
  %(prog)s --features features/dog-breed --model logreg --C 0.5 --models-dir models
  %(prog)s --list --features features/dog-breed
"""


def main(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, usage=usage("--features FEATURES [options]",
                                                       "--list [--features FEATURES] [--models-dir MODELS_DIR]"),
                                description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", help="required unless --list: a dataset folder under features/, e.g. features/demo")
    p.add_argument("--backbones", default=None, help="comma-separated backbones (default: every cached one)")
    p.add_argument("--model", default="logreg",
                   help="logreg|lgbm|stack|avg|blend (default logreg: the quick loop to rerun). For a final "
                        "submission use stack: it beat its best member and logreg in every measurement "
                        "(BENCHMARKS.md), at 2-4x logreg's time")
    p.add_argument("--level2", default="pool",
                   help="stack's level-2 model: pool (log-linear pooling of the members: a non-negative weight per "
                        "member), logreg (a full logistic regression on the members' log-probabilities, its C "
                        "chosen by CV) or lgbm (default pool)")
    p.add_argument("--members", default=None,
                   help="comma-separated level-1 members of stack, blend and avg: backbones (each backbone's own "
                        "logreg), a backbone's name, concat (logreg on the concatenated features), lgbm (default: "
                        "backbones,concat for stack and blend; backbones for avg)")
    p.add_argument("--C", default="1.0",
                   help="inverse L2 strength of the logistic regressions (logreg, and each level-1 member of avg, "
                        "blend and stack), or auto: chosen from 1e-4 ... 100 by CV on training rows (default 1.0)")
    p.add_argument("--folds", type=int, default=5, help="stratified CV folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of folds and models (default 0)")
    p.add_argument("--models-dir", default=str(MODELS_DIR), help="where run folders go (default models/)")
    p.add_argument("--run-id", default=None, help="name of the run folder (default: dataset-model-time)")
    p.add_argument("--allow-missing", action="store_true", help="use only ids that every backbone has")
    p.add_argument("--exclude", default=None, metavar="FILE",
                   help="a CSV with an id column (e.g. an audit's label_issues.csv): train without those training "
                        "rows; holdout rows are never excluded")
    p.add_argument("--list", action="store_true", help="print every run (of --features' dataset), best CV first")
    p.add_argument("--select", action="store_true",
                   help="rank the cached backbones: CV log loss alone, then greedy forward selection on blended "
                        "out-of-fold probabilities; writes models/<run>/selection.csv")
    a = parse_command(p, argv)
    from .. import stack
    if a.list:
        return run_main(stack.list_runs, a.models_dir, a.features)
    if not a.features:
        p.error("--features is required (e.g. --features features/demo)")
    if a.select:
        from .. import selection
        return run_main(selection.run_select, a.features, backbones=comma_list(a.backbones), folds=a.folds,
                        seed=a.seed, C=a.C, models_dir=a.models_dir, run_id=a.run_id, allow_missing=a.allow_missing)
    run_main(stack.run_stack, a.features, backbones=comma_list(a.backbones), model=a.model, level2=a.level2,
             folds=a.folds, seed=a.seed, models_dir=a.models_dir, allow_missing=a.allow_missing, run_id=a.run_id, C=a.C,
             exclude=a.exclude, members=comma_list(a.members))

