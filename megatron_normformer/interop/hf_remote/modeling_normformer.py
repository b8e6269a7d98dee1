"""NormFormer and the plain Pre-LN transformer for transformers: causal LM and masked LM.

megatron_normformer's exporter writes this file next to ``configuration_normformer.py`` and the
weights; it needs torch and transformers only. It computes what megatron_normformer's model computes
at tensor-parallel degree 1 (``model/{embeddings,layer,attention,mlp,gpt,bert}.py`` there). One layer:

    h = LN_in(x)
    a = Attention(h)                             HeadScale inside (scale_heads)
    a = LN_post_attn(a)                          scale_attn
    x = x + dropout(a)
    y = fc2(LN_ffn(act(fc1(LN_pre_mlp(x)))))     LN_ffn: scale_fc
    x = resid_scale * x + dropout(y)             ResScale: scale_resids

With the four switches off it is the plain Pre-LN transformer. Every LN is the configured
``normalization`` (LayerNorm, or RMSNorm with transformers' Llama semantics). The fused QKV
projection keeps the row order the model was trained with: group-major, for each of the
``num_query_groups`` key/value groups its query heads, then its key head, then its value head (with
one group per head this is [heads, (q, k, v), head_dim], GPT-NeoX's order). With ``swiglu`` the
fc1 rows interleave gate and up units (row 2i gate i, row 2i+1 up i) and act(.) is
silu(gate) * up. Rotary positions (``position_embedding_type="rope"``) rotate the first
``rotary_percent`` of each head's dims in the rotate-half pairing (dim i with dim i + rot/2), after
the optional per-head q/k norms (``qk_layernorm``).

Padding and positions follow megatron_normformer's generation: a position counts the real tokens
before it (left padding does not shift a prompt's positions), no real token attends to padding, and
a padding query attends to itself only, which keeps its (ignored) row finite.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, MaskedLMOutput

from .configuration_normformer import NormFormerConfig

# transformers 5 calls the cache argument and output field ``cache``, 4.x ``past_key_values``.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "relu_squared": relu_squared}


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in float32 and the result cast back before the gain
    (transformers' LlamaRMSNorm, which is what megatron_normformer computes too)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def norm(config: NormFormerConfig, size: int) -> nn.Module:
    """The configured normalisation over ``size`` features."""
    if config.normalization.lower() == "rmsnorm":
        return RMSNorm(size, config.layer_norm_eps)
    return nn.LayerNorm(size, eps=config.layer_norm_eps)


class Rotary(nn.Module):
    """cos/sin of the rotary angles for integer positions: inverse frequencies base^(-2j/rot),
    angles in float32, cast to the activations' dtype (as transformers' Llama does). Held as no
    buffer for the reason given at SinusoidalPositions."""

    def __init__(self, head_dim: int, percent: float, base: float):
        super().__init__()
        self.dim = int(head_dim * percent)
        self.base = base

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        steps = torch.arange(0, self.dim, 2, dtype=torch.int64, device=positions.device).float()
        inv_freq = 1.0 / (self.base ** (steps / self.dim))
        angles = positions.float()[..., None] * inv_freq  # [batch|1, seq, rot/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [batch|1, 1, seq, rot]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary rotation of x's first cos.size(-1) dims (rotate-half pairing); the rest pass."""
    rot = cos.size(-1)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    first, second = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
    rotated = x_rot * cos + torch.cat([-second, first], dim=-1) * sin
    return torch.cat([rotated, x_pass], dim=-1) if x_pass.numel() else rotated


def sinusoidal_table(rows: int, dim: int) -> torch.Tensor:
    """[rows, dim] fp32: row p is [sin(p f), cos(p f)], f_i = exp(-i ln(10000) / (dim/2 - 1)),
    computed in float64 (fairseq's table, and megatron_normformer's)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float64) * -(math.log(10000.0) / max(half - 1, 1)))
    angles = torch.arange(rows, dtype=torch.float64)[:, None] * freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class SinusoidalPositions(nn.Module):
    """The fixed sinusoidal table. It is built on first use rather than held as a buffer: a buffer
    made in ``__init__`` would be left uninitialised by transformers' meta-device loading."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.rows, self.dim = rows, dim
        self._table: Optional[torch.Tensor] = None

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if self._table is None or self._table.device != positions.device:
            self._table = sinusoidal_table(self.rows, self.dim).to(positions.device)
        return self._table[positions]


def attention_mask_for(mask: Optional[torch.Tensor], new: int, past: int, bidirectional: bool
                       ) -> Tuple[Optional[torch.Tensor], bool]:
    """(boolean [batch|1, 1, new, past + new] mask with True = may attend, SDPA's ``is_causal``)
    for ``new`` queries after ``past`` cached positions; ``mask`` is transformers' [batch, past + new]
    padding mask (1 = real token) or None."""
    padded = mask is not None and not bool(mask.all())
    if bidirectional:
        return (mask.bool()[:, None, None, :] if padded else None), False
    total = past + new
    if not padded:
        if past == 0:
            return None, True
        if new == 1:
            return None, False  # one query after the cache sees every key
    if mask is not None and mask.size(1) != total:
        raise ValueError(f"attention_mask covers {mask.size(1)} positions, the cache and the input {total}")
    device = mask.device if mask is not None else None
    query = torch.arange(past, total, device=device)[:, None]
    key = torch.arange(total, device=device)[None, :]
    allowed = key <= query
    if not padded:
        return allowed[None, None], False
    allowed = (allowed[None] & mask.bool()[:, None, :]) | (key == query)[None]
    return allowed[:, None], False


class NormFormerAttention(nn.Module):
    def __init__(self, config: NormFormerConfig, layer_idx: int):
        super().__init__()
        d, bias = config.hidden_size, config.add_bias_linear
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups or self.num_heads
        self.head_dim = d // self.num_heads
        self.dropout = config.attention_dropout
        self.post_proj = config.head_scale_position == "post-proj"
        # output rows group-major: per group its query heads, its key head, its value head
        self.qkv = nn.Linear(d, (self.num_heads + 2 * self.num_groups) * self.head_dim, bias=bias)
        self.dense = nn.Linear(d, d, bias=bias)
        self.head_scale = nn.Parameter(torch.ones(self.num_heads)) if config.scale_heads else None
        self.q_layernorm = norm(config, self.head_dim) if config.qk_layernorm else None
        self.k_layernorm = norm(config, self.head_dim) if config.qk_layernorm else None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool,
                cache: Optional[Cache], rotary: Optional[Tuple[torch.Tensor, torch.Tensor]]
                ) -> torch.Tensor:
        b, s, d = x.shape
        per_group = self.num_heads // self.num_groups
        qkv = self.qkv(x).view(b, s, self.num_groups, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = (qkv[:, :, :, per_group + i].transpose(1, 2) for i in (0, 1))  # [b, groups, s, hd]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if per_group > 1:  # query head h reads group h // per_group
            k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal)
        context = context.transpose(1, 2).reshape(b, s, d)
        if self.head_scale is not None and not self.post_proj:  # the paper: each head before W_O
            context = context * self.head_scale.repeat_interleave(self.head_dim).to(context.dtype)
        out = self.dense(context)
        if self.head_scale is not None and self.post_proj:  # fairseq: head-sized blocks after W_O
            out = (out.view(b, s, self.num_heads, self.head_dim)
                   * self.head_scale.view(-1, 1).to(out.dtype)).view(b, s, d)
        return out


class NormFormerMLP(nn.Module):
    def __init__(self, config: NormFormerConfig):
        super().__init__()
        f, bias = config.intermediate_size, config.add_bias_linear
        self.swiglu = config.swiglu
        self.activation = None if self.swiglu else ACTIVATIONS[config.activation_fn]
        # with swiglu, rows 2i and 2i+1 are gate unit i and up unit i
        self.fc1 = nn.Linear(config.hidden_size, 2 * f if self.swiglu else f, bias=bias)
        self.ffn_layernorm = norm(config, f) if config.scale_fc else None
        self.fc2 = nn.Linear(f, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = self.fc1(x).unflatten(-1, (-1, 2))
            u = F.silu(h[..., 0]) * h[..., 1]
        else:
            u = self.activation(self.fc1(x))
        if self.ffn_layernorm is not None:
            u = self.ffn_layernorm(u)
        return self.fc2(u)


class NormFormerLayer(nn.Module):
    def __init__(self, config: NormFormerConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.dropout = config.hidden_dropout
        self.input_layernorm = norm(config, d)
        self.attention = NormFormerAttention(config, layer_idx)
        self.post_attention_layernorm = norm(config, d) if config.scale_attn else None
        self.pre_mlp_layernorm = norm(config, d)
        self.mlp = NormFormerMLP(config)
        self.resid_scale = nn.Parameter(torch.ones(d)) if config.scale_resids else None

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool,
                cache: Optional[Cache], rotary: Optional[Tuple[torch.Tensor, torch.Tensor]]
                ) -> torch.Tensor:
        a = self.attention(self.input_layernorm(x), mask, is_causal, cache, rotary)
        if self.post_attention_layernorm is not None:
            a = self.post_attention_layernorm(a)
        x = x + F.dropout(a, self.dropout, self.training)
        y = F.dropout(self.mlp(self.pre_mlp_layernorm(x)), self.dropout, self.training)
        return x + y if self.resid_scale is None else torch.addcmul(y, x, self.resid_scale)


class NormFormerPreTrainedModel(PreTrainedModel):
    config_class = NormFormerConfig
    base_model_prefix = "model"
    _no_split_modules = ["NormFormerLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        """Weights of a model built from its config alone (``from_config``); loading a checkpoint
        replaces them. The scales and norms start at the identity, as in training."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, NormFormerAttention) and module.head_scale is not None:
            nn.init.ones_(module.head_scale)
        elif isinstance(module, NormFormerLayer) and module.resid_scale is not None:
            nn.init.ones_(module.resid_scale)
        elif isinstance(module, NormFormerLMHead):
            nn.init.zeros_(module.bias)


class NormFormerModel(NormFormerPreTrainedModel):
    """Embeddings, the layers and the final LayerNorm: hidden states [batch, seq, hidden]."""

    def __init__(self, config: NormFormerConfig):
        super().__init__(config)
        d = config.hidden_size
        self.embed_scale = math.sqrt(d) if config.scale_embedding else 1.0
        self.position_offset = config.position_embedding_offset
        rows = config.max_position_embeddings + config.position_embedding_offset
        self.embed_tokens = nn.Embedding(config.vocab_size, d)
        kind = config.position_embedding_type
        self.embed_positions = (nn.Embedding(rows, d) if kind == "learned"
                                else SinusoidalPositions(rows, d) if kind == "sinusoidal" else None)
        self.rotary = (Rotary(d // config.num_attention_heads, config.rotary_percent, config.rotary_base)
                       if kind == "rope" else None)
        self.layers = nn.ModuleList(NormFormerLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = norm(config, d) if config.final_layernorm else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[Cache] = None,
                past_key_values: Optional[Cache] = None, inputs_embeds: Optional[torch.Tensor] = None,
                use_cache: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
                return_dict: Optional[bool] = None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("NormFormer attends through scaled_dot_product_attention and returns "
                             "no attention weights")
        cache = cache if cache is not None else past_key_values
        causal = not self.config.bidirectional
        use_cache = causal and (use_cache if use_cache is not None else
                                self.config.use_cache and not self.training)
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        new = inputs_embeds.size(1)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            padding = attention_mask if causal else None  # the masked LM counts every position
            position_ids = self._position_ids(padding, new, past, inputs_embeds.device)
        x = inputs_embeds * self.embed_scale if self.embed_scale != 1.0 else inputs_embeds
        rotary = None
        if self.rotary is not None:  # rotary positions have no table, hence no bound
            rotary = self.rotary(position_ids, x.dtype)
        else:
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(f"position {int(position_ids.max())} is past max_position_embeddings "
                                 f"({self.config.max_position_embeddings})")
            x = x + self.embed_positions(position_ids + self.position_offset).to(x.dtype)
        x = F.dropout(x, self.config.hidden_dropout, self.training)

        mask, is_causal = attention_mask_for(attention_mask, new, past, not causal)
        hidden_states = (x,) if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, mask, is_causal, cache, rotary)
            if output_hidden_states:
                hidden_states += (x,)
        if self.final_layernorm is not None:
            x = self.final_layernorm(x)
        return BaseModelOutputWithPast(last_hidden_state=x, hidden_states=hidden_states,
                                       **{CACHE_FIELD: cache})

    @staticmethod
    def _position_ids(mask: Optional[torch.Tensor], new: int, past: int, device) -> torch.Tensor:
        """[batch|1, new]: the number of real tokens before each position."""
        if mask is None:
            return torch.arange(past, past + new, device=device)[None]
        return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)[:, -new:]


class NormFormerForCausalLM(NormFormerPreTrainedModel, GenerationMixin):
    """The causal LM: logits over the vocabulary from the input embedding (tied) or ``lm_head``.

    ``labels`` (the input ids, -100 where not counted) give the mean next-token cross entropy."""

    def __init__(self, config: NormFormerConfig):
        super().__init__(config)
        self.model = NormFormerModel(config)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> Optional[nn.Linear]:
        # None when tied: the projection is the input embedding itself, so there is nothing to tie.
        return self.lm_head

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None, cache: Optional[Cache] = None,
                past_key_values: Optional[Cache] = None, inputs_embeds: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, use_cache: Optional[bool] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                logits_to_keep: int = 0, num_items_in_batch: Optional[int] = None,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids, attention_mask, position_ids, cache, past_key_values,
                         inputs_embeds, use_cache, output_hidden_states, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep and labels is None:
            hidden = hidden[:, -logits_to_keep:]
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100,
                                   reduction="mean" if num_items_in_batch is None else "sum")
            if num_items_in_batch is not None:  # gradient accumulation: the mean over all batches
                loss = loss / num_items_in_batch
        result = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        return result if return_dict is not False else result.to_tuple()


class NormFormerLMHead(nn.Module):
    """RoBERTa's masked-LM head: dense, gelu, LayerNorm, then the input embedding plus a bias."""

    def __init__(self, config: NormFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.layernorm = norm(config, config.hidden_size)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.layernorm(F.gelu(self.dense(hidden))), embedding_weight, self.bias)


class NormFormerForMaskedLM(NormFormerPreTrainedModel):
    """The masked LM: logits at every position; ``labels`` (-100 where not masked) give the mean
    cross entropy over the masked positions."""

    def __init__(self, config: NormFormerConfig):
        super().__init__(config)
        self.model = NormFormerModel(config)
        self.lm_head = NormFormerLMHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(self, input_ids: Optional[torch.LongTensor] = None,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.LongTensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None, labels: Optional[torch.LongTensor] = None,
                output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None,
                **kwargs) -> MaskedLMOutput:
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds,
                         use_cache=False, output_hidden_states=output_hidden_states, **kwargs)
        logits = self.lm_head(out.last_hidden_state, self.model.embed_tokens.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        result = MaskedLMOutput(loss=loss, logits=logits, hidden_states=out.hidden_states)
        return result if return_dict is not False else result.to_tuple()
