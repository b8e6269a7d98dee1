"""The world and the tensor / pipeline / data-parallel process groups.

world = TP x PP x DP, ranks ordered as in Megatron: TP varies fastest, then DP, then PP, so

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

A :class:`ParallelState` holds the groups and is passed explicitly to whatever needs them. It also
answers DeepSpeed's ``mpu`` protocol (``get_model_parallel_group`` and friends), so the same object is
handed to ``deepspeed.initialize(mpu=...)``.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_normformer.config import ParallelConfig
from megatron_normformer.deepspeed_repairs import skip_shm_comm_op
from megatron_normformer.runtime import build_locks, phases
from megatron_normformer.runtime.launch_env import LaunchEnv, read_launch_env


def initialize_distributed(backend: Optional[str] = None, timeout_minutes: int = 30) -> LaunchEnv:
    """Initialise torch.distributed from the launcher's environment (idempotent).

    Exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT so that DeepSpeed, which reads
    them too, agrees with us whatever the launcher was.
    """
    launch = read_launch_env()
    for key, value in (("RANK", launch.rank), ("WORLD_SIZE", launch.world_size),
                       ("LOCAL_RANK", launch.local_rank), ("MASTER_ADDR", launch.master_addr),
                       ("MASTER_PORT", launch.master_port)):
        os.environ[key] = str(value)
    if dist.is_initialized():
        return launch
    if backend is None:
        # On GPUs, NCCL for device tensors and gloo for the few host-side collectives (the stop
        # flag, logged scalars, object gathers), which NCCL cannot take.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    phases.phase(
        f"rendezvous of {launch.world_size} processes at {launch.master_addr}:{launch.master_port}",
        f"waiting until every rank has joined (ranks that have not started, or cannot reach "
        f"{launch.master_addr}:{launch.master_port}, keep this one waiting up to "
        f"{timeout_minutes} min)")
    dist.init_process_group(backend=backend, init_method="env://", rank=launch.rank,
                            world_size=launch.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return launch


def init_deepspeed_comm() -> None:
    """Let ``deepspeed.comm`` adopt the process group torch.distributed already has, without
    DeepSpeed's shared-memory comm op, a JIT build that training never uses
    (``deepspeed_repairs.skip_shm_comm_op``)."""
    import deepspeed

    skip_shm_comm_op()
    build_locks.report_build_lock_waits()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def rank_grid(world_size: int, tp: int, pp: int):
    """Rank lists of every TP, DP and PP group, in Megatron order (TP fastest, then DP, then PP)."""
    dp = ParallelConfig(tp, pp).data_parallel_size(world_size)

    def rank(p, d, t):
        return p * dp * tp + d * tp + t

    tp_groups = [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_groups = [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    mp_groups = [[rank(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)]
    return tp_groups, dp_groups, pp_groups, mp_groups


class ParallelState:
    """The process groups of one rank. Also DeepSpeed's ``mpu``.

    In DeepSpeed's vocabulary "model parallel" means every rank that holds a different piece of the
    same replica: the TP group without pipelining, TP x PP with it.
    """

    def __init__(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                 sequence_parallel: bool = False):
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        self.sequence_parallel = sequence_parallel
        if not dist.is_initialized():
            raise RuntimeError("initialize_distributed() must run before ParallelState()")
        world, me = dist.get_world_size(), dist.get_rank()
        tp_groups, dp_groups, pp_groups, mp_groups = rank_grid(world, tp, pp)
        self.tp_size, self.pp_size, self.dp_size = tp, pp, world // (tp * pp)
        self.world_size, self.rank = world, me

        def build(groups):
            # Every rank must create every group, in the same order.
            mine = None
            for ranks in groups:
                group = dist.new_group(ranks) if len(ranks) < world else dist.group.WORLD
                if me in ranks:
                    mine, mine_ranks = group, ranks
            return mine, mine_ranks

        self.tp_group, self.tp_ranks = build(tp_groups)
        self.dp_group, self.dp_ranks = build(dp_groups)
        self.pp_group, self.pp_ranks = build(pp_groups)
        self.mp_group, self.mp_ranks = build(mp_groups)
        self.tp_rank = self.tp_ranks.index(me)
        self.dp_rank = self.dp_ranks.index(me)
        self.pp_rank = self.pp_ranks.index(me)

    # -- convenience -------------------------------------------------------------------------
    @property
    def sp_group(self):
        """The group the sequence is split over outside the tensor-parallel regions (the TP group
        under ``--sequence-parallel``), None when it is not split."""
        return self.tp_group if self.sequence_parallel and self.tp_size > 1 else None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def __repr__(self):
        return (f"ParallelState(rank={self.rank}, tp={self.tp_rank}/{self.tp_size}, "
                f"dp={self.dp_rank}/{self.dp_size}, pp={self.pp_rank}/{self.pp_size})")

    # -- DeepSpeed / Megatron mpu protocol ---------------------------------------------------
    def get_model_parallel_group(self):
        return self.mp_group

    def get_model_parallel_rank(self) -> int:
        return self.mp_ranks.index(self.rank)

    def get_model_parallel_world_size(self) -> int:
        return len(self.mp_ranks)

    def get_tensor_model_parallel_group(self):
        return self.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_pipeline_model_parallel_group(self):
        return self.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.pp_size

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size


class SingleProcessState(ParallelState):
    """A world of one without torch.distributed: for tools and single-process inference."""

    def __init__(self):  # noqa: D401 - deliberately skips the group building
        self.tp_size = self.pp_size = self.dp_size = self.world_size = 1
        self.sequence_parallel = False
        self.rank = self.tp_rank = self.dp_rank = self.pp_rank = 0
        self.tp_group = self.dp_group = self.pp_group = self.mp_group = None
        self.tp_ranks = self.dp_ranks = self.pp_ranks = self.mp_ranks = [0]
