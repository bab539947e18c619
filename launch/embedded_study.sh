#!/usr/bin/env bash
# The study behind docs/study.md: HPL against its base loss, Figure 5's two sweeps
# and the refresh choices, on the two embedded datasets, every setting with the same training seeds.
#
# Needs:   the project's environment (pip install -r requirements.txt), run from the repository root; a CPU is
#          enough (on this project's 2-core machine a 10-epoch synthetic_sop run takes about 1 min alone, a
#          default run about 50 s with a second run beside it).
# Usage:   launch/embedded_study.sh ROOT [STAGE ...]       (default: every stage, in the order below)
# Example: nohup nice launch/embedded_study.sh /tmp/hpl_study > /tmp/hpl_study.log 2>&1 &
#          python -m hpl_jax.report /tmp/hpl_study/synthetic_sop_pa --metrics=map@r,recall@1,val/map@r \
#            --baseline='hpl.weights=(1.0,)'
# Each stage is one or more `python -m hpl_jax.sweep` calls into ROOT/<dataset>_<question>; running the script
# again resumes (finished runs are skipped, an interrupted one resumes from its checkpoint). A run that a later
# sweep would repeat with the same config and seed (HPL-PA at the config's own w and K_1) is copied into that
# sweep's root under the name the sweep gives it, not trained again.
# Environment:
#   SEEDS        training seeds of every setting (default 0,1,2,3,4)
#   DATA_SEEDS   the other data seeds the `data_seeds` stages repeat a comparison on (default 1,2)
#   WINNER_SOP   the HPL weights the `data_seeds` stage compares with flat Proxy-Anchor on synthetic_sop
#                (default '(1.0,0.1)'; set it to the setting validation chose)
#   WINNER_SET   further KEY=VALUE fields of that setting, space-separated (e.g. 'hpl.num_coarse=(96,)'), set
#                for both sides (a flat run does not use the hpl fields but its config records them)
#   WINNER_DEFAULT, WINNER_DEFAULT_SET   the same for the `default_data_seeds` stage on configs/default.py
set -euo pipefail

ROOT="${1:?usage: launch/embedded_study.sh ROOT [STAGE ...]}"
shift
SEEDS="${SEEDS:-0,1,2,3,4}"
DATA_SEEDS="${DATA_SEEDS:-1,2}"
WINNER_SOP="${WINNER_SOP:-(1.0,0.1)}"
WINNER_SET="${WINNER_SET:-}"
WINNER_DEFAULT="${WINNER_DEFAULT:-(1.0,0.1)}"
WINNER_DEFAULT_SET="${WINNER_DEFAULT_SET:-}"
PYTHON="${PYTHON:-python}"
# configs/synthetic_sop.py trained 10 epochs when the study started; sop_long's validation chose 30, its default
# since. The synthetic_sop sweeps keep their 10 epochs (the study's runs; 30 would triple the study's time), except
# sop_long, sop_w1_long and sop_k1_long, which train 30.
SOP10=(--set=num_epochs=10)
NCA=(--set=loss.base=proxy_nca '--set=optim.lr_mults=(("proxies/.*",1.0),)')   # docs/method.md: NCA proxies at 1 x lr

sweep() {  # sweep DATASET QUESTION SWEEP-FLAGS...
  local dataset="$1" question="$2"
  shift 2
  echo "== $(date '+%F %T') ${dataset}_${question}"
  "$PYTHON" -m hpl_jax.sweep --config="configs/${dataset}.py" --workdir="$ROOT/${dataset}_${question}" \
    --seeds="$SEEDS" "$@"
}

reuse() {  # reuse FROM_SWEEP FROM_NAME TO_SWEEP TO_NAME [TO_SUFFIX]: the finished runs of one sweep as runs of
           # another (TO_SUFFIX: what the target sweep's names add after the seed, e.g. __data_seed=0)
  mkdir -p "$ROOT/$3"
  "$PYTHON" - "$ROOT" "$1" "$2" "$3" "$4" "${5:-}" "$SEEDS" <<'PY'
import os, shutil, sys
from hpl_jax import reporting
root, from_sweep, from_name, to_sweep, to_name, to_suffix, seeds = sys.argv[1:]
for seed in seeds.split(","):
    source = os.path.join(root, from_sweep, f"{from_name}__seed={seed}")
    target = os.path.join(root, to_sweep, f"{to_name}__seed={seed}{to_suffix}")
    if not os.path.exists(target) and reporting.run_has_ended(source):
        shutil.copytree(source, target)
PY
}

# HPL against its flat base loss (w = (1.0,)); the config's own K_1.
stage_sop_pa() { sweep synthetic_sop pa --grid='hpl.weights=(1.0,),(1.0,0.1)' "${SOP10[@]}"; }
stage_sop_nca() { sweep synthetic_sop nca --grid='hpl.weights=(1.0,),(1.0,0.1)' "${NCA[@]}" "${SOP10[@]}"; }
# The same pair trained 3x longer: the 10-epoch runs of configs/synthetic_sop.py still improve on validation at
# their last epoch (each run still picks its epoch on validation).
stage_sop_long() { sweep synthetic_sop long --grid='hpl.weights=(1.0,),(1.0,0.1)' --set=num_epochs=30; }
stage_default_pa() { sweep default pa --grid='hpl.weights=(1.0,),(1.0,0.1)'; }
stage_default_nca() { sweep default nca --grid='hpl.weights=(1.0,),(1.0,0.1)' "${NCA[@]}"; }

# Figure 5: w_1 (w_1 = 0: the coarse level is there but has no weight) and K_1 (the config's own K_1 among them).
W1_GRID='hpl.weights=(1.0,0.0),(1.0,0.01),(1.0,0.03),(1.0,0.1),(1.0,0.3),(1.0,1.0)'
figure5() {  # figure5 DATASET CONFIG_K1 K1_VALUES [SWEEP-FLAGS...]
  local dataset="$1" config_k1="$2" k1_values="$3"
  shift 3
  reuse "${dataset}_pa" 'hpl.weights=1.0,0.1' "${dataset}_w1" 'hpl.weights=1.0,0.1'
  sweep "$dataset" w1 --grid="$W1_GRID" "$@"
  reuse "${dataset}_pa" 'hpl.weights=1.0,0.1' "${dataset}_k1" "hpl.num_coarse=$config_k1"
  sweep "$dataset" k1 --grid="hpl.num_coarse=$k1_values" "$@"
}
SOP_K1_VALUES='(12,),(24,),(48,),(96,),(192,)'
stage_sop_w1_k1() { figure5 synthetic_sop 48 "$SOP_K1_VALUES" "${SOP10[@]}"; }
# Figure 5 again at the config's 30 epochs (sop_long's HPL-PA runs are its w_1 = 0.1, K_1 = 48).
stage_sop_w1_long() {
  reuse synthetic_sop_long 'hpl.weights=1.0,0.1' synthetic_sop_w1_long 'hpl.weights=1.0,0.1'
  sweep synthetic_sop w1_long --grid="$W1_GRID" --set=num_epochs=30
}
stage_sop_k1_long() {
  reuse synthetic_sop_long 'hpl.weights=1.0,0.1' synthetic_sop_k1_long 'hpl.num_coarse=48'
  sweep synthetic_sop k1_long --grid="hpl.num_coarse=$SOP_K1_VALUES" --set=num_epochs=30
}
stage_default_w1_k1() { figure5 default 8 '(2,),(4,),(8,),(16,)'; }

# Level 1 from the ground-truth super-classes instead of k-means, and the refresh choices, each against the
# config's own (k-means levels, reset, once per epoch, first grouping from class means); refreshes every 17 / 5
# steps = about 4 per epoch (67 / 15 steps per epoch).
refresh_choices() {  # refresh_choices DATASET EVERY_STEPS [SWEEP-FLAGS...]
  local dataset="$1" every="$2"
  shift 2
  reuse "${dataset}_pa" 'hpl.weights=1.0,0.1' "${dataset}_gt" 'hpl.ground_truth_level1=False'
  sweep "$dataset" gt --grid='hpl.ground_truth_level1=False,True' "$@"
  reuse "${dataset}_pa" 'hpl.weights=1.0,0.1' "${dataset}_policy" 'hpl.coarse_policy=reset'
  sweep "$dataset" policy --grid='hpl.coarse_policy=reset,rematch' "$@"
  reuse "${dataset}_pa" 'hpl.weights=1.0,0.1' "${dataset}_every" 'hpl.refresh_every_steps=0'
  sweep "$dataset" every --grid="hpl.refresh_every_steps=0,$every" "$@"
  reuse "${dataset}_pa" 'hpl.weights=1.0,0.1' "${dataset}_first" 'hpl.first_grouping=class_means'
  sweep "$dataset" first --grid='hpl.first_grouping=class_means,proxies' "$@"
}
stage_sop_refresh() { refresh_choices synthetic_sop 17 "${SOP10[@]}"; }
stage_default_refresh() { refresh_choices default 5; }

# 2 levels against 3 (level 2 = 12 groups, as many as the super-classes), both by k-means.
stage_sop_levels() {
  sweep synthetic_sop levels --grid='hpl.weights=(1.0,0.1),(1.0,0.1,0.1)' '--set=hpl.num_coarse=(48,12)' "${SOP10[@]}"
}

# The comparison repeated on other data (config.dataset.seed), with the setting validation chose. Data seed 0's
# runs are the *_pa stage's (copied when the winner is the config's own setting), so the root holds all three
# and its report gives the difference pooled and per data seed.
data_seeds() {  # data_seeds DATASET WINNER 'KEY=VALUE ...' [SWEEP-FLAGS...]
  local dataset="$1" winner="$2" fields
  read -r -a fields <<< "$3"
  shift 3
  if [[ "$winner" == "(1.0,0.1)" && ${#fields[@]} -eq 0 ]]; then
    reuse "${dataset}_pa" 'hpl.weights=1.0' "${dataset}_data_seeds" 'hpl.weights=1.0' __data_seed=0
    reuse "${dataset}_pa" 'hpl.weights=1.0,0.1' "${dataset}_data_seeds" 'hpl.weights=1.0,0.1' __data_seed=0
  fi
  sweep "$dataset" data_seeds --grid="hpl.weights=(1.0,),$winner" --data_seeds="0,$DATA_SEEDS" \
    "${fields[@]/#/--set=}" "$@"
}
stage_data_seeds() { data_seeds synthetic_sop "$WINNER_SOP" "$WINNER_SET" "${SOP10[@]}"; }
stage_default_data_seeds() { data_seeds default "$WINNER_DEFAULT" "$WINNER_DEFAULT_SET"; }

# results.md, results.csv and the plots of every sweep root there is, each against its baseline setting.
stage_report() {
  local root baseline
  for root in "$ROOT"/*/; do
    root="${root%/}"
    [[ -f "$root/sweep.json" ]] || continue
    case "${root##*/}" in
      *_w1 | *_w1_long) baseline='hpl.weights=(1.0,0.0)' ;;
      synthetic_sop_k1 | synthetic_sop_k1_long) baseline='hpl.num_coarse=(48,)' ;;
      default_k1) baseline='hpl.num_coarse=(8,)' ;;
      *_policy) baseline='hpl.coarse_policy=reset' ;;
      *_every) baseline='hpl.refresh_every_steps=0' ;;
      *_first) baseline='hpl.first_grouping=class_means' ;;
      *_gt) baseline='hpl.ground_truth_level1=False' ;;
      *_levels) baseline='hpl.weights=(1.0,0.1)' ;;
      *) baseline='hpl.weights=(1.0,)' ;;
    esac
    # A root whose runs are all of one setting so far has nothing to compare yet: say so and go on.
    "$PYTHON" -m hpl_jax.report "$root" --metrics=map@r,recall@1,val/map@r --baseline="$baseline" ||
      echo "(no report for $root)" >&2
  done
}

ALL_STAGES=(sop_pa sop_nca default_pa default_nca sop_long sop_refresh sop_w1_k1 sop_levels default_w1_k1
            default_refresh data_seeds default_data_seeds sop_w1_long sop_k1_long
            report)
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
