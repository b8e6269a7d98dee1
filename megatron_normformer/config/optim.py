"""The optimizer and its learning-rate schedule (defaults: the NormFormer recipe, paper Table 8,
fairseq train_lm.sh: Adam (0.9, 0.98), eps 1e-8, weight decay 0.01, linear warm-up then linear
decay to 0, no gradient clipping)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

LR_DECAY_STYLES = ("linear", "cosine", "constant")
OPTIMIZERS = ("adam", "sgd")


@dataclass
class OptimizerConfig:
    """AdamW (or SGD) with Megatron parameter groups and the learning-rate schedule."""

    optimizer: str = field(default="adam", metadata={"choices": OPTIMIZERS})
    """``adam``: AdamW, decoupled weight decay (the recipe's; Megatron's ``adam``, which is AdamW
    too); ``sgd``: SGD with ``--sgd-momentum``, weight decay added to the gradient as torch and
    Megatron do (``--optimizer``)."""
    lr: float = 3e-3
    """Peak learning rate (``--lr``); the paper's NormFormer 125M value is the default."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay (``--min-lr``)."""
    lr_decay_style: str = field(default="linear", metadata={"choices": LR_DECAY_STYLES})
    """Shape of the decay after warm-up: linear, cosine or constant (``--lr-decay-style``)."""
    lr_warmup_iters: int = 0
    """Iterations of linear warm-up from 0 to ``--lr`` (``--lr-warmup-iters``)."""
    lr_decay_iters: Optional[int] = None
    """Iteration at which the decay reaches ``--min-lr``; ``--train-iters`` when unset."""
    lr_warmup_fraction: Optional[float] = None
    """Warm-up as a fraction of the decay length (``--lr-warmup-fraction``), instead of
    ``--lr-warmup-iters`` / ``--lr-warmup-samples``."""
    lr_warmup_samples: int = 0
    """Sequences of linear warm-up, with ``--train-samples`` (``--lr-warmup-samples``)."""
    lr_decay_samples: Optional[int] = None
    """Sequences after which the decay reaches ``--min-lr``, with ``--train-samples``;
    ``--train-samples`` when unset (``--lr-decay-samples``)."""
    lr_warmup_tokens: Optional[int] = None
    """Tokens of linear warm-up (Megatron-DeepSpeed's ``--lr-warmup-tokens``): warm-up samples =
    tokens / ``--seq-length``."""
    lr_decay_tokens: Optional[int] = None
    """Tokens after which the decay reaches ``--min-lr`` (Megatron-DeepSpeed's
    ``--lr-decay-tokens``): decay samples = tokens / ``--seq-length``."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) weight decay (``--weight-decay``). By default, as in Megatron, biases and
    every 1-D parameter (LayerNorm weights, HeadScale gamma, ResScale lambda) are exempt."""
    weight_decay_all: bool = False
    """Decay every parameter, norms, biases and NormFormer scales included, as fairseq does."""
    clip_grad: float = 0.0
    """Clip the global gradient L2 norm to this value; 0 disables clipping (the paper's runs)."""
    adam_beta1: float = 0.9
    """Adam beta1 (``--adam-beta1``)."""
    adam_beta2: float = 0.98
    """Adam beta2 (``--adam-beta2``)."""
    adam_eps: float = 1e-8
    """Adam epsilon (``--adam-eps``)."""
    sgd_momentum: float = 0.9
    """Momentum of ``--optimizer sgd`` (``--sgd-momentum``)."""
