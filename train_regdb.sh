#!/bin/sh
# Train the 10 RegDB trials one after the other (DATASET.TRIAL 1..10), one run directory each:
# runs/regdb_trial<N> (CMFN) or runs/<method>_regdb_trial<N> by default
# (utils.config.default_output_dir), or <OUTPUT_ROOT>/[<method>_]regdb_trial<N>.
#
#   sh train_regdb.sh [--method NAME] [train.py options and KEY VALUE overrides]
#   TRIALS="3 4" OUTPUT_ROOT=/data/runs PYTHON=/path/to/python sh train_regdb.sh SOLVER.AMP bf16
#   sh train_regdb.sh --method ivreid
#
# Extra arguments go to every trial's train.py (e.g. --method, --resume, --overwrite, KEY VALUE
# pairs). Set the run directories with OUTPUT_ROOT, not OUTPUT_DIR: one OUTPUT_DIR for all
# trials would make them collide. The script stops at the first trial that fails.
set -e
PYTHON=${PYTHON:-python}
TRIALS=${TRIALS:-"1 2 3 4 5 6 7 8 9 10"}
TRAIN_PY="$(dirname "$0")/train.py"

prefix=""
previous=""
for arg in "$@"; do
    if [ "$arg" = "OUTPUT_DIR" ]; then
        echo "train_regdb.sh: pass OUTPUT_ROOT=<folder> instead of OUTPUT_DIR (one run directory per trial)" >&2
        exit 2
    fi
    if [ "$previous" = "--method" ] && [ "$arg" != "cmfn" ]; then
        prefix="${arg}_"
    fi
    previous="$arg"
done

for trial in $TRIALS; do
    echo "=== RegDB trial $trial ==="
    if [ -n "$OUTPUT_ROOT" ]; then
        "$PYTHON" "$TRAIN_PY" --dataset regdb "$@" DATASET.TRIAL "$trial" OUTPUT_DIR "$OUTPUT_ROOT/${prefix}regdb_trial$trial"
    else
        "$PYTHON" "$TRAIN_PY" --dataset regdb "$@" DATASET.TRIAL "$trial"
    fi
done
