#!/usr/bin/env bash
# The GPU check, prepared as one device call: each model's reference preset with every
# default variant, one fresh process per variant (see run.py), JSON and logs under $OUT.
#
#   bash benchmarks/gpu_session.sh                            # on the device machine
#   OUT=/tmp/out PRESET=tiny MODELS=mlp bash benchmarks/gpu_session.sh   # a CPU dry run
#
# Sized for one 10-minute device command: each model gets MODEL_TIMEOUT seconds in
# all (default 170) and each variant VARIANT_TIMEOUT (default 90); a variant that runs
# out is recorded with its error and the rest go on. Copy the JSON files into
# benchmarks/results/ and say in benchmarks/results/README.md what ran, where, when.
set -u
OUT=${OUT:-/tmp/hetjax-gpu}
PRESET=${PRESET:-reference}
MODELS=${MODELS:-"mlp gpt_scan cnn"}
mkdir -p "$OUT"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/hetjax-jax-cache}
"${PYTHON:-python}" -c "import jax; print('jax', jax.__version__, jax.devices())"
for model in $MODELS; do
  echo "== $model ($PRESET), $(date -u +%H:%M:%S)"
  timeout "${MODEL_TIMEOUT:-170}" "${PYTHON:-python}" benchmarks/run.py --target local --model "$model" --preset "$PRESET" \
    --steps "${STEPS:-10}" --warmup 2 --timeout "${VARIANT_TIMEOUT:-90}" \
    --json "$OUT/${model}_${PRESET}.json" >"$OUT/${model}_${PRESET}.log" 2>&1
  echo "exit $?"
  tail -n 12 "$OUT/${model}_${PRESET}.log"
done
