#!/usr/bin/env bash
# The GPU checks of the lean training step, in the course preset's precision (bf16 frozen weights, the NF4
# base computing in bf16, LoRA weights and AdamW's moments in fp32, the forward pass under bf16 autocast on
# both sides), in two runs of under 10 minutes each on one H100 or H200 (parts 1-4, about 8 minutes; part 5, about 4):
#   1. the CUDA tests: hand-written backward passes on CUDA, the fused LoRA path under CUDA's bf16 autocast,
#      offloaded checkpointing keeps no activation of a layer on the device, NF4 and the fused head on CUDA
#      (every test whose name says cuda)
#   2. the course's shape: bench/train_step.py --device cuda --shape llama31-8b (4 x 182, r=32 on q, k, v, o)
#   3. 2 x 2048 tokens, r=16 on all seven projections, without and with offloaded checkpointing
#   4. ops and bytes saved for backward of the Llama-3.1-8B-shaped layer (bench/lean.py --preset) on CUDA
#   5. packed rows, 2 x 8192 tokens of 4 documents each: tokens/s and peak memory, ours (flash attention's
#      variable-length kernel per document) against transformers + PEFT's padding-free path (bench/packed_step.py)
# Each part's output goes to $OUT/<part>.log ($OUT: the device tool's folder; ./gpu-out when unset).
#
#   bash bench/gpu_check.sh         # on the GPU machine
#   bash bench/gpu_check.sh --cpu   # the same parts on the CPU, the models cut to one layer at 1/8 width
#                                   # (--layers 1 --shrink 8), to check the script itself without a GPU
#   bash bench/gpu_check.sh packed  # only the parts named (tests course long long-offload lean packed)
#
# The lent machine lacks bitsandbytes and gguf: carry them as wheels, made here with
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .whl bitsandbytes==0.50.2 gguf==0.19.0
# then run there, with .whl carried, `bash bench/gpu_check.sh tests course long long-offload lean` (time limit 540 s)
# or `bash bench/gpu_check.sh packed` (300 s): 15 minutes of device time hold one of the two with room to rerun it.
set -u -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=cuda
SIZE=()          # the full Llama-3.1-8B shape on a GPU
TESTS="cuda"     # pytest -k: the tests that need a GPU
K=1              # the time limits below are for a GPU; on the CPU each is K times longer
LEAN=60          # seconds for part 4 (two full-width layers; about 2 minutes on two CPU cores)
PACKED=()        # bench/packed_step.py's defaults: 2 x 8192
if [ "${1:-}" = "--cpu" ]; then
  DEVICE=cpu SIZE=(--layers 1 --shrink 8) TESTS="preset_precision" K=4 LEAN=400 PACKED=(--tokens 1024)
  shift
fi
PARTS="${*:-tests course long long-offload lean packed}"
for p in $PARTS; do
  case " tests course long long-offload lean packed " in *" $p "*) ;; *)
    echo "error: unknown argument $p (expected --cpu and part names: tests course long long-offload lean packed)" >&2
    exit 2;; esac
done
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

{ if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  $PY -c "import torch, bitsandbytes, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| bitsandbytes', bitsandbytes.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
} 2>&1 | tee "$OUT/env.log" || exit 1

failed=""
part() {  # part NAME SECONDS COMMAND...: run it with a time limit, keep its output, note a failure and go on
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0;; esac
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || failed="$failed $name"
}

# --dtype bfloat16 (the default on cuda) is the preset's precision on both sides of bench/train_step.py
part tests $((120 * K)) $PY -m pytest -q -p no:cacheprovider -k "$TESTS" tests/
part course $((130 * K)) $PY bench/train_step.py --device $DEVICE --dtype bfloat16 --shape llama31-8b "${SIZE[@]}"
part long $((100 * K)) $PY bench/train_step.py --device $DEVICE --dtype bfloat16 --shape llama31-8b-2k "${SIZE[@]}" \
  --rounds 2 --steps 3 --memory-steps 1
part long-offload $((100 * K)) $PY bench/train_step.py --device $DEVICE --dtype bfloat16 --shape llama31-8b-2k "${SIZE[@]}" \
  --offload --rounds 2 --steps 3 --memory-steps 1
part lean $LEAN $PY bench/lean.py --preset --device $DEVICE --shapes llama31-8b
part packed $((240 * K)) $PY bench/packed_step.py --device $DEVICE "${SIZE[@]}" "${PACKED[@]}"

if [ -n "$failed" ]; then echo "failed or timed out:$failed"; exit 1; fi
echo "all parts done"
