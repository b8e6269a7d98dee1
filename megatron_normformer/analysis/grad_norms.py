"""Fig. 3: average L1 norm of the gradient of the second FFN weight (fc2) per layer, early in training.

"Average L1 norm" is the mean absolute value of the gradient entries, recorded after every backward
of the first N steps, by the training step and the diagnostic the trainer uses (``training/step.py``,
``training/diagnostics.py``). The paper's finding: under Pre-LN early layers get much larger fc2 gradients
than late ones; NormFormer's FFN LN brings the layers closer together.
"""
from __future__ import annotations

from typing import Dict, Iterator, List

import torch

from megatron_normformer.analysis.common import pyplot
from megatron_normformer.config import ModelConfig
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.parallel.state import SingleProcessState
from megatron_normformer.training.diagnostics import fc2_grad_mean_abs
from megatron_normformer.training.step import PlainBackend, next_token_loss, train_step


def warmup_lr(step: int, peak: float, warmup: int) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then constant (step counts from 1)."""
    return peak * min(1.0, step / max(warmup, 1))


def record_fc2_grad_mean_abs(cfg: ModelConfig, batches: Iterator[torch.Tensor], steps: int, lr: float,
                             warmup: int, seed: int = 1234, weight_decay: float = 0.01) -> dict:
    """Train ``steps`` AdamW steps; per step the loss and each layer's mean |grad| of fc2.weight
    (``training/diagnostics.fc2_grad_mean_abs``, the trainer's own measure)."""
    torch.manual_seed(seed)
    pstate = SingleProcessState()
    model = GPTModel(cfg, pstate, seed=seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-8,
                            weight_decay=weight_decay)
    backend = PlainBackend(model, opt, next_token_loss)
    series: Dict[int, List[float]] = {i: [] for i in range(cfg.num_layers)}
    losses: List[float] = []
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = warmup_lr(step, lr, warmup)
        result = train_step(backend, batches, 1,
                            lambda b, _: fc2_grad_mean_abs(b.model, pstate, zero_stage=0))
        for i in range(cfg.num_layers):
            series[i].append(result.diagnostics[f"normformer/fc2_grad_mean_abs/layer_{i}"])
        losses.append(result.loss.item())
    return {"loss": losses, "fc2_grad_mean_abs": {str(i): s for i, s in series.items()}}


def default_layers(num_layers: int) -> List[int]:
    """The paper's choice for 12 layers (0, 1, 6, 10, 11) generalised: 0, 1, middle, last-1, last."""
    picks = [0, 1, num_layers // 2, num_layers - 2, num_layers - 1]
    return sorted({p for p in picks if 0 <= p < num_layers})


def plot_grad_norms(result: dict, layers: List[int], path: str) -> str:
    plt = pyplot()
    runs = result["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), sharey=True)
    axes = [axes] if len(runs) == 1 else list(axes)
    titles = {"preln": "Pre-LN", "normformer": "NormFormer"}
    for ax, (name, run) in zip(axes, runs.items()):
        for layer in layers:
            values = run["fc2_grad_mean_abs"][str(layer)]
            ax.plot(range(1, len(values) + 1), values, label=f"layer {layer}")
        ax.set_title(titles.get(name, name))
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean |grad| of fc2 weight")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
