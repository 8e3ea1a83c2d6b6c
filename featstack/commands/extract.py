"""`featstack extract` (and extract_features.py):
extract and cache pooled features of frozen ImageNet backbones for every image of a dataset.
"""
import argparse

from ..cli import batch_size_arg, comma_list, parse_command, run_main, usage
from ..paths import FEATURES_DIR

DESCRIPTION = 'Extract and cache pooled features of frozen ImageNet backbones for every image of a dataset.'
EXAMPLES = """examples:
  %(prog)s --demo
  %(prog)s --data data/dog-breed
  %(prog)s --data data/photos --backbones resnet50,vgg16 --weights /kaggle/input/keras-weights \\
      --summary-json summary.json
"""


def parse_args(argv=None, prog=None):
    p = argparse.ArgumentParser(prog=prog, usage=usage("--data DATA [options]", "--demo [options]"),
                                description=DESCRIPTION, epilog=EXAMPLES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="required unless --demo: the dataset folder (or manifest CSV)")
    p.add_argument("--layout", default="auto",
                   help="auto|dog-breed|cats-dogs|folders|stanford-dogs|manifest (default auto)")
    p.add_argument("--backbones", default=None,
                   help="comma-separated registry names, .keras/.h5 model paths (PATH:LAYER for a named layer, "
                        "PATH:BASE/LAYER inside a nested base model; default: its last global-pooling layer) or "
                        "keras-hub presets (hub:dinov2_base, hub:/kaggle/input/FOLDER); "
                        "default xception,inception_v3,resnet50,vgg16")
    p.add_argument("--weights", default="imagenet", help="imagenet | random | DIR holding Keras's weight files")
    p.add_argument("--preprocess", default=None, help="tf|caffe|torch: preprocessing for model-file backbones")
    p.add_argument("--image-size", type=int, default=None,
                   help="override every backbone's input size (px; at least its minimum, e.g. 75 for inception_v3)")
    p.add_argument("--pooling", default=None,
                   help="avg|max global pooling (default avg); hub: ViTs (DINOv2): default token (the class token), "
                        "avg|max of the patch tokens; CLIP/SigLIP: their pooled image embedding; a model file: a named "
                        "layer's feature map pooled avg|max (default avg), its own pooling layer or a vector layer "
                        "as it is (recorded as its kind, or none)")
    p.add_argument("--tta", default="none", help="none|flip: flip averages features of the image and its mirror")
    p.add_argument("--features-dir", default=str(FEATURES_DIR), help="feature store root (default features/)")
    p.add_argument("--name", default=None, help="dataset name under the store (default: the data folder's name)")
    p.add_argument("--holdout", type=float, default=0.1, help="stratified holdout fraction (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of random weights (default 0)")
    p.add_argument("--batch-size", default=32, type=batch_size_arg,
                   help="images per forward pass, or auto (default 32)")
    p.add_argument("--precision", default="float32", help="float32|bf16 (mixed precision, for GPUs)")
    p.add_argument("--decode-threads", type=int, default=None, help="decoder threads (default: CPU count)")
    p.add_argument("--engine", default="local", help="local|ray (Ray Data, for clusters)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--ray-actors", type=int, default=None, help="Ray: model actors (default: one per GPU or CPU slot)")
    p.add_argument("--ray-decode-cpus", type=float, default=1, help="Ray: CPUs per decode task (default 1)")
    p.add_argument("--shard-rows", type=int, default=1024,
                   help="rows per on-disk shard: the most a killed run loses (default 1024)")
    p.add_argument("--demo", action="store_true",
                   help="write the embedded digits competition to data/demo and extract it (resnet50, inception_v3 "
                        "and efficientnet_b0 at 75 px unless --backbones or --image-size say otherwise)")
    p.add_argument("--summary-json", default=None, help="also write the end-of-run summary to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parse_command(p, argv)


def build_config(a: argparse.Namespace):
    """The run configuration the parsed command line asks for."""
    from ..extract import ExtractConfig
    return ExtractConfig(
        data=a.data, layout=a.layout, backbones=comma_list(a.backbones), weights=a.weights, preprocess=a.preprocess,
        image_size=a.image_size, pooling=a.pooling, tta=a.tta, features_dir=a.features_dir, name=a.name,
        holdout=a.holdout, seed=a.seed, batch_size=a.batch_size, precision=a.precision,
        decode_threads=a.decode_threads, demo=a.demo, engine=a.engine, ray_address=a.ray_address,
        ray_options={"actors": a.ray_actors, "decode_cpus": a.ray_decode_cpus}, shard_rows=a.shard_rows,
        progress=not a.no_progress)


def check_options(a: argparse.Namespace) -> None:
    """Option values argparse's types let through but no run can use: one line each, before anything is read.
    --image-size is checked against the backbones it applies to, the demo's included: 0 may not fall back to a
    default."""
    from ..backbones import DEFAULT_BACKBONES, check_image_size
    from ..demo import BACKBONES as DEMO_BACKBONES
    from ..split import check_holdout
    check_holdout(a.holdout)
    check_image_size(a.image_size, comma_list(a.backbones) or list(DEMO_BACKBONES if a.demo else DEFAULT_BACKBONES))


def main(argv=None, prog=None):
    a = parse_args(argv, prog)
    from ..heartbeat import heartbeat
    with heartbeat("loading the extraction libraries"):  # named if slow (a loaded machine), before the first step
        from ..extract import extract
    run_main(check_options, a)
    summary = run_main(extract, build_config(a))
    if a.summary_json:
        import json
        with open(a.summary_json, "w") as f:
            json.dump(summary.as_dict(), f, indent=2)
