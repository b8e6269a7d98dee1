"""The training loop: data, steps, evaluation, logging, checkpoints, signals.

``train(run, pstate, ds_config, vocab_size, task)`` runs on every rank and returns a summary
(per-iteration losses and grad norms, evaluations) that the tests compare across layouts. The task
(``training/tasks.py``: GPT or masked LM) supplies the model, the data and the loss of a batch;
everything else here is shared.
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from typing import Dict, List, Optional

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
)
from megatron_normformer.training.step import train_step as train_step_of
from megatron_normformer.training.tasks import get_task


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message names the iteration."""

    every_rank_knows = True  # rank 0 reports it


def print_rank(msg: str, rank: Optional[int] = 0) -> None:
    if rank is None or dist.get_rank() == (rank if rank >= 0 else dist.get_world_size() + rank):
        print(msg, flush=True)


# -- data -------------------------------------------------------------------------------------

def build_datasets(run: RunConfig, train_samples: int, eval_samples: int, vocab_size: int,
                   task=None):
    n_eval = eval_samples if run.log.eval_iters > 0 else 0
    return get_task(task).build_datasets(run, [train_samples, n_eval, n_eval], vocab_size)


def micro_batches(dataset, consumed: int, total: int, run: RunConfig, pstate, task=None):
    """This rank's micro-batches from sample ``consumed`` to ``total`` (``data/loader.py``)."""
    return loader.micro_batches(dataset, consumed, total, run.train.micro_batch_size, pstate,
                                get_task(task).collate(run), run.data.num_workers, run.train.seed,
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


def _pipeline_extra(e: Engine, pstate, task) -> Dict[str, float]:
    return {k: _dp_mean(v, pstate) for k, v in task.pipeline_extra(e.model, pstate).items()}


def _mean_over_micro_batches(values: List[Dict[str, torch.Tensor]], pstate) -> Dict[str, float]:
    return {k: _dp_mean(torch.stack([v[k].detach().double() for v in values]).mean(), pstate)
            for k in (values[0] if values else {})}


def backend_of(e: Engine, task) -> DeepSpeedBackend:
    return DeepSpeedBackend(e.engine, task.loss, e.pipeline, task.pipeline_batch)


def train_step(e: Engine, batches, gas: int, pstate, want_diagnostics: bool, task=None,
               count_zeros: bool = False, timers: Optional[Timers] = None) -> Dict:
    """One optimizer step over ``gas`` micro-batches: {lm_loss, grad_norm, extra, diagnostics}
    (``num_zeros_in_grad`` with ``count_zeros``, where the gradients can be read)."""
    task = get_task(task)

    def on_gradients(backend, result):
        diag = {}
        if e.zero_stage == 0 and not e.pipeline:
            # p.grad holds the loss-scaled gradient under fp16: report the true norm.
            diag["grad_norm"] = diagnostics.grad_norm(e.model, pstate, 0) / loss_scale(e.engine)
        if want_diagnostics:
            diag.update(diagnostics.fc2_grad_mean_abs(e.model, pstate, e.zero_stage))
        if count_zeros:
            diag["num_zeros_in_grad"] = diagnostics.grad_zeros(e.model, pstate, e.zero_stage)
        return diag

    step = train_step_of(backend_of(e, task), batches, gas, on_gradients, timers)
    diag = dict(step.diagnostics)
    if e.zero_stage != 0 or e.pipeline:
        diag["grad_norm"] = engine_grad_norm(e.engine)
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


def warmup_step(e: Engine, run: RunConfig, gas: int, pstate, task=None) -> None:
    """One optimizer step on a batch of zeros (the caller zeroes the learning rate): it makes
    DeepSpeed create its optimizer state, about to be overwritten by a checkpoint's. The RNG
    streams are left as they were."""
    task = get_task(task)
    rng = get_all_rng_states()
    batch = task.dummy_batch(run)
    train_step_of(backend_of(e, task), iter([batch] * gas), gas)
    if e.pipeline:
        task.pipeline_extra(e.model, pstate)  # forget the dummy batch's metrics
    set_all_rng_states(rng)


@torch.no_grad()
def evaluate(e: Engine, dataset, eval_iters: int, global_batch: int, run: RunConfig, pstate,
             task=None) -> Dict[str, float]:
    """{"loss": mean loss, plus the task's extra metrics} over the first ``eval_iters`` global
    batches of ``dataset`` (the same batches at every evaluation, so evaluations are comparable and
    resume-exact)."""
    task = get_task(task)
    total = eval_iters * global_batch
    # closed at once: the DataLoader workers must not outlive an error here (data/loader.py)
    with contextlib.closing(micro_batches(dataset, 0, total, run, pstate, task)) as batches:
        if e.pipeline:
            gas = global_batch // (run.train.micro_batch_size * pstate.dp_size)
            losses = [e.engine.eval_batch(iter([task.pipeline_batch(next(batches)) for _ in range(gas)]),
                                          num_micro_batches=gas)
                      for _ in range(eval_iters)]
            return {"loss": float(torch.stack([torch.as_tensor(x, dtype=torch.float64)
                                               for x in losses]).mean()),
                    **_pipeline_extra(e, pstate, task)}
        e.engine.eval()
        results = [task.loss(e.engine, b) for b in batches]
    e.engine.train()
    out = {"loss": _dp_mean(torch.stack([loss for loss, _ in results]).mean(), pstate)}
    out.update(_mean_over_micro_batches([extra for _, extra in results], pstate))
    return out


# -- the run ----------------------------------------------------------------------------------

def train(run: RunConfig, pstate, ds_config: Dict, vocab_size: int, task=None) -> Dict:
    """Train ``task`` (GPT when None) as configured; return the per-iteration summary (same on
    every rank)."""
    task = get_task(task)
    start_time = time.time()
    world, rank = dist.get_world_size(), dist.get_rank()
    dp, gas, global_batch = run.batch_layout(world)
    train_iters = run.train_iters(global_batch)
    ramp = run.batch_ramp()
    # Sequences the whole run consumes (the ramp's smaller batches first).
    total_samples = ramp.samples(train_iters) if ramp else train_iters * global_batch
    seq = run.train.seq_length
    writer_rank = world - 1
    run_dict = run.to_dict()
    if run.ckpt.save:  # an unwritable --save stops the run now, not at the first save
        phases.phase(f"checking --save {run.ckpt.save}")
        for line in checkpointing.prepare_save_dir(run.ckpt.save):
            print_rank(f"> --save {run.ckpt.save}: {line}")

    phases.phase("building the model and the DeepSpeed engine")
    e = build_engine(run, pstate, ds_config, task)
    state = dict(iteration=0, consumed_samples=0, consumed_tokens=0)
    load = run.ckpt.load
    if load and load == run.ckpt.save and not checkpointing.has_checkpoint(load):
        # The resume-or-start pattern of Megatron scripts (--save DIR --load DIR): nothing to
        # resume yet. A --load elsewhere without a checkpoint stays an error.
        print_rank(f"> --load {load}: no checkpoint yet; starting from scratch")
        load = None
    if load:
        phases.phase(f"loading the checkpoint in {run.ckpt.load}")
    if load and run.ckpt.finetune:
        # Megatron's --finetune: the weights only; iteration, data position, optimizer, schedule
        # and RNG streams start as in a new run.
        checkpointing.load_checkpoint(e, run, pstate, run.ckpt.load, load_optim=False, load_rng=False)
        print_rank(f"> --finetune: loaded the weights of {run.ckpt.load}; starting at iteration 0")
    elif load:
        state = checkpointing.load_checkpoint(
            e, run, pstate, run.ckpt.load, load_optim=not run.ckpt.no_load_optim,
            load_rng=not run.ckpt.no_load_rng,
            materialize_optimizer_state=lambda: warmup_step(e, run, gas, pstate, task))
        print_rank(f"> resumed from {run.ckpt.load} at iteration {state['iteration']}")
    last_checkpoint = (f"{run.ckpt.load} (iteration {state['iteration']})"
                       if load and not run.ckpt.finetune else None)
    phases.phase("building the datasets")
    datasets = build_datasets(run, total_samples, run.log.eval_iters * global_batch,
                              vocab_size, task)
    train_ds, valid_ds, test_ds = datasets

    sink = MetricsSink(run.log.metrics_file, run.log.tensorboard_dir, rank == writer_rank)
    flops = task.flops(run.model, global_batch, seq, run.model.padded_vocab_size(pstate.tp_size),
                       (run.recompute() or (None,))[0] == "full")
    peak = peak_tflops_per_device(run.log.peak_flops_per_device, run.train.bf16 or run.train.fp16)
    summary = dict(losses={}, grad_norms={}, lrs={}, val={}, test={}, fc2_grad_mean_abs={}, extra={},
                   val_extra={}, test_extra={}, stopped_by=None, task=task.name, global_batches={},
                   params_norms={}, skipped_iters={}, num_zeros_in_grad={}, ds_config=ds_config,
                   zero3=zero3_partitioning(e.model) if e.zero_stage == 3 else None,
                   train_iters=train_iters, global_batch=global_batch, gas=gas, dp=dp)
    stop = StopFlag()
    nonfinite = NonFiniteCheck(run)
    timers = Timers(run.log.timing_log_level)
    iteration_timers = [name for name in timers.names if name != "save-checkpoint"]
    timers_to_tb = bool(run.log.tensorboard_dir) and run.log.log_timers_to_tensorboard
    tb_interval = run.log.tensorboard_log_interval or run.log.log_interval
    count_zeros = run.log.log_num_zeros_in_grad and not e.pipeline
    saved_at = None

    def save():
        nonlocal saved_at, last_checkpoint
        if run.ckpt.save and saved_at != state["iteration"]:
            universal = None if run.ckpt.no_save_universal else (e.model, pstate, run.model)
            try:
                with timers("save-checkpoint"):
                    tag = checkpointing.save_checkpoint(e.engine, run_dict, state, run.ckpt.save,
                                                        universal, optim=not run.ckpt.no_save_optim,
                                                        rng=not run.ckpt.no_save_rng)
            except checkpointing.CheckpointError as error:
                raise TrainingError(f"iteration {state['iteration']}: {error}") from None
            saved_at = state["iteration"]
            last_checkpoint = f"{run.ckpt.save}/{tag}"
            print_rank(f"> saved checkpoint {last_checkpoint}")
            times = timers.per_iteration(["save-checkpoint"], 1)
            timers.reset(["save-checkpoint"])
            print_rank(format_timers(times), writer_rank)
            if timers_to_tb:
                sink.scalars({"timers/save-checkpoint": times["save-checkpoint"][1]},
                             state["iteration"])

    def stop_training(it: int, why: str):
        advice = "lower --lr or set --clip-grad"
        if last_checkpoint:
            return TrainingError(f"iteration {it}: {why}; stopped before saving, the last "
                                 f"checkpoint is {last_checkpoint} ({advice} and resume from it)")
        return TrainingError(f"iteration {it}: {why}; stopped, no checkpoint saved ({advice})")

    def run_eval(split: str, dataset, step: int):
        if dataset is None or run.log.eval_iters == 0:
            return
        result = evaluate(e, dataset, run.log.eval_iters, global_batch, run, pstate, task)
        loss = result.pop("loss")
        ppl = safe_ppl(loss)
        key = "val" if split == "validation" else split
        summary[key][step] = loss
        if result:
            summary[f"{key}_extra"][step] = result
        line = (f" {split} loss at iteration {step} | lm loss value: {loss:.6E} | "
                f"lm loss PPL: {'n/a' if ppl is None else format(ppl, '.3f')} |"
                + "".join(f" {k.replace('_', ' ')}: {v:.4f} |" for k, v in result.items()))
        print_rank("-" * len(line) + "\n" + line + "\n" + "-" * len(line), writer_rank)
        sink.record({"iteration": step, f"{key}_loss": loss, f"{key}_ppl": ppl,
                     **{f"{key}_{k}": v for k, v in result.items()}})
        sink.scalars({f"{key}/loss": loss, f"{key}/ppl": ppl,
                      **{f"{key}/{k}": v for k, v in result.items()}}, step)

    # Lazy (no DataLoader worker starts before the first batch), and closed however the loop ends.
    train_batches = micro_batches(train_ds, state["consumed_samples"], total_samples, run, pstate,
                                  task)
    try:
        if state["iteration"] >= train_iters:
            print_rank(f"> nothing to do: already trained {state['iteration']} of {train_iters} iterations")
            return summary
        batches = timers.timed(train_batches, "batch-generator")
        window = dict(time=0.0, iters=0, loss=0.0, skipped_before=e.engine.skipped_steps)
        for note in flag_notes(run, e.pipeline):
            print_rank(f"> note: {note}")
        print_rank(f"> training {train_iters} iterations: global batch {global_batch} = micro "
                   f"{run.train.micro_batch_size} x DP {dp} x accumulation {gas}; TP "
                   f"{pstate.tp_size}, ZeRO-{e.zero_stage}")
        batch_now = None
        while state["iteration"] < train_iters:
            it = state["iteration"] + 1
            log_now = it % run.log.log_interval == 0 or it == train_iters
            tb_now = bool(run.log.tensorboard_dir) and (it % tb_interval == 0 or it == train_iters)
            if ramp is not None and ramp.global_batch(state["consumed_samples"]) != batch_now:
                batch_now = ramp.global_batch(state["consumed_samples"])
                e.engine.set_train_batch_size(batch_now)
                e.schedule.set_batch_size(batch_now)
            batch_now = batch_now or global_batch
            lr = e.schedule.current_lr()
            skipped_before = e.engine.skipped_steps
            t0 = time.time()
            try:
                step = train_step(e, batches, batch_now // (run.train.micro_batch_size * dp),
                                  pstate, tb_now, task, count_zeros and (log_now or tb_now),
                                  timers)
            except Exception as error:
                if not loss_scale_exhausted(error):
                    raise
                why = ("the fp16 gradients overflow at the minimum loss scale (--min-loss-scale "
                       f"{run.train.min_loss_scale:g})")
                raise stop_training(it, why) from None
            dt = time.time() - t0
            skipped = e.engine.skipped_steps > skipped_before
            loss = step["lm_loss"]
            weights = None
            if nonfinite.check and step.get("grad_norm") is None and e.pipeline:
                weights = diagnostics.params_norm(e.model, pstate, e.zero_stage, e.pipeline)
            why = nonfinite(it, loss, step.get("grad_norm"), skipped, loss_scale(e.engine), weights)
            if why:
                raise stop_training(it, why)
            state.update(iteration=it, consumed_samples=state["consumed_samples"] + batch_now)
            state["consumed_tokens"] = state["consumed_samples"] * seq
            summary["losses"][it] = loss
            summary["global_batches"][it] = batch_now
            summary["grad_norms"][it] = step.get("grad_norm")
            summary["lrs"][it] = lr
            summary["skipped_iters"][it] = int(skipped)
            if step["extra"]:
                summary["extra"][it] = step["extra"]
            window["time"] += dt
            window["iters"] += 1
            window["samples"] = window.get("samples", 0) + batch_now
            if log_now or tb_now:
                # Rates over the iterations since the last progress line.
                ms = 1000 * window["time"] / window["iters"]
                tps = window["samples"] / window["iters"] * seq / (ms / 1000)
                tflops = flops * batch_now / global_batch / (ms / 1000) / world / 1e12
                params_norm = None
                if run.log.log_params_norm:
                    params_norm = diagnostics.params_norm(e.model, pstate, e.zero_stage, e.pipeline)
                    summary["params_norms"][it] = params_norm
                zeros = step.get("num_zeros_in_grad")
                if zeros is not None:
                    summary["num_zeros_in_grad"][it] = zeros
                scale = loss_scale(e.engine)
                m = dict(iteration=it, train_iters=train_iters, consumed_samples=state["consumed_samples"],
                         consumed_tokens=state["consumed_tokens"], lm_loss=loss, ppl=safe_ppl(loss),
                         lr=lr, grad_norm=step.get("grad_norm"), loss_scale=scale,
                         ms_per_iter=ms, tokens_per_sec=tps, tflops_per_device=tflops,
                         mfu=None if peak is None else tflops / peak, global_batch_size=batch_now,
                         params_norm=params_norm, num_zeros_in_grad=zeros,
                         skipped_iters=e.engine.skipped_steps - window["skipped_before"],
                         **step["extra"])
                times = {}
                if (log_now and run.log.timing_log_level > 0) or (tb_now and timers_to_tb):
                    times = timers.per_iteration(iteration_timers, window["iters"])
            if log_now:
                print_rank(format_log_line(m), writer_rank)
                if times and run.log.timing_log_level > 0:
                    print_rank(format_timers(times), writer_rank)
                sink.record({k: m[k] for k in ("iteration", "consumed_samples", "consumed_tokens",
                                               "lm_loss", "lr", "grad_norm", "loss_scale",
                                               "global_batch_size", "skipped_iters",
                                               *(["params_norm"] if params_norm is not None else []),
                                               *(["num_zeros_in_grad"] * (zeros is not None)),
                                               "ms_per_iter", "tokens_per_sec", "tflops_per_device",
                                               "mfu", *step["extra"])})
            if tb_now:
                shown_scale = scale if run.log.log_loss_scale_to_tensorboard else None
                sink.scalars({"train/lm_loss": loss, "train/ppl": m["ppl"], "train/lr": lr,
                              "train/grad_norm": m["grad_norm"], "train/loss_scale": shown_scale,
                              "train/skipped_iters": m["skipped_iters"],
                              "train/tokens_per_sec": tps, "train/tflops_per_device": tflops,
                              "train/mfu": m["mfu"], "train/params_norm": params_norm,
                              "train/num_zeros_in_grad": zeros,
                              "train/global_batch_size": batch_now,
                              **{f"train/{k}": v for k, v in step["extra"].items()}}, it)
                if timers_to_tb:
                    slowest = {f"timers/{name}": high for name, (_, high) in times.items()}
                    sink.scalars({"timers/iteration-time": ms, **slowest}, it)
                if run.log.log_optimizer_states_to_tensorboard:
                    sink.scalars(diagnostics.optimizer_state_norms(e.engine, e.model, pstate), it)
                fc2 = {k: v for k, v in step.items() if k.startswith("normformer/")}
                if fc2:
                    summary["fc2_grad_mean_abs"][it] = fc2
                    sink.scalars(fc2, it)
                sink.histograms(diagnostics.scale_parameters(e.model, pstate, e.zero_stage), it)
            if log_now:
                window.update(time=0.0, iters=0, samples=0, skipped_before=e.engine.skipped_steps)
                timers.reset(iteration_timers)
            if run.log.eval_iters and it % run.log.eval_interval == 0 and it < train_iters:
                run_eval("validation", valid_ds, it)
            if run.ckpt.save_interval and it % run.ckpt.save_interval == 0:
                save()
            limit = run.train.exit_duration_in_mins
            reason = stop.agreed(limit is not None and time.time() - start_time > 60 * limit)
            if reason:
                summary["stopped_by"] = reason
                save()
                why = (f"--exit-duration-in-mins {limit} reached" if reason == "exit-duration"
                       else reason + (" received" if reason.startswith("SIG") else ""))
                print_rank(f"> {why}: stopped after iteration {it}"
                           + (f", checkpoint in {run.ckpt.save}" if run.ckpt.save else
                              " (no --save: nothing saved)"))
                return summary
            if run.train.exit_interval and it % run.train.exit_interval == 0 and it < train_iters:
                summary["stopped_by"] = "exit-interval"
                save()
                print_rank(f"> --exit-interval {run.train.exit_interval}: stopped after iteration {it}")
                return summary
        save()
        run_eval("validation", valid_ds, state["iteration"])
        run_eval("test", test_ds, state["iteration"])
        return summary
    finally:
        train_batches.close()  # the workers stop now, not at exit (data/loader.py)
        summary.update(iteration=state["iteration"], consumed_samples=state["consumed_samples"])
        stop.restore()
        sink.close()


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
