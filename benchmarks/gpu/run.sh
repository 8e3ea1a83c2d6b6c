#!/usr/bin/env bash
# The GPU benchmark of issue #15 in one command, on a bare H200 machine or (small, N=64) on a CPU:
#   device `run`, carry [".whl"], command `bash benchmarks/gpu/run.sh`      (20,579 images, results in $OUT)
#   N=64 bash benchmarks/gpu/run.sh                                          (CPU proof, results in /tmp/gpuout)
# Env: N (images, default 20579), OUT (results folder), MODE (gpu|cpu, default: gpu when nvidia-smi sees one),
# BATCH (default auto), IMAGE_SIZE (default: each backbone's own; 75 in CPU mode), PRECISION (default bf16),
# DEADLINE (seconds for all stages, default 450; 3600 in CPU mode), WORK (scratch, default /tmp/featstack-gpu-bench),
# OPTIONAL=1 (also the newer registry backbones: ConvNeXt, EfficientNetV2, NASNetLarge, ResNet152).
set -euo pipefail
cd "$(dirname "$0")/../.."
started=$(date +%s)

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
# Keras (and namex, optree) are not on the GPU machine, which has no network: install the carried wheels.
if ! "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('keras') is None)"; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "error: Keras is not importable and .whl/ holds no wheels; download them as BENCHMARKS.md (GPU) says" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ -z "${MODE:-}" ]; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then MODE=gpu; else MODE=cpu; fi
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
size=()
if [ "${OPTIONAL:-0}" = 1 ]; then size+=(--optional); fi
if [ "$MODE" = cpu ]; then
  export JAX_PLATFORMS=cpu
  size+=(--image-size "${IMAGE_SIZE:-75}")
elif [ -n "${IMAGE_SIZE:-}" ]; then
  size+=(--image-size "$IMAGE_SIZE")
fi
echo "featstack GPU benchmark: mode $MODE, N=${N:-20579}, python $("$PYTHON" -V 2>&1), set-up $(( $(date +%s) - started )) s"
exec "$PYTHON" benchmarks/gpu/bench_gpu.py all --mode "$MODE" --n "${N:-20579}" --out-dir "${OUT:-/tmp/gpuout}" \
  --work "${WORK:-/tmp/featstack-gpu-bench}" --batch-size "${BATCH:-auto}" --precision "${PRECISION:-bf16}" \
  --deadline "${DEADLINE:-$([ "$MODE" = cpu ] && echo 3600 || echo 450)}" "${size[@]}"
