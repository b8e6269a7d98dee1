"""Table 4: the LR stability test. The learning rate is ``step * lr_step`` (it climbs from 0 by a
fixed amount per iteration) until training breaks; report the peak LR reached, the last good step,
and the first operation and layer that produced a non-finite value.

Forward hooks watch, in execution order, the embedding, each layer's input LN, the QKV projection,
the attention scores q@k (recomputed from the QKV output in the run's precision, since the fused
attention kernel never materialises them), the attention output projection, post-attention LN,
pre-MLP LN, fc1, FFN LN, fc2, and the final LN. A step fails when its loss is not finite or when any
watched output is: in a real fp16 run that inf would be the overflow that breaks training (under
CPU autocast some kernels compute internally in fp32 and would hide it). A step whose gradients are
not finite fails too (op ``gradient``, the first such parameter), before its update poisons the
weights.

``dtype``: ``fp32``, or ``fp16`` / ``bf16`` through torch.autocast (matmuls in the low precision,
LayerNorms in fp32, as in mixed-precision training; both work on CPU in recent torch).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Iterator, List, Optional

import torch

from megatron_normformer.analysis.common import pyplot
from megatron_normformer.config import ModelConfig
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.parallel.state import SingleProcessState
from megatron_normformer.training.step import PlainBackend, next_token_loss, train_step

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WATCHED = {  # module name suffix -> operation name reported
    "embedding": "embedding",
    "input_layernorm": "input LN",
    "attention.qkv": "qkv projection",
    "attention.dense": "output projection",
    "post_attention_layernorm": "post-attn LN",
    "pre_mlp_layernorm": "pre-MLP LN",
    "mlp.fc1": "fc1",
    "mlp.ffn_layernorm": "FFN LN",
    "mlp.fc2": "fc2",
    "head.final_layernorm": "final LN",
}
SCORES = "q@k"


class NonFiniteWatch:
    """Forward hooks recording the first watched output that is not finite in a forward pass."""

    def __init__(self, model: GPTModel):
        self.first: Optional[dict] = None
        self.attentions = {n: m for n, m in model.named_modules() if n.endswith("attention")}
        self.handles = []
        for name, module in model.named_modules():
            suffix = next((s for s in WATCHED if name == s or name.endswith("." + s)), None)
            if suffix is not None:
                self.handles.append(module.register_forward_hook(self._hook(name, WATCHED[suffix])))

    def reset(self) -> None:
        self.first = None

    def _record(self, name: str, op: str) -> None:
        if self.first is None:
            match = re.match(r"layers\.(\d+)\.", name)
            self.first = {"op": op, "module": name, "layer": int(match.group(1)) if match else None}

    def _hook(self, name: str, op: str):
        def hook(_module, _inputs, output):
            if self.first is not None:
                return
            if not torch.isfinite(output).all():
                self._record(name, op)
            elif op == "qkv projection":
                attention = self.attentions[name.rsplit(".", 1)[0]]
                if not torch.isfinite(self._scores(output, attention)).all():
                    self._record(name.rsplit(".", 1)[0], SCORES)
        return hook

    @staticmethod
    def _scores(qkv: torch.Tensor, attention) -> torch.Tensor:
        """Scaled q k^T per head in the dtype the projection produced (as fairseq: q scaled first)."""
        with torch.no_grad():
            b, s, _ = qkv.shape
            q, k, _ = qkv.view(b, s, attention.local_heads, 3, attention.head_dim).unbind(dim=3)
            q = q.transpose(1, 2) * attention.head_dim ** -0.5
            return torch.matmul(q, k.transpose(1, 2).transpose(-1, -2))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def run_stability_test(cfg: ModelConfig, batches: Iterator[torch.Tensor], lr_step: float,
                       max_steps: int, dtype: str = "fp32", seed: int = 1234, device="cpu",
                       weight_decay: float = 0.01) -> dict:
    """Train with lr = step * lr_step until the first failure or ``max_steps``."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    torch.manual_seed(seed)
    model = GPTModel(cfg, SingleProcessState(), seed=seed, device=device)
    model.train()
    watch = NonFiniteWatch(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-8,
                            weight_decay=weight_decay)
    autocast = None
    if DTYPES[dtype] != torch.float32:
        autocast = functools.partial(torch.autocast, torch.device(device).type, dtype=DTYPES[dtype])
    backend = PlainBackend(model, opt, next_token_loss, autocast)
    lrs: List[float] = []
    losses: List[float] = []
    failure: Optional[dict] = None

    def check(backend, result) -> Optional[bool]:
        """The step's first failure, in the order it happened; False skips the update."""
        loss = result.losses[0].item()
        if not math.isfinite(loss) or watch.first is not None:
            failed.update(watch.first or {"op": "loss", "module": "head", "layer": None})
        else:
            bad = next((n for n, p in model.named_parameters()
                        if p.grad is not None and not torch.isfinite(p.grad).all()), None)
            if bad is None:
                return None
            # The update would poison the weights: the backward pass broke.
            match = re.match(r"layers\.(\d+)\.", bad)
            failed.update(op="gradient", module=bad, layer=int(match.group(1)) if match else None)
        return False

    for step in range(1, max_steps + 1):
        lr = step * lr_step
        for group in opt.param_groups:
            group["lr"] = lr
        watch.reset()
        failed: dict = {}
        result = train_step(backend, [next(batches).to(device)], 1, check)
        loss = result.losses[0].item()
        if not result.updated:
            failure = dict(step=step, lr=lr, loss=loss, **failed)
            break
        lrs.append(lr)
        losses.append(loss)
    watch.remove()
    last_step = len(losses)
    return {
        "diverged": failure is not None,
        "peak_lr": last_step * lr_step,
        "last_step": last_step,
        "failed_step": failure and failure["step"],
        "failed_op": failure and failure["op"],
        "failed_module": failure and failure["module"],
        "failed_layer": failure and failure["layer"],
        "failed_loss": failure and failure["loss"],
        "lrs": lrs,
        "losses": losses,
    }


def plot_stability(result: dict, path: str) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    titles = {"preln": "Pre-LN", "normformer": "NormFormer"}
    for name, run in result["runs"].items():
        line, = ax.plot(run["lrs"], run["losses"], label=titles.get(name, name))
        if run["diverged"]:
            ax.axvline(run["peak_lr"], color=line.get_color(), ls="--", lw=0.8)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR stability test ({result['dtype']}, +{result['lr_step']:g}/step)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
