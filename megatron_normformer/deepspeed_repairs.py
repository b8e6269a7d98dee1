"""Every place this package works around DeepSpeed, in one module.

Each repair is a small function whose docstring says what DeepSpeed does, the upstream issue or
pull request it works around, and what would make it unnecessary. ``tests/test_deepspeed_repairs.py``
holds a canary per repair: it checks the raw DeepSpeed behaviour the repair compensates for, so the
day DeepSpeed changes that behaviour the canary fails and the repair is removed rather than applied
on top of a fix.

    check_deepspeed_version     the DeepSpeed series the repairs were checked against (0.19)
    undo_initial_zero_step      ZeRO-0 16-bit wrappers: the zero-gradient step taken when built
    clip_by_the_true_norm       FP16_UnfusedOptimizer's clipping norm: no TP rank > 0 gradients,
                                a pipeline's tied embedding twice
    reports_true_grad_norm      ... and the norm it reports: that one, loss-scaled
    fp16_loss_left_unscaled     fp16 without ZeRO: engine.backward leaves unscaled the loss whose
    fp16_scaled, Fp16ScaledLoss gradients the wrapper's step unscales
    release_last_stage_buffers  PipelineEngine's last stage keeps its logits and its loss's graph
    skip_shm_comm_op            deepspeed.comm JIT-builds a shared-memory op training never uses
    link_optimizer_state        ZeRO-1/2's per-parameter optimizer-state views, lost by a load
    deepspeed_runner            the single-node ``deepspeed`` runner forwards no signal

DeepSpeed internals the package builds on without repairing anything have canaries too: the
private hooks ``model/pipeline.py`` overrides in ``PipelineModule`` (``_partition_layers``,
``_build``, ``_is_checkpointable``, the ``tied_modules`` registration) and the optimizer fields
``checkpoint/universal.py`` reads the fp32 masters from.

Only the standard library and ``config`` are imported here: the entry scripts hand
``deepspeed_runner`` to ``runtime/signals.install`` before torch loads. torch and DeepSpeed are imported by the functions that
need them.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
from typing import Callable, Optional, Tuple

from megatron_normformer.config import ConfigError

CHECKED_SERIES = (0, 19)
"""The DeepSpeed release series (major, minor) every repair here was checked against; pyproject.toml
pins deepspeed to it."""
ANY_DEEPSPEED_ENV = "MEGATRON_NORMFORMER_ANY_DEEPSPEED"
"""Set to 1 to run with another DeepSpeed series anyway (then run tests/test_deepspeed_repairs.py:
a failing canary names a repair that no longer applies)."""


def check_deepspeed_version(installed: Optional[str] = None) -> None:
    """ConfigError, in one line, unless the installed DeepSpeed (``installed``: its version string)
    is of ``CHECKED_SERIES`` or ``ANY_DEEPSPEED_ENV`` is set to 1."""
    installed = installed or importlib.metadata.version("deepspeed")
    match = re.match(r"(\d+)\.(\d+)", installed)
    checked = match is not None and tuple(map(int, match.groups())) == CHECKED_SERIES
    if checked or os.environ.get(ANY_DEEPSPEED_ENV) == "1":
        return
    series = ".".join(map(str, CHECKED_SERIES))
    raise ConfigError(f"DeepSpeed {installed} is installed, but this package's DeepSpeed repairs "
                      f"(megatron_normformer/deepspeed_repairs.py) were checked against {series}.x "
                      f"only: pip install 'deepspeed=={series}.*', or set {ANY_DEEPSPEED_ENV}=1 to "
                      f"try {installed} (then run tests/test_deepspeed_repairs.py)")


# -- DeepSpeed's ZeRO-0 16-bit wrappers ---------------------------------------------------------

def undo_initial_zero_step(optimizer) -> None:
    """Undo the optimizer step DeepSpeed's ZeRO-0 fp16/bf16 wrappers take when they are built.

    ``FP16_Optimizer`` and ``FP16_UnfusedOptimizer`` create the inner optimizer's state by stepping
    it once on zero gradients (``initialize_optimizer_states`` in ``deepspeed/runtime/fp16/
    fused_optimizer.py`` and ``unfused_optimizer.py``): Adam's step count starts at 1, so the first
    real update is about 0.74 x Adam's first, and the fp32 masters are weight-decayed once. Undone:
    the masters copied back from the 16-bit weights they were cloned from, the state emptied (AdamW
    builds it again at the first real step). ZeRO 1-3 build their state lazily instead, as
    deepspeedai/DeepSpeed pull request 5104 proposed for them. Upstream: no issue found for these
    wrappers. Unneeded once they build their state without stepping (the canary sees the inner
    optimizer's step count at 0 after construction).
    """
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        for masters, weights in zip(optimizer.fp32_groups, optimizer.fp16_groups):
            for master, weight in zip(masters, weights):
                master.data.copy_(weight.data)
    elif isinstance(optimizer, FP16_Optimizer):
        for master, weights in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups_flat):
            master.data.copy_(weights)
    else:
        return
    optimizer.optimizer.state.clear()


def clip_by_the_true_norm(optimizer, true_norm: Callable[[], float]) -> None:
    """Make ``FP16_UnfusedOptimizer`` (16-bit at ZeRO-0 with a torch optimizer) clip by
    ``true_norm()``, the global gradient norm loss-scaled as it expects.

    Its ``step`` clips by ``deepspeed.runtime.utils.get_weight_norm`` of the gradient tensors,
    which skips on TP ranks > 0 every tensor without a ``tensor_model_parallel`` / ``model_parallel``
    attribute, and skips pipeline-replicated tensors by ``ds_pipe_replicated``: attributes the
    parameters carry and their gradients do not. So every gradient of the TP ranks > 0 is left out
    and a pipeline's tied embedding is counted on both stages. Upstream: no issue found (pull
    request 8613, open, fixes another gap of the same norm, expert gradients). Unneeded once that
    norm reads the parameters' attributes (the canary sees a TP rank 1 gradient counted).
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if not isinstance(optimizer, FP16_UnfusedOptimizer) or optimizer.clip_grad <= 0:
        return
    unscale_and_clip = optimizer.unscale_and_clip_grads

    def unscale_and_clip_grads(total_norm, apply_scale=True):
        return unscale_and_clip(true_norm(), apply_scale)

    optimizer.unscale_and_clip_grads = unscale_and_clip_grads


def reports_true_grad_norm(optimizer) -> bool:
    """Whether ``engine.get_global_grad_norm()`` is the true norm with this DeepSpeed optimizer.

    ``FP16_UnfusedOptimizer`` reports the norm it clips by: still multiplied by the loss scale
    (deepspeedai/DeepSpeed pull request 8588, open) and wrong like that one
    (``clip_by_the_true_norm``), so the loop computes its own there. Unneeded once both are fixed
    (the canaries see an unscaled norm, and TP rank 1's gradients in it).
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return not isinstance(optimizer, FP16_UnfusedOptimizer)


def fp16_loss_left_unscaled(engine) -> bool:
    """Whether ``engine.backward`` leaves this engine's fp16 loss unscaled although the optimizer's
    ``step`` divides the gradients by the loss scale.

    DeepSpeed multiplies the loss by the scale in ``engine.backward`` only for its ZeRO optimizers
    (``deepspeed/runtime/engine.py``, ``DeepSpeedEngine.backward``); fp16 at ZeRO-0 runs
    ``FP16_Optimizer`` / ``FP16_UnfusedOptimizer``, whose ``step`` unscales all the same. Left
    alone, fp16 at ZeRO-0 trains with gradients 2^32 times too small (Megatron's initial scale) and
    never overflows. Upstream: deepspeedai/DeepSpeed pull request 8393 (open). Where this is True
    the loss goes through ``fp16_scaled`` (pipelined: ``Fp16ScaledLoss``), which scales only a
    backward pass DeepSpeed has not scaled, so a DeepSpeed with that fix cannot scale it twice;
    the canary fails on that DeepSpeed, and this repair is then removed.
    """
    from deepspeed.runtime.base_optimizer import ZeROOptimizer

    return bool(engine.fp16_enabled()) and not isinstance(engine.optimizer, ZeROOptimizer)


def fp16_scaled(loss, engine):
    """``loss`` (same value) whose backward pass is multiplied by the fp16 optimizer's current loss
    scale where DeepSpeed's own backward pass did not scale it.

    ``engine.backward`` starts the backward pass of the loss it is given from 1 / (gradient
    accumulation steps), and from scale / steps where it has scaled the loss itself: what arrives
    here says which, per backward pass, without a device synchronisation."""
    import torch

    scale, steps = float(engine.optimizer.loss_scale), engine.gradient_accumulation_steps()

    def scale_if_unscaled(grad):
        sent = grad * steps
        return torch.where((sent - 1).abs() <= (sent - scale).abs(), grad * scale, grad)

    out = loss.clone()
    out.register_hook(scale_if_unscaled)
    return out


class Fp16ScaledLoss:
    """A pipeline's loss function through ``fp16_scaled`` (the pipeline engine calls
    ``engine.backward`` on the loss itself); other attributes pass through."""

    def __init__(self, loss_fn: Callable, engine):
        self.loss_fn, self.engine = loss_fn, engine

    def __call__(self, *args):
        return fp16_scaled(self.loss_fn(*args), self.engine)

    def __getattr__(self, name):  # only for what the instance itself lacks
        if name == "loss_fn":
            raise AttributeError(name)
        return getattr(self.loss_fn, name)


# -- DeepSpeed's pipeline engine ------------------------------------------------------------------

def release_last_stage_buffers(engine) -> None:
    """Free what DeepSpeed's PipelineEngine keeps alive on the last stage after it is last needed.

    The engine keeps each micro-batch's forward output in a pipe buffer (``pipe_buffers
    ["outputs"]``) for its backward pass and frees it at the end of that backward, except on the
    last stage, whose backward pass returns before it gets there (``deepspeed/runtime/pipe/
    engine.py``, ``_exec_backward_pass``). There the output is the logits [micro batch, seq, padded
    vocab / TP], which nothing reads once the loss has been computed from them (the cross entropy
    keeps its own softmax, the output projection its inputs, the last stage sends nothing on): each
    pipe buffer (two at least) kept one micro-batch's logits through the rest of the iteration and
    into the next, up to two logits tensors above the cross entropy's own (0.8 GiB each at micro
    batch 4, seq 2048, GPT-2's vocabulary, bf16). The reference is dropped right after each forward
    pass; ``eval_batch(return_logits=True)`` keeps its own (``engine.outputs``).

    The engine's ``loss`` also keeps its micro-batch's autograd graph after the backward pass,
    until the next forward replaces it (through the optimizer step, into the next iteration): its
    nodes hold no saved tensors any more, but the one accumulating into the received activations
    (a leaf) holds that tensor, and with it its gradient, after both have been sent. The loss is
    detached once its backward pass has run.

    Upstream: no issue found (issue 3900, open, is about the same single ``loss`` of the last
    stage). Unneeded once the last stage frees both itself (the canary sees them freed).
    """
    import torch
    from deepspeed.runtime.pipe import schedule

    if not engine.is_last_stage():
        return
    instructions = type(engine)._INSTRUCTION_MAP
    forward, backward = instructions[schedule.ForwardPass], instructions[schedule.BackwardPass]

    def forward_then_release(self, buffer_id):
        forward(self, buffer_id)
        self.pipe_buffers["outputs"][buffer_id] = None

    def backward_then_release(self, buffer_id):
        backward(self, buffer_id)
        self.loss = self.loss.detach() if torch.is_tensor(self.loss) else [l.detach() for l in self.loss]

    # _exec_schedule looks each instruction up in this map: the instance's copy shadows the class's.
    engine._INSTRUCTION_MAP = {**instructions, schedule.ForwardPass: forward_then_release,
                               schedule.BackwardPass: backward_then_release}


# -- deepspeed.comm -------------------------------------------------------------------------------

def skip_shm_comm_op() -> None:
    """Keep ``deepspeed.comm`` from building or loading its shared-memory comm op.

    On a CPU, DeepSpeed's ``TorchBackend`` JIT-compiles that op (``deepspeed_shm_comm``, about 2
    minutes on 2 cores) when a process first initialises ``deepspeed.comm`` (``build_shm_op`` in
    ``deepspeed/comm/torch.py``), under a file lock in ``~/.cache/torch_extensions`` that an
    interrupted build leaves behind, blocking every later launch. It serves only
    ``inference_all_reduce`` (DeepSpeed's inference tensor parallelism), which training never
    calls: ZeRO's collectives and this package's go to torch.distributed. Call before
    ``deepspeed.init_distributed``. Upstream: deepspeedai/DeepSpeed pull request 5391 (merged) added
    the op to ``TorchBackend``; issue 7625 (open) asks for a way to choose the plain all-reduce.
    Unneeded once the op is built on first use, or can be declined (the canary sees
    ``TorchBackend`` build it at construction).
    """
    # By name: the attribute deepspeed.comm.torch is the torch package (a star import).
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


# -- ZeRO-1/2's per-parameter views ---------------------------------------------------------------

def link_optimizer_state(engine) -> None:
    """Point ZeRO-1/2's and the BF16 optimizer's per-parameter views (``param._hp_mapping``) at the
    optimizer state they hold now.

    DeepSpeed links them once, after the first step (``_lazy_init_hp_params_optimizer_state``,
    guarded by ``_hp_optimizer_states_linked``), and its checkpoint load rebuilds the views
    (``_link_all_hp_params``) without the state: from then on ``safe_get_full_optimizer_state``
    and this package's layout-independent checkpoint find no moments. Relinked on every use.
    Upstream: no issue found. Unneeded once a load relinks the state (the canary sees it missing
    after ``load_checkpoint`` and a step).
    """
    opt = engine.optimizer
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    for lp_name, hp_name in (("bit16_groups", "single_partition_of_fp32_groups"),
                             ("bf16_groups", "fp32_groups_flat_partition")):
        if hasattr(opt, lp_name) and hasattr(opt, hp_name):
            for group, flat in zip(getattr(opt, lp_name), getattr(opt, hp_name)):
                if flat in opt.optimizer.state:
                    lazy_init_hp_params_optimizer_state(group, flat, opt.optimizer.state)


# -- DeepSpeed's launcher -------------------------------------------------------------------------

def deepspeed_runner(cmdline: Callable[[int], str], parent_of: Callable[[int], Optional[int]]
                     ) -> Optional[Tuple[int, int]]:
    """(launch.py's pid, the runner's pid) when the ``deepspeed`` command started this process on
    this machine, else None (``cmdline`` and ``parent_of`` read a pid's command line and parent).

    On one node the runner starts ``python -m deepspeed.launcher.launch`` and installs no signal
    handler (``deepspeed/launcher/runner.py``, ``main``: only a multi-node pdsh launch forwards
    SIGINT/SIGTERM): SIGTERM to the runner kills it alone and the training under launch.py goes on
    unaware. ``runtime/signals.py`` watches the runner and takes its exit for a SIGTERM.
    Upstream: deepspeedai/DeepSpeed issue 4098, closed by pull request 4160, which forwards SIGTERM
    for pdsh launches only. Unneeded once the single-node runner forwards signals (the canary sees
    it install no handler).
    """
    launch = os.getppid()
    if "deepspeed.launcher.launch" not in cmdline(launch):
        return None
    runner = parent_of(launch)
    if runner is None or "deepspeed" not in cmdline(runner):
        return None
    return launch, runner
