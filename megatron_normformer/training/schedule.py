"""Learning-rate schedule: linear warm-up, then linear / cosine / constant decay, counted in
sequences (samples) as Megatron's scheduler counts them.

With ``s`` sequences consumed by the applied steps so far and ``b`` the global batch of the next
step, that step's rate is

    warm-up  (s < W):        lr * min(1, (s + b) / W)
    decay    (W <= s < D):   min_lr + (lr - min_lr) * f((s - W) / (D - W))
    after    (s >= D):       min_lr

with f(p) = 1 - p (linear), (1 + cos(pi p)) / 2 (cosine) or 1 (constant). W and D are the
warm-up and decay lengths in sequences (``RunConfig.lr_schedule_samples``: iteration flags count
``--global-batch-size`` sequences per iteration). With a constant batch and W = w b, D = d b this
is the step-counted schedule lr (n + 1) / w, ... after n steps: the first step therefore trains
(fairseq's convention), and the last of d steps still has a small positive rate. Steps the fp16
loss scaler skips do not advance the schedule: DeepSpeed calls :meth:`step` only after a step it
applied. Under a batch-size ramp the loop sets :attr:`batch_size` before each step.
"""
from __future__ import annotations

import math

from megatron_normformer.config import ConfigError

SCHEDULE_SETTINGS = ("max_lr", "min_lr", "warmup_samples", "decay_samples", "style")


class LRSchedule:
    def __init__(self, optimizer, lr: float, min_lr: float, warmup_samples: int, decay_samples: int,
                 style: str = "linear", batch_size: int = 1):
        if style not in ("linear", "cosine", "constant"):
            raise ValueError(f"unknown --lr-decay-style {style!r}")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = lr, min_lr
        self.warmup_samples, self.decay_samples, self.style = warmup_samples, decay_samples, style
        self.batch_size = batch_size
        # What a resumed run takes from the checkpoint's settings: "check" (Megatron's default:
        # they must equal the flags'), "flags" (--override-opt_param-scheduler) or "checkpoint"
        # (--use-checkpoint-opt_param-scheduler).
        self.resume_settings = "check"
        self.num_steps = 0
        self.num_samples = 0
        self.apply()

    def lr_at(self, samples: int, batch_size: int) -> float:
        """Rate of the step of ``batch_size`` sequences taken after ``samples`` sequences."""
        w, d = self.warmup_samples, self.decay_samples
        if w > 0 and samples < w:
            return self.max_lr * min(1.0, (samples + batch_size) / w)
        if self.style == "constant":
            return self.max_lr
        if samples >= d:
            return self.min_lr
        p = (samples - w) / max(1, d - w)
        f = 1.0 - p if self.style == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return self.min_lr + (self.max_lr - self.min_lr) * f

    def current_lr(self) -> float:
        return self.lr_at(self.num_samples, self.batch_size)

    def set_batch_size(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.apply()

    def apply(self) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.current_lr()

    def step(self, *args, **kwargs) -> None:
        self.num_steps += 1
        self.num_samples += self.batch_size
        self.apply()

    def get_lr(self):
        return [self.current_lr()]

    def get_last_lr(self):
        return self.get_lr()

    def settings(self) -> dict:
        return {k: getattr(self, k) for k in SCHEDULE_SETTINGS}

    def state_dict(self) -> dict:
        return dict(self.settings(), num_steps=self.num_steps, num_samples=self.num_samples)

    def load_state_dict(self, state: dict) -> None:
        """The position (steps, sequences) resumes; the settings as :attr:`resume_settings` says."""
        saved = {k: state[k] for k in SCHEDULE_SETTINGS if k in state}
        if self.resume_settings == "checkpoint":
            for key, value in saved.items():
                setattr(self, key, value)
        elif self.resume_settings == "check":
            diffs = [f"{k} {v!r} (this run {getattr(self, k)!r})" for k, v in saved.items()
                     if v != getattr(self, k)]
            if diffs:
                raise ConfigError(
                    "the checkpoint's learning-rate schedule differs from the flags': "
                    + ", ".join(diffs) + "; pass --override-opt_param-scheduler to take the flags' "
                    "or --use-checkpoint-opt_param-scheduler to keep the checkpoint's")
        self.num_steps = int(state["num_steps"])
        # Checkpoints from before the sample count: every step was one constant global batch.
        self.num_samples = int(state.get("num_samples", self.num_steps * self.batch_size))
        self.apply()
