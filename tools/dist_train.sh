#!/usr/bin/env bash
# Distributed training through torchrun and mmengine's DDP.
#   tools/dist_train.sh CONFIG NUM_PROCS [train.py flags...]
# Multi-node: NNODES, NODE_RANK, MASTER_ADDR, PORT. PYTHON: the interpreter (default: the project's .venv).
# Without CUDA the processes run on CPU with gloo (see mmdet_vanillanet.tool_setup.init_cpu_distributed).
set -euo pipefail
CONFIG=$1
NPROC=$2
HERE=$(cd "$(dirname "$0")" && pwd)
# the project's environment (make install) unless PYTHON names another interpreter
PYTHON=${PYTHON:-$HERE/../.venv/bin/python}
PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$NPROC" \
    "$HERE/train.py" "$CONFIG" --launcher pytorch "${@:3}"
