"""Fused sequence-to-token attention (the absorbed form in `r2m.fusion`): c_e = sum_s softmax_s(h_s . u_e) h_s
over packed ragged h.

Keys and values are the same policy states h, so one read of each h tile serves every head (multi-query style).
Forward: one pass over h with an online softmax; a long sequence is cut into splits, each split writes a partial
(c, lse) and a combine kernel merges them (flash-decoding), so a batch of few long sequences still fills the GPU.
Backward: one more pass over h gives du; h gets no gradient (it is detached policy state).
Every program keeps its heads' [HG, D_p] vectors in registers, so the launch configuration (tokens per step,
heads per program, warps) is autotuned per (D_p, H, dtype) among the ones whose registers fit (see _registers).
"""

from __future__ import annotations

import functools
import itertools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from r2m.checks import check_int

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_HEAD_GROUPS = (1, 2, 4, 8, 16)
# NVIDIA register file: 64K 32-bit registers per multiprocessor, at most 255 per thread.
_REGISTERS_PER_SM, _MAX_REGISTERS_PER_THREAD = 65536, 255
# A split shorter than this spends more on writing its partial [H, D_p] result than it gains in parallelism.
_MIN_SPLIT_TOKENS = 128
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _configs() -> list[triton.Config]:
    if _INTERPRET:  # one configuration per head group: the interpreter never benchmarks
        return [triton.Config({"BLOCK_S": 8, "HG": hg}) for hg in _HEAD_GROUPS]
    # num_stages is left alone: the loop has no dot, and the compiler emits the same code for every value.
    return [triton.Config({"BLOCK_S": block_s, "HG": hg}, num_warps=warps)
            for block_s, hg, warps in itertools.product((1, 2, 4, 8, 16), _HEAD_GROUPS, (4, 8, 16))]


def _registers(resident_vectors: int, block_s: int, hg: int, block_d: int, num_warps: int) -> float:
    """Registers per thread, modelled on ptxas reports for sm_90 (both kernels, bf16 h, D_p 4096 and 8192,
    BLOCK_S 1-8, HG 1-4, 4-16 warps): the ``resident_vectors`` [HG, D_p] tensors that live across the loop, the
    [BLOCK_S, D_p] h tile, a quarter of the [BLOCK_S, HG, D_p] products, and 20 for addresses and loop state.
    Of the 190 configurations compiled, every one this admits has a stack frame of at most 8 bytes. A D_p not
    divisible by 16 loses the 16-byte loads and needs a few registers more."""
    values = (resident_vectors * hg + block_s + block_s * hg / 4) * block_d / (32 * num_warps)
    return values + 20


def _prune(resident_vectors: int):
    """Keep the configurations whose registers fit without spilling. Heads per program: the most that fit (all of
    them when they fit) or half that, which doubles the programs and serves the second read of each h tile from
    L2 (head groups of one tile are neighbours in the grid); the autotuner measures which wins."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        heads, block_d = triton.next_power_of_2(args["H"]), args["BLOCK_D"]

        def registers(c: triton.Config) -> float:
            return _registers(resident_vectors, c.kwargs["BLOCK_S"], c.kwargs["HG"], block_d, c.num_warps)

        usable = [c for c in configs if c.kwargs["HG"] <= heads]
        if _INTERPRET:
            return [max(usable, key=lambda c: c.kwargs["HG"])]
        fits = [c for c in usable if c.kwargs["BLOCK_S"] * block_d >= 32 * c.num_warps
                and registers(c) <= min(_MAX_REGISTERS_PER_THREAD, _REGISTERS_PER_SM // (32 * c.num_warps))]
        if not fits:
            return [min(usable, key=registers)]
        most = max(c.kwargs["HG"] for c in fits)
        return [c for c in fits if c.kwargs["HG"] >= most // 2]

    return prune


@triton.jit
def _program_coordinates(H, NUM_SPLITS, HG: tl.constexpr):
    """(head group, split, sequence) of this program in a 1-D grid; head groups of one tile are neighbours."""
    pid = tl.program_id(0)
    groups = tl.cdiv(H, HG)
    return pid % groups, (pid // groups) % NUM_SPLITS, pid // (groups * NUM_SPLITS)


@triton.jit
def _indices(seq, group, H, D_P, BLOCK_S: tl.constexpr, HG: tl.constexpr, BLOCK_D: tl.constexpr):
    """Token steps [S, 1, 1], heads [1, HG, 1], features [1, 1, D], and the offsets and mask of the [1, HG, D]
    per-head vectors (u, c, dc, du) of this program."""
    steps = tl.arange(0, BLOCK_S)[:, None, None]
    heads = group * HG + tl.arange(0, HG)[None, :, None]
    cols = tl.arange(0, BLOCK_D)[None, None, :]
    vec_offsets = (seq * H + heads).to(tl.int64) * D_P + cols
    return steps, heads, cols, vec_offsets, (heads < H) & (cols < D_P)


@triton.autotune(configs=_configs(), key=["D_P", "H"],
                 prune_configs_by={"early_config_prune": _prune(2)})
@triton.jit
def _forward_kernel(h_ptr, cu_ptr, u_ptr, c_ptr, lse_ptr, stride_h, D_P, H, NUM_SPLITS, SPLIT_LEN, stride_c_split,
                    stride_lse_split, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HG: tl.constexpr):
    """Program (head group, split, sequence): softmax-weighted mean of the split's tokens for HG heads.

    Writes c [HG, D_p] normalised over the split and its lse; an empty split writes c = 0, lse = -inf.
    """
    group, split, seq = _program_coordinates(H, NUM_SPLITS, HG)
    seq_end = tl.load(cu_ptr + seq + 1)
    start = tl.load(cu_ptr + seq) + split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, seq_end)
    # Every tensor is 3-D [tokens, heads, features] with size-1 axes where it has none, so the broadcasts and
    # keep_dims reductions below stay in one layout family: no shared-memory layout conversions inside the loop.
    steps, heads, cols, vec_offsets, vec_mask = _indices(seq, group, H, D_P, BLOCK_S, HG, BLOCK_D)
    u = tl.load(u_ptr + vec_offsets, mask=vec_mask, other=0.0)

    running_max = tl.full([1, HG, 1], float("-inf"), tl.float32)
    denominator = tl.zeros([1, HG, 1], tl.float32)
    acc = tl.zeros([1, HG, BLOCK_D], tl.float32)
    for first in range(start, end, BLOCK_S):
        rows = first + steps
        row_ok = rows < end
        h = tl.load(h_ptr + rows.to(tl.int64) * stride_h + cols, mask=row_ok & (cols < D_P), other=0.0).to(tl.float32)
        scores = tl.where(row_ok, tl.sum(h * u, axis=2, keep_dims=True), float("-inf"))
        # Every step holds at least one valid row, so new_max is finite and no exp sees -inf - -inf.
        new_max = tl.maximum(running_max, tl.max(scores, axis=0, keep_dims=True))
        rescale = tl.exp(running_max - new_max)
        p = tl.exp(scores - new_max)
        denominator = denominator * rescale + tl.sum(p, axis=0, keep_dims=True)
        acc = acc * rescale + tl.sum(p * h, axis=0, keep_dims=True)
        running_max = new_max

    nonempty = denominator > 0
    safe_denominator = tl.where(nonempty, denominator, 1.0)
    lse = tl.where(nonempty, running_max + tl.log(safe_denominator), float("-inf"))
    tl.store(c_ptr + split.to(tl.int64) * stride_c_split + vec_offsets, acc / safe_denominator, mask=vec_mask)
    tl.store(lse_ptr + split * stride_lse_split + seq * H + heads, lse, mask=heads < H)


@triton.jit
def _combine_kernel(partial_c_ptr, partial_lse_ptr, c_ptr, lse_ptr, D_P, NUM_SPLITS, stride_c_split,
                    stride_lse_split, SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (sequence * H + head, column block): merge the splits' (c, lse) into the sequence's."""
    row, block = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_lse = tl.load(partial_lse_ptr + splits * stride_lse_split + row, mask=splits < NUM_SPLITS,
                        other=float("-inf"))
    top = tl.max(split_lse, axis=0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(tl.exp(split_lse - safe_top), axis=0)
    safe_total = tl.where(total > 0, total, 1.0)

    cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D_P
    acc = tl.zeros([BLOCK_D], tl.float32)
    lse_ptr_split = partial_lse_ptr + row
    c_ptrs_split = partial_c_ptr + row.to(tl.int64) * D_P + cols
    for _ in range(NUM_SPLITS):
        weight = tl.exp(tl.load(lse_ptr_split) - safe_top)
        acc += weight * tl.load(c_ptrs_split, mask=col_ok, other=0.0)
        lse_ptr_split += stride_lse_split
        c_ptrs_split += stride_c_split
    tl.store(c_ptr + row.to(tl.int64) * D_P + cols, acc / safe_total, mask=col_ok)
    tl.store(lse_ptr + row, tl.where(total > 0, safe_top + tl.log(safe_total), float("-inf")), mask=block == 0)


@triton.autotune(configs=_configs(), key=["D_P", "H"],
                 prune_configs_by={"early_config_prune": _prune(3)})
@triton.jit
def _backward_kernel(h_ptr, cu_ptr, u_ptr, c_ptr, lse_ptr, dc_ptr, du_ptr, stride_h, D_P, H, NUM_SPLITS, SPLIT_LEN,
                     stride_du_split, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HG: tl.constexpr):
    """Program (head group, split, sequence): du_e = sum_s p_s (h_s . dc_e - dc_e . c_e) h_s over the split."""
    group, split, seq = _program_coordinates(H, NUM_SPLITS, HG)
    seq_end = tl.load(cu_ptr + seq + 1)
    start = tl.load(cu_ptr + seq) + split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, seq_end)
    steps, heads, cols, vec_offsets, vec_mask = _indices(seq, group, H, D_P, BLOCK_S, HG, BLOCK_D)
    u = tl.load(u_ptr + vec_offsets, mask=vec_mask, other=0.0)
    dc = tl.load(dc_ptr + vec_offsets, mask=vec_mask, other=0.0)
    delta = tl.sum(dc * tl.load(c_ptr + vec_offsets, mask=vec_mask, other=0.0), axis=2, keep_dims=True)
    lse = tl.load(lse_ptr + seq * H + heads, mask=heads < H, other=0.0)

    acc = tl.zeros([1, HG, BLOCK_D], tl.float32)
    for first in range(start, end, BLOCK_S):
        rows = first + steps
        row_ok = rows < end
        h = tl.load(h_ptr + rows.to(tl.int64) * stride_h + cols, mask=row_ok & (cols < D_P), other=0.0).to(tl.float32)
        # Rows past the split load as h = 0: score 0, whose exp(0 - lse) would overflow when lse is very negative.
        p = tl.exp(tl.where(row_ok, tl.sum(h * u, axis=2, keep_dims=True), float("-inf")) - lse)
        dp = tl.sum(h * dc, axis=2, keep_dims=True)
        acc += tl.sum(p * (dp - delta) * h, axis=0, keep_dims=True)
    tl.store(du_ptr + split.to(tl.int64) * stride_du_split + vec_offsets, acc, mask=vec_mask)


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return os.cpu_count() or 1


def _split_plan(max_len: int, batch: int, device: torch.device, num_splits: int | None) -> tuple[int, int]:
    """(number of splits per sequence, tokens per split): enough programs to fill the device, none too short."""
    if num_splits is None:
        wanted = triton.cdiv(_target_programs(device), max(batch, 1))
        num_splits = max(1, min(wanted, max_len // _MIN_SPLIT_TOKENS))
    split_len = max(1, triton.cdiv(max_len, num_splits))
    return num_splits, split_len


def _validate(h: Tensor, cu_seqlens: Tensor, u: Tensor, num_splits: int | None, max_seqlen: int | None) -> None:
    """Types, shapes, dtypes and devices only: reading cu_seqlens' values would wait for the device."""
    for name, value in (("h", h), ("cu_seqlens", cu_seqlens), ("u", u)):
        if not isinstance(value, Tensor):
            raise TypeError(f"seq_to_token_attention: {name} must be a torch.Tensor, got {type(value).__name__}")
    if h.dim() != 2:
        raise ValueError(f"seq_to_token_attention: h must be packed [total_tokens, D_p], got shape {tuple(h.shape)}")
    if h.dtype not in _DTYPES:
        raise TypeError(f"seq_to_token_attention: h must be bfloat16, float16 or float32, got {h.dtype}")
    if u.dim() != 3 or u.shape[2] != h.shape[1] or u.shape[1] < 1:
        raise ValueError(f"seq_to_token_attention: u must have shape [B, H >= 1, D_p={h.shape[1]}], "
                         f"got {tuple(u.shape)}")
    if u.dtype != torch.float32:
        raise TypeError(f"seq_to_token_attention: u must be float32, got {u.dtype}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.shape != (u.shape[0] + 1,):
        raise ValueError(f"seq_to_token_attention: cu_seqlens must be int32 of shape [B + 1 = {u.shape[0] + 1}] "
                         f"(B from u), got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    for name, value in (("cu_seqlens", cu_seqlens), ("u", u)):
        if value.device != h.device:
            raise ValueError(f"seq_to_token_attention: {name} is on {value.device} but h is on {h.device}")
    if h.device.type != "cuda" and not _INTERPRET:
        raise RuntimeError(f"seq_to_token_attention: h is on {h.device}; the Triton kernel needs a CUDA device, or "
                           "TRITON_INTERPRET=1 set before triton is first imported (use impl='torch' on CPU)")
    check_int("seq_to_token_attention: num_splits", num_splits, optional=True)
    check_int("seq_to_token_attention: max_seqlen", max_seqlen, minimum=0, optional=True)


def _forward(h: Tensor, cu_seqlens: Tensor, u: Tensor, num_splits: int, split_len: int) -> tuple[Tensor, Tensor]:
    batch, heads, dim = u.shape
    c = torch.empty(batch, heads, dim, dtype=torch.float32, device=h.device)
    lse = torch.empty(batch, heads, dtype=torch.float32, device=h.device)
    if num_splits == 1:
        partial_c, partial_lse = c[None], lse[None]
    else:
        partial_c = torch.empty(num_splits, batch, heads, dim, dtype=torch.float32, device=h.device)
        partial_lse = torch.empty(num_splits, batch, heads, dtype=torch.float32, device=h.device)
    block_d = triton.next_power_of_2(dim)
    _forward_kernel[lambda meta: (triton.cdiv(heads, meta["HG"]) * num_splits * batch,)](
        h, cu_seqlens, u, partial_c, partial_lse, h.stride(0), dim, heads, num_splits, split_len,
        partial_c.stride(0), partial_lse.stride(0), BLOCK_D=block_d)
    if num_splits > 1:
        combine_block = min(block_d, 1024)
        _combine_kernel[(batch * heads, triton.cdiv(dim, combine_block))](
            partial_c, partial_lse, c, lse, dim, num_splits, partial_c.stride(0), partial_lse.stride(0),
            SPLITS_PAD=triton.next_power_of_2(num_splits), BLOCK_D=combine_block)
    return c, lse


def _backward(h: Tensor, cu_seqlens: Tensor, u: Tensor, c: Tensor, lse: Tensor, dc: Tensor, num_splits: int,
              split_len: int) -> Tensor:
    batch, heads, dim = u.shape
    du = torch.empty(num_splits, batch, heads, dim, dtype=torch.float32, device=h.device)
    _backward_kernel[lambda meta: (triton.cdiv(heads, meta["HG"]) * num_splits * batch,)](
        h, cu_seqlens, u, c, lse, dc, du, h.stride(0), dim, heads, num_splits, split_len, du.stride(0),
        BLOCK_D=triton.next_power_of_2(dim))
    return du[0] if num_splits == 1 else du.sum(dim=0)


class SeqToTokenAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: differentiable in u only; the policy states h and cu_seqlens get no gradient."""

    @staticmethod
    def forward(ctx, h: Tensor, cu_seqlens: Tensor, u: Tensor, num_splits: int | None,
                max_seqlen: int | None) -> tuple[Tensor, Tensor]:
        h = h.detach()
        if h.stride(-1) != 1:
            h = h.contiguous()
        u = u.detach().contiguous()
        batch = u.shape[0]
        if batch == 0:
            return u.new_zeros(u.shape), u.new_zeros(u.shape[:2])
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max())
        splits, split_len = _split_plan(max_seqlen, batch, h.device, num_splits)
        c, lse = _forward(h, cu_seqlens, u, splits, split_len)
        ctx.save_for_backward(h, cu_seqlens, u, c, lse)
        ctx.plan = (splits, split_len)
        return c, lse

    @staticmethod
    def backward(ctx, dc: Tensor | None, dlse: Tensor | None) -> tuple[None, None, Tensor | None, None, None]:
        if not ctx.needs_input_grad[2] or not ctx.saved_tensors:
            return None, None, None, None, None
        h, cu_seqlens, u, c, lse = ctx.saved_tensors
        dc = torch.zeros_like(c) if dc is None else dc.float().contiguous()
        du = _backward(h, cu_seqlens, u, c, lse, dc, *ctx.plan)
        if dlse is not None:  # d lse_e / d u_e = sum_s p_s h_s = c_e
            du = du + dlse.float()[..., None] * c
        return None, None, du, None, None


def seq_to_token_attention(h: Tensor, cu_seqlens: Tensor, u: Tensor, *, num_splits: int | None = None,
                           max_seqlen: int | None = None) -> tuple[Tensor, Tensor]:
    """Attend each sequence's packed policy states with its per-head query vectors u (`r2m.fusion.attend`).

    h [total_tokens, D_p] (bf16, fp16 or fp32), cu_seqlens [B + 1] int32, u [B, H, D_p] float32 (already scaled)
    -> c [B, H, D_p] float32 with c[b, e] = sum_s softmax_s(h_s . u[b, e]) h_s over sequence b, and
    lse [B, H] float32, the log-sum-exp of those scores. A zero-length sequence gives c = 0, lse = -inf and zero
    gradient. Differentiable w.r.t. u only. ``num_splits`` fixes how many programs share one sequence
    (default: derived from the device and the lengths).

    ``cu_seqlens`` must be well formed (start at 0, never decrease, end at total_tokens): check it once where the
    layout is built (`r2m.packed.check_cu_seqlens`, which `r2m.packed.PackedStates` runs); the launcher reads no
    value from the device to check it. ``max_seqlen`` (the longest sequence, known on the host where the layout is
    built) spares the one read it would otherwise make to plan the splits.
    """
    _validate(h, cu_seqlens, u, num_splits, max_seqlen)
    return SeqToTokenAttentionFunction.apply(h, cu_seqlens, u, num_splits, max_seqlen)
