"""Process discovery and the tensor / pipeline / data-parallel process groups.

world = TP x PP x DP, ranks ordered as in Megatron: TP varies fastest, then DP, then PP, so

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

A :class:`ParallelState` holds the groups and is passed explicitly to whatever needs them. It also
answers DeepSpeed's ``mpu`` protocol (``get_model_parallel_group`` and friends), so the same object is
handed to ``deepspeed.initialize(mpu=...)``.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from megatron_normformer.config import ConfigError, ParallelConfig
from megatron_normformer.deepspeed_repairs import skip_shm_comm_op
from megatron_normformer.training import interrupts


@dataclass
class LaunchEnv:
    """Rank facts read from whatever launcher started this process."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _mpi_master_addr(world_size: int, local_size: int) -> str:
    """The address of MPI rank 0, via mpi4py when present, else localhost for a single node."""
    try:
        from mpi4py import MPI  # type: ignore

        return MPI.COMM_WORLD.bcast(socket.gethostbyname(socket.gethostname()), root=0)
    except ImportError:
        nodelist = _slurm_nodelist(os.environ)
        if nodelist:  # mpirun / srun --mpi=pmi2 inside a Slurm allocation: rank 0 is on its first host
            return expand_hostlist(nodelist)[0]
        if local_size != world_size:
            raise ConfigError(
                "mpirun across nodes needs MASTER_ADDR set to the first node's address "
                "(e.g. mpirun -x MASTER_ADDR=node0 ...) or mpi4py installed to discover it")
        return "127.0.0.1"


def expand_hostlist(hostlist: str) -> List[str]:
    """Slurm's compressed host list in full: ``node[01-03,7],gpu-a1`` -> node01, node02, node03,
    node7, gpu-a1 (zero padding kept; several bracket groups in one name multiply out)."""
    hosts, name, depth = [], "", 0
    for ch in hostlist + ",":
        if ch == "," and depth == 0:
            if name:
                hosts.extend(_expand_name(name, hostlist))
            name = ""
            continue
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            raise ConfigError(f"SLURM_JOB_NODELIST {hostlist!r}: unbalanced brackets")
        name += ch
    if depth:
        raise ConfigError(f"SLURM_JOB_NODELIST {hostlist!r}: unbalanced brackets")
    return hosts


def _expand_name(name: str, hostlist: str) -> List[str]:
    if "[" not in name:
        return [name]
    head, rest = name.split("[", 1)
    ranges, tail = rest.split("]", 1)
    values = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ConfigError(f"SLURM_JOB_NODELIST {hostlist!r}: cannot read the range {part!r}")
        width = len(low)
        values += [str(i).zfill(width) for i in range(int(low), int(high or low) + 1)]
    return [head + v + t for v in values for t in _expand_name(tail, hostlist)]


def _slurm_nodelist(env) -> Optional[str]:
    return env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")


def _slurm_port(env) -> int:
    """MASTER_PORT, else one derived from the job id, so every task of the job picks the same
    port and two jobs sharing a node rarely collide."""
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"])
    return 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000


def read_launch_env() -> LaunchEnv:
    """Ranks from torchrun / the deepspeed launcher (RANK, WORLD_SIZE, ...), OpenMPI, PMI or
    Slurm's srun (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first host of
    SLURM_JOB_NODELIST).

    A plain ``python script.py`` is a world of one. Nothing has to be set by hand on one machine.
    """
    env = os.environ
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "env")
    for prefix, launcher in (("OMPI_COMM_WORLD_", "openmpi"), ("PMI_", "pmi"), ("PMIX_", "pmix")):
        if prefix + "RANK" in env and prefix + "SIZE" in env:
            rank, world = int(env[prefix + "RANK"]), int(env[prefix + "SIZE"])
            local_rank = int(env.get(prefix + "LOCAL_RANK", env.get("MPI_LOCALRANKID", rank)))
            local_size = int(env.get(prefix + "LOCAL_SIZE", env.get("MPI_LOCALNRANKS", world)))
            addr = env.get("MASTER_ADDR") or _mpi_master_addr(world, local_size)
            return LaunchEnv(rank, world, local_rank, addr, port, launcher)
    if "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        # One process per task of an srun step (the step's task count; the job's outside srun).
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS")))
        nodelist = _slurm_nodelist(env)
        if "MASTER_ADDR" in env:
            addr = env["MASTER_ADDR"]
        elif nodelist:
            addr = expand_hostlist(nodelist)[0]
        elif world == 1:
            addr = "127.0.0.1"
        else:
            raise ConfigError("srun: SLURM_JOB_NODELIST is not set; set MASTER_ADDR to the first "
                              "node's address")
        return LaunchEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), addr,
                         _slurm_port(env), "slurm")
    if "MASTER_PORT" not in env:
        # A world of one still needs a rendezvous port: take a free one, so that several
        # single-process runs on one machine do not collide on the default.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


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
    interrupts.phase(
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
    interrupts.report_build_lock_waits()
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
