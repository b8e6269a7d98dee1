"""Fig. 4: distributions of the learned NormFormer scales per layer of a checkpoint.

FFN LN gamma (over F), post-attention LN gamma (over d), HeadScale gamma (one per head) and, when
present, ResScale lambda (over d). For each kind and layer: n, mean, std, min, max and quantiles.
"""
from __future__ import annotations

from typing import Dict, List

import torch

from megatron_normformer.analysis.common import pyplot
from megatron_normformer.config import ModelConfig

SCALE_KINDS = {
    "ffn_ln": ("layers.{i}.mlp.ffn_layernorm.weight", "FFN LN gamma"),
    "post_attn_ln": ("layers.{i}.post_attention_layernorm.weight", "Post-Attn LN gamma"),
    "head_scale": ("layers.{i}.attention.head_scale", "HeadScale gamma"),
    "resid_scale": ("layers.{i}.resid_scale", "ResScale lambda"),
}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def describe(values: torch.Tensor) -> dict:
    v = values.detach().double().flatten()
    stats = {"n": v.numel(), "mean": v.mean().item(), "std": v.std(unbiased=False).item(),
             "min": v.min().item(), "max": v.max().item()}
    for q, value in zip(QUANTILES, torch.quantile(v, torch.tensor(QUANTILES, dtype=v.dtype)).tolist()):
        stats[f"q{int(round(q * 100)):02d}"] = value
    return stats


def collect_scales(full: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, List[torch.Tensor]]:
    """{kind: [values of layer 0, 1, ...]} for each kind the checkpoint has."""
    found = {}
    for kind, (pattern, _) in SCALE_KINDS.items():
        names = [pattern.format(i=i) for i in range(cfg.num_layers)]
        if all(n in full for n in names):
            found[kind] = [full[n].float() for n in names]
    return found


def scale_report(full: Dict[str, torch.Tensor], cfg: ModelConfig) -> dict:
    scales = collect_scales(full, cfg)
    return {"num_layers": cfg.num_layers,
            "kinds": {kind: [dict(layer=i, **describe(v)) for i, v in enumerate(values)]
                      for kind, values in scales.items()}}


def plot_scales(full: Dict[str, torch.Tensor], cfg: ModelConfig, path: str) -> str:
    plt = pyplot()
    scales = collect_scales(full, cfg)
    fig, axes = plt.subplots(1, len(scales), figsize=(4.5 * len(scales), 4), squeeze=False)
    for ax, (kind, values) in zip(axes[0], scales.items()):
        ax.boxplot([v.numpy() for v in values], vert=False, showfliers=True)
        ax.set_yticks(range(1, cfg.num_layers + 1), [str(i) for i in range(cfg.num_layers)])
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_title(SCALE_KINDS[kind][1])
        ax.set_xlabel("value")
        ax.set_ylabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
