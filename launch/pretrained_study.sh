#!/usr/bin/env bash
# The study behind docs/study.md, "From pretrained features": HPL against Proxy-Anchor when both fine-tune a backbone
# pretrained on a disjoint, larger source of the same domain (hpl_jax/data/synthetic_source.py), with the Proxy-Anchor
# recipe (configs/finetune_default.py: frozen BN, a warm-up epoch, lr 1e-4, proxies at 100x); on the two embedded
# datasets, the same training seeds for both arms, three data seeds.
#
# Needs:   the project's environment (pip install -r requirements.txt), run from the repository root; a CPU is
#          enough (on this project's 2-core machine the pretraining takes about 15 min, a fine-tuning run 1-3 min).
# Usage:   launch/pretrained_study.sh ROOT [STAGE ...]       (default: every stage, in the order below)
# Example: nohup nice launch/pretrained_study.sh /tmp/hpl_pstudy > /tmp/hpl_pstudy.log 2>&1 &
#          two streams side by side on 2 cores (after the pretrain stage):
#          launch/pretrained_study.sh /tmp/hpl_pstudy sop_sanity sop_pa sop_gt sop_w1 &
#          launch/pretrained_study.sh /tmp/hpl_pstudy default_sanity default_pa default_gt default_w1 &
# Running the script again resumes: the pretraining from its checkpoint, each sweep's finished runs are skipped and
# an interrupted run resumes from its checkpoint. Every run keeps its compiled programs in ROOT/compile_cache
# (config.compilation_cache_dir), where the next run of the same shapes finds them. The stages:
#   pretrain        python -m hpl_jax.main --config=configs/pretrain_synthetic.py --workdir=ROOT/pretrain: writes
#                   ROOT/pretrain/backbone, which every fine-tuning run below loads
#   *_sanity        fine-tuned against from scratch (each with its own recipe: the from-scratch study's config at its
#                   epochs), flat Proxy-Anchor, data seed 0, into ROOT/<dataset>_sanity
#   *_pa            HPL-PA (the config's own w and K_1) against flat Proxy-Anchor, both fine-tuned, data seeds 0-2,
#                   seed by seed (so an interrupted stage leaves pairs), into ROOT/<dataset>_pa
#   *_gt            level 1 = the ground-truth super-classes against k-means (data seed 0; k-means runs copied from *_pa)
#   *_w1            Figure 5's w_1 sweep, fine-tuned (data seed 0; w_1 = 0.1 copied from *_pa)
#   sop_hier_val    HIER on flat Proxy-Anchor, its weight (hier.weight) and number of proxies (hier.num_proxies)
#                   chosen on the validation classes of the SOP-like data (data seed 0), into
#                   ROOT/synthetic_sop_hier_val. The rule, fixed before the runs: HIER's published weight 0.5
#                   with 32 proxies (the official 512 scaled to these 864 classes: SOP's 11,318 classes have 512)
#                   stays unless another setting's paired 95% interval of val/map@r over it lies above 0; of
#                   several such, the highest mean
#   *_hier          the four-way comparison, seed by seed and data seed by data seed (data seeds 0-2): flat PA,
#                   HPL-PA, HIER-PA and HPL + HIER, HIER with the values sop_hier_val chose (HIER_WEIGHT,
#                   HIER_PROXIES), into ROOT/<dataset>_hier
#   report          results.md / results.csv / plots of every root
# Environment:
#   SEEDS        training seeds of every setting (default 0,1,2,3,4)
#   DATA_SEEDS   data seeds of the *_pa and *_hier stages (default 0,1,2)
#   HIER_WEIGHT, HIER_PROXIES   HIER's setting in the *_hier stages (default: what sop_hier_val chose, below)
set -euo pipefail

ROOT="${1:?usage: launch/pretrained_study.sh ROOT [STAGE ...]}"
shift
SEEDS="${SEEDS:-0,1,2,3,4}"
DATA_SEEDS="${DATA_SEEDS:-0,1,2}"
PYTHON="${PYTHON:-python}"
BACKBONE="$ROOT/pretrain/backbone"
PRETRAINED=("--set=model.pretrained=$BACKBONE")
PAIR='hpl.weights=(1.0,),(1.0,0.1)'
# Every run of the HIER stages carries HIER's learning-rate rule and warm-up (configs/hier_recipe.py: with_hier), so
# the four arms differ only in hpl.weights and hier.weight; the rules match nothing where hier.weight is 0.
HIER_OPTIM=('--set=optim.lr_mults=(("hier_proxies",50.0),("proxies/.*",100.0))'
            '--set=optim.warmup_trainable=("hier_proxies","model/embedding/.*","proxies/.*")')
HIER_VAL_GRID=('--grid=hier.weight=0.1,0.5,1.0' '--grid=hier.num_proxies=32,128')
HIER_WEIGHT="${HIER_WEIGHT:-0.5}"
HIER_PROXIES="${HIER_PROXIES:-32}"

need_backbone() {
  [[ -f "$BACKBONE/metadata.json" ]] || { echo "no $BACKBONE yet: run the pretrain stage first" >&2; exit 1; }
}

sweep() {  # sweep CONFIG ROOT_NAME SWEEP-FLAGS...
  local config="$1" name="$2"
  shift 2
  echo "== $(date '+%F %T') $name $*"
  "$PYTHON" -m hpl_jax.sweep --config="configs/${config}.py" --workdir="$ROOT/$name" "$@" \
    --set=compilation_cache_dir="$ROOT/compile_cache"
}

reuse() {  # reuse FROM_ROOT FROM_NAME TO_ROOT TO_NAME: a finished run copied into another root under another name
  mkdir -p "$ROOT/$3"
  "$PYTHON" - "$ROOT/$1/$2" "$ROOT/$3/$4" <<'PY'
import os, shutil, sys
from hpl_jax import reporting
source, target = sys.argv[1:]
if not os.path.exists(target) and reporting.run_has_ended(source):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "best", "tensorboard"))
PY
}

stage_pretrain() {
  echo "== $(date '+%F %T') pretrain"
  "$PYTHON" -m hpl_jax.main --config=configs/pretrain_synthetic.py --workdir="$ROOT/pretrain" \
    --config.compilation_cache_dir="$ROOT/compile_cache"
}

# From scratch with the from-scratch study's recipe (10 / 12 epochs) against fine-tuned, flat PA, data seed 0: both
# trained here with this code, then the fine-tuned runs copied beside the scratch ones (the report pairs them by seed).
sanity() {  # sanity DATASET SCRATCH_CONFIG SCRATCH-FLAGS...
  local dataset="$1" config="$2" seed
  shift 2
  need_backbone
  sweep "$config" "${dataset}_scratch" --grid='hpl.weights=(1.0,)' --seeds="$SEEDS" "$@"
  sweep "finetune_$dataset" "${dataset}_pa" --grid='hpl.weights=(1.0,)' --seeds="$SEEDS" --data_seeds=0 \
    "${PRETRAINED[@]}"
  for seed in ${SEEDS//,/ }; do
    reuse "${dataset}_scratch" "hpl.weights=1.0__seed=$seed" "${dataset}_sanity" "scratch__seed=$seed"
    reuse "${dataset}_pa" "hpl.weights=1.0__seed=${seed}__data_seed=0" "${dataset}_sanity" "pretrained__seed=$seed"
  done
}
stage_sop_sanity() { sanity synthetic_sop synthetic_sop --set=num_epochs=10; }
stage_default_sanity() { sanity default default; }

pairs() {  # pairs DATASET: HPL-PA and PA, seed by seed and data seed by data seed, then the whole sweep's plan
  local dataset="$1" data_seed seed
  need_backbone
  for data_seed in ${DATA_SEEDS//,/ }; do
    for seed in ${SEEDS//,/ }; do
      sweep "finetune_$dataset" "${dataset}_pa" --grid="$PAIR" --seeds="$seed" --data_seeds="$data_seed" \
        "${PRETRAINED[@]}"
    done
  done
  sweep "finetune_$dataset" "${dataset}_pa" --grid="$PAIR" --seeds="$SEEDS" --data_seeds="$DATA_SEEDS" \
    "${PRETRAINED[@]}"
}
stage_sop_pa() { pairs synthetic_sop; }
stage_default_pa() { pairs default; }

ground_truth() {  # ground_truth DATASET
  local dataset="$1" seed
  need_backbone
  for seed in ${SEEDS//,/ }; do
    reuse "${dataset}_pa" "hpl.weights=1.0,0.1__seed=${seed}__data_seed=0" "${dataset}_gt" \
      "hpl.ground_truth_level1=False__seed=$seed"
  done
  sweep "finetune_$dataset" "${dataset}_gt" --grid='hpl.ground_truth_level1=False,True' --seeds="$SEEDS" \
    "${PRETRAINED[@]}"
}
stage_sop_gt() { ground_truth synthetic_sop; }
stage_default_gt() { ground_truth default; }

figure5_w1() {  # figure5_w1 DATASET
  local dataset="$1" seed
  need_backbone
  for seed in ${SEEDS//,/ }; do
    reuse "${dataset}_pa" "hpl.weights=1.0,0.1__seed=${seed}__data_seed=0" "${dataset}_w1" \
      "hpl.weights=1.0,0.1__seed=$seed"
  done
  sweep "finetune_$dataset" "${dataset}_w1" \
    --grid='hpl.weights=(1.0,0.0),(1.0,0.01),(1.0,0.1),(1.0,0.3),(1.0,1.0)' --seeds="$SEEDS" "${PRETRAINED[@]}"
}
stage_sop_w1() { figure5_w1 synthetic_sop; }
stage_default_w1() { figure5_w1 default; }

stage_sop_hier_val() {  # HIER-PA's weight and number of proxies on the validation classes, seed by seed
  local seed
  need_backbone
  for seed in ${SEEDS//,/ }; do
    sweep finetune_synthetic_sop synthetic_sop_hier_val '--set=hpl.weights=(1.0,)' "${HIER_VAL_GRID[@]}" \
      --seeds="$seed" --data_seeds=0 "${HIER_OPTIM[@]}" "${PRETRAINED[@]}"
  done
  sweep finetune_synthetic_sop synthetic_sop_hier_val '--set=hpl.weights=(1.0,)' "${HIER_VAL_GRID[@]}" \
    --seeds="$SEEDS" --data_seeds=0 "${HIER_OPTIM[@]}" "${PRETRAINED[@]}"
}

four_way() {  # four_way DATASET: flat PA, HPL-PA, HIER-PA, HPL + HIER, seed by seed and data seed by data seed
  local dataset="$1" data_seed seed
  local grid=("--grid=$PAIR" "--grid=hier.weight=0.0,$HIER_WEIGHT" "--set=hier.num_proxies=$HIER_PROXIES")
  need_backbone
  for data_seed in ${DATA_SEEDS//,/ }; do
    for seed in ${SEEDS//,/ }; do
      sweep "finetune_$dataset" "${dataset}_hier" "${grid[@]}" --seeds="$seed" --data_seeds="$data_seed" \
        "${HIER_OPTIM[@]}" "${PRETRAINED[@]}"
    done
  done
  sweep "finetune_$dataset" "${dataset}_hier" "${grid[@]}" --seeds="$SEEDS" --data_seeds="$DATA_SEEDS" \
    "${HIER_OPTIM[@]}" "${PRETRAINED[@]}"
}
stage_sop_hier() { four_way synthetic_sop; }
stage_default_hier() { four_way default; }

stage_report() {
  local root baseline
  for root in "$ROOT"/*/; do
    root="${root%/}"
    case "${root##*/}" in
      pretrain) continue ;;
      *_sanity) baseline=("model.pretrained=") ;;
      *_w1) baseline=('hpl.weights=(1.0,0.0)') ;;
      *_gt) baseline=('hpl.ground_truth_level1=False') ;;
      *_hier_val) baseline=('hier.weight=0.5' 'hier.num_proxies=32') ;;
      *_hier) baseline=('hpl.weights=(1.0,)' 'hier.weight=0.0') ;;
      *_scratch) continue ;;
      *) baseline=('hpl.weights=(1.0,)') ;;
    esac
    "$PYTHON" -m hpl_jax.report "$root" --metrics=map@r,recall@1,val/map@r "${baseline[@]/#/--baseline=}" ||
      echo "(no report for $root)" >&2
  done
}

ALL_STAGES=(pretrain sop_sanity default_sanity sop_pa default_pa sop_gt default_gt sop_w1 default_w1 sop_hier_val
            sop_hier default_hier report)
STAGES=("${ALL_STAGES[@]}")
if (($# > 0)); then STAGES=("$@"); fi
start=$(date +%s)
for stage in "${STAGES[@]}"; do
  if ! declare -F "stage_$stage" >/dev/null; then
    echo "unknown stage '$stage'; the stages are: ${ALL_STAGES[*]}" >&2
    exit 2
  fi
done
for stage in "${STAGES[@]}"; do
  "stage_$stage"
done
echo "== $(date '+%F %T') done: ${STAGES[*]} in $(($(date +%s) - start)) s"
