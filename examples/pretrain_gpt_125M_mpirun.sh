#!/bin/bash
# The 125M NormFormer under OpenMPI instead of the deepspeed launcher. Ranks come from
# OMPI_COMM_WORLD_*; across nodes export MASTER_ADDR (the first host) or install mpi4py.
#   NP=16 HOSTS=node-001:8,node-002:8 examples/pretrain_gpt_125M_mpirun.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NP=${NP:-8}
HOSTS=${HOSTS:-localhost:$NP}
export MASTER_ADDR=${MASTER_ADDR:-${HOSTS%%:*}}
# odls_base_sigkill_timeout: on SIGTERM mpirun passes it on after this many seconds (default 1)
# and sends SIGKILL as long after that, the time the ranks have to save (docs/training.md).
LAUNCHER=${LAUNCHER:-"mpirun -np $NP -H $HOSTS -x MASTER_ADDR -x PATH --bind-to none --mca odls_base_sigkill_timeout 30 python"} \
  exec examples/pretrain_gpt_125M.sh "$@"
