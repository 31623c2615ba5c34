#!/usr/bin/env bash
# The GPU path's checks, in one call on a CUDA machine (docs/BENCHMARKS.md records what they printed):
#   1. tests/test_cuda.py: bf16 logits and greedy decoding against transformers on CUDA, FSDP2 over nccl;
#   2. bench/gpu.py: the 8B-shaped training (q,v on every layer, and the paper's probe) and decode figures;
#   3. train.py end to end on CUDA in bf16 (SFT, SW, OT; plain and under torchrun) on a tiny random Llama with
#      the built-in model's tokenizer, from TOKENIZER_DIR (.gpu-carry/tok: its two tokenizer files).
# Logs go to $OUT (or /tmp/gpu-checks). Arguments after the command go to bench/gpu.py.
#
#   bash bench/gpu_checks.sh pack     # here: .gpu-carry/tok and .gpu-carry/gguf (eval.py imports gguf)
#   bash bench/gpu_checks.sh          # there, with .gpu-carry/tok and .gpu-carry/gguf carried (about 4 MB)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = pack ]; then
  set -e
  rm -rf .gpu-carry/tok .gpu-carry/gguf && mkdir -p .gpu-carry/tok .gpu-carry/gguf
  src=$(${PY:-.venv/bin/python} convert.py | head -1 | cut -d' ' -f1)
  cp "$src"/tokenizer.json "$src"/tokenizer_config.json .gpu-carry/tok/
  ${PY:-.venv/bin/python} -m pip download --no-deps -q -d .gpu-carry/gguf gguf
  ls -l .gpu-carry/tok .gpu-carry/gguf
  exit 0
fi
OUT=${OUT:-/tmp/gpu-checks}
TOK=${TOKENIZER_DIR:-.gpu-carry/tok}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
PY=${PY:-python}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if ! $PY -c "import gguf" 2>/dev/null; then  # the GPU machine lacks it: install the carried wheel aside
  $PY -m pip install -q --no-index --no-deps --target /tmp/gpu-site .gpu-carry/gguf/*.whl || exit 1
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null
  $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} | tee "$OUT/env.txt"
echo "== tests/test_cuda.py"
$PY -m pytest -q -s -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" || status=1
echo "== train.py on $DEVICE"
SMOKE=/tmp/gpu-smoke && rm -rf "$SMOKE" && mkdir -p "$SMOKE"
$PY -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from conftest import build_tiny; build_tiny('llama', Path('$SMOKE/model'), vocab_size=49152)"
cp "$TOK"/tokenizer.json "$TOK"/tokenizer_config.json "$SMOKE/model/"
run() {
  echo "-- $*"
  timeout 300 "$@" --model "$SMOKE/model" --task longctx --noise 1.0 --length 40 --rank 4 --steps 60 --schedule constant \
    --snapshots 30,60 --device "$DEVICE" --dtype "$DTYPE" --out "$SMOKE/runs" 2>&1 | tail -3 || status=1
}
{ run $PY train.py --method sft
  run $PY train.py --method sw
  run $PY train.py --method ot
  run $PY -m torch.distributed.run --standalone --nproc_per_node 1 train.py --method sw --name torchrun-sw
  $PY -c "import json, glob; [print(f, json.load(open(f))['settings'].get('device'), json.load(open(f))['settings'].get('dtype')) for f in sorted(glob.glob('$SMOKE/runs/*.json'))]"
} 2>&1 | tee "$OUT/train_smoke.log"
echo "== bench/gpu.py"
$PY bench/gpu.py "$@" 2>&1 | tee "$OUT/bench_gpu.jsonl" || status=1
exit $status
