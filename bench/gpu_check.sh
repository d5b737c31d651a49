#!/usr/bin/env bash
# The GPU checks of the lean training step, as one run of about 7 minutes on one H100 or H200:
#   1. the CUDA tests: hand-written backward passes on CUDA, offloaded checkpointing keeps no activation
#      of a layer on the device, NF4 and the fused head on CUDA (every test whose name says cuda)
#   2. the course's shape: bench/train_step.py --device cuda --shape llama31-8b (4 x 182, r=32 on q, k, v, o)
#   3. 2 x 2048 tokens, r=16 on all seven projections, without and with offloaded checkpointing
# Each part's output goes to $OUT/<part>.log ($OUT: the device tool's folder; ./gpu-out when unset).
#
# The lent machine lacks bitsandbytes and gguf: carry them as wheels, made here with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl bitsandbytes==0.50.2 gguf==0.19.0
# then run `bash bench/gpu_check.sh` there with .whl carried, and a time limit of 540 s, which leaves room to
# run it once more within 15 minutes of device time.
set -u -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, bitsandbytes, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| bitsandbytes', bitsandbytes.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.log" || exit 1

failed=""
part() {  # part NAME SECONDS COMMAND...: run it with a time limit, keep its output, note a failure and go on
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || failed="$failed $name"
}

part tests 120 python3 -m pytest -q -p no:cacheprovider -k cuda tests/
part course 130 python3 bench/train_step.py --device cuda --shape llama31-8b
part long 100 python3 bench/train_step.py --device cuda --shape llama31-8b-2k --rounds 2 --steps 3 --memory-steps 1
part long-offload 100 python3 bench/train_step.py --device cuda --shape llama31-8b-2k --offload --rounds 2 --steps 3 \
  --memory-steps 1

if [ -n "$failed" ]; then echo "failed or timed out:$failed"; exit 1; fi
echo "all parts done"
