"""The partitioned FFN LayerNorm and the vocab-parallel cross entropy against their dense forms."""
import pytest
import torch
import torch.nn.functional as F

from megatron_normformer.testing import spawn


def _partitioned_ln_vs_dense():
    import torch.distributed as dist

    from megatron_normformer.model.norms import partitioned_layer_norm
    from megatron_normformer.parallel.mappings import (
        gather_from_tensor_parallel,
        scatter_to_tensor_parallel,
    )

    group = dist.group.WORLD
    world = dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    n = 8 * world
    # A large common offset makes naive E[x^2] - E[x]^2 lose digits; ours must not.
    x = (torch.randn(3, 5, n, generator=g, dtype=torch.float64) * 2.0 + 40.0).requires_grad_()
    w = torch.randn(n, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(n, generator=g, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(3, 5, n, generator=g, dtype=torch.float64)

    def sharded(x, w, b):
        # scatter: forward keeps this rank's slice, backward gathers all ranks' gradients, so the
        # composite is a full-width function whose Jacobian gradcheck can verify in lockstep.
        local = [scatter_to_tensor_parallel(t, group) for t in (x, w, b)]
        return gather_from_tensor_parallel(partitioned_layer_norm(*local, 1e-5, group), group)

    y = sharded(x, w, b)
    (y * upstream).sum().backward()
    got = (y.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone())
    for t in (x, w, b):
        t.grad = None
    y_ref = F.layer_norm(x, (n,), w, b, 1e-5)
    (y_ref * upstream).sum().backward()
    ref = (y_ref.detach(), x.grad, w.grad, b.grad)
    errors = [((a - r).abs().max() / r.abs().max()).item() for a, r in zip(got, ref)]

    small = [t.detach()[:1, :2].clone().requires_grad_() if t.dim() == 3 else t.detach().clone().requires_grad_()
             for t in (x, w, b)]
    passed = torch.autograd.gradcheck(sharded, small, eps=1e-6, atol=1e-7, rtol=1e-5)
    return errors, passed


@pytest.mark.parametrize("tp", [2, 4])
def test_partitioned_layer_norm_is_exact_full_width_layer_norm(tp):
    for errors, passed in spawn(_partitioned_ln_vs_dense, tp):
        assert passed
        assert max(errors) < 1e-12, errors


def test_partitioned_layer_norm_single_rank_gradcheck():
    from megatron_normformer.model.norms import _PartitionedLayerNormFunction

    g = torch.Generator().manual_seed(1)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
               for s in ((2, 3, 6), (6,), (6,)))
    assert torch.autograd.gradcheck(
        lambda x, w, b: _PartitionedLayerNormFunction.apply(x, w, b, 1e-5, None), (x, w, b))


VOCAB = 37  # not divisible by any TP degree: padded


def _vocab_parallel_ce():
    import torch.distributed as dist

    from megatron_normformer.parallel.cross_entropy import vocab_parallel_cross_entropy

    world, rank = dist.get_world_size(), dist.get_rank()
    padded = 40  # multiple of 1, 2, 4
    per_rank = padded // world
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, padded, generator=g, dtype=torch.float64)
    logits[..., VOCAB:] = 1e4  # would dominate the softmax if padding were not excluded
    target = torch.randint(0, VOCAB, (4, 6), generator=g)
    upstream = torch.rand(4, 6, generator=g, dtype=torch.float64)
    local = logits[..., rank * per_rank:(rank + 1) * per_rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, rank * per_rank, VOCAB, dist.group.WORLD)
    (loss * upstream).sum().backward()
    return loss.detach(), local.grad, rank * per_rank


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_cross_entropy_matches_dense(tp):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 40, generator=g, dtype=torch.float64)
    logits[..., VOCAB:] = 1e4
    target = torch.randint(0, VOCAB, (4, 6), generator=g)
    upstream = torch.rand(4, 6, generator=g, dtype=torch.float64)
    real = logits[..., :VOCAB].clone().requires_grad_()
    ref = F.cross_entropy(real.flatten(0, 1), target.flatten(), reduction="none").view(4, 6)
    (ref * upstream).sum().backward()

    results = spawn(_vocab_parallel_ce, tp)
    grad = torch.cat([r[1] for r in results], dim=-1)
    for loss, _, _ in results:
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad[..., :VOCAB], real.grad, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(grad[..., VOCAB:]) == 0  # padding gets no gradient


@pytest.mark.parametrize("tokens", [1, 3, 48])
def test_row_parallel_input_scale_equals_scaled_input(tokens):
    """HeadScale's input_scale gives (x * s) A^T + b and its gradients whichever side it scales:
    A's columns for 48 tokens (>= 16 outputs), x itself for 1 and 3 (decoding)."""
    from megatron_normformer.parallel.layers import InitSpec, RowParallelLinear

    torch.manual_seed(0)
    layer = RowParallelLinear(24, 16, None, 0, 1, init=InitSpec(7, "w", 0.5)).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(tokens, 24, dtype=torch.float64, requires_grad=True)
    s = torch.rand(24, dtype=torch.float64).add_(0.5).requires_grad_()
    grad = torch.randn(tokens, 16, dtype=torch.float64)

    got = layer(x, input_scale=s)
    got.backward(grad)
    got_grads = [t.grad.clone() for t in (x, s, layer.weight, layer.bias)]
    for t in (x, s, layer.weight, layer.bias):
        t.grad = None
    want = F.linear(x * s, layer.weight, layer.bias)
    want.backward(grad)

    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, t in zip(got_grads, (x, s, layer.weight, layer.bias)):
        torch.testing.assert_close(g, t.grad, rtol=1e-12, atol=1e-12)
