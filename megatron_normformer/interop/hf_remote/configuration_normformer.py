"""NormFormerConfig: a megatron_normformer model's architecture, as transformers reads it.

megatron_normformer's exporter (``tools/convert_checkpoint.py --output-hf``) writes this file next
to the weights; it needs transformers only. Fields take transformers' usual names where it has one
(``hidden_size``, ``num_hidden_layers``, ``intermediate_size``, ``layer_norm_eps``,
``initializer_range``, ``tie_word_embeddings``) and megatron_normformer's ``ModelConfig`` names
elsewhere, with the same meaning.
"""
from typing import Optional

from transformers import PretrainedConfig


class NormFormerConfig(PretrainedConfig):
    """NormFormer (Shleifer et al., 2021) or plain Pre-LN transformer, causal or masked LM.

    - ``scale_attn``: LayerNorm on the attention output (the paper's Post-Attn LN).
    - ``scale_fc``: LayerNorm over the FFN's inner dimension, after the activation (FFN LN).
    - ``scale_heads``: a learned scalar per attention head (HeadScale), applied to each head's
      output before the output projection (``head_scale_position="pre-proj"``, the paper) or to
      head-sized blocks of the projection's output, bias included (``"post-proj"``, fairseq's code).
    - ``scale_resids``: a learned per-dimension scale of the FFN's residual (ResScale).
    - ``position_embedding_type``: ``"sinusoidal"`` (fairseq's table, no parameters),
      ``"learned"`` (position p reads row ``p + position_embedding_offset``), or ``"rope"``:
      rotary positions on q and k, no table, ``max_position_embeddings`` no bound.
    - ``rotary_base``, ``rotary_percent``: rope's base (transformers' ``rope_theta``) and the
      fraction of each head's dims rotated (``partial_rotary_factor``), rotate-half pairing.
    - ``activation_fn``: ``"gelu"`` (exact erf form), ``"relu"`` or ``"relu_squared"``; unused with
      ``swiglu``, the gated FFN silu(x W_gate) * (x W_up) whose fc1 rows interleave gate and up.
    - ``num_query_groups``: key/value heads (grouped-query attention); None is one per head.
    - ``normalization``: ``"LayerNorm"`` or ``"RMSNorm"``, for every norm of the model.
    - ``add_bias_linear``: biases in the attention and FFN linears.
    - ``qk_layernorm``: a norm over head_dim on each query and key head, before rope.
    - ``scale_embedding``: token embeddings times sqrt(hidden_size).
    - ``final_layernorm``: a LayerNorm after the last layer (fairseq's ``--no-decoder-final-norm``
      turns it off).
    - ``bidirectional``: a masked LM (RoBERTa-style head) instead of a causal LM.
    - ``init_scheme``, ``make_vocab_size_divisible_by``: unused here; kept so that a model that
      goes back to megatron_normformer trains on as it was configured.
    """

    model_type = "normformer"

    def __init__(self, vocab_size: int = 51200, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 12, intermediate_size: int = 3072,
                 max_position_embeddings: int = 2048, position_embedding_type: str = "sinusoidal",
                 position_embedding_offset: int = 0, rotary_base: int = 10000,
                 rotary_percent: float = 1.0, activation_fn: str = "gelu", swiglu: bool = False,
                 num_query_groups: Optional[int] = None, normalization: str = "LayerNorm",
                 add_bias_linear: bool = True, qk_layernorm: bool = False,
                 scale_attn: bool = False, scale_fc: bool = False, scale_heads: bool = False,
                 scale_resids: bool = False, head_scale_position: str = "pre-proj",
                 scale_embedding: bool = True, final_layernorm: bool = True,
                 bidirectional: bool = False, layer_norm_eps: float = 1e-5,
                 hidden_dropout: float = 0.1, attention_dropout: float = 0.1,
                 initializer_range: float = 0.02, init_scheme: str = "fairseq",
                 make_vocab_size_divisible_by: int = 128, use_cache: bool = True,
                 tie_word_embeddings: bool = True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type
        self.position_embedding_offset = position_embedding_offset
        self.rotary_base = rotary_base
        self.rotary_percent = rotary_percent
        self.activation_fn = activation_fn
        self.swiglu = swiglu
        self.num_query_groups = num_query_groups
        self.normalization = normalization
        self.add_bias_linear = add_bias_linear
        self.qk_layernorm = qk_layernorm
        self.scale_attn = scale_attn
        self.scale_fc = scale_fc
        self.scale_heads = scale_heads
        self.scale_resids = scale_resids
        self.head_scale_position = head_scale_position
        self.scale_embedding = scale_embedding
        self.final_layernorm = final_layernorm
        self.bidirectional = bidirectional
        self.layer_norm_eps = layer_norm_eps
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.init_scheme = init_scheme
        self.make_vocab_size_divisible_by = make_vocab_size_divisible_by
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
