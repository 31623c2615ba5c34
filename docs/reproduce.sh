#!/usr/bin/env bash
# The reproduction study on the built-in SmolLM2-135M (paper preset: one mlp probe at layer 20 of 30),
# sized for a 2-core CPU: two chains of sweeps run side by side, one thread each. Every sweep skips
# runs whose results file exists, so rerunning this script resumes a killed study.
#   bash docs/reproduce.sh            # all studies, then tables and figures
#   python docs/report.py             # only rebuild docs/REPRODUCTION.md tables and figures from results/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=results
export OMP_NUM_THREADS=1  # two single-threaded chains beat one two-threaded one on 2 cores

law_small_ranks() {
  # 1. The law on random text (rho = 1), SFT. Split by rank so the two chains take about as long.
  $PY train.py --task longctx --noise 1.0 --ranks 1,2,4,8 --lengths 25,50,100,200,400,800 --steps 100 --out $OUT
  # 2. Semantic density: a smaller grid for rho = 0 and 0.4 (rho = 1 comes from study 1).
  $PY train.py --task longctx --noises 0,0.4 --ranks 1,4,16 --lengths 25,50,100 --steps 100 --out $OUT
  # Seed to seed: nine law points again with another seed (new text, init and dropout).
  $PY train.py --task longctx --noise 1.0 --ranks 1,4,16 --lengths 50,100,200 --steps 100 --seed 1 --out $OUT
}
law_large_ranks_memft_rule() {
  $PY train.py --task longctx --noise 1.0 --ranks 16,32 --lengths 25,50,100,200,400,800 --steps 100 --out $OUT
  # 3. MemFT vs SFT at the same step budget: long context rho = 1 (SFT from study 1), PhoneBook at two sizes.
  $PY train.py --task longctx --noise 1.0 --lengths 100 --ranks 1,2,4,8,16 --methods ot,sw --steps 100 --out $OUT
  $PY train.py --task phonebook --lengths 30,60 --ranks 1,2,4,8,16 --methods sft,ot,sw --steps 100 --out $OUT
  # 4. Linear rule: memory (trained pairs) and generalization (held-out pairs), SFT vs MemFT-OT.
  $PY train.py --task linear --samples 32 --ranks 1,4,16 --methods sft,ot --steps 200 --batch-size 16 --out $OUT
}
law_small_ranks > $OUT/chain1.log 2>&1 &
law_large_ranks_memft_rule > $OUT/chain2.log 2>&1
wait
$PY docs/report.py
