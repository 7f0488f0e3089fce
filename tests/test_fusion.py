"""SequenceToTokenAttention and `attend`: naive and absorbed implementations against an explicit float64 reference."""

import importlib.util
import math

import pytest
import torch

from r2m.fusion import SequenceToTokenAttention, attend, pack, unpack
from r2m.packed import PackedStates

TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.bfloat16: dict(atol=2e-5, rtol=2e-4)}


def reference_attention(module, rte, hidden, lengths):
    """Paper Eq. 3 written out per sample and head in float64: project K and V, softmax, output projection."""
    wq, wk, wv, wo = (p.detach().double() for p in (module.q_proj.weight, module.k_proj.weight,
                                                    module.v_proj.weight, module.o_proj.weight))
    heads, head_dim = module.num_heads, module.head_dim
    outputs = []
    for b, length in enumerate(lengths):
        h = hidden[b, :length].double()
        q = rte[b].double() @ wq.T
        per_head = []
        for e in range(heads):
            cols = slice(e * head_dim, (e + 1) * head_dim)
            if length == 0:
                per_head.append(torch.zeros(head_dim, dtype=torch.float64))
                continue
            k, v = h @ wk[cols].T, h @ wv[cols].T
            p = torch.softmax(k @ q[cols] / math.sqrt(head_dim), dim=0)
            per_head.append(p @ v)
        outputs.append(torch.cat(per_head) @ wo.T)
    return torch.stack(outputs)


def random_batch(lengths, policy_dim, rm_dim, dtype, pad_value=float("nan")):
    batch, max_len = len(lengths), max(max(lengths), 1)
    hidden = torch.randn(batch, max_len, policy_dim).to(dtype)
    mask = torch.arange(max_len)[None, :] < torch.tensor(lengths)[:, None]
    hidden[~mask] = pad_value  # padding garbage must never leak into the result
    return torch.randn(batch, rm_dim), hidden, mask


def make_module(rm_dim, policy_dim, attn_dim, heads, impl):
    module = SequenceToTokenAttention(rm_dim, policy_dim, attn_dim, heads, impl=impl)
    torch.nn.init.normal_(module.o_proj.weight, std=0.3)
    return module


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_float64_reference(impl, heads, dtype):
    lengths = [0, 1, 7, 3, 12]
    module = make_module(20, 12, 16, heads, impl)
    rte, hidden, mask = random_batch(lengths, 12, 20, dtype)
    out = module(rte, hidden, mask)
    assert out.shape == (5, 20) and out.dtype == torch.float32
    expected = reference_attention(module, rte, hidden, lengths)
    torch.testing.assert_close(out.double(), expected, **TOLERANCE[dtype])
    assert torch.equal(out[0], torch.zeros(20))


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_of_every_projection_match(heads, dtype):
    lengths = [5, 0, 1, 9]
    naive = make_module(16, 24, 8, heads, "naive")
    absorbed = make_module(16, 24, 8, heads, "torch")
    absorbed.load_state_dict(naive.state_dict())
    rte, hidden, mask = random_batch(lengths, 24, 16, dtype)
    upstream = torch.randn(4, 16)

    reference = make_module(16, 24, 8, heads, "naive").double()
    reference.load_state_dict({k: v.double() for k, v in naive.state_dict().items()})
    padded = torch.where(mask[..., None], hidden.double(), 0.0)
    (reference(rte.double(), padded, mask) * upstream.double()).sum().backward()

    for module in (naive, absorbed):
        (module(rte, hidden, mask) * upstream).sum().backward()
        for name, param in module.named_parameters():
            expected = dict(reference.named_parameters())[name].grad
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            torch.testing.assert_close(param.grad.double(), expected, atol=5e-5, rtol=5e-4, msg=name)


def test_rte_gradient_flows_and_hidden_gets_none():
    module = make_module(8, 8, 8, 2, "torch")
    rte = torch.randn(3, 8, requires_grad=True)
    hidden = torch.randn(3, 4, 8, requires_grad=True)
    module(rte, hidden.detach(), torch.ones(3, 4, dtype=torch.bool)).sum().backward()
    assert rte.grad is not None and torch.isfinite(rte.grad).all()
    assert hidden.grad is None


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_packed_equals_padded(impl):
    lengths = [3, 0, 6, 1]
    module = make_module(10, 6, 8, 2, impl)
    rte, hidden, mask = random_batch(lengths, 6, 10, torch.float32, pad_value=0.0)
    packed, cu_seqlens = pack(hidden, mask)
    assert cu_seqlens.tolist() == [0, 3, 3, 9, 10] and cu_seqlens.dtype == torch.int32
    assert packed.shape == (10, 6)
    torch.testing.assert_close(module(rte, packed, cu_seqlens=cu_seqlens), module(rte, hidden, mask))
    torch.testing.assert_close(module.forward_states(rte, PackedStates.from_padded(hidden, mask)),
                               module(rte, hidden, mask))
    padded, mask_back = unpack(packed, cu_seqlens)
    assert torch.equal(mask_back, mask[:, : mask_back.shape[1]])
    assert torch.equal(padded, hidden[:, : padded.shape[1]])


def test_zero_initialised_output_projection():
    module = SequenceToTokenAttention(12, 10, 8, 2)
    assert torch.count_nonzero(module.o_proj.weight) == 0
    out = module(torch.randn(2, 12), torch.randn(2, 5, 10), torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros(2, 12))
    assert all(p.bias is None for p in (module.q_proj, module.k_proj, module.v_proj, module.o_proj))
    assert module.q_proj.weight.shape == (8, 12) and module.k_proj.weight.shape == (8, 10)
    assert module.o_proj.weight.shape == (12, 8)


def test_left_padded_integer_mask_is_accepted():
    module = make_module(6, 4, 4, 1, "torch")
    rte = torch.randn(2, 6)
    hidden = torch.randn(2, 5, 4)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    shifted = hidden.clone()
    shifted[0, :3] = hidden[0, 2:]
    torch.testing.assert_close(module(rte, hidden, left), module(rte, shifted, right))


def test_auto_picks_torch_on_cpu():
    module = SequenceToTokenAttention(4, 4, 4)
    assert module.resolve_impl(torch.zeros(1, 1, 4)) == "torch"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden=torch.randn(2, 3, 5)), "policy_dim=4"),
        (dict(rte=torch.randn(2, 7)), "rm_dim=6"),
        (dict(rte=torch.randn(3, 6)), "batch=3"),
        (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask must have shape"),
        (dict(mask=torch.ones(2, 3)), "mask must be bool or integer"),
        (dict(hidden=torch.ones(2, 3, 4, dtype=torch.long)), "floating-point"),
        (dict(mask=None), "exactly one of mask"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, message):
    module = SequenceToTokenAttention(6, 4, 4)
    args = dict(rte=torch.randn(2, 6), hidden=torch.randn(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        module(args["rte"], args["hidden"], args["mask"])


def test_bad_cu_seqlens():
    module = SequenceToTokenAttention(6, 4, 4)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        module(torch.randn(2, 6), torch.randn(5, 4), cu_seqlens=torch.tensor([0, 4, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens must be an integer tensor of shape \[batch \+ 1 = 3\]"):
        module(torch.randn(2, 6), torch.randn(5, 4), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


@pytest.mark.parametrize("kwargs, message", [(dict(attn_dim=6, num_heads=4), "divisible"),
                                             (dict(impl="cuda"), "impl must be one of"),
                                             (dict(rm_dim=0), "rm_dim must be an int >= 1")])
def test_constructor_validation(kwargs, message):
    args = dict(rm_dim=4, policy_dim=4, attn_dim=8, num_heads=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SequenceToTokenAttention(**args)


def reference_attend(hidden, lengths, u):
    """c and lse of the absorbed attend(u) -> c (r2m.fusion) per sample and head in float64 (zero-length: c = 0,
    lse = -inf)."""
    c = torch.zeros(u.shape, dtype=torch.float64)
    lse = torch.full(u.shape[:2], float("-inf"), dtype=torch.float64)
    for b, length in enumerate(lengths):
        if length:
            h = hidden[b, :length].double()
            scores = h @ u[b].double().T  # [S, H]
            c[b] = torch.softmax(scores, dim=0).T @ h
            lse[b] = torch.logsumexp(scores, dim=0)
    return c, lse


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_attend_matches_float64_reference_with_its_gradient(layout):
    lengths = [4, 0, 9, 1]
    _, hidden, mask = random_batch(lengths, 6, 1, torch.float32)
    u = (torch.randn(4, 3, 6) * 0.5).requires_grad_(True)
    if layout == "packed":
        packed, cu_seqlens = pack(hidden, mask)
        c, lse = attend(packed, u, cu_seqlens=cu_seqlens, impl="torch")
    else:
        c, lse = attend(hidden, u, mask=mask, impl="torch")  # NaN padding must not leak
    expected_c, expected_lse = reference_attend(hidden, lengths, u.detach())
    assert c.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(c.double(), expected_c, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), expected_lse, atol=1e-6, rtol=1e-5)
    assert torch.equal(c[1], torch.zeros_like(c[1])) and torch.isneginf(lse[1]).all()
    dc = torch.randn_like(c)
    (du,) = torch.autograd.grad(c, u, dc)
    u64 = u.detach().double().requires_grad_(True)
    (expected_du,) = torch.autograd.grad(reference_attend(hidden, lengths, u64)[0], u64, dc.double())
    torch.testing.assert_close(du.double(), expected_du, atol=1e-5, rtol=1e-4)
    assert torch.isfinite(du).all() and torch.equal(du[1], torch.zeros_like(du[1]))


def test_attend_is_what_the_module_runs():
    module = make_module(10, 6, 8, 2, "torch")
    rte, hidden, mask = random_batch([3, 0, 5], 6, 10, torch.float32)
    context, _ = attend(hidden, module.query_vectors(rte), mask=mask)
    torch.testing.assert_close(module.project_context(context), module(rte, hidden, mask), rtol=0, atol=0)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_attend_triton_matches_torch():
    lengths = [5, 0, 8, 1]
    _, hidden, mask = random_batch(lengths, 8, 1, torch.float32, pad_value=0.0)
    packed, cu_seqlens = pack(hidden, mask)
    u = torch.randn(4, 2, 8, requires_grad=True)
    results = {}
    for impl in ("torch", "triton"):
        c, lse = attend(packed, u, cu_seqlens=cu_seqlens, impl=impl)
        results[impl] = (c, lse, torch.autograd.grad(c, u, torch.ones_like(c))[0])
    for got, expected in zip(results["triton"], results["torch"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(impl="naive"), "impl must be 'auto', 'torch' or 'triton'"),
    (dict(mask=None), "exactly one of mask"),
    (dict(u=torch.randn(2, 1, 4)), r"u must have shape \[batch=3, heads, D_p=5\]"),
])
def test_attend_bad_input(kwargs, message):
    args = dict(hidden=torch.randn(3, 4, 5), u=torch.randn(3, 1, 5), mask=torch.ones(3, 4, dtype=torch.bool))
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        attend(args.pop("hidden"), args.pop("u"), **args)
