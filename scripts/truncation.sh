#!/usr/bin/env bash
# Truncated embeddings (docs/matryoshka.md): the recipe and the recipe with the Matryoshka loss (hybrid batches, the
# seeds given; default 42), each validated on a small XQuAD-R slice during training, then full XQuAD-R encoded once
# in fp32 (embeddings kept), the zero-shot model likewise, and benchmarks/truncation.py over all of them.
# Resumable: finished steps are skipped.   Usage: scripts/truncation.sh [seed ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-multirun/trunc}
SEEDS=("${@:-42}")
SLICE=(dataset.max_questions_per_language=50 "dataset.languages=[ar,de,el,en,es,hi,ru,th,tr,vi,zh]")
FULL=(dataset=xquad_r dataset.languages=null dataset.max_questions_per_language=null hardware=cpu_auto
      hardware.encode_dtype=float32 save_embeddings=true rankings_top_k=0)
runs=()
for seed in "${SEEDS[@]}"; do
  for kind in recipe recipe_matryoshka; do
    dir=$OUT/${kind}_seed$seed
    if ! { [ -f "$dir/run_info.json" ] && grep -q '"best"' "$dir/run_info.json"; }; then
      "$PY" run.py experiment=$kind sampler=hybrid train.seed="$seed" train.evaluate_before=false "${SLICE[@]}" \
        hydra.run.dir="$dir" run_name="truncation $kind seed $seed"
    fi
    [ -f "$dir/eval/query_emb.npy" ] || "$PY" -m hybrid_retrieval.evaluate checkpoint="$dir/checkpoints/best.ckpt" \
      "${FULL[@]}" hydra.run.dir="$dir/eval" run_name="truncation eval $kind seed $seed"
    label=recipe; [ $kind = recipe_matryoshka ] && label=recipe+matryoshka
    runs+=(--run "$label=$dir/eval")
  done
done
[ -f "$OUT/zero_shot/query_emb.npy" ] || "$PY" -m hybrid_retrieval.evaluate model=me5_small "${FULL[@]}" \
  hydra.run.dir="$OUT/zero_shot" run_name="truncation eval zero-shot"
"$PY" benchmarks/truncation.py --run "zero-shot=$OUT/zero_shot" "${runs[@]}" --out docs/results/truncation
