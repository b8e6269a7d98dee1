"""The model's architecture: ``ModelConfig``, the size presets, NormFormer's parameter count."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from megatron_normformer.config.base import ConfigError

ACTIVATIONS = ("gelu", "relu", "relu_squared")
POSITION_EMBEDDING_TYPES = ("sinusoidal", "learned")
HEAD_SCALE_POSITIONS = ("pre-proj", "post-proj")
INIT_SCHEMES = ("fairseq", "megatron")


@dataclass
class ModelConfig:
    """Architecture of a NormFormer (or plain Pre-LN) transformer language model."""

    num_layers: int = 12
    """Number of transformer layers (``--num-layers``)."""
    hidden_size: int = 768
    """Model width d (``--hidden-size``)."""
    num_attention_heads: int = 12
    """Attention heads per layer (``--num-attention-heads``)."""
    ffn_hidden_size: Optional[int] = None
    """FFN inner size F (``--ffn-hidden-size``); 4 x hidden when unset."""
    vocab_size: int = 51200
    """Real vocabulary size (from the tokenizer, or ``--vocab-size`` with the NullTokenizer)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding to a multiple of this times the TP degree (``--make-vocab-size-divisible-by``).
    Padded rows are never looked up and are masked out of the softmax, so they never change the loss."""
    max_position_embeddings: int = 2048
    """Largest sequence length the position embedding covers (``--max-position-embeddings``)."""
    position_embedding_type: str = "sinusoidal"
    """``sinusoidal`` (the paper's runs, no parameters) or ``learned`` (``--position-embedding-type``)."""
    position_embedding_offset: int = 0
    """Position p reads row p + offset of the position table (``--position-embedding-offset``); a
    learned table has that many extra rows. fairseq's positions start at its padding index + 1 (2)."""
    activation_fn: str = "gelu"
    """FFN activation: ``gelu`` (exact erf form), ``relu`` or ``relu_squared`` (``--activation-fn``)."""
    scale_attn: bool = False
    """NormFormer Post-Attn LN: LayerNorm on the attention output (``--scale-attn``)."""
    scale_fc: bool = False
    """NormFormer FFN LN: LayerNorm over the full FFN inner dimension (``--scale-fc``)."""
    scale_heads: bool = False
    """NormFormer HeadScale: a learned scalar per attention head (``--scale-heads``)."""
    scale_resids: bool = False
    """NormFormer ResScale: learned per-dimension scale of the FFN residual (``--scale-resids``)."""
    head_scale_position: str = "pre-proj"
    """Where HeadScale acts: ``pre-proj`` scales each head before W_O (the paper, sharded by head);
    ``post-proj`` scales head-sized blocks of the W_O output, bias included (fairseq's code)."""
    untie_embeddings_and_output_weights: bool = False
    """Separate output projection instead of the tied input embedding
    (``--untie-embeddings-and-output-weights``)."""
    final_layernorm: bool = True
    """LayerNorm after the last layer; off with fairseq's ``--no-decoder-final-norm`` (causal LM only)."""
    hidden_dropout: float = 0.1
    """Dropout on the residual branches and embeddings (``--hidden-dropout``)."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities (``--attention-dropout``)."""
    layernorm_epsilon: float = 1e-5
    """Epsilon of every LayerNorm (``--layernorm-epsilon``)."""
    init_scheme: Optional[str] = None
    """Initial weights (``--init-scheme``): ``fairseq`` is the paper's model (fairseq transformer_lm:
    token embeddings N(0, d^-0.5) scaled by sqrt(d), xavier-uniform attention, nn.Linear-default FFN;
    the causal LM's default); ``megatron`` is N(0, --init-method-std) everywhere with W_O, W_2 at
    std / sqrt(2 L) and no embedding scale (the masked LM's default). See docs/model.md."""
    init_method_std: float = 0.02
    """Standard deviation of ``--init-scheme megatron``'s normal initialisation
    (``--init-method-std``); output projections (W_O, W_2) use std / sqrt(2 * num_layers)."""
    scale_embedding: Optional[bool] = None
    """Multiply token embeddings by sqrt(hidden) (``--scale-embedding`` / fairseq's
    ``--no-scale-embedding``); on exactly when ``--init-scheme`` is fairseq unless a flag says."""
    bidirectional: bool = False
    """Bidirectional attention with a padding mask (masked LM) instead of causal attention."""

    def __post_init__(self):
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.init_scheme is None:
            self.init_scheme = "megatron" if self.bidirectional else "fairseq"
        if self.scale_embedding is None:
            self.scale_embedding = self.init_scheme == "fairseq"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def validate(self, tensor_parallel_size: int = 1) -> "ModelConfig":
        """Raise ConfigError naming the offending flag; return self for chaining."""
        positive = {
            "--num-layers": self.num_layers,
            "--hidden-size": self.hidden_size,
            "--num-attention-heads": self.num_attention_heads,
            "--ffn-hidden-size": self.ffn_hidden_size,
            "--vocab-size": self.vocab_size,
            "--max-position-embeddings": self.max_position_embeddings,
            "--make-vocab-size-divisible-by": self.make_vocab_size_divisible_by,
            "--tensor-model-parallel-size": tensor_parallel_size,
        }
        for flag, value in positive.items():
            if value is None or value <= 0:
                raise ConfigError(f"{flag} must be a positive integer, got {value}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"--hidden-size ({self.hidden_size}) must be divisible by "
                f"--num-attention-heads ({self.num_attention_heads})")
        if self.num_attention_heads % tensor_parallel_size:
            raise ConfigError(
                f"--num-attention-heads ({self.num_attention_heads}) must be divisible by "
                f"--tensor-model-parallel-size ({tensor_parallel_size})")
        if self.ffn_hidden_size % tensor_parallel_size:
            raise ConfigError(
                f"--ffn-hidden-size ({self.ffn_hidden_size}) must be divisible by "
                f"--tensor-model-parallel-size ({tensor_parallel_size})")
        for flag, value, choices in (
                ("--activation-fn", self.activation_fn, ACTIVATIONS),
                ("--position-embedding-type", self.position_embedding_type, POSITION_EMBEDDING_TYPES),
                ("--head-scale-position", self.head_scale_position, HEAD_SCALE_POSITIONS),
                ("--init-scheme", self.init_scheme, INIT_SCHEMES)):
            if value not in choices:
                raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        if self.position_embedding_offset is None or self.position_embedding_offset < 0:
            raise ConfigError("--position-embedding-offset must be a non-negative integer, got "
                              f"{self.position_embedding_offset}")
        if self.bidirectional and not self.final_layernorm:
            raise ConfigError("--no-decoder-final-norm is for causal models; the masked LM keeps "
                              "its final LayerNorm")
        if self.position_embedding_type == "sinusoidal" and self.hidden_size % 2:
            raise ConfigError(
                f"--hidden-size ({self.hidden_size}) must be even for sinusoidal positions")
        for flag, p in (("--hidden-dropout", self.hidden_dropout),
                        ("--attention-dropout", self.attention_dropout)):
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"{flag} must be in [0, 1), got {p}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown model config fields: {sorted(unknown)}")
        # Configs saved before --init-scheme existed describe Megatron-initialised models and name
        # their embedding scale explicitly.
        return cls(**{"init_scheme": "megatron", **d})


@dataclass(frozen=True)
class SizePreset:
    num_layers: int
    hidden_size: int
    num_attention_heads: int


# fairseq's gpt3 presets (ffn = 4 x hidden) and the RoBERTa/BERT encoders.
MODEL_SIZE_PRESETS = {
    "125M": SizePreset(12, 768, 12),
    "355M": SizePreset(24, 1024, 16),
    "760M": SizePreset(24, 1536, 16),
    "1.3B": SizePreset(24, 2048, 32),
    "2.7B": SizePreset(32, 2560, 32),
    "6.7B": SizePreset(32, 4096, 32),
    "13B": SizePreset(40, 5120, 40),
    "175B": SizePreset(96, 12288, 96),
    "bert-base": SizePreset(12, 768, 12),
    "bert-large": SizePreset(24, 1024, 16),
}


def normformer_extra_parameters(cfg: ModelConfig) -> int:
    """Parameters the four NormFormer operations add per model (the paper's +0.1M at 125M)."""
    per_layer = 0
    if cfg.scale_heads:
        per_layer += cfg.num_attention_heads
    if cfg.scale_attn:
        per_layer += 2 * cfg.hidden_size
    if cfg.scale_fc:
        per_layer += 2 * cfg.ffn_hidden_size
    if cfg.scale_resids:
        per_layer += cfg.hidden_size
    return per_layer * cfg.num_layers
