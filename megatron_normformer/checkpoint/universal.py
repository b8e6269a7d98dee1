"""Layout-independent ("universal") training state: fp32 weights and Adam moments by parameter name.

DeepSpeed's own checkpoint files are tied to the layout that wrote them (TP degree, pipeline stages,
ZeRO partitions). Next to them every save writes ``TAG/universal/``:

    meta.json                            source layout, model config, optimizer step
    tp{T:02d}_pp{P:02d}_dp{D:03d}.safetensors  written by every rank that holds fp32 master state:
                                         ``NAME`` (fp32 master weight), ``NAME::exp_avg``,
                                         ``NAME::exp_avg_sq``, each the piece of the flattened TP
                                         shard that this data-parallel rank owns

Each rank writes only what it already holds: its ZeRO partition of the master weights and moments
(ZeRO 1-3 and DeepSpeed's BF16 optimizer), or, without ZeRO, data-parallel rank 0 the whole
replicated state. There is no gather: a save adds at most this rank's own shard to its host memory
and moves nothing between ranks. The file's ``layout`` metadata tells, per name, the TP shard's
shape and the piece's offset in it; ``UniversalReader`` stitches pieces together one tensor at a
time when a run loads it (or ``tools/convert_checkpoint.py`` converts it). Files named
``tp{T:02d}_pp{P:02d}.safetensors`` (the converter's output) hold whole TP shards.

Names are the model's own (``layers.3.mlp.fc1.weight``), identical with and without pipelining
(``model/pipeline.py``). Replicated parameters are written by TP rank 0 only; the tied word
embedding by the first pipeline stage only. Reading back reassembles each full tensor and cuts it for the
reader's TP rank, so a run can resume into any (TP, PP, DP, ZeRO stage) with its optimizer state.

Where the fp32 master weights live depends on what DeepSpeed wrapped around the optimizer: the
ZeRO-3 partitions, the ``_hp_mapping`` fragments of ZeRO-1/2 and the BF16 optimizer, the fp32 copies
of the fp16/bf16 wrappers without ZeRO (state keyed by those copies, not by the module's
parameters), or the module's own fp32 parameters. An optimizer we cannot read stops the save or the
load with a message rather than writing (or resuming from) the low-precision weights. These are
DeepSpeed's private fields: tests/test_deepspeed_repairs.py has a canary for each.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from safetensors import safe_open

from megatron_normformer.checkpoint.atomic import save_safetensors
from megatron_normformer.checkpoint.shards import cut_for, layout_of
from megatron_normformer.config import ConfigError, ModelConfig
from megatron_normformer.deepspeed_repairs import link_optimizer_state
from megatron_normformer.model.pipeline import counted_here

UNIVERSAL_DIR = "universal"
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's; --optimizer sgd keeps its momentum buffer instead
_FILE = re.compile(r"^tp(\d+)_pp(\d+)(?:_dp(\d+))?\.safetensors$")


# -- where the fp32 master weights and moments live --------------------------------------------
def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def moment_keys(engine) -> Tuple[str, ...]:
    """The optimizer state kept beside each master weight: Adam's two moments, or SGD's momentum
    buffer (none without momentum)."""
    base = _base_optimizer(engine)
    if isinstance(base, torch.optim.SGD):
        return ("momentum_buffer",) if base.defaults["momentum"] else ()
    return MOMENTS


def _state_view(state: Dict, key: str, like: torch.Tensor) -> torch.Tensor:
    value = state.get(key)
    return torch.zeros_like(like) if value is None else value


class MasterState:
    """This rank's piece of every parameter's fp32 master weight and Adam moments.

    ``piece(param)`` is None where this rank holds none of it, else ``(start, numel, get)``: the
    piece covers elements ``[start, start + numel)`` of the flattened (TP-shard) parameter and
    ``get(key)`` returns it as a 1-D fp32 tensor that aliases the optimizer's storage (``key`` None:
    the master weight; else a moment), so reading costs no copy and writing into it sets the state.
    """

    def __init__(self, engine, pstate):
        self.engine, self.pstate = engine, pstate
        opt = engine.optimizer
        self._masters: Dict[int, Tuple[torch.Tensor, Callable[[str], torch.Tensor]]] = {}
        self.kind = "zero"
        if engine.zero_optimization_stage() > 0 or hasattr(opt, "bf16_groups"):
            link_optimizer_state(engine)  # ZeRO 1-3 or DeepSpeed's BF16 optimizer
        elif hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):
            # DeepSpeed's unfused fp16/bf16 wrapper without ZeRO: one fp32 copy per parameter.
            self.kind = "copies"
            for lp_group, fp32_group in zip(opt.fp16_groups, opt.fp32_groups):
                for lp, hp in zip(lp_group, fp32_group):
                    self._masters[id(lp)] = (hp.view(-1), self._moments(opt.optimizer, hp, 0, hp.numel()))
        elif hasattr(opt, "fp32_groups_flat") and hasattr(opt, "fp16_groups"):
            # The fused fp16 wrapper: one flat fp32 tensor per group, parameters in group order.
            self.kind = "copies"
            for lp_group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
                offset = 0
                for lp in lp_group:
                    n = lp.numel()
                    self._masters[id(lp)] = (flat.narrow(0, offset, n),
                                             self._moments(opt.optimizer, flat, offset, n))
                    offset += n
        elif isinstance(opt, torch.optim.Optimizer) and all(
                p.dtype == torch.float32 for g in opt.param_groups for p in g["params"]):
            self.kind = "plain"  # fp32 without ZeRO: the module's parameters are the masters
        else:
            raise ConfigError(
                f"the layout-independent checkpoint cannot read the fp32 master weights out of "
                f"DeepSpeed's {type(opt).__name__}; save with --no-save-universal and resume in the "
                "same layout, or train with another precision / ZeRO stage")

    @staticmethod
    def _moments(optimizer, hp: torch.Tensor, offset: int, n: int):
        """Elements ``[offset, offset + n)`` of fp32 tensor ``hp``'s Adam moment ``key``."""
        def get(key):
            return _state_view(optimizer.state.get(hp, {}), key, hp).view(-1).narrow(0, offset, n)
        return get

    def piece(self, param, writer: bool = True
              ) -> Optional[Tuple[int, int, Callable[[Optional[str]], torch.Tensor]]]:
        """``writer``: without ZeRO only data-parallel rank 0 reports its (replicated) state."""
        if hasattr(param, "ds_id"):  # ZeRO-3: this rank's partition of the flattened parameter
            if not param.requires_grad:
                return None
            opt = param._z3_optimizer
            part = param.ds_tensor.numel()
            start = part * opt._get_param_partition_rank(param)
            n = max(0, min(part, param.ds_numel - start))
            if n == 0:
                return None
            return start, n, lambda key: opt.get_local_fp32_param(param, key).view(-1)[:n]
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is not None:  # ZeRO-1/2, BF16 optimizer: this rank's fragment
            address = mapping.lp_fragment_address
            if address.numel == 0:
                return None
            return address.start, address.numel, lambda key: mapping.get_hp_fragment(key).view(-1)
        if self.kind == "zero":
            return None  # a ZeRO rank that owns no part of this parameter
        if writer and self.pstate.dp_rank != 0:
            return None  # replicated over data parallelism: DP rank 0 writes it
        if self.kind == "copies":
            master, moments = self._masters[id(param)]
            return 0, master.numel(), lambda key: master if key is None else moments(key)
        state = _base_optimizer(self.engine).state
        return 0, param.numel(), lambda key: (
            param.detach().view(-1) if key is None
            else _state_view(state.get(param, {}), key, param).view(-1))

    def set_full(self, param, value: torch.Tensor, key: Optional[str]) -> None:
        """Set this rank's master weight (``key`` None) or moment from the full (TP-shard) tensor."""
        flat = value.reshape(-1).float()
        if hasattr(param, "ds_id"):
            if not param.requires_grad:
                return
            # Through DeepSpeed's setter: with offload the local partition may live elsewhere.
            part = param.ds_tensor.numel()
            start = part * param._z3_optimizer._get_param_partition_rank(param)
            local = torch.zeros(part, dtype=torch.float32)
            n = max(0, min(part, flat.numel() - start))
            local[:n] = flat[start:start + n]
            device = param.ds_tensor.device
            param._z3_optimizer.set_local_hp_param(local.to(device), param, key)
            return
        piece = self.piece(param, writer=False)
        if piece is None:
            return
        start, n, get = piece
        target = get(key)
        with torch.no_grad():
            target.copy_(flat[start:start + n].to(device=target.device, dtype=target.dtype))


def optimizer_step(engine) -> int:
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def save_universal(engine, module: torch.nn.Module, pstate, cfg: ModelConfig, tag_dir: str,
                   optimizer: bool = True) -> None:
    """Write this rank's part of ``tag_dir/universal`` (every rank calls it; no collective: the
    caller knows when every rank is done, ``checkpoint/training.py`` writes ``tag_dir`` as a
    temporary directory that is renamed into place once all are). ``optimizer`` False: the master
    weights only (``--no-save-optim``)."""
    out_dir = os.path.join(tag_dir, UNIVERSAL_DIR)
    os.makedirs(out_dir, exist_ok=True)
    masters = MasterState(engine, pstate)
    tensors, layout = {}, {}
    for name, param in module.named_parameters():
        if name in layout or not counted_here(name, param, pstate):
            continue
        piece = masters.piece(param)
        if piece is None:
            continue
        start, n, get = piece
        for key in (None, *(moment_keys(engine) if optimizer else ())):
            # Views of the optimizer's own storage: safetensors copies each into the file buffer.
            value = get(key).detach()
            value = value if value.dtype == torch.float32 else value.float()
            tensors[name if key is None else f"{name}::{key}"] = value.cpu().contiguous()
        layout[name] = {**layout_of(param), "shape": list(getattr(param, "ds_shape", param.shape)),
                        "start": start, "numel": n}
    step = optimizer_step(engine)
    if tensors:
        path = os.path.join(out_dir, f"tp{pstate.tp_rank:02d}_pp{pstate.pp_rank:02d}"
                                     f"_dp{pstate.dp_rank:03d}.safetensors")
        save_safetensors(tensors, path, metadata={"layout": json.dumps(layout)})
    del tensors
    if dist.get_rank() == 0:
        meta = {"tensor_model_parallel_size": pstate.tp_size,
                "pipeline_model_parallel_size": pstate.pp_size,
                "data_parallel_size": pstate.dp_size,
                "optimizer_step": step, "model_config": cfg.to_dict()}
        with open(os.path.join(out_dir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)


# -- reading a universal directory -----------------------------------------------------------
class UniversalReader:
    """Full tensors of a universal checkpoint, assembled from its TP shards and their
    data-parallel pieces on demand (one tensor in memory at a time)."""

    def __init__(self, tag_dir: str):
        self.dir = os.path.join(tag_dir, UNIVERSAL_DIR)
        meta_path = os.path.join(self.dir, "meta.json")
        if not os.path.isfile(meta_path):
            raise ConfigError(f"{tag_dir}: no layout-independent state ({UNIVERSAL_DIR}/meta.json); "
                              "it can only be resumed in the layout that wrote it")
        with open(meta_path) as f:
            self.meta = json.load(f)
        self.cfg = ModelConfig.from_dict(self.meta["model_config"])
        self.tp = self.meta["tensor_model_parallel_size"]
        self.step = self.meta["optimizer_step"]
        self.layout: Dict[str, dict] = {}  # name -> partition_dim, vocab_padded
        self.shape: Dict[Tuple[str, int], List[int]] = {}  # (name, tp rank) -> TP shard shape
        # stored key -> tp rank -> [(start, numel, file)]
        self.pieces: Dict[str, Dict[int, List[Tuple[int, int, str]]]] = {}
        self._files: Dict[str, object] = {}
        paths = sorted(p for p in glob.glob(os.path.join(self.dir, "*.safetensors"))
                       if _FILE.match(os.path.basename(p)))
        if not paths:
            raise ConfigError(f"{self.dir}: no shard files")
        for path in paths:
            tp_rank = int(_FILE.match(os.path.basename(path)).group(1))
            f = self._open(path)
            layout = json.loads(f.metadata()["layout"])
            for name, info in layout.items():
                self.layout[name] = {k: info[k] for k in ("partition_dim", "vocab_padded")}
            for key in f.keys():
                name = key.split("::")[0]
                info = layout[name]
                if "start" in info:
                    start, n, shape = info["start"], info["numel"], info["shape"]
                else:  # a whole TP shard
                    shape = list(f.get_slice(key).get_shape())
                    start, n = 0, int(torch.Size(shape).numel())
                self.shape[(name, tp_rank)] = shape
                self.pieces.setdefault(key, {}).setdefault(tp_rank, []).append((start, n, path))

    def _open(self, path: str):
        if path not in self._files:
            self._files[path] = safe_open(path, framework="pt")
        return self._files[path]

    def names(self) -> List[str]:
        return [k for k in self.pieces if "::" not in k]

    def moments(self) -> List[str]:
        """The optimizer states saved beside the weights (none: saved with --no-save-optim)."""
        return sorted({k.split("::", 1)[1] for k in self.pieces if "::" in k})

    def _tp_shard(self, stored: str, name: str, tp_rank: int) -> torch.Tensor:
        pieces = sorted(self.pieces[stored][tp_rank])
        shape = self.shape[(name, tp_rank)]
        total = int(torch.Size(shape).numel())
        if len(pieces) == 1 and pieces[0][:2] == (0, total):
            return self._open(pieces[0][2]).get_tensor(stored).reshape(shape)
        out = torch.empty(total, dtype=torch.float32)
        covered = 0
        for start, n, path in pieces:
            if start != covered:
                raise ConfigError(f"{self.dir}: {stored} (TP rank {tp_rank}) has a gap or overlap "
                                  f"at element {covered} (a data-parallel rank's file is missing?)")
            out[start:start + n] = self._open(path).get_tensor(stored)
            covered += n
        if covered != total:
            raise ConfigError(f"{self.dir}: {stored} (TP rank {tp_rank}) covers {covered} of "
                              f"{total} elements (a data-parallel rank's file is missing?)")
        return out.view(shape)

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
        """The full tensor (vocabulary rows unpadded) of ``name`` or of its moment ``key``."""
        stored = name if key is None else f"{name}::{key}"
        if stored not in self.pieces:
            raise ConfigError(f"{self.dir}: no tensor {stored}")
        info = self.layout[name]
        shards = self.pieces[stored]
        if info["partition_dim"] is None:
            return self._tp_shard(stored, name, min(shards))
        if sorted(shards) != list(range(self.tp)):
            raise ConfigError(f"{self.dir}: {stored} has shards {sorted(shards)}, expected {self.tp}")
        value = torch.cat([self._tp_shard(stored, name, r) for r in range(self.tp)],
                          dim=info["partition_dim"])
        return value[: self.cfg.vocab_size] if info["vocab_padded"] else value


# -- writing master weights and moments into an engine ----------------------------------------
def _set_lp(param, value: torch.Tensor) -> None:
    """The module's own (possibly low-precision, possibly ZeRO-3-partitioned) copy."""
    with torch.no_grad():
        if hasattr(param, "ds_tensor"):
            # ZeRO-3: this rank's partition of the flattened tensor (zero-padded at the end) ...
            part = param.ds_tensor
            flat = value.flatten().to(part.dtype)
            start = part.numel() * dist.get_rank(param.ds_process_group)
            n = max(0, min(part.numel(), flat.numel() - start))
            part.data.zero_()
            part.data[:n].copy_(flat[start:start + n].to(part.device))
            # ... and the gathered copy that persistent (small) parameters keep between steps.
            if param.data.numel() == value.numel():
                param.data.copy_(value.view(param.data.shape).to(device=param.device, dtype=param.dtype))
        else:
            param.data.copy_(value.to(device=param.device, dtype=param.dtype))


def load_universal(engine, module: torch.nn.Module, pstate, cfg: ModelConfig, tag_dir: str,
                   with_optimizer: bool) -> int:
    """Load weights and, ``with_optimizer``, Adam moments of any source layout into this engine.
    Returns the step.

    ``with_optimizer`` needs the engine's optimizer state to exist already, which DeepSpeed creates
    at its first step: the caller runs one at learning rate 0 (any batch; the weights do not move),
    and that state is overwritten here. Without, the weights only are loaded (fresh optimizer).
    """
    reader = UniversalReader(tag_dir)
    check_same_model(reader.meta["model_config"], cfg.to_dict(), tag_dir)
    if with_optimizer:
        if not _base_optimizer(engine).state:
            raise ConfigError(f"--load {tag_dir}: DeepSpeed created no optimizer state in the "
                              "warm-up step (fp16 overflow?); resume in the saving layout, or pass "
                              "--no-load-optim")
    masters = MasterState(engine, pstate)  # also links ZeRO's per-parameter views to the state

    for name, param in module.named_parameters():
        weight = cut_for(reader.full(name), param, pstate.tp_rank, pstate.tp_size)
        _set_lp(param, weight)
        # The fp32 master copy too: the next step starts from it, not from the module's weights.
        masters.set_full(param, weight, None)
        if not with_optimizer:
            continue
        for key in moment_keys(engine):
            moment = cut_for(reader.full(name, key), param, pstate.tp_rank, pstate.tp_size)
            masters.set_full(param, moment, key)
    for state in _base_optimizer(engine).state.values() if with_optimizer else ():
        if "step" in state:
            state["step"] = (torch.tensor(float(reader.step)) if torch.is_tensor(state["step"])
                             else reader.step)
    dist.barrier()
    return reader.step


# Fields a checkpoint need not match: dropout may change between runs, and the init scheme only
# decided the weights the checkpoint replaces.
FREE_MODEL_FIELDS = ("hidden_dropout", "attention_dropout", "init_scheme", "init_method_std")


def check_same_model(saved: Dict, current: Dict, load_dir: str) -> None:
    """ConfigError naming every difference between a checkpoint's model config and this run's that
    the checkpoint's weights cannot follow. The one rule of every load (DeepSpeed's files or this
    module's, any layout): both configs are read through ``ModelConfig.from_dict``, so a field the
    checkpoint predates counts as the value it had then."""
    try:
        a = ModelConfig.from_dict(saved).to_dict()
    except ConfigError as e:
        raise ConfigError(f"--load {load_dir}: {e} (a checkpoint of a newer version?)") from None
    b = ModelConfig.from_dict(current).to_dict()
    diffs = [f"{k}: checkpoint {a[k]!r} vs this run {b[k]!r}"
             for k in b if k not in FREE_MODEL_FIELDS and a[k] != b[k]]
    if diffs:
        hint = ""
        if a["scale_embedding"] is False and b["scale_embedding"]:
            hint = " (add --no-scale-embedding to continue a model trained without the sqrt(d) scale)"
        raise ConfigError(f"--load {load_dir}: checkpoint does not match this run: "
                          + "; ".join(diffs) + hint)
