#!/usr/bin/env bash
# The reproduction study on the built-in SmolLM2-135M (paper preset: one mlp probe at layer 20 of 30),
# sized for a 2-core CPU. Every sweep skips runs whose results file exists, so rerunning resumes.
#   bash docs/reproduce.sh            # all studies, then tables and figures
#   python docs/report.py             # only rebuild docs/REPRODUCTION tables and figures from results/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=results
STEPS=100

# 1. The law on random text (rho = 1), SFT.
$PY train.py --task longctx --noise 1.0 --ranks 1,2,4,8,16,32 --lengths 25,50,100,200 --steps $STEPS --out $OUT
# 2. Semantic density: the same at smaller size for rho = 0 and 0.4 (rho = 1 comes from study 1).
$PY train.py --task longctx --noises 0,0.4 --ranks 1,4,16 --lengths 25,50,100,200 --steps $STEPS --out $OUT
# 3. MemFT vs SFT at the same step budget: PhoneBook at two sizes, long context rho = 1.
$PY train.py --task phonebook --lengths 50,100 --ranks 1,4,16 --methods sft,ot,sw --steps $STEPS --out $OUT
$PY train.py --task longctx --noise 1.0 --lengths 100 --ranks 1,4,16 --methods ot,sw --steps $STEPS --out $OUT
# 4. Linear rule: memory (trained pairs) and generalization (held-out pairs), SFT vs MemFT-OT.
$PY train.py --task linear --samples 48 --ranks 1,4,16 --methods sft,ot --steps 60 --batch-size 16 --out $OUT
$PY docs/report.py
