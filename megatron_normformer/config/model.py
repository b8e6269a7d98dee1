"""The model's architecture: ``ModelConfig``, the size presets, NormFormer's parameter count."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from megatron_normformer.config.base import ConfigError

ACTIVATIONS = ("gelu", "relu", "relu_squared")
POSITION_EMBEDDING_TYPES = ("sinusoidal", "learned", "rope")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
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
    """``sinusoidal`` (the paper's runs, no parameters), ``learned``, or ``rope``: rotary positions
    applied to q and k in every layer, no position table, and ``--max-position-embeddings`` does not
    bound the sequence length (``--position-embedding-type``; ``--use-rotary-position-embeddings``)."""
    rotary_base: int = 10000
    """Base theta of the rotary frequencies, inv_freq_j = base^(-2j / rotary_dim)
    (``--rotary-base``, Megatron-DeepSpeed's ``--rotary-position-embeddings-theta``)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dims that rotate (``--rotary-percent``): rotary_dim =
    int(head_dim * rotary_percent), which must be even and positive; the rest pass unrotated."""
    position_embedding_offset: int = 0
    """Position p reads row p + offset of the position table (``--position-embedding-offset``); a
    learned table has that many extra rows. fairseq's positions start at its padding index + 1 (2)."""
    activation_fn: str = "gelu"
    """FFN activation: ``gelu`` (exact erf form), ``relu`` or ``relu_squared`` (``--activation-fn``);
    unused with ``--swiglu``, whose gate is silu."""
    swiglu: bool = False
    """Gated FFN (silu(x W_gate) * (x W_up)) W_2 (``--swiglu``). fc1 holds gate and up interleaved
    (row 2i gate unit i, row 2i+1 up unit i); without ``--ffn-hidden-size``, F is Megatron-LM's
    int(4 * hidden * 2/3 / 64) * 64 (two thirds of 4 x hidden, rounded down to a multiple of 64)."""
    num_query_groups: Optional[int] = None
    """Key/value heads G of grouped-query attention, each shared by H / G query heads
    (``--group-query-attention --num-query-groups G``, or ``--num-key-value-heads G``); None is
    multi-head attention (G = H), 1 multi-query. G must divide the heads and be divisible by TP."""
    normalization: str = "LayerNorm"
    """Kind of every norm of the model, NormFormer's included: ``LayerNorm`` or ``RMSNorm``
    (``--normalization``; lower-case accepted). RMSNorm has a weight and no bias."""
    add_bias_linear: bool = True
    """Biases in the attention (qkv, dense) and FFN (fc1, fc2) linears; ``--disable-bias-linear``
    removes them (LayerNorms keep theirs)."""
    qk_layernorm: bool = False
    """A norm of the ``--normalization`` kind over head_dim on each query and key head, before the
    rotary positions (``--qk-layernorm``)."""
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
            self.ffn_hidden_size = (swiglu_ffn_hidden_size(self.hidden_size) if self.swiglu
                                    else 4 * self.hidden_size)
        self.normalization = _NORMALIZATION_NAMES.get(str(self.normalization).lower(),
                                                      self.normalization)
        if self.init_scheme is None:
            self.init_scheme = "megatron" if self.bidirectional else "fairseq"
        if self.scale_embedding is None:
            self.scale_embedding = self.init_scheme == "fairseq"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """G, the key/value heads (H for multi-head attention)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rotary positions rotate."""
        return int(self.head_dim * self.rotary_percent)

    @property
    def max_sequence_length(self) -> Optional[int]:
        """The longest sequence the model can take: the position table's rows, None for rotary
        positions (they have no table)."""
        return None if self.position_embedding_type == "rope" else self.max_position_embeddings

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
                ("--normalization", self.normalization, NORMALIZATIONS),
                ("--position-embedding-type", self.position_embedding_type, POSITION_EMBEDDING_TYPES),
                ("--head-scale-position", self.head_scale_position, HEAD_SCALE_POSITIONS),
                ("--init-scheme", self.init_scheme, INIT_SCHEMES)):
            if value not in choices:
                raise ConfigError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        self._validate_modern(tensor_parallel_size)
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

    def _validate_modern(self, tensor_parallel_size: int) -> None:
        """The issue-24 options: rotary positions, SwiGLU, grouped-query attention."""
        groups = self.num_query_groups
        if groups is not None:
            if groups <= 0 or self.num_attention_heads % groups:
                raise ConfigError(f"--num-query-groups ({groups}) must be a positive divisor of "
                                  f"--num-attention-heads ({self.num_attention_heads})")
            if groups % tensor_parallel_size:
                raise ConfigError(f"--num-query-groups ({groups}) must be divisible by "
                                  f"--tensor-model-parallel-size ({tensor_parallel_size}): each rank "
                                  "holds whole key/value groups")
        if self.swiglu and self.activation_fn != "gelu":
            raise ConfigError(f"--swiglu gates with silu; --activation-fn {self.activation_fn} "
                              "contradicts it")
        if self.position_embedding_type == "rope":
            if self.rotary_base is None or self.rotary_base <= 0:
                raise ConfigError(f"--rotary-base must be positive, got {self.rotary_base}")
            if not 0.0 < self.rotary_percent <= 1.0:
                raise ConfigError(f"--rotary-percent must be in (0, 1], got {self.rotary_percent}")
            if self.rotary_dim <= 0 or self.rotary_dim % 2:
                raise ConfigError(
                    f"--rotary-percent {self.rotary_percent} of head_dim {self.head_dim} rotates "
                    f"{self.rotary_dim} dims; rotary positions need an even, positive number")
            if self.position_embedding_offset:
                raise ConfigError("--position-embedding-offset offsets a position table; "
                                  "--position-embedding-type rope has none")

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


_NORMALIZATION_NAMES = {name.lower(): name for name in NORMALIZATIONS}


def swiglu_ffn_hidden_size(hidden_size: int) -> int:
    """Megatron-LM's SwiGLU width: two thirds of 4 x hidden (same parameters as a 4 x hidden
    two-matrix FFN), rounded down to a multiple of 64."""
    return int(4 * hidden_size * 2 / 3 / 64) * 64


# What a Llama-style preset sets besides its shape: Llama's architecture, Megatron's initialisation
# (normal, no embedding scale) and Llama 3's rotary base.
LLAMA_ARCHITECTURE = dict(position_embedding_type="rope", rotary_base=500000, swiglu=True,
                          normalization="RMSNorm", add_bias_linear=False,
                          untie_embeddings_and_output_weights=True, init_scheme="megatron")


@dataclass(frozen=True)
class SizePreset:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: Optional[int] = None
    num_query_groups: Optional[int] = None
    llama: bool = False
    """Llama's architecture (:data:`LLAMA_ARCHITECTURE`) rather than GPT-3's."""

    def fields(self) -> dict:
        """The ModelConfig fields this preset sets."""
        values = dict(num_layers=self.num_layers, hidden_size=self.hidden_size,
                      num_attention_heads=self.num_attention_heads)
        if self.ffn_hidden_size is not None:
            values["ffn_hidden_size"] = self.ffn_hidden_size
        if self.num_query_groups is not None:
            values["num_query_groups"] = self.num_query_groups
        if self.llama:
            values.update(LLAMA_ARCHITECTURE)
        return values


# fairseq's gpt3 presets (ffn = 4 x hidden), the RoBERTa/BERT encoders, and a Llama-style family:
# llama-1B/3B/8B are Llama 3.2 1B / 3.2 3B / 3.1 8B's shapes, llama-150M the 125M shape (154M with an untied 51,200-row vocabulary).
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
    "llama-150M": SizePreset(12, 768, 12, ffn_hidden_size=2048, num_query_groups=4, llama=True),
    "llama-1B": SizePreset(16, 2048, 32, ffn_hidden_size=8192, num_query_groups=8, llama=True),
    "llama-3B": SizePreset(28, 3072, 24, ffn_hidden_size=8192, num_query_groups=8, llama=True),
    "llama-8B": SizePreset(32, 4096, 32, ffn_hidden_size=14336, num_query_groups=8, llama=True),
}


def normformer_extra_parameters(cfg: ModelConfig) -> int:
    """Parameters the four NormFormer operations add per model (the paper's +0.1M at 125M)."""
    per_layer = 0
    if cfg.scale_heads:
        per_layer += cfg.num_attention_heads
    norm = 2 if cfg.normalization == "LayerNorm" else 1  # RMSNorm has no bias
    if cfg.scale_attn:
        per_layer += norm * cfg.hidden_size
    if cfg.scale_fc:
        per_layer += norm * cfg.ffn_hidden_size
    if cfg.scale_resids:
        per_layer += cfg.hidden_size
    return per_layer * cfg.num_layers
