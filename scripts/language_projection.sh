#!/usr/bin/env bash
# Language-subspace removal (model.language_projection, docs/recipe.md#removing-the-language-subspace).
#   scripts/language_projection.sh select    rank 1, 3, 10 (texts: 500 Tatoeba sentences in each of XQuAD-R's
#                                            11 languages) on the selection split: the zero-shot model and the
#                                            recipe's selection run (multirun/recipe_select/c_base), never XQuAD-R
#   scripts/language_projection.sh measure R the chosen rank R on full XQuAD-R: zero-shot and every comparison
#                                            checkpoint under multirun/recipe (SEEDS, default 42 43 44 45 46, empty = none;
#                                            SAMPLERS, default hybrid cross mono)
# Without a projection the set is encoded once (save_embeddings); each projection rescores those embeddings and encodes
# only its own texts. Resumable: finished evaluations are skipped. Summary: python scripts/projection_table.py <folder>
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mode=${1:?select or measure}
SELECT=(dataset=mlqa_r_selection 'dataset.holdout={dataset: mlqa_r, groups: 200, seed: 0}' hardware=cpu_auto
        hardware.encode_dtype=float32 rankings_top_k=0)
# as experiment=recipe evaluates (cpu_auto: bf16 where the CPU has bf16 units), so the saved embeddings match
FULL=(dataset=xquad_r dataset.languages=null dataset.max_questions_per_language=null hardware=cpu_auto
      rankings_top_k=0)

evaluate() {  # folder, overrides...
  local dir=$1; shift
  if [ -f "$dir/metrics.json" ]; then echo "== $dir: done, skipped"; return; fi
  echo "== $dir: $*"
  "$PY" -m hybrid_retrieval.evaluate "$@" hydra.run.dir="$dir" run_name="projection $(basename "$dir")"
}

projection() { echo "model.language_projection={rank: $1, texts: tatoeba, per_language: 500}"; }

if [ "$mode" = select ]; then
  OUT=${OUT:-multirun/projection_select}
  for model in zero_shot c_base; do
    source_args=(model=me5_small)
    [ $model = c_base ] && source_args=(checkpoint=multirun/recipe_select/c_base/checkpoints/best.ckpt)
    evaluate "$OUT/${model}_none" "${source_args[@]}" "${SELECT[@]}" save_embeddings=true
    for rank in 1 3 10; do  # rescoring the saved embeddings: only the projection's texts are encoded
      evaluate "$OUT/${model}_rank$rank" "${source_args[@]}" "${SELECT[@]}" "$(projection $rank)" \
        embeddings="$OUT/${model}_none"
    done
  done
fi
if [ "$mode" = measure ]; then
  rank=${2:?the chosen rank}
  OUT=${OUT:-multirun/projection}
  evaluate "$OUT/zero_shot_none" model=me5_small "${FULL[@]}" save_embeddings=true
  evaluate "$OUT/zero_shot_rank$rank" model=me5_small "${FULL[@]}" "$(projection "$rank")" \
    embeddings="$OUT/zero_shot_none"
  for seed in ${SEEDS-42 43 44 45 46}; do
    for sampler in ${SAMPLERS:-hybrid cross mono}; do
      run=multirun/recipe/${sampler}_seed$seed
      [ -f "$run/checkpoints/best.ckpt" ] || { echo "== $run: no best.ckpt, skipped"; continue; }
      saved=()  # its final evaluation's embeddings, where the run kept them (save_embeddings): nothing re-encoded
      [ -f "$run/query_emb.npy" ] && saved=(embeddings="$run")
      evaluate "$OUT/${sampler}_seed${seed}_rank$rank" checkpoint="$run/checkpoints/best.ckpt" "${FULL[@]}" \
        "$(projection "$rank")" "${saved[@]}"
    done
  done
fi
