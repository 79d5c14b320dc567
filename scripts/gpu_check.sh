#!/usr/bin/env bash
# Every GPU check of the project in one run, under 8 minutes on one GPU (issue 16):
#   1. the GPU tests (tests/gpu, and the device/dtype tests)
#   2. the Triton gather-GEMV's bandwidth as a fraction of dense, Llama-3-8B shapes, d 0.25/0.5/0.75
#   3. sparse vs dense evaluation time, random-weight Llama-3-8B in bfloat16   (target <= 1.25x)
#   4. closed-loop DIP-CA vs DIP evaluation time, same model                   (target <= 1.5x)
#   5. `dipstream generate` on the GPU (a small random checkpoint)
# and a table of what passed, with the seconds each step took. Without CUDA it runs the
# CPU-possible parts (3-5) at a reduced size, to check the script itself:
#   bash scripts/gpu_check.sh            # PYTHON=... to choose the interpreter
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-$(mktemp -d)}
if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MODE=gpu; DEV=cuda; DT=bfloat16
  SHAPE=(--random-shape llama3-8b); EVAL=(--windows 4 --rounds 3); CA=(--tokens 4088 --batch-size 8 --rounds 2)
else
  MODE=cpu; DEV=cpu; DT=float32
  SHAPE=(--random-shape smollm2-135m --layers 2); EVAL=(--windows 1 --seq-len 128 --rounds 1)
  CA=(--tokens 254 --seq-len 128 --batch-size 2 --rounds 1)
  echo "no CUDA device: running the CPU-possible parts at a reduced size (GPU figures unmeasured)"
fi
declare -a SUMMARY
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name"
  if timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
    SUMMARY+=("$(printf '%-22s %-6s %5ss' "$name" ok $((SECONDS - t0)))")
  else
    SUMMARY+=("$(printf '%-22s %-6s %5ss' "$name" FAILED $((SECONDS - t0)))")
  fi
}
if [ "$MODE" = gpu ]; then
  step gpu-tests 150 $PY -m pytest -q -p no:cacheprovider tests/gpu tests/test_scale.py -k "not interpreter"
  step gather-gemv 90 $PY benchmarks/bench_gpu_gemv.py --dtypes bf16
fi
step eval-overhead 120 $PY benchmarks/bench_eval_overhead.py "${SHAPE[@]}" --device $DEV --dtype $DT "${EVAL[@]}" \
  --methods dip,teal,cats,glu
step dip-ca-overhead 150 $PY benchmarks/bench_dip_ca_overhead.py "${SHAPE[@]}" --device $DEV --dtype $DT "${CA[@]}"
step generate 90 $PY - "$OUT/ckpt" $DEV <<'PYEOF'
import subprocess, sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
from tests.conftest import _byte_tokenizer
torch.manual_seed(0)
cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=300, hidden_act="silu", max_position_embeddings=512)
AutoModelForCausalLM.from_config(cfg).save_pretrained(sys.argv[1])
_byte_tokenizer().save_pretrained(sys.argv[1])
sys.exit(subprocess.call([sys.executable, "-m", "dipstream.cli.main", "generate", "--model", sys.argv[1],
                          "--device", sys.argv[2], "--method", "dip", "--density", "0.5",
                          "--max-new-tokens", "16", "--no-stop-at-eos"]))
PYEOF
echo "=== summary ($MODE, logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}"
! printf '%s\n' "${SUMMARY[@]}" | grep -q FAILED
