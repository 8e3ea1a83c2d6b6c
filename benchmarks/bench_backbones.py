#!/usr/bin/env python
"""CPU images/s of every registry backbone (and keras-hub architectures) through featstack's extract, at small N.

Each backbone is extracted alone, with seeded random weights (speed does not depend on the weights' values), at
its own input size, from N photo-like 500x375 JPEGs. Two figures: the summary's img/s of that first run (forward
passes only, the first one's tracing included), and the warm rate: one more batch through run_backbones, the call
every engine makes, best of two. `--hub` adds keras-hub presets of the published DINOv2 small/base and SigLIP
base/16 vision architectures, saved here with random weights (save_to_preset), extracted through hub:FOLDER.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_extract import generated_photo  # noqa: E402
from common import header, write_json  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The published architectures (keras-hub's dinov2_small / dinov2_base / siglip_base_patch16_224 configurations).
HUB_ARCHITECTURES = {
    "dinov2_small": dict(patch_size=14, hidden_dim=384, num_layers=12, num_heads=6, intermediate_dim=1536),
    "dinov2_base": dict(patch_size=14, hidden_dim=768, num_layers=12, num_heads=12, intermediate_dim=3072),
    "siglip_base_patch16_224": dict(patch_size=16, hidden_dim=768, num_layers=12, num_heads=12,
                                    intermediate_dim=3072),
}


def save_hub_architecture(folder: Path, name: str) -> Path:
    import keras
    import keras_hub
    keras.utils.set_random_seed(0)
    arch = HUB_ARCHITECTURES[name]
    if name.startswith("dinov2"):
        backbone = keras_hub.models.DINOV2Backbone(image_shape=(224, 224, 3), position_embedding_shape=(518, 518, 3),
                                                   layer_scale_init_value=1e-5, **arch)
        converter = keras_hub.layers.DINOV2ImageConverter(
            image_size=(224, 224), scale=[1 / (255 * s) for s in STD], offset=[-m / s for m, s in zip(MEAN, STD)],
            interpolation="bicubic", antialias=True, crop_to_aspect_ratio=True)
    else:
        backbone = keras_hub.models.SigLIPBackbone(
            keras_hub.models.SigLIPVisionEncoder(image_shape=(224, 224, 3), **arch),
            keras_hub.models.SigLIPTextEncoder(vocabulary_size=64, embedding_dim=32, hidden_dim=32, num_layers=1,
                                               num_heads=2, intermediate_dim=64))  # the text tower is never run
        converter = keras_hub.layers.SigLIPImageConverter(image_size=(224, 224), scale=1 / 127.5, offset=-1.0,
                                                          interpolation="bicubic", crop_to_aspect_ratio=False)
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return folder


def main():
    from featstack import backbones as bb
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backbones", default=",".join(bb.REGISTRY))
    p.add_argument("--hub", action="store_true", help="also keras-hub DINOv2 small/base and SigLIP base/16")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "backbones_cpu.json"))
    a = p.parse_args()
    import keras

    from featstack.backbones import run_backbones
    from featstack.decode import decode_batch
    from featstack.extract import ExtractConfig, extract
    results = {**header(), "n": a.n, "batch_size": a.batch_size, "keras_backend": keras.backend.backend(),
               "load_before": os.getloadavg(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data" / "bench"
        (data / "train").mkdir(parents=True)
        (data / "test1").mkdir()
        for k in range(a.n):
            generated_photo(k).save(data / "train" / f"{('cat', 'dog')[k % 2]}.{k}.jpg", quality=90)
        names = [n for n in a.backbones.split(",") if n]
        if a.hub:
            names += [f"hub:{save_hub_architecture(Path(tmp) / h, h)}" for h in HUB_ARCHITECTURES]
        for name in names:
            t0 = time.perf_counter()
            s = extract(ExtractConfig(data, backbones=[name], weights="imagenet" if name.startswith("hub:") else
                                      "random", features_dir=Path(tmp) / "f", holdout=0, batch_size=a.batch_size,
                                      progress=False))
            job = s.jobs[0]
            built = time.perf_counter() - t0
            arrays, _ = decode_batch([str(p) for p in sorted((data / "train").glob("*.jpg"))[:a.batch_size]],
                                     (job.backbone.input_key,))
            warm = min(run_backbones([job.backbone], arrays)[1][0] for _ in range(2))
            row = {"backbone": name.rsplit("/", 1)[-1] if name.startswith("hub:") else name,
                   "input_size": job.backbone.input_size, "width": job.backbone.width,
                   "images_per_s": round(len(next(iter(arrays.values()))) / warm, 2),
                   "first_run_images_per_s": round(job.extracted / job.seconds, 2),
                   "build_and_run_s": round(built, 1), "load": os.getloadavg()[0]}
            results["rows"].append(row)
            print(row, flush=True)
            keras.backend.clear_session()
    results["load_after"] = os.getloadavg()
    print("\n| backbone | input | width | CPU images/s (warm) | first run | build + run s | load |\n"
          "|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| `{r['backbone']}` | {r['input_size']} | {r['width']} | {r['images_per_s']} | "
              f"{r['first_run_images_per_s']} | {r['build_and_run_s']} | {r['load']:.1f} |")
    write_json(results, a.out)


if __name__ == "__main__":
    main()
