"""The training loop: data, steps, evaluation, logging, checkpoints, signals.

``train(run, pstate, ds_config, vocab_size, task)`` runs on every rank and returns a
``RunSummary`` (per-iteration losses and grad norms, evaluations) that the tests compare across
layouts. The task (``training/tasks.py``: GPT or masked LM) supplies the model, the data and the
loss of a batch; everything else here is shared. ``train`` builds the engine, loads or starts the
state (``LoopState``), and hands the iterations to ``Loop``; ``ProgressLog`` reports them and
``Checkpoints`` saves them.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_normformer.checkpoint import training as checkpointing
from megatron_normformer.config import RunConfig
from megatron_normformer.data import loader
from megatron_normformer.parallel.random import get_all_rng_states, set_all_rng_states
from megatron_normformer.runtime import phases, signals
from megatron_normformer.training import diagnostics
from megatron_normformer.training.engine import Engine, build_engine
from megatron_normformer.training.metrics import (
    MetricsSink,
    Timers,
    format_log_line,
    format_timers,
    peak_tflops_per_device,
    safe_ppl,
)
from megatron_normformer.training.step import (
    DeepSpeedBackend,
    engine_grad_norm,
    loss_scale_exhausted,
    train_step,
    zero_learning_rate,
)
from megatron_normformer.training.tasks import Task


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message names the iteration."""

    every_rank_knows = True  # rank 0 reports it


def print_rank(msg: str, rank: Optional[int] = 0) -> None:
    if rank is None or dist.get_rank() == (rank if rank >= 0 else dist.get_world_size() + rank):
        print(msg, flush=True)


# -- data -------------------------------------------------------------------------------------

def build_datasets(run: RunConfig, train_samples: int, eval_samples: int, vocab_size: int,
                   task: Task):
    n_eval = eval_samples if run.log.eval_iters > 0 else 0
    return task.build_datasets(run, [train_samples, n_eval, n_eval], vocab_size)


def micro_batches(dataset, consumed: int, total: int, run: RunConfig, pstate, task: Task):
    """This rank's micro-batches from sample ``consumed`` to ``total`` (``data/loader.py``)."""
    return loader.micro_batches(dataset, consumed, total, run.train.micro_batch_size, pstate,
                                task.collate(run), run.data.num_workers, run.train.seed,
                                run.model.vocab_size, run.data.describe_paths())


# -- signals ----------------------------------------------------------------------------------

class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop finishes the step, saves and exits. A second signal
    (during the save) sets it again and changes nothing. ``--exit-duration-in-mins`` stops the
    same way once that much time has passed since training started."""

    def __init__(self):
        self.signal_name: Optional[str] = None
        signals.trainer_takes_signals()
        self._previous = {}
        for sig in signals.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self, out_of_time: bool = False) -> Optional[str]:
        """Why to stop, the same on every rank: a signal any rank got (every rank then names the
        same one), else ``out_of_time`` on any rank ("exit-duration"), else None. One collective
        per iteration for both."""
        mine = self.signal_name or signals.received_during_training()
        flag = torch.tensor([signals.STOP_REASONS.index(mine) + 1 if mine else 0,
                             int(out_of_time)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag[0]:
            self.signal_name = signals.STOP_REASONS[int(flag[0]) - 1]
            return self.signal_name
        return "exit-duration" if flag[1] else None

    def restore(self):
        signals.finishing()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# -- non-finite losses and gradients ------------------------------------------------------------

class NonFiniteCheck:
    """``--check-for-nan-in-loss-and-grad`` and the fp16 loss scaler's skips, decided the same on
    every rank (one all-reduce per iteration), right after the step and before anything is logged
    or saved.

    A non-finite loss stops the run. A step DeepSpeed skipped, or a non-finite gradient norm, is an
    overflow of fp16's dynamic loss scaling (the scale goes down and the step is retried on the
    next batch) or else non-finite gradients, which stop the run. Consecutive fp16 skips are
    bounded by ``--max-consecutive-skipped-iterations``."""

    def __init__(self, run: RunConfig):
        t = run.train
        self.check = t.check_for_nan_in_loss_and_grad
        self.loss_scaling = t.fp16 and t.loss_scale is None
        self.max_skips = t.max_consecutive_skipped_iterations
        self.consecutive = 0

    def __call__(self, it: int, loss: float, grad_norm: Optional[float], skipped: bool,
                 scale: float, params_norm: Optional[float] = None) -> Optional[str]:
        """Why iteration ``it`` stops the run, or None. ``params_norm``: the weights' norm after
        the step, where the engine reports no gradient norm (DeepSpeed's pipeline at ZeRO-0
        without clipping): a non-finite gradient shows there."""
        bad_params = params_norm is not None and not math.isfinite(params_norm)
        flags = torch.tensor([not math.isfinite(loss),
                              grad_norm is not None and not math.isfinite(grad_norm), skipped,
                              bad_params], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad_loss, bad_grad, skipped, bad_params = (bool(f) for f in flags)
        if self.check and bad_loss:
            norm = "" if grad_norm is None else f", gradient norm {grad_norm}"
            return f"lm loss is {loss}{norm}"
        if self.check and bad_params:
            return "the weights are not finite after the step (a non-finite gradient)"
        if not (skipped or bad_grad):
            self.consecutive = 0
            return None
        if self.loss_scaling and skipped:
            self.consecutive += 1
            if self.consecutive < self.max_skips:
                return None
            return (f"{self.consecutive} consecutive iterations skipped because the fp16 gradients "
                    f"overflow, down to loss scale {scale:g} "
                    f"(--max-consecutive-skipped-iterations {self.max_skips})")
        if self.check:
            if grad_norm is not None and not math.isfinite(grad_norm):
                return f"gradient norm is {grad_norm}"
            return "the gradients are not finite (DeepSpeed skipped the step)"
        return None


# -- steps ------------------------------------------------------------------------------------

def _dp_mean(x: torch.Tensor, pstate) -> float:
    x = x.detach().double().cpu().reshape(1)
    if pstate.dp_size > 1:
        dist.all_reduce(x, group=pstate.dp_group)
        x /= pstate.dp_size
    return x.item()


def _pipeline_extra(e: Engine, pstate, task: Task) -> Dict[str, float]:
    return {k: _dp_mean(v, pstate) for k, v in task.pipeline_extra(e.module, pstate).items()}


def _mean_over_micro_batches(values: List[Dict[str, torch.Tensor]], pstate) -> Dict[str, float]:
    return {k: _dp_mean(torch.stack([v[k].detach().double() for v in values]).mean(), pstate)
            for k in (values[0] if values else {})}


def backend_of(e: Engine, task: Task) -> DeepSpeedBackend:
    return DeepSpeedBackend(e.deepspeed, task.loss, e.pipeline, task.pipeline_batch)


def train_iteration(e: Engine, batches, gas: int, pstate, want_diagnostics: bool, task: Task,
                    count_zeros: bool = False, timers: Optional[Timers] = None) -> Dict:
    """``train_step`` (``training/step.py``) over ``gas`` micro-batches, its numbers averaged
    over data parallelism: {lm_loss, grad_norm, extra, diagnostics} (``num_zeros_in_grad`` with
    ``count_zeros``, where the gradients can be read)."""
    def on_gradients(backend, result):
        diag = {}
        if e.zero_stage == 0 and not e.pipeline:
            # p.grad holds the loss-scaled gradient under fp16: report the true norm.
            diag["grad_norm"] = diagnostics.grad_norm(e.module, pstate, 0) / loss_scale(e.deepspeed)
        if want_diagnostics:
            diag.update(diagnostics.fc2_grad_mean_abs(e.module, pstate, e.zero_stage))
        if count_zeros:
            diag["num_zeros_in_grad"] = diagnostics.grad_zeros(e.module, pstate, e.zero_stage)
        return diag

    step = train_step(backend_of(e, task), batches, gas, on_gradients, timers)
    diag = dict(step.diagnostics)
    if e.zero_stage != 0 or e.pipeline:
        diag["grad_norm"] = engine_grad_norm(e.deepspeed)
    if e.pipeline:  # the mean loss comes back averaged over DP on every rank
        diag["lm_loss"] = float(step.loss)
        diag["extra"] = _pipeline_extra(e, pstate, task)
    else:
        diag["lm_loss"] = _dp_mean(step.loss, pstate)
        diag["extra"] = _mean_over_micro_batches(step.extras, pstate)
    return diag


def loss_scale(engine) -> float:
    """The fp16 loss scale the last backward pass used (1 without loss scaling)."""
    if not engine.fp16_enabled():
        return 1.0
    return float(getattr(engine.optimizer, "loss_scale", 1.0))


def zero3_partitioning(model) -> Dict[str, int]:
    """How many of this rank's parameters ZeRO-3 really partitions (its piece smaller than the
    parameter) and how many it keeps whole (under the persistence threshold)."""
    params = [p for p in model.parameters() if hasattr(p, "ds_tensor")]
    split = sum(1 for p in params if p.ds_tensor.numel() < p.ds_numel)
    return {"partitioned": split, "whole": len(params) - split,
            "local_numel": sum(p.ds_tensor.numel() for p in params),
            "full_numel": sum(p.ds_numel for p in params)}


def warmup_step(e: Engine, run: RunConfig, gas: int, pstate, task: Task) -> None:
    """One optimizer step at learning rate 0 on a batch of zeros: it makes DeepSpeed create its
    optimizer state, about to be overwritten by a checkpoint's, and moves no weight. The RNG
    streams are left as they were."""
    rng = get_all_rng_states()
    batch = task.dummy_batch(run)
    with zero_learning_rate(e.deepspeed.optimizer):
        train_step(backend_of(e, task), iter([batch] * gas), gas)
    if e.pipeline:
        task.pipeline_extra(e.module, pstate)  # forget the dummy batch's metrics
    set_all_rng_states(rng)


@torch.no_grad()
def evaluate(e: Engine, dataset, eval_iters: int, global_batch: int, run: RunConfig, pstate,
             task: Task) -> Dict[str, float]:
    """{"loss": mean loss, plus the task's extra metrics} over the first ``eval_iters`` global
    batches of ``dataset`` (the same batches at every evaluation, so evaluations are comparable and
    resume-exact)."""
    total = eval_iters * global_batch
    # closed at once: the DataLoader workers must not outlive an error here (data/loader.py)
    with contextlib.closing(micro_batches(dataset, 0, total, run, pstate, task)) as batches:
        if e.pipeline:
            gas = global_batch // (run.train.micro_batch_size * pstate.dp_size)
            losses = [e.deepspeed.eval_batch(iter([task.pipeline_batch(next(batches))
                                                   for _ in range(gas)]), num_micro_batches=gas)
                      for _ in range(eval_iters)]
            return {"loss": float(torch.stack([torch.as_tensor(x, dtype=torch.float64)
                                               for x in losses]).mean()),
                    **_pipeline_extra(e, pstate, task)}
        e.deepspeed.eval()
        results = [task.loss(e.deepspeed, b) for b in batches]
    e.deepspeed.train()
    out = {"loss": _dp_mean(torch.stack([loss for loss, _ in results]).mean(), pstate)}
    out.update(_mean_over_micro_batches([extra for _, extra in results], pstate))
    return out


# -- the run's state, summary and log -----------------------------------------------------------

@dataclass
class LoopState:
    """Where the run is: what a checkpoint saves and a resume restores."""

    iteration: int = 0
    consumed_samples: int = 0
    consumed_tokens: int = 0

    def advance(self, batch: int, seq: int) -> None:
        self.iteration += 1
        self.consumed_samples += batch
        self.consumed_tokens = self.consumed_samples * seq

    def to_dict(self) -> Dict[str, int]:
        return asdict(self)


@dataclass
class RunSummary:
    """What ``train`` returns, the same on every rank: per-iteration numbers keyed by iteration,
    evaluations keyed by the iteration they followed, and the run's layout. The tests compare
    these across layouts and resumes."""

    task: str
    train_iters: int
    global_batch: int
    gas: int
    dp: int
    ds_config: Dict
    zero3: Optional[Dict[str, int]] = None
    """``zero3_partitioning`` of this rank's parameters at ZeRO-3."""
    losses: Dict[int, float] = field(default_factory=dict)
    grad_norms: Dict[int, Optional[float]] = field(default_factory=dict)
    lrs: Dict[int, float] = field(default_factory=dict)
    global_batches: Dict[int, int] = field(default_factory=dict)
    skipped_iters: Dict[int, int] = field(default_factory=dict)
    extra: Dict[int, Dict[str, float]] = field(default_factory=dict)
    """The task's extra metrics (the masked-token accuracy), where it has any."""
    params_norms: Dict[int, float] = field(default_factory=dict)
    """At logged iterations, with ``--log-params-norm``."""
    num_zeros_in_grad: Dict[int, int] = field(default_factory=dict)
    """At logged iterations, with ``--log-num-zeros-in-grad``."""
    fc2_grad_mean_abs: Dict[int, Dict[str, float]] = field(default_factory=dict)
    """At TensorBoard iterations: the NormFormer diagnostics of ``diagnostics.fc2_grad_mean_abs``."""
    val: Dict[int, float] = field(default_factory=dict)
    test: Dict[int, float] = field(default_factory=dict)
    val_extra: Dict[int, Dict[str, float]] = field(default_factory=dict)
    test_extra: Dict[int, Dict[str, float]] = field(default_factory=dict)
    stopped_by: Optional[str] = None
    """A signal's name, "exit-duration" or "exit-interval"; None when the run finished."""
    iteration: int = 0
    consumed_samples: int = 0

    def record_iteration(self, it: int, step: Dict, lr: float, batch: int, skipped: bool) -> None:
        self.losses[it] = step["lm_loss"]
        self.global_batches[it] = batch
        self.grad_norms[it] = step.get("grad_norm")
        self.lrs[it] = lr
        self.skipped_iters[it] = int(skipped)
        if step["extra"]:
            self.extra[it] = step["extra"]


class ProgressLog:
    """The training iterations' progress line, metrics-file record and TensorBoard scalars, each
    made from one record, and the window of iterations whose rates they report."""

    def __init__(self, run: RunConfig, e: Engine, pstate, sink: MetricsSink, timers: Timers,
                 flops: float, global_batch: int, train_iters: int, writer_rank: int):
        self.run, self.e, self.pstate, self.sink, self.timers = run, e, pstate, sink, timers
        self.flops, self.global_batch, self.train_iters = flops, global_batch, train_iters
        self.writer_rank, self.world = writer_rank, dist.get_world_size()
        self.peak = peak_tflops_per_device(run.log.peak_flops_per_device,
                                           run.train.bf16 or run.train.fp16)
        self.iteration_timers = [name for name in timers.names if name != "save-checkpoint"]
        self.timers_to_tb = bool(run.log.tensorboard_dir) and run.log.log_timers_to_tensorboard
        self.tb_interval = run.log.tensorboard_log_interval or run.log.log_interval
        self.count_zeros = run.log.log_num_zeros_in_grad and not e.pipeline
        self._open_window()

    def _open_window(self) -> None:
        self.window_time, self.window_iters, self.window_samples = 0.0, 0, 0
        self.skipped_before = self.e.deepspeed.skipped_steps

    def due(self, it: int):
        """(progress line due, TensorBoard due) at iteration ``it``."""
        last = it == self.train_iters
        log_now = it % self.run.log.log_interval == 0 or last
        tb_now = bool(self.run.log.tensorboard_dir) and (it % self.tb_interval == 0 or last)
        return log_now, tb_now

    def iteration(self, it: int, state: LoopState, step: Dict, lr: float, batch: int, dt: float,
                  summary: RunSummary) -> None:
        """Account iteration ``it`` (``dt`` seconds) and report it where due. Collective where the
        report is (norms, timers)."""
        e, run, pstate, timers = self.e, self.run, self.pstate, self.timers
        self.window_time += dt
        self.window_iters += 1
        self.window_samples += batch
        log_now, tb_now = self.due(it)
        if not (log_now or tb_now):
            return
        # Rates over the iterations since the last progress line.
        ms = 1000 * self.window_time / self.window_iters
        tps = self.window_samples / self.window_iters * run.train.seq_length / (ms / 1000)
        tflops = self.flops * batch / self.global_batch / (ms / 1000) / self.world / 1e12
        params_norm = None
        if run.log.log_params_norm:
            params_norm = diagnostics.params_norm(e.module, pstate, e.zero_stage, e.pipeline)
            summary.params_norms[it] = params_norm
        zeros = step.get("num_zeros_in_grad")
        if zeros is not None:
            summary.num_zeros_in_grad[it] = zeros
        loss, scale = step["lm_loss"], loss_scale(e.deepspeed)
        record = dict(iteration=it, consumed_samples=state.consumed_samples,
                      consumed_tokens=state.consumed_tokens, lm_loss=loss, lr=lr,
                      grad_norm=step.get("grad_norm"), loss_scale=scale, global_batch_size=batch,
                      skipped_iters=e.deepspeed.skipped_steps - self.skipped_before)
        if params_norm is not None:
            record["params_norm"] = params_norm
        if zeros is not None:
            record["num_zeros_in_grad"] = zeros
        record.update(ms_per_iter=ms, tokens_per_sec=tps, tflops_per_device=tflops,
                      mfu=None if self.peak is None else tflops / self.peak, **step["extra"])
        ppl = safe_ppl(loss)
        times = {}
        if (log_now and run.log.timing_log_level > 0) or (tb_now and self.timers_to_tb):
            times = timers.per_iteration(self.iteration_timers, self.window_iters)
        if log_now:
            print_rank(format_log_line(dict(record, train_iters=self.train_iters, ppl=ppl)),
                       self.writer_rank)
            if times and run.log.timing_log_level > 0:
                print_rank(format_timers(times), self.writer_rank)
            self.sink.record(record)
        if tb_now:
            self._tensorboard(it, record, ppl, step, times, summary)
        if log_now:
            self._open_window()
            timers.reset(self.iteration_timers)

    def _tensorboard(self, it: int, record: Dict, ppl: Optional[float], step: Dict, times: Dict,
                     summary: RunSummary) -> None:
        e, pstate, log, sink = self.e, self.pstate, self.run.log, self.sink
        shown_scale = record["loss_scale"] if log.log_loss_scale_to_tensorboard else None
        sink.scalars({"train/lm_loss": record["lm_loss"], "train/ppl": ppl,
                      "train/lr": record["lr"], "train/grad_norm": record["grad_norm"],
                      "train/loss_scale": shown_scale,
                      "train/skipped_iters": record["skipped_iters"],
                      "train/tokens_per_sec": record["tokens_per_sec"],
                      "train/tflops_per_device": record["tflops_per_device"],
                      "train/mfu": record["mfu"], "train/params_norm": record.get("params_norm"),
                      "train/num_zeros_in_grad": record.get("num_zeros_in_grad"),
                      "train/global_batch_size": record["global_batch_size"],
                      **{f"train/{k}": v for k, v in step["extra"].items()}}, it)
        if self.timers_to_tb:
            slowest = {f"timers/{name}": high for name, (_, high) in times.items()}
            sink.scalars({"timers/iteration-time": record["ms_per_iter"], **slowest}, it)
        if log.log_optimizer_states_to_tensorboard:
            sink.scalars(diagnostics.optimizer_state_norms(e.deepspeed, e.module, pstate), it)
        fc2 = {k: v for k, v in step.items() if k.startswith("normformer/")}
        if fc2:
            summary.fc2_grad_mean_abs[it] = fc2
            sink.scalars(fc2, it)
        sink.histograms(diagnostics.scale_parameters(e.module, pstate, e.zero_stage), it)

    def evaluation(self, split: str, step: int, result: Dict[str, float],
                   summary: RunSummary) -> None:
        """Report and keep an evaluation's result (``evaluate``'s) after iteration ``step``."""
        result = dict(result)
        loss = result.pop("loss")
        ppl = safe_ppl(loss)
        key = "val" if split == "validation" else split
        getattr(summary, key)[step] = loss
        if result:
            getattr(summary, f"{key}_extra")[step] = result
        line = (f" {split} loss at iteration {step} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {'n/a' if ppl is None else format(ppl, '.3f')} |"
                + "".join(f" {k.replace('_', ' ')}: {v:.4f} |" for k, v in result.items()))
        print_rank("-" * len(line) + "\n" + line + "\n" + "-" * len(line), self.writer_rank)
        self.sink.record({"iteration": step, f"{key}_loss": loss, f"{key}_ppl": ppl,
                          **{f"{key}_{k}": v for k, v in result.items()}})
        self.sink.scalars({f"{key}/loss": loss, f"{key}/ppl": ppl,
                           **{f"{key}/{k}": v for k, v in result.items()}}, step)

    def save_time(self, iteration: int) -> None:
        """The save's timer report, after a save."""
        times = self.timers.per_iteration(["save-checkpoint"], 1)
        self.timers.reset(["save-checkpoint"])
        print_rank(format_timers(times), self.writer_rank)
        if self.timers_to_tb:
            self.sink.scalars({"timers/save-checkpoint": times["save-checkpoint"][1]}, iteration)


# -- checkpoints ------------------------------------------------------------------------------

class Checkpoints:
    """Saves at most once per iteration, and remembers the last checkpoint for error messages."""

    def __init__(self, run: RunConfig, e: Engine, pstate, last: Optional[str]):
        self.run, self.e, self.pstate, self.last = run, e, pstate, last
        self.run_dict = run.to_dict()
        self.saved_at: Optional[int] = None

    def save(self, state: LoopState, log: ProgressLog) -> None:
        ckpt = self.run.ckpt
        if not ckpt.save or self.saved_at == state.iteration:
            return
        universal = (None if ckpt.no_save_universal else
                     checkpointing.UniversalSource(self.e.module, self.pstate, self.run.model))
        try:
            with log.timers("save-checkpoint"):
                tag = checkpointing.save_checkpoint(self.e.deepspeed, self.run_dict, state.to_dict(),
                                                    ckpt.save, universal, optim=not ckpt.no_save_optim,
                                                    rng=not ckpt.no_save_rng)
        except checkpointing.CheckpointError as error:
            raise TrainingError(f"iteration {state.iteration}: {error}") from None
        self.saved_at = state.iteration
        self.last = f"{ckpt.save}/{tag}"
        print_rank(f"> saved checkpoint {self.last}")
        log.save_time(state.iteration)

    def stop_error(self, it: int, why: str) -> TrainingError:
        """The error that stops the run at iteration ``it`` for ``why``, before saving it."""
        advice = "lower --lr or set --clip-grad"
        if self.last:
            return TrainingError(f"iteration {it}: {why}; stopped before saving, the last "
                                 f"checkpoint is {self.last} ({advice} and resume from it)")
        return TrainingError(f"iteration {it}: {why}; stopped, no checkpoint saved ({advice})")


def check_save_dir(run: RunConfig) -> None:
    """An unwritable --save stops the run now, not at the first save."""
    if run.ckpt.save:
        phases.phase(f"checking --save {run.ckpt.save}")
        for line in checkpointing.prepare_save_dir(run.ckpt.save):
            print_rank(f"> --save {run.ckpt.save}: {line}")


def load_or_start(e: Engine, run: RunConfig, pstate, task: Task, gas: int
                  ) -> Tuple[LoopState, Optional[str]]:
    """The state to start from (``--load``'s, or a new run's) and the checkpoint it came from."""
    ckpt = run.ckpt
    load = ckpt.load
    if load and load == ckpt.save and not checkpointing.has_checkpoint(load):
        # The resume-or-start pattern of Megatron scripts (--save DIR --load DIR): nothing to
        # resume yet. A --load elsewhere without a checkpoint stays an error.
        print_rank(f"> --load {load}: no checkpoint yet; starting from scratch")
        load = None
    if not load:
        return LoopState(), None
    phases.phase(f"loading the checkpoint in {load}")
    if ckpt.finetune:
        # Megatron's --finetune: the weights only; iteration, data position, optimizer, schedule
        # and RNG streams start as in a new run.
        plan = checkpointing.plan_load(run, load, load_optim=False, load_rng=False)
        checkpointing.load_checkpoint(e, run, pstate, plan)
        print_rank(f"> --finetune: loaded the weights of {load}; starting at iteration 0")
        return LoopState(), None
    plan = checkpointing.plan_load(run, load, load_optim=not ckpt.no_load_optim,
                                   load_rng=not ckpt.no_load_rng)
    if plan.needs_optimizer_state:
        warmup_step(e, run, gas, pstate, task)
    state = LoopState(**checkpointing.load_checkpoint(e, run, pstate, plan))
    print_rank(f"> resumed from {load} at iteration {state.iteration}")
    return state, f"{load} (iteration {state.iteration})"


# -- the run ----------------------------------------------------------------------------------

def train(run: RunConfig, pstate, ds_config: Dict, vocab_size: int, task: Task) -> RunSummary:
    """Train ``task`` as configured; return the run's summary (the same on every rank)."""
    start_time = time.time()
    dp, gas, global_batch = run.batch_layout(dist.get_world_size())
    train_iters = run.train_iters(global_batch)
    ramp = run.batch_ramp()
    # Sequences the whole run consumes (the ramp's smaller batches first).
    total_samples = ramp.samples(train_iters) if ramp else train_iters * global_batch
    check_save_dir(run)

    phases.phase("building the model and the DeepSpeed engine")
    e = build_engine(run, pstate, ds_config, task)
    state, last_checkpoint = load_or_start(e, run, pstate, task, gas)
    phases.phase("building the datasets")
    train_ds, valid_ds, test_ds = build_datasets(run, total_samples,
                                                 run.log.eval_iters * global_batch, vocab_size, task)

    writer_rank = dist.get_world_size() - 1
    sink = MetricsSink(run.log.metrics_file, run.log.tensorboard_dir, dist.get_rank() == writer_rank)
    flops = task.flops(run.model, global_batch, run.train.seq_length,
                       run.model.padded_vocab_size(pstate.tp_size),
                       (run.recompute() or (None,))[0] == "full")
    summary = RunSummary(task.name, train_iters, global_batch, gas, dp, ds_config,
                         zero3=zero3_partitioning(e.module) if e.zero_stage == 3 else None)
    stop = StopFlag()
    timers = Timers(run.log.timing_log_level)
    checkpoints = Checkpoints(run, e, pstate, last_checkpoint)
    # Lazy (no DataLoader worker starts before the first batch), and closed however the loop ends.
    train_batches = micro_batches(train_ds, state.consumed_samples, total_samples, run, pstate,
                                  task)
    try:
        if state.iteration >= train_iters:
            print_rank(f"> nothing to do: already trained {state.iteration} of {train_iters} iterations")
            return summary
        log = ProgressLog(run, e, pstate, sink, timers, flops, global_batch, train_iters, writer_rank)
        loop = Loop(run, e, pstate, task, state, summary, log, checkpoints, stop, start_time)
        for note in flag_notes(run, e.pipeline):
            print_rank(f"> note: {note}")
        print_rank(f"> training {train_iters} iterations: global batch {global_batch} = micro "
                   f"{run.train.micro_batch_size} x DP {dp} x accumulation {gas}; TP "
                   f"{pstate.tp_size}, ZeRO-{e.zero_stage}")
        if loop.iterate(timers.timed(train_batches, "batch-generator"), valid_ds):
            checkpoints.save(state, log)
            loop.evaluate("validation", valid_ds)
            loop.evaluate("test", test_ds)
        return summary
    finally:
        train_batches.close()  # the workers stop now, not at exit (data/loader.py)
        summary.iteration, summary.consumed_samples = state.iteration, state.consumed_samples
        stop.restore()
        sink.close()


class Loop:
    """The iterations of ``train``: step, checks, log, evaluation, save, stop."""

    def __init__(self, run: RunConfig, e: Engine, pstate, task: Task, state: LoopState,
                 summary: RunSummary, log: ProgressLog, checkpoints: Checkpoints, stop: StopFlag,
                 start_time: float):
        self.run, self.e, self.pstate, self.task = run, e, pstate, task
        self.state, self.summary, self.log = state, summary, log
        self.checkpoints, self.stop, self.start_time = checkpoints, stop, start_time
        self.nonfinite = NonFiniteCheck(run)
        self.ramp = run.batch_ramp()
        self.global_batch = summary.global_batch
        self.batch_now: Optional[int] = None

    def iterate(self, batches, valid_ds) -> bool:
        """Iterate to ``--train-iters``: True, or False where a stop condition ended the run
        (saved already)."""
        run, state = self.run, self.state
        while state.iteration < self.summary.train_iters:
            self.step(batches)
            it = state.iteration
            if run.log.eval_iters and it % run.log.eval_interval == 0 and it < self.summary.train_iters:
                self.evaluate("validation", valid_ds)
            if run.ckpt.save_interval and it % run.ckpt.save_interval == 0:
                self.checkpoints.save(state, self.log)
            if self.stopped():
                return False
        return True

    def _batch_size(self) -> int:
        """This iteration's global batch: the ramp's (told to DeepSpeed and the LR schedule when
        it changes), else the configured one."""
        if self.ramp is not None:
            size = self.ramp.global_batch(self.state.consumed_samples)
            if size != self.batch_now:
                self.batch_now = size
                self.e.deepspeed.set_train_batch_size(size)
                self.e.schedule.set_batch_size(size)
        self.batch_now = self.batch_now or self.global_batch
        return self.batch_now

    def step(self, batches) -> None:
        """One iteration: the optimizer step, the non-finite checks, the summary and the log."""
        e, run, pstate, state = self.e, self.run, self.pstate, self.state
        it = state.iteration + 1
        log_now, tb_now = self.log.due(it)
        batch = self._batch_size()
        lr = e.schedule.current_lr()
        skipped_before = e.deepspeed.skipped_steps
        t0 = time.time()
        try:
            step = train_iteration(e, batches, batch // (run.train.micro_batch_size * self.summary.dp),
                                   pstate, tb_now, self.task,
                                   self.log.count_zeros and (log_now or tb_now), self.log.timers)
        except Exception as error:
            if not loss_scale_exhausted(error):
                raise
            why = ("the fp16 gradients overflow at the minimum loss scale (--min-loss-scale "
                   f"{run.train.min_loss_scale:g})")
            raise self.checkpoints.stop_error(it, why) from None
        dt = time.time() - t0
        skipped = e.deepspeed.skipped_steps > skipped_before
        weights = None
        if self.nonfinite.check and step.get("grad_norm") is None and e.pipeline:
            weights = diagnostics.params_norm(e.module, pstate, e.zero_stage, e.pipeline)
        why = self.nonfinite(it, step["lm_loss"], step.get("grad_norm"), skipped,
                             loss_scale(e.deepspeed), weights)
        if why:
            raise self.checkpoints.stop_error(it, why)
        state.advance(batch, run.train.seq_length)
        self.summary.record_iteration(it, step, lr, batch, skipped)
        self.log.iteration(it, state, step, lr, batch, dt, self.summary)

    def evaluate(self, split: str, dataset) -> None:
        if dataset is None or self.run.log.eval_iters == 0:
            return
        result = evaluate(self.e, dataset, self.run.log.eval_iters, self.global_batch, self.run,
                          self.pstate, self.task)
        self.log.evaluation(split, self.state.iteration, result, self.summary)

    def stopped(self) -> bool:
        """A signal, ``--exit-duration-in-mins`` or ``--exit-interval``: save, say why, True."""
        run, it = self.run, self.state.iteration
        limit = run.train.exit_duration_in_mins
        reason = self.stop.agreed(limit is not None and time.time() - self.start_time > 60 * limit)
        if reason:
            self.summary.stopped_by = reason
            self.checkpoints.save(self.state, self.log)
            why = (f"--exit-duration-in-mins {limit} reached" if reason == "exit-duration"
                   else reason + (" received" if reason.startswith("SIG") else ""))
            print_rank(f"> {why}: stopped after iteration {it}"
                       + (f", checkpoint in {run.ckpt.save}" if run.ckpt.save else
                          " (no --save: nothing saved)"))
            return True
        if run.train.exit_interval and it % run.train.exit_interval == 0 and it < self.summary.train_iters:
            self.summary.stopped_by = "exit-interval"
            self.checkpoints.save(self.state, self.log)
            print_rank(f"> --exit-interval {run.train.exit_interval}: stopped after iteration {it}")
            return True
        return False


def flag_notes(run: RunConfig, pipeline: bool) -> List[str]:
    """The flags given that cannot act in this run, each said once at the start."""
    log, notes = run.log, []
    if not log.tensorboard_dir:
        for flag, given in (("--log-timers-to-tensorboard", log.log_timers_to_tensorboard),
                            ("--log-optimizer-states-to-tensorboard",
                             log.log_optimizer_states_to_tensorboard),
                            ("--tensorboard-log-interval", log.tensorboard_log_interval)):
            if given:
                notes.append(f"{flag} has no effect without --tensorboard-dir")
    if log.log_num_zeros_in_grad and pipeline:
        notes.append("--log-num-zeros-in-grad is not available with pipeline parallelism "
                     "(DeepSpeed's pipeline engine steps the optimizer inside its schedule); "
                     "no zeros are counted")
    return notes
