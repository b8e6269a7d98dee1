"""The DeepSpeed repairs (megatron_normformer/deepspeed_repairs.py) and their canaries.

A canary checks the raw DeepSpeed behaviour a repair compensates for, on DeepSpeed alone. It fails
the day DeepSpeed changes that behaviour: the repair named in its message is then removed, not
applied on top of a fix. The DeepSpeed internals the package builds on without repairing them
(``PipelineModule``'s private hooks, the optimizer fields ``checkpoint/universal.py`` reads) have
canaries too. Everything DeepSpeed is observed once, in one process (``observed``).
"""
import copy
import os
import re
import tempfile
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from megatron_normformer import deepspeed_repairs as repairs
from megatron_normformer.config import ConfigError
from megatron_normformer.testing import spawn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9}


class _TPRank1:
    """DeepSpeed's mpu protocol for a process that is TP rank 1 of a one-process world."""

    def __getattr__(self, name):
        if name.endswith("_rank"):
            return lambda: 1
        if name.endswith("_world_size"):
            return lambda: 1
        if name.endswith("_group"):
            return lambda: dist.group.WORLD
        raise AttributeError(name)


class _Weight(torch.nn.Module):
    """loss = 3 * sum(w): every gradient of w is 3 / (accumulation steps) unless scaled."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(4, dtype=dtype))

    def forward(self):
        return (self.w.float() * 3.0).sum()


def _engine(config, module=None):
    import deepspeed

    module = module or _Weight()
    engine, optimizer, _, _ = deepspeed.initialize(
        model=module, optimizer=torch.optim.AdamW(module.parameters(), lr=1e-3), config={**BASE, **config})
    return engine, optimizer, module


def _wrapper_observations():
    """ZeRO-0 16-bit wrappers, built directly: their initial step, their gradient norm."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    out = {"initial step": {}}
    for wrapper in (FP16_Optimizer, FP16_UnfusedOptimizer):
        inner = torch.optim.AdamW(_Weight(torch.bfloat16).parameters(), lr=1e-3)
        wrapper(inner, low_precision_dtype=torch.bfloat16)
        out["initial step"][wrapper.__name__] = [int(s["step"]) for s in inner.state.values()]
    # TP rank 1, a TP-sharded parameter: its gradient (norm 6) is left out of the clipping norm.
    module = _Weight(torch.bfloat16)
    module.w.tensor_model_parallel = True
    optimizer = FP16_UnfusedOptimizer(torch.optim.AdamW(module.parameters(), lr=0.0), mpu=_TPRank1(),
                                      low_precision_dtype=torch.bfloat16, clip_grad=1.0)
    module.w.grad = torch.full((4,), 3.0, dtype=torch.bfloat16)
    optimizer.step()
    out["TP rank 1 norm"] = optimizer._global_grad_norm
    # Static loss scale 128, gradients of true norm 1: the reported norm.
    module = _Weight(torch.bfloat16)
    optimizer = FP16_UnfusedOptimizer(torch.optim.AdamW(module.parameters(), lr=0.0), static_loss_scale=128.0,
                                      low_precision_dtype=torch.bfloat16)
    module.w.grad = torch.full((4,), 0.5 * 128, dtype=torch.bfloat16)
    optimizer.step()
    out["reported norm"] = optimizer._global_grad_norm
    return out


def _fp16_observations():
    """fp16 at ZeRO-0 (DeepSpeed's accelerator told the CPU has fp16: only backward is observed)."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 10}
    engine, optimizer, module = _engine({"gradient_accumulation_steps": 2, "zero_optimization": {"stage": 0},
                                         "fp16": fp16})

    def gradient(loss_of):
        module.w.grad = None
        engine.backward(loss_of(module()))
        return module.w.grad.float().tolist()

    return {"fp16 optimizer": type(optimizer).__name__, "loss scale": optimizer.loss_scale,
            "left unscaled": repairs.fp16_loss_left_unscaled(engine),
            "raw": gradient(lambda loss: loss),
            "repaired": gradient(lambda loss: repairs.fp16_scaled(loss, engine)),
            # a DeepSpeed that scales the loss itself (pull request 8393), under the repair
            "fixed and repaired": gradient(
                lambda loss: repairs.fp16_scaled(loss, engine) * optimizer.loss_scale)}


def _pipeline_observations():
    """PipelineModule's private hooks, and what its engine's last stage keeps after a batch."""
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    calls = []

    class Recording(PipelineModule):
        def _partition_layers(self, method="uniform"):
            calls.append("_partition_layers")
            return super()._partition_layers(method)

        def _build(self):
            calls.append("_build")
            return super()._build()

        def _is_checkpointable(self, funcs):
            calls.append("_is_checkpointable")
            return super()._is_checkpointable(funcs)

    def layers():
        torch.manual_seed(0)
        return [TiedLayerSpec("embedding", torch.nn.Linear, 4, 4, tied_weight_attr=["weight"]),
                torch.nn.Linear(4, 3)]

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits, labels)

    module = Recording(layers(), num_stages=1, loss_fn=loss_fn, activation_checkpoint_interval=1,
                       activation_checkpoint_func=lambda function, *inputs: function(*inputs))
    hooks = {"calls": calls, "registered": list(module._modules),
             "tied": (type(module.tied_modules).__name__, dict(module.tied_weight_attrs)),
             "bounds": (module._local_start, module._local_stop, len(module.forward_funcs)),
             "coordinates": module._topo.get_coord(module.global_rank).pipe,
             "set_bounds": callable(getattr(module, "_set_bounds", None))}
    engine, _, _ = _engine({"gradient_accumulation_steps": 2, "zero_optimization": {"stage": 0}}, module)
    hooks["calls"] = calls
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(2)]
    engine.train_batch(iter(batches))
    kept = {"outputs": [o is not None for o in engine.pipe_buffers["outputs"]],
            "loss graph": engine.loss.grad_fn is not None}
    repairs.release_last_stage_buffers(engine)
    engine.train_batch(iter(batches))
    released = {"outputs": [o is not None for o in engine.pipe_buffers["outputs"]],
                "loss graph": engine.loss.grad_fn is not None}
    return {"pipeline hooks": hooks, "last stage keeps": kept, "last stage repaired": released}


def _shm_observation():
    """Whether DeepSpeed's TorchBackend builds the shared-memory op when it is constructed."""
    import datetime
    import importlib

    from deepspeed.accelerator import get_accelerator

    module = importlib.import_module("deepspeed.comm.torch")
    calls = []
    with mock.patch.object(module, "build_shm_op", lambda: calls.append(1)):
        module.TorchBackend("gloo", datetime.timedelta(minutes=1), None)
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    return {"shm op built": len(calls), "shm builder": None if builder is None else builder.NAME}


def _linkage_observations():
    """ZeRO-1's per-parameter optimizer-state view after DeepSpeed's own checkpoint load."""
    from deepspeed.utils import safe_get_full_optimizer_state

    engine, _, module = _engine({"zero_optimization": {"stage": 1}})

    def step():
        engine.backward(module())
        engine.step()

    def moment():
        try:
            return safe_get_full_optimizer_state(module.w, "exp_avg").tolist()
        except (TypeError, ValueError) as e:
            return repr(e)

    step()
    after_step = moment()
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="t")
        engine.load_checkpoint(d, tag="t")
    step()
    after_load = moment()
    repairs.link_optimizer_state(engine)
    return {"moment after a step": after_step, "moment after a load and a step": after_load,
            "moment relinked": moment()}


def _universal_fields():
    """The fields checkpoint/universal.py reads the fp32 masters and moments from, per wrapper."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    def shapes(groups):
        return [[tuple(t.shape) for t in g] for g in groups]

    out = {}
    # bf16 at ZeRO-0, bf16 accumulation: FP16_UnfusedOptimizer, one fp32 copy per parameter.
    engine, opt, module = _engine({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True},
                                   "data_types": {"grad_accum_dtype": "bf16"}})
    engine.backward(module())
    engine.step()
    out["unfused"] = (type(opt).__name__, shapes(opt.fp16_groups) == shapes(opt.fp32_groups),
                      {t.dtype for g in opt.fp32_groups for t in g} == {torch.float32},
                      sorted(opt.optimizer.state[opt.fp32_groups[0][0]]))
    # The fused wrapper (GPU fused optimizers), built directly: one flat fp32 tensor per group.
    params = list(_Weight(torch.bfloat16).parameters())
    opt = FP16_Optimizer(torch.optim.AdamW(params, lr=1e-3), low_precision_dtype=torch.bfloat16)
    out["fused"] = (shapes(opt.fp16_groups), [tuple(t.shape) for t in opt.fp32_groups_flat],
                    hasattr(opt, "fp32_groups"))
    # ZeRO-1, and bf16 with fp32 accumulation (DeepSpeed's BF16 optimizer): _hp_mapping fragments.
    for name, config in (("zero1", {"zero_optimization": {"stage": 1}}),
                         ("bf16 optimizer", {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
                                             "data_types": {"grad_accum_dtype": "fp32"}})):
        engine, opt, module = _engine(config)
        engine.backward(module())
        engine.step()
        lp, hp = (("bit16_groups", "single_partition_of_fp32_groups") if hasattr(opt, "bit16_groups")
                  else ("bf16_groups", "fp32_groups_flat_partition"))
        repairs.link_optimizer_state(engine)
        mapping = module.w._hp_mapping
        out[name] = (type(opt).__name__, lp, hasattr(opt, hp), mapping.lp_fragment_address.start,
                     mapping.lp_fragment_address.numel, tuple(mapping.get_hp_fragment().shape),
                     tuple(mapping.get_hp_fragment("exp_avg").shape))
    # ZeRO-3: the partition of each parameter and its optimizer's accessors.
    engine, opt, module = _engine({"zero_optimization": {"stage": 3}})
    engine.backward(module())
    engine.step()
    p = module.w
    z3 = p._z3_optimizer
    local = z3.get_local_fp32_param(p, "exp_avg")
    z3.set_local_hp_param(local.clone(), p, "exp_avg")
    out["zero3"] = (type(opt).__name__, hasattr(p, "ds_id"), p.ds_numel, p.ds_tensor.numel(),
                    dist.get_rank(p.ds_process_group), z3._get_param_partition_rank(p),
                    tuple(z3.get_local_fp32_param(p).shape), tuple(local.shape))
    return out


def _observe():
    from megatron_normformer.parallel.state import init_deepspeed_comm

    shm = _shm_observation()  # before deepspeed.comm adopts the group
    init_deepspeed_comm()
    return {**shm, **_wrapper_observations(), **_fp16_observations(), **_pipeline_observations(),
            **_linkage_observations(), "universal": _universal_fields()}


@pytest.fixture(scope="module")
def observed():
    return spawn(_observe, 1)[0]


# -- the DeepSpeed series --------------------------------------------------------------------------
def test_deepspeed_is_pinned_to_the_checked_series():
    import deepspeed

    series = repairs.CHECKED_SERIES
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pins = re.findall(r'"deepspeed([^"]*)"', f.read())
    assert pins == [f">={series[0]}.{series[1]},<{series[0]}.{series[1] + 1}"]
    assert tuple(map(int, deepspeed.__version__.split(".")[:2])) == series, (
        f"DeepSpeed {deepspeed.__version__} is installed: run this file's canaries against it, then "
        "move CHECKED_SERIES and the pin")
    repairs.check_deepspeed_version()


def test_another_series_is_one_line_at_the_engine_build(monkeypatch):
    from megatron_normformer.training.engine import build_engine

    monkeypatch.delenv(repairs.ANY_DEEPSPEED_ENV, raising=False)
    monkeypatch.setattr(repairs.importlib.metadata, "version", lambda name: "0.20.1")
    with pytest.raises(ConfigError) as e:
        build_engine(None, None, {}, None)  # refused before the run is read
    assert str(e.value) == (
        "DeepSpeed 0.20.1 is installed, but this package's DeepSpeed repairs "
        "(megatron_normformer/deepspeed_repairs.py) were checked against 0.19.x only: "
        "pip install 'deepspeed==0.19.*', or set MEGATRON_NORMFORMER_ANY_DEEPSPEED=1 to try 0.20.1 "
        "(then run tests/test_deepspeed_repairs.py)")
    for version in ("0.18.9", "1.19.0", "unknown"):
        with pytest.raises(ConfigError, match=f"DeepSpeed {version} is installed"):
            repairs.check_deepspeed_version(version)
    repairs.check_deepspeed_version("0.19.0+cpu")
    monkeypatch.setenv(repairs.ANY_DEEPSPEED_ENV, "1")
    repairs.check_deepspeed_version("0.20.1")


# -- ZeRO-0's 16-bit wrappers ----------------------------------------------------------------------
def test_canary_zero0_wrappers_step_once_when_built(observed):
    assert observed["initial step"] == {"FP16_Optimizer": [1], "FP16_UnfusedOptimizer": [1]}, (
        "DeepSpeed's ZeRO-0 wrappers no longer step at construction: remove undo_initial_zero_step")


def test_canary_unfused_clipping_norm_drops_tp_rank_1(observed):
    assert observed["TP rank 1 norm"] == 0.0, (
        "FP16_UnfusedOptimizer's norm counts a TP rank > 0 gradient now: remove clip_by_the_true_norm "
        "if it counts replicated and tied gradients once")


def test_canary_unfused_reports_the_scaled_norm(observed):
    assert observed["reported norm"] == pytest.approx(128.0), (
        "FP16_UnfusedOptimizer reports an unscaled norm now (pull request 8588): revisit "
        "reports_true_grad_norm")


def test_canary_engine_backward_leaves_fp16_zero0_loss_unscaled(observed):
    assert observed["fp16 optimizer"] == "FP16_UnfusedOptimizer" and observed["left unscaled"]
    assert observed["raw"] == [1.5] * 4, (
        "engine.backward scales the fp16 loss at ZeRO-0 now (pull request 8393): remove "
        "fp16_loss_left_unscaled, fp16_scaled and Fp16ScaledLoss")


def test_fp16_loss_is_scaled_once_whoever_scales_it(observed):
    """The repair scales the backward pass by the loss scale where DeepSpeed did not, and leaves
    it alone where DeepSpeed did: never twice."""
    scaled = [1.5 * observed["loss scale"]] * 4
    assert observed["repaired"] == scaled
    assert observed["fixed and repaired"] == scaled


def test_fp16_scaled_decides_per_backward_pass():
    """Without DeepSpeed: 1 / steps arrives where the loss was not scaled, scale / steps where it was."""
    engine = SimpleNamespace(optimizer=SimpleNamespace(loss_scale=1024.0),
                             gradient_accumulation_steps=lambda: 4)
    w = torch.ones(3, requires_grad=True)
    for already in (1.0, 1024.0):
        w.grad = None
        loss = repairs.fp16_scaled((w * 2).sum(), engine)
        assert loss.item() == 6.0
        (loss / 4 * already).backward()
        assert w.grad.tolist() == [2 * 1024.0 / 4] * 3

    def loss_fn(x):
        return (x * 2).sum()

    loss_fn.reduction = "sum"
    wrapped = repairs.Fp16ScaledLoss(loss_fn, engine)
    assert wrapped.reduction == "sum" and copy.copy(wrapped).loss_fn is loss_fn
    w.grad = None
    (wrapped(w) / 4).backward()
    assert w.grad.tolist() == [2 * 1024.0 / 4] * 3


def test_canary_loss_scaler_gives_up_with_the_exception_step_py_recognises():
    """Not a repair, a reading of DeepSpeed: training/step.py's loss_scale_exhausted tells the fp16
    scaler giving up at the minimum scale by its bare Exception and message."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from megatron_normformer.training.step import loss_scale_exhausted

    scaler = DynamicLossScaler(init_scale=1, scale_window=1000, min_scale=1, delayed_shift=1,
                               consecutive_hysteresis=False)
    with pytest.raises(Exception) as e:
        scaler.update_scale(True)
    assert loss_scale_exhausted(e.value), f"DeepSpeed's scaler gives up differently now: {e.value!r}"


# -- the pipeline engine ---------------------------------------------------------------------------
def test_canary_last_stage_keeps_logits_and_loss_graph(observed):
    assert observed["last stage keeps"] == {"outputs": [True, True], "loss graph": True}, (
        "PipelineEngine's last stage frees its outputs or its loss's graph now: remove "
        "release_last_stage_buffers")
    assert observed["last stage repaired"] == {"outputs": [False, False], "loss graph": False}


def test_canary_pipeline_module_builds_through_the_hooks_model_pipeline_overrides(observed):
    hooks = observed["pipeline hooks"]
    assert hooks["calls"] == ["_partition_layers", "_build"] + ["_is_checkpointable"] * 2, hooks["calls"]
    assert "tied_modules" in hooks["registered"], (
        "DeepSpeed no longer registers tied_modules as a submodule: see model/pipeline.py")
    assert hooks["tied"] == ("ModuleDict", {"embedding": ["weight"]})
    assert hooks["bounds"] == (0, 2, 2) and hooks["coordinates"] == 0 and hooks["set_bounds"]


# -- deepspeed.comm, ZeRO's views, the launcher ------------------------------------------------------
def test_canary_torch_backend_builds_the_shm_op(observed):
    assert observed["shm op built"] == 1 and observed["shm builder"] == "deepspeed_shm_comm", (
        "TorchBackend no longer builds the shared-memory op at construction: remove skip_shm_comm_op")


def test_canary_zero_optimizer_state_views_lost_after_a_load(observed):
    assert observed["moment after a step"] == [pytest.approx(0.3)] * 4
    assert re.search("not iterable|not found", observed["moment after a load and a step"]), (
        "ZeRO relinks its optimizer-state views after a checkpoint load now: remove link_optimizer_state")
    assert observed["moment relinked"] == [pytest.approx(0.9 * 0.3 + 0.1 * 3)] * 4  # Adam's second step


def test_canary_universal_checkpoint_reads_these_optimizer_fields(observed):
    u = observed["universal"]
    assert u["unfused"] == ("FP16_UnfusedOptimizer", True, True, ["exp_avg", "exp_avg_sq", "step"])
    assert u["fused"] == ([[(4,)]], [(4,)], False)
    assert u["zero1"] == ("DeepSpeedZeroOptimizer", "bit16_groups", True, 0, 4, (4,), (4,))
    assert u["bf16 optimizer"] == ("BF16_Optimizer", "bf16_groups", True, 0, 4, (4,), (4,))
    assert u["zero3"] == ("DeepSpeedZeroOptimizer_Stage3", True, 4, 4, 0, 0, (4,), (4,))


def test_canary_single_node_runner_forwards_no_signal(monkeypatch):
    import subprocess

    from deepspeed.launcher import runner

    launched, handled = [], []
    real = subprocess.Popen

    def popen(cmd, *args, **kwargs):
        if "deepspeed.launcher.launch" not in cmd:
            return real(cmd, *args, **kwargs)
        launched.append(cmd)
        return SimpleNamespace(returncode=0, wait=lambda: 0)

    monkeypatch.setattr(runner.subprocess, "Popen", popen)
    monkeypatch.setattr(runner.signal, "signal", lambda sig, handler: handled.append(sig))
    runner.main(["--num_gpus", "1", "train.py"])
    assert launched and launched[0][1:4] == ["-u", "-m", "deepspeed.launcher.launch"]
    assert handled == [], "the single-node deepspeed runner handles signals now: remove deepspeed_runner"


def test_deepspeed_runner_is_found_from_the_process_tree():
    launch, runner = os.getppid(), 4242
    cmdlines = {launch: "python -u -m deepspeed.launcher.launch --world_info=X train.py",
                runner: "python /usr/bin/deepspeed train.py"}
    parents = {launch: runner}
    assert repairs.deepspeed_runner(lambda pid: cmdlines.get(pid, ""), parents.get) == (launch, runner)
    assert repairs.deepspeed_runner(lambda pid: "torchrun train.py", parents.get) is None
