#!/usr/bin/env bash
# Distributed testing through torchrun.
#   tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py flags...]
# As tools/dist_train.sh: NNODES, NODE_RANK, MASTER_ADDR, PORT, PYTHON; CPU-only machines use gloo.
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
NPROC=$3
HERE=$(cd "$(dirname "$0")" && pwd)
# the project's environment (make install) unless PYTHON names another interpreter
PYTHON=${PYTHON:-$HERE/../.venv/bin/python}
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    "$HERE/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
