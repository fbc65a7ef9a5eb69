#!/usr/bin/env bash
# Recipe selection on the MLQA-R selection split (experiment=recipe_select; never XQuAD-R): one training run per
# variant into multirun/recipe_select/<name>/, then WiSE-FT ratios of chosen runs evaluated on the same split.
# Resumable: finished runs are skipped, a stopped one resumes (train.resume=auto). Summary:
#   python -m hybrid_retrieval.report sweep=multirun/recipe_select at=last
# Usage: scripts/recipe_selection.sh [round]   (1 = single changes; 2 = combinations; 3 = more cross-lingual
# signal on top of the chosen t01_hn, for the multilingual and bias goals; see docs/results/recipe/selection.md;
# choices = the recipe's size, frozen vocabulary and alpha, each against t01_hn retrained at the same commit,
# compared with paired tests over the held-out queries: docs/results/recipe/choices.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-multirun/recipe_select}
round=${1:-1}

train() {  # name, overrides...
  local name=$1; shift
  if [ -f "$OUT/$name/run_info.json" ] && grep -q '"best"' "$OUT/$name/run_info.json"; then
    echo "== $name: finished, skipped"; return; fi
  echo "== $name: $*"
  "$PY" run.py experiment=recipe_select "$@" hydra.run.dir="$OUT/$name" run_name="select $name"
}

merge_eval() {  # name of a finished run, ratio
  local name=$1 ratio=$2 dir="$OUT/merge_$1_$2"
  if [ -f "$dir/metrics.json" ]; then echo "== merge $name $ratio: done, skipped"; return; fi
  echo "== merge $name at $ratio"
  "$PY" -m hybrid_retrieval.evaluate checkpoint="$OUT/$name/checkpoints/best.ckpt" merge_with=start \
    merge_ratio="$ratio" dataset=mlqa_r_selection 'dataset.holdout={dataset: mlqa_r, groups: 200, seed: 0}' \
    hardware=cpu_auto rankings_top_k=0 hydra.run.dir="$dir" run_name="select merge $name $ratio"
}

if [ "$round" = 1 ]; then                     # one change at a time against the old recipe
  train base                                   # the old recipe (README "The paper's comparison")
  train t01 loss.temperature=0.01              # multilingual-E5's own training temperature
  train hn train_data.datasets.0.hard_negative=same_paragraph
fi
if [ "$round" = 2 ]; then                     # on top of the temperature, the clear winner of round 1
  merge_eval base 0                            # the starting model on the selection split
  merge_eval base 1                            # the old recipe again, with the bias metrics
  train t01_hn loss.temperature=0.01 train_data.datasets.0.hard_negative=same_paragraph
  train t01_distill loss.temperature=0.01 distill.weight=1.0 distill.temperature=0.01
  merge_eval t01 0.5
fi
if [ "$round" = 3 ]; then                     # more cross-lingual signal on top of the chosen t01_hn
  T01_HN=(loss.temperature=0.01 train_data.datasets.0.hard_negative=same_paragraph)
  train t01_hn_a25 "${T01_HN[@]}" sampler.mono_ratio=0.25
  train t01_hn_mt train_data=mlqa_r_squad_mt "${T01_HN[@]}" train_data.datasets.1.hard_negative=same_paragraph
  train t01_hn_60 "${T01_HN[@]}" trainer.limit_train_batches=60
fi
if [ "$round" = choices ]; then              # the recipe's remaining choices, one at a time against t01_hn
  T01_HN=(loss.temperature=0.01 train_data.datasets.0.hard_negative=same_paragraph)
  train c_base "${T01_HN[@]}"
  train c_unfrozen "${T01_HN[@]}" train.freeze_embeddings=false
  train c_b64 "${T01_HN[@]}" train.batch_size=64
  train c_b16 "${T01_HN[@]}" train.batch_size=16 trainer.limit_train_batches=60
  train c_120 "${T01_HN[@]}" trainer.limit_train_batches=120
  train c_a25 "${T01_HN[@]}" sampler.mono_ratio=0.25
  train c_a75 "${T01_HN[@]}" sampler.mono_ratio=0.75
  # the base's seed spread: how far a seed alone moves the selection metrics
  train c_base_s43 "${T01_HN[@]}" train.seed=43
  train c_base_s44 "${T01_HN[@]}" train.seed=44
fi
