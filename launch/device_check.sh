#!/usr/bin/env bash
# The prepared accelerator check (BENCHMARKS.md "GPU / TPU"): one command, run on the
# device machine as it comes, that prints and saves under $OUT
#   1. launch/benchmark.py on ddim_medium at B = 128, float32 and bfloat16: the plain step,
#      generative distillation (teacher 2 steps), generative replay, gaussian distillation
#      and DDIM sampling, gdjax and the PyTorch baseline side by side, TFLOP/s, % of peak
#      and peak memory;
#   2. launch/project.py on configs/split_fmnist.py (the paper's Split Fashion-MNIST:
#      5 experiences x 100 epochs at batch 128, 10,000 evaluation samples): each compiled
#      piece timed on the real data, the whole schedule projected;
#   3. the distillation and plain rows at B = 256 and 512 (throughput scaling), and at
#      B = 128 with 8 steps per call (train.steps_per_call);
#   4. the plain step fed by the input pipeline with and without its prefetch (bf16).
#
# Before the lease, here (the device has no network):
#   bash launch/device_check.sh --prepare   # wheels of what the device lacks and the
#                                           # Fashion-MNIST .gz files into .device/
# On the device (the `device` tool, carrying .device):
#   bash launch/device_check.sh
# A dry run at tiny sizes on the CPU (tests/test_device_check.py runs it):
#   DEVICE_CHECK_DRY_RUN=1 JAX_PLATFORMS=cpu bash launch/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${DEVICE_CHECK_DIR:-.device}
PY=${PYTHON:-python3}
# What the device machine's Python lacks (it has jax, flax, optax, orbax, chex, torch,
# numpy, scipy, pillow, matplotlib, safetensors): never jax itself.
# The project's own three at the versions requirements*.txt pin; their dependencies as PyPI
# has them.
pinned() { grep -ih "^$1==" requirements.txt requirements-test.txt | head -1; }
WHEELS="$(pinned ml-collections) $(pinned absl-py) $(pinned diffusers) huggingface_hub
filelock fsspec tqdm pyyaml regex requests urllib3 idna certifi charset_normalizer
packaging typing_extensions importlib_metadata zipp hf-xet"

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$STAGE/wheels" "$STAGE/fashion-mnist"
    # shellcheck disable=SC2086
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$STAGE/wheels" $WHEELS
    src=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
    cp "$src"/*-ubyte.gz "$STAGE/fashion-mnist/"
    grep -qx "/$STAGE/" .git/info/exclude 2>/dev/null || echo "/$STAGE/" >> .git/info/exclude
    du -sh "$STAGE"
    exit 0
fi

OUT=${OUT:-runs/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G "$STAGE/wheels/*.whl" > /dev/null; then
    $PY -m pip install --quiet --no-index --no-deps "$STAGE"/wheels/*.whl
fi
DATA=$STAGE/fashion-mnist
[[ -d "$DATA" ]] || DATA=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}

if [[ -n "${DEVICE_CHECK_DRY_RUN:-}" ]]; then   # seconds on a CPU: every command, tiny
    MODEL=tiny; BATCH=4; BIG="8"; ITERS=1; DTYPES="float32"
    PROJECT=(--config.model.name=tiny --config.train.batch_size=8
             --config.eval.num_samples=16 --config.eval.batch_size=8 --iters=1
             --config.data.image_size=16 --config.eval.fid=False)
else
    MODEL=ddim_medium; BATCH=128; BIG="256 512"; ITERS=20; DTYPES="float32 bfloat16"
    PROJECT=()
fi

{
    echo "# gdjax device check, $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    $PY -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices()); \
print('flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__)"
} 2>&1 | tee "$OUT/versions.txt"

for dtype in $DTYPES; do
    $PY -m launch.benchmark --model=$MODEL --batch=$BATCH --dtype="$dtype" --iters=$ITERS \
        --warmup=3 --rows=plain,gd,replay,gaussian,sampling --json="$OUT/bench_$dtype.json" \
        2>&1 | tee "$OUT/bench_$dtype.txt"
done
for batch in $BIG; do
    $PY -m launch.benchmark --model=$MODEL --batch="$batch" --dtype=bfloat16 \
        --iters=$ITERS --warmup=3 --rows=plain,gd --skip_torch \
        --json="$OUT/bench_b$batch.json" 2>&1 | tee "$OUT/bench_b$batch.txt"
done
$PY -m launch.benchmark --model=$MODEL --batch=$BATCH --dtype=bfloat16 --iters=$ITERS \
    --warmup=3 --rows=plain,gd --skip_torch --steps_per_call=8 \
    --json="$OUT/bench_k8.json" 2>&1 | tee "$OUT/bench_k8.txt"
$PY -m launch.benchmark --model=$MODEL --batch=$BATCH --dtype=bfloat16 --iters=$ITERS \
    --warmup=3 --rows=plain,fed,fed_inline --skip_torch \
    --json="$OUT/bench_prefetch.json" 2>&1 | tee "$OUT/bench_prefetch.txt"
$PY -m launch.project --config=configs/split_fmnist.py --variants=generative_distillation \
    --seeds=42 --config.data.data_dir="$DATA" "${PROJECT[@]}" 2>&1 | tee "$OUT/project.txt"
echo "device check done: $OUT"
