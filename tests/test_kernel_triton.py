"""The Triton kernel of r2m.kernels against an explicit float64 reference.

On CUDA machines the kernels run on the GPU; elsewhere on CPU tensors through TRITON_INTERPRET=1 (see conftest).
Inputs are fresh random draws every run; the seed is drawn from the OS and printed in every failure message.
"""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from r2m.fusion import SequenceToTokenAttention
from r2m.kernels import seq_to_token_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative error ||out - ref|| / ||ref||. The reference reads the same rounded h, so every dtype is left with fp32
# accumulation error only; half inputs get a little more room for the GPU's approximate exp on larger rows.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
# Interpreter configs step over 8 tokens at a time: lengths 0, 1, a multiple of 8 and odd ones around it.
FIXED_LENGTHS = [0, 1, 8, 13]


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def ragged_batch(heads: int, dim: int, dtype: torch.dtype, extra: int = 3):
    """Random lengths (the fixed edge cases plus ``extra`` draws in [0, 30]), packed h, cu_seqlens and u."""
    lengths = FIXED_LENGTHS + torch.randint(0, 31, (extra,)).tolist()
    lengths = [lengths[i] for i in torch.randperm(len(lengths)).tolist()]
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
    h = torch.randn(int(cu_seqlens[-1]), dim).to(device=DEVICE, dtype=dtype)
    u = (torch.randn(len(lengths), heads, dim, device=DEVICE) / math.sqrt(dim) * 3).requires_grad_()
    cu_seqlens = cu_seqlens.to(DEVICE)
    return lengths, h, cu_seqlens, u


def reference(h: torch.Tensor, cu_seqlens: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence and head in float64 on the CPU: softmax attention of query u over keys = values = h."""
    h, cu_seqlens, u = h.cpu(), cu_seqlens.cpu(), u.cpu()
    contexts, lses = [], []
    for b in range(u.shape[0]):
        tokens = h[cu_seqlens[b]:cu_seqlens[b + 1]].double()
        per_head_c, per_head_lse = [], []
        for e in range(u.shape[1]):
            scores = tokens @ u[b, e]
            if tokens.shape[0] == 0:
                per_head_c.append(torch.zeros(h.shape[1], dtype=torch.float64))
                per_head_lse.append(torch.tensor(float("-inf"), dtype=torch.float64))
                continue
            per_head_c.append(torch.softmax(scores, dim=0) @ tokens)
            per_head_lse.append(torch.logsumexp(scores, dim=0))
        contexts.append(torch.stack(per_head_c))
        lses.append(torch.stack(per_head_lse))
    return torch.stack(contexts), torch.stack(lses)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def check_against_reference(h, cu_seqlens, u, lengths, dtype, seed, num_splits=None):
    c, lse = seq_to_token_attention(h, cu_seqlens, u, num_splits=num_splits)
    dc, dlse = torch.randn_like(c), torch.randn_like(lse)
    empty = torch.tensor(lengths, device=DEVICE) == 0
    # lse is -inf for empty sequences: their dlse is dropped so the loss stays finite.
    (du,) = torch.autograd.grad((c * dc).sum() + (lse.masked_fill(empty[:, None], 0) * dlse).sum(), u)

    u64 = u.detach().cpu().double().requires_grad_()
    ref_c, ref_lse = reference(h, cu_seqlens, u64)
    dc64, dlse64, empty64 = dc.cpu().double(), dlse.cpu().double(), empty.cpu()
    ref_loss = (ref_c * dc64).sum() + (ref_lse.masked_fill(empty64[:, None], 0) * dlse64).sum()
    (ref_du,) = torch.autograd.grad(ref_loss, u64)

    context = f"seed={seed} lengths={lengths} dtype={dtype} num_splits={num_splits}"
    assert c.dtype == lse.dtype == du.dtype == torch.float32, context
    assert torch.isfinite(c).all() and torch.isfinite(du).all(), context
    assert torch.equal(c[empty], torch.zeros_like(c[empty])), context
    assert torch.equal(du[empty], torch.zeros_like(du[empty])), context
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all(), context
    tolerance = TOLERANCE[dtype]
    assert relative_error(c, ref_c) < tolerance, context
    assert relative_error(lse[~empty], ref_lse[~empty64]) < tolerance, context
    assert relative_error(du, ref_du) < tolerance, context


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [1, 3, 4])
def test_matches_float64_reference(dtype, heads):
    seed = fresh_seed()
    lengths, h, cu_seqlens, u = ragged_batch(heads, 37, dtype)
    check_against_reference(h, cu_seqlens, u, lengths, dtype, seed)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 40])
def test_split_sequences_combine_to_the_same_result(num_splits):
    """Splits of one sequence, including empty ones (40 splits of at most 30 tokens), merge to the same result."""
    seed = fresh_seed()
    lengths, h, cu_seqlens, u = ragged_batch(4, 100, torch.bfloat16)
    check_against_reference(h, cu_seqlens, u, lengths, torch.bfloat16, seed, num_splits=num_splits)


@pytest.mark.parametrize("dim", [1, 16, 129])
def test_feature_sizes_with_masked_tails(dim):
    seed = fresh_seed()
    lengths, h, cu_seqlens, u = ragged_batch(2, dim, torch.float32)
    check_against_reference(h, cu_seqlens, u, lengths, torch.float32, seed, num_splits=2)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_extreme_scores_stay_finite(num_splits):
    """Scores near -300 and +300 (lse far from 0): nothing may overflow, masked tail rows included."""
    seed = fresh_seed()
    lengths, h, cu_seqlens, u = ragged_batch(2, 37, torch.float32)
    h = h.abs() + 1
    with torch.no_grad():
        u[:, 0] = -8 / math.sqrt(37)
        u[:, 1] = 8 / math.sqrt(37)
    check_against_reference(h, cu_seqlens, u, lengths, torch.float32, seed, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_every_output_element_is_written(monkeypatch, num_splits):
    """Every torch.empty in the call (outputs, split partials, du) starts as NaN: the kernels must overwrite it."""
    real_empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    seed = fresh_seed()
    lengths, h, cu_seqlens, u = ragged_batch(4, 45, torch.float16)
    monkeypatch.setattr(torch, "empty", poisoned_empty)
    check_against_reference(h, cu_seqlens, u, lengths, torch.float16, seed, num_splits=num_splits)


def test_all_sequences_empty():
    u = torch.randn(3, 2, 24, device=DEVICE, requires_grad=True)
    c, lse = seq_to_token_attention(torch.randn(0, 24, device=DEVICE), torch.zeros(4, dtype=torch.int32, device=DEVICE),
                                    u)
    c.sum().backward()
    assert torch.equal(c, torch.zeros_like(c)) and torch.isneginf(lse).all()
    assert torch.equal(u.grad, torch.zeros_like(u))


def test_policy_states_get_no_gradient():
    _, h, cu_seqlens, u = ragged_batch(2, 20, torch.float32)
    h.requires_grad_()
    seq_to_token_attention(h, cu_seqlens, u)[0].sum().backward()
    assert h.grad is None and u.grad is not None


def make_module(impl: str, heads: int) -> SequenceToTokenAttention:
    module = SequenceToTokenAttention(rm_dim=20, policy_dim=37, attn_dim=16, num_heads=heads, impl=impl)
    torch.nn.init.normal_(module.o_proj.weight, std=0.3)  # o_proj starts at zero, which would hide q/k/v gradients
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_module_outputs_and_all_projection_gradients(dtype, heads, packed):
    """SequenceToTokenAttention(impl="triton") against impl="naive" run in float64."""
    seed = fresh_seed()
    lengths, h, cu_seqlens, _ = ragged_batch(heads, 37, dtype)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    padded = torch.zeros(len(lengths), max(lengths), 37, dtype=dtype)
    padded[mask] = h.cpu()
    rte, upstream = torch.randn(len(lengths), 20, device=DEVICE), torch.randn(len(lengths), 20, device=DEVICE)

    triton_module = make_module("triton", heads).to(DEVICE)
    naive64 = make_module("naive", heads).double()
    naive64.load_state_dict({k: v.double() for k, v in triton_module.state_dict().items()})
    inputs = (h, None, cu_seqlens) if packed else (padded.to(DEVICE), mask.to(DEVICE), None)
    out = triton_module(rte, *inputs)
    expected = naive64(rte.cpu().double(), padded.double(), mask)
    (out * upstream).sum().backward()
    (expected * upstream.cpu().double()).sum().backward()

    context = f"seed={seed} lengths={lengths}"
    assert relative_error(out, expected.detach()) < 1e-5, context
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        grad, ref_grad = getattr(triton_module, name).weight.grad, getattr(naive64, name).weight.grad
        assert ref_grad.norm() > 0, f"{name}: reference gradient is zero, the check would be vacuous"
        assert relative_error(grad, ref_grad) < 1e-5, f"{name} {context}"


def good_inputs():
    return (torch.randn(6, 8, device=DEVICE), torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE),
            torch.randn(2, 1, 8, device=DEVICE))


def test_max_seqlen_gives_the_same_result_and_the_launcher_reads_nothing_back():
    """Given max_seqlen (known on the host where the layout is built) the launcher plans without reading
    cu_seqlens: a malformed layout is the builder's to refuse (r2m.packed.check_cu_seqlens), not the launcher's."""
    lengths, h, cu_seqlens, u = ragged_batch(2, 37, torch.float32)
    c, lse = seq_to_token_attention(h, cu_seqlens, u)
    c_given, lse_given = seq_to_token_attention(h, cu_seqlens, u, max_seqlen=max(lengths))
    assert torch.equal(c, c_given) and torch.equal(lse, lse_given)
    with pytest.raises(ValueError, match="max_seqlen must be None or an int >= 0"):
        seq_to_token_attention(h, cu_seqlens, u, max_seqlen=-1)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            seq_to_token_attention(h, cu_seqlens, u, max_seqlen=max(lengths))
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("change, error, message", [
    (lambda h, cu, u: (h[None], cu, u), ValueError, "h must be packed"),
    (lambda h, cu, u: (h.double(), cu, u), TypeError, "h must be bfloat16, float16 or float32"),
    (lambda h, cu, u: (h, cu, u[:, :, :5]), ValueError, "u must have shape"),
    (lambda h, cu, u: (h, cu, u[0]), ValueError, "u must have shape"),
    (lambda h, cu, u: (h, cu, u.double()), TypeError, "u must be float32"),
    (lambda h, cu, u: (h, cu.long(), u), ValueError, "cu_seqlens must be int32"),
    (lambda h, cu, u: (h, cu[:2], u), ValueError, "cu_seqlens must be int32 of shape"),
    (lambda h, cu, u: (h, cu, u.to("meta")), ValueError, "u is on meta"),
    (lambda h, cu, u: (h.tolist(), cu, u), TypeError, "h must be a torch.Tensor"),
])
def test_bad_inputs_name_the_argument(change, error, message):
    with pytest.raises(error, match=message):
        seq_to_token_attention(*change(*good_inputs()))


@pytest.mark.parametrize("num_splits", [0, 1.5, True])
def test_bad_num_splits(num_splits):
    with pytest.raises(ValueError, match="num_splits"):
        seq_to_token_attention(*good_inputs(), num_splits=num_splits)


# Compiles the kernels for Hopper (sm_90) through Triton's NVIDIA backend and its bundled ptxas, which needs no
# GPU, and reports what the resource report and the PTX say. It runs in a child process because this one has
# TRITON_INTERPRET=1, under which the kernels are interpreter objects.
COMPILE_FOR_HOPPER = r"""
import json, os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import r2m.kernels
k = sys.modules["r2m.kernels.seq_to_token_attention"]
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
D, H, BLOCK_D = 4096, 4, 4096
aligned = ("stride_h", "D_P", "stride_c_split", "stride_du_split")  # as the launcher specialises them for D_p=4096
results = {}
def compile_kernel(name, fn, constants, options):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constants else ("*bf16" if n == "h_ptr" else "*i32" if n == "cu_ptr"
                 else "*fp32") if n.endswith("_ptr") else "i32" for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n in aligned}
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", 90, 32),
                            options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(x.split(":") for x in next(l for l in usage.splitlines() if "REG:" in l).split() if ":" in x)
    results[name] = {"registers": int(fields["REG"]), "stack": int(fields["STACK"]),
                     "vector_loads": kernel.asm["ptx"].count("ld.global.v4"), **constants}
for name, autotuned, resident in (("forward", k._forward_kernel, 2), ("backward", k._backward_kernel, 3)):
    config = max(k._prune(resident)(autotuned.configs, {"H": H}, BLOCK_D=BLOCK_D),
                 key=lambda c: (c.kwargs["HG"], k._registers(resident, c.kwargs["BLOCK_S"], c.kwargs["HG"], BLOCK_D,
                                                            c.num_warps)))
    compile_kernel(name, autotuned.fn, {"BLOCK_D": BLOCK_D, **config.kwargs}, {"num_warps": config.num_warps})
compile_kernel("combine", k._combine_kernel, {"SPLITS_PAD": 64, "BLOCK_D": 1024}, {"num_warps": 4})
print(json.dumps(results))
"""


@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists(),
                    reason="this triton build ships no NVIDIA ptxas, so nothing can be compiled for a GPU here")
def test_kernels_compile_for_hopper_without_spills():
    """The autotuner's heaviest admitted configuration at D_p=4096, H=4 (bf16) compiles for sm_90 without spilling
    and reads h with 16-byte loads. This is the only GPU-side check that runs without a GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name, report in results.items():
        assert report["stack"] <= 8, f"{name} spills: {report}"
        assert report["vector_loads"] > 0, f"{name} has no 16-byte loads: {report}"
    assert results["forward"]["HG"] == 4, "all four heads should share each h tile in the forward"
