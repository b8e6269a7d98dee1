"""Layout-independent ("universal") training state: fp32 weights and Adam moments by parameter name.

DeepSpeed's own checkpoint files are tied to the layout that wrote them (TP degree, pipeline stages,
ZeRO partitions). Next to them every save writes ``TAG/universal/``:

    meta.json                      source layout, model config, optimizer step, per-parameter layout
    tp{T:02d}_pp{P:02d}.safetensors   written by data-parallel rank 0 of each (TP, PP) coordinate:
                                   ``NAME`` (fp32 master weight), ``NAME::exp_avg``, ``NAME::exp_avg_sq``
                                   for the parameters that coordinate owns, as its TP shard

Names are the canonical ones of the plain GPT model (``layers.3.mlp.fc1.weight``), whatever the
pipeline layout. Replicated parameters are written by TP rank 0 only; the tied word embedding by
the first pipeline stage only. Reading back reassembles each full tensor and cuts it for the
reader's TP rank, so a run can resume into any (TP, PP, ZeRO stage) with its optimizer state.

The master weights and moments are read and written through DeepSpeed's ``safe_get_full_*`` /
``safe_set_full_*`` API (ZeRO 1-3, bf16) or the torch optimizer's own state (no ZeRO, fp32).
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_normformer.config import ConfigError, ModelConfig

UNIVERSAL_DIR = "universal"
MOMENTS = ("exp_avg", "exp_avg_sq")
_PIPE_INDEX = re.compile(r"^(\d+)\.(.*)$")


# -- names ----------------------------------------------------------------------------------
def canonical_name(name: str, cfg: ModelConfig) -> str:
    """The plain-model name (``GPTModel``'s or ``BertModel``'s) of a parameter of the plain or the
    pipeline model (``model/gpt_pipeline.py``, ``model/bert_pipeline.py``)."""
    if name.startswith("tied_modules."):
        # tied_modules.<key>.<path inside the embedding>
        return "embedding." + name.split(".", 2)[2]
    m = _PIPE_INDEX.match(name)
    if not m:
        return name
    index, rest = int(m.group(1)), m.group(2)
    if index == 0:
        return "embedding." + rest
    if index <= cfg.num_layers:
        return f"layers.{index - 1}.{rest}"
    if cfg.bidirectional:  # final_layernorm.*, then the LM head's transform and output bias
        return rest if index == cfg.num_layers + 1 else "lm_head." + rest
    return "head." + rest  # final_layernorm.*, then the untied output's weight


def _owner(canonical: str, param, pstate) -> bool:
    """Whether this rank writes ``canonical`` (one writer per distinct tensor shard)."""
    if pstate.dp_rank != 0:
        return False
    if canonical.startswith("embedding.") and not pstate.is_first_stage:
        return False  # the last stage's copy of the tied embedding
    return pstate.tp_rank == 0 or getattr(param, "tensor_model_parallel", False)


# -- reading master weights and moments out of an engine --------------------------------------
def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _is_zero_or_mixed(param) -> bool:
    return hasattr(param, "ds_id") or getattr(param, "_hp_mapping", None) is not None


def _get_master(engine, param, key: Optional[str]) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if _is_zero_or_mixed(param):
        value = (safe_get_full_fp32_param(param) if key is None
                 else safe_get_full_optimizer_state(param, key))
    else:
        state = _base_optimizer(engine).state.get(param, {})
        value = param.detach() if key is None else state.get(key)
        if value is None:
            value = torch.zeros_like(param)
    return value.detach().float().cpu().reshape(getattr(param, "ds_shape", param.shape))


def _link_optimizer_fragments(engine) -> None:
    """Point ZeRO-1/2's per-parameter views at the current optimizer state.

    DeepSpeed links them lazily, and not on every path (e.g. the pipeline engine at ZeRO-1).
    """
    opt = engine.optimizer
    if not (hasattr(opt, "bit16_groups") and hasattr(opt, "single_partition_of_fp32_groups")):
        return
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    for group, flat in zip(opt.bit16_groups, opt.single_partition_of_fp32_groups):
        if flat in opt.optimizer.state:
            lazy_init_hp_params_optimizer_state(group, flat, opt.optimizer.state)


def optimizer_step(engine) -> int:
    for state in _base_optimizer(engine).state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def save_universal(engine, module: torch.nn.Module, pstate, cfg: ModelConfig, tag_dir: str) -> None:
    """Write ``tag_dir/universal`` (collective: every rank calls it)."""
    from safetensors.torch import save_file

    out_dir = os.path.join(tag_dir, UNIVERSAL_DIR)
    os.makedirs(out_dir, exist_ok=True)
    _link_optimizer_fragments(engine)
    tensors, layout = {}, {}
    for name, param in module.named_parameters():
        canonical = canonical_name(name, cfg)
        # The safe_get calls are collectives over data parallelism: every rank, every parameter.
        values = {key: _get_master(engine, param, key) for key in (None, *MOMENTS)}
        if not _owner(canonical, param, pstate) or canonical in tensors:
            continue
        tensors[canonical] = values[None].contiguous()
        for key in MOMENTS:
            tensors[f"{canonical}::{key}"] = values[key].contiguous()
        layout[canonical] = {
            "partition_dim": param.partition_dim if getattr(param, "tensor_model_parallel", False) else None,
            "vocab_padded": bool(getattr(param, "vocab_padded", False)),
        }
    step = optimizer_step(engine)
    if tensors:
        path = os.path.join(out_dir, f"tp{pstate.tp_rank:02d}_pp{pstate.pp_rank:02d}.safetensors")
        save_file(tensors, path + ".tmp", metadata={"layout": json.dumps(layout)})
        os.replace(path + ".tmp", path)
    if dist.get_rank() == 0:
        meta = {"tensor_model_parallel_size": pstate.tp_size,
                "pipeline_model_parallel_size": pstate.pp_size,
                "optimizer_step": step, "model_config": cfg.to_dict()}
        with open(os.path.join(out_dir, "meta.json.tmp"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(out_dir, "meta.json.tmp"), os.path.join(out_dir, "meta.json"))
    dist.barrier()


# -- reading a universal directory -----------------------------------------------------------
class UniversalReader:
    """Full tensors of a universal checkpoint, assembled from its TP shards on demand."""

    def __init__(self, tag_dir: str):
        from safetensors import safe_open

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
        self.layout: Dict[str, dict] = {}
        self.where: Dict[str, Dict[int, str]] = {}  # name -> {tp rank: file}
        files = sorted(glob.glob(os.path.join(self.dir, "tp*_pp*.safetensors")))
        if not files:
            raise ConfigError(f"{self.dir}: no shard files")
        for path in files:
            tp_rank = int(os.path.basename(path)[2:4])
            with safe_open(path, framework="pt") as f:
                self.layout.update(json.loads(f.metadata()["layout"]))
                for key in f.keys():
                    self.where.setdefault(key, {})[tp_rank] = path

    def names(self) -> List[str]:
        return [k for k in self.where if "::" not in k]

    def full(self, name: str, key: Optional[str] = None) -> torch.Tensor:
        """The full tensor (vocabulary rows unpadded) of ``name`` or of its moment ``key``."""
        from safetensors import safe_open

        stored = name if key is None else f"{name}::{key}"
        if stored not in self.where:
            raise ConfigError(f"{self.dir}: no tensor {stored}")
        info = self.layout[name]
        shards = self.where[stored]
        if info["partition_dim"] is None:
            with safe_open(shards[min(shards)], framework="pt") as f:
                return f.get_tensor(stored)
        if sorted(shards) != list(range(self.tp)):
            raise ConfigError(f"{self.dir}: {stored} has shards {sorted(shards)}, expected {self.tp}")
        parts = []
        for rank in range(self.tp):
            with safe_open(shards[rank], framework="pt") as f:
                parts.append(f.get_tensor(stored))
        value = torch.cat(parts, dim=info["partition_dim"])
        return value[: self.cfg.vocab_size] if info["vocab_padded"] else value


def shard_for(value: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full tensor, vocabulary re-padded to the parameter's size."""
    if not getattr(param, "tensor_model_parallel", False):
        return value
    dim = param.partition_dim
    if getattr(param, "vocab_padded", False):
        padded = getattr(param, "ds_shape", param.shape)[0] * tp_size
        pad = value.new_zeros((padded - value.shape[0],) + tuple(value.shape[1:]))
        value = torch.cat([value, pad])
    return value.chunk(tp_size, dim=dim)[tp_rank]


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


def _set_master(engine, param, value: torch.Tensor, key: Optional[str]) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if _is_zero_or_mixed(param):
        device = getattr(param, "ds_tensor", param).device
        value = value.to(device=device, dtype=torch.float32)
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
    elif key is not None:
        _base_optimizer(engine).state[param][key].copy_(value.to(param.device))


def load_universal(engine, module: torch.nn.Module, pstate, cfg: ModelConfig, tag_dir: str,
                   materialize_optimizer_state: Optional[Callable[[], None]]) -> int:
    """Load weights and Adam moments of any source layout into this engine. Returns the step.

    ``materialize_optimizer_state`` must run one optimizer step of the engine (any batch): it is
    called with every learning rate at 0, so weights do not move, and lets DeepSpeed create and link
    its optimizer state, which is then overwritten. None loads the weights only (fresh optimizer).
    """
    reader = UniversalReader(tag_dir)
    _check_same_model(reader.cfg, cfg, tag_dir)
    with_optimizer = materialize_optimizer_state is not None
    if with_optimizer:
        groups = engine.optimizer.param_groups
        saved_lrs = [g["lr"] for g in groups]
        for g in groups:
            g["lr"] = 0.0
        materialize_optimizer_state()
        for g, lr in zip(groups, saved_lrs):
            g["lr"] = lr
        _link_optimizer_fragments(engine)

    for name, param in module.named_parameters():
        canonical = canonical_name(name, cfg)
        weight = shard_for(reader.full(canonical), param, pstate.tp_rank, pstate.tp_size)
        _set_lp(param, weight)
        _set_master(engine, param, weight, None)
        if not with_optimizer:
            continue
        for key in MOMENTS:
            moment = shard_for(reader.full(canonical, key), param, pstate.tp_rank, pstate.tp_size)
            _set_master(engine, param, moment, key)
    for state in _base_optimizer(engine).state.values() if with_optimizer else ():
        if "step" in state:
            state["step"] = (torch.tensor(float(reader.step)) if torch.is_tensor(state["step"])
                             else reader.step)
    dist.barrier()
    return reader.step


def _check_same_model(saved: ModelConfig, current: ModelConfig, where: str) -> None:
    a, b = saved.to_dict(), current.to_dict()
    ignore = {"hidden_dropout", "attention_dropout"}
    diff = [f"{k}: checkpoint {a[k]!r} vs run {b[k]!r}" for k in a if k not in ignore and a[k] != b.get(k)]
    if diff:
        raise ConfigError(f"--load {where}: the model config does not match: " + "; ".join(diff))
