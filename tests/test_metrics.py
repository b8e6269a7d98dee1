"""The FLOP count behind the logged TFLOP/s and MFU, and the peak it is divided by."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_normformer.config import ModelConfig
from megatron_normformer.model.gpt import GPTModel
from megatron_normformer.parallel.random import seed_everything
from megatron_normformer.parallel.state import SingleProcessState
from megatron_normformer.training import metrics
from megatron_normformer.training.metrics import LN_FLOPS_PER_ELEMENT, flops_per_iteration


@pytest.mark.parametrize("normformer", [False, True])
def test_flops_per_iteration_counts_what_the_model_multiplies(normformer):
    """torch's FlopCounterMode over a real forward + backward: every matmul, the attention's
    included (attention dropout sends SDPA down its counted bmm path). NormFormer's LayerNorms and
    scales are element-wise, which the counter skips and the formula adds."""
    b, s, h, f, layers = 3, 32, 64, 256, 2
    cfg = ModelConfig(num_layers=layers, hidden_size=h, num_attention_heads=4, ffn_hidden_size=f,
                      vocab_size=500, max_position_embeddings=s, hidden_dropout=0.0, attention_dropout=0.1,
                      scale_attn=normformer, scale_fc=normformer, scale_heads=normformer,
                      scale_resids=normformer).validate(1)
    seed_everything(1, 0, 0)
    model = GPTModel(cfg, SingleProcessState(), seed=1).train()
    tokens = torch.randint(0, cfg.vocab_size, (b, s + 1))
    with FlopCounterMode(display=False) as counter:
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    elementwise = 3 * layers * b * s * (LN_FLOPS_PER_ELEMENT * (h + f) + 2 * h) if normformer else 0
    assert flops_per_iteration(cfg, b, s, cfg.padded_vocab_size(1)) == counter.get_total_flops() + elementwise
    # Activation recomputation runs every layer's forward once more (a third of the layers' count);
    # the head is not recomputed.
    plain = flops_per_iteration(cfg, b, s, cfg.padded_vocab_size(1))
    head = 3 * 2 * b * s * h * cfg.padded_vocab_size(1)
    assert flops_per_iteration(cfg, b, s, cfg.padded_vocab_size(1), recompute=True) == plain + (plain - head) / 3


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0),
    ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("Some Future GPU", None),
])
def test_peak_is_the_devices_own(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert metrics.peak_tflops_per_device(None, True) == peak
    assert metrics.peak_tflops_per_device(400.0, True) == 400.0  # --peak-flops-per-device wins
