"""Learning-rate schedule by optimizer step: linear warm-up, then linear / cosine / constant decay.

The rate of the step taken after ``n`` successful steps (n = 0, 1, ...) is

    warm-up  (n < W):        lr * (n + 1) / W
    decay    (W <= n < D):   min_lr + (lr - min_lr) * f((n - W) / (D - W))
    after    (n >= D):       min_lr

with f(p) = 1 - p (linear), (1 + cos(pi p)) / 2 (cosine) or 1 (constant). The first step therefore
trains (fairseq's convention), and the last of D steps still has a small positive rate. Steps the
fp16 loss scaler skips do not advance the schedule: DeepSpeed calls :meth:`step` only after a step
it applied.
"""
from __future__ import annotations

import math


class LRSchedule:
    def __init__(self, optimizer, lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
                 style: str = "linear"):
        if style not in ("linear", "cosine", "constant"):
            raise ValueError(f"unknown --lr-decay-style {style!r}")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = lr, min_lr
        self.warmup_iters, self.decay_iters, self.style = warmup_iters, decay_iters, style
        self.num_steps = 0
        self.apply()

    def lr_at(self, n: int) -> float:
        """Rate of the step taken after ``n`` applied steps."""
        w, d = self.warmup_iters, self.decay_iters
        if w > 0 and n < w:
            return self.max_lr * (n + 1) / w
        if self.style == "constant":
            return self.max_lr
        if n >= d:
            return self.min_lr
        p = (n - w) / max(1, d - w)
        f = 1.0 - p if self.style == "linear" else 0.5 * (1.0 + math.cos(math.pi * p))
        return self.min_lr + (self.max_lr - self.min_lr) * f

    def current_lr(self) -> float:
        return self.lr_at(self.num_steps)

    def apply(self) -> None:
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.current_lr()

    def step(self, *args, **kwargs) -> None:
        self.num_steps += 1
        self.apply()

    def get_lr(self):
        return [self.current_lr()]

    def get_last_lr(self):
        return self.get_lr()

    def state_dict(self) -> dict:
        return dict(num_steps=self.num_steps, max_lr=self.max_lr, min_lr=self.min_lr,
                    warmup_iters=self.warmup_iters, decay_iters=self.decay_iters, style=self.style)

    def load_state_dict(self, state: dict) -> None:
        # The step count resumes; the shape comes from this run's flags (as Megatron's
        # --override-opt_param-scheduler), so a resumed run may change its schedule deliberately.
        self.num_steps = int(state["num_steps"])
        self.apply()
