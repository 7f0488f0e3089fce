"""Sequence-to-token cross-attention (Eq. 3 of Huang et al. 2026, arXiv 2601.22664), computed through its absorbed
form.

The absorbed algebra (exact, because keys and values are bias-free linear maps of the same states h): per head e,
q_e . (h_s W_k,e) / sqrt(d_h) = h_s . u_e with u_e = W_k,e q_e / sqrt(d_h), and sum_s p_s (h_s W_v,e) = c_e W_v,e
with c_e = sum_s p_s h_s. So the sequence is touched only by "attend(u) -> c", one weighted pass over h (multi-query
decoding attention with head dim D_p): no key or value projection of the sequence. Its backward, given dc_e:
ds_s = p_s (h_s . dc_e - dc_e . c_e), du_e = sum_s ds_s h_s (h is policy state and gets no gradient). Shipping u
to where h lives and c back is also the paper's Section 6.1 traffic cut (2 H D_p numbers per sample).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from r2m.checks import check_int
from r2m.config import IMPLS
from r2m.packed import PackedStates, check_cu_seqlens, offsets


def pack(hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Padded [B, S, D] + mask [B, S] -> packed valid tokens [N, D] and cu_seqlens [B + 1] (int32)."""
    return hidden[mask], offsets(mask.sum(dim=1)).to(torch.int32)


def unpack(hidden: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, Tensor]:
    """Packed [N, D] + cu_seqlens [B + 1] -> padded [B, S_max, D] (zeros after each sequence) + mask [B, S_max]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    batch, max_len = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    mask = torch.arange(max_len, device=hidden.device)[None, :] < lengths.to(hidden.device)[:, None]
    padded = hidden.new_zeros(batch, max_len, hidden.shape[-1])
    padded[mask] = hidden
    return padded, mask


def attend_naive(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Standard masked attention of one query per sequence: q [B, H, d], keys/values [B, S, H, d] -> [B, H, d].

    A sequence with no valid token attends to nothing and returns zeros.
    """
    scores = torch.einsum("bhd,bshd->bhs", q, keys) / math.sqrt(q.shape[-1])
    probs = _masked_softmax(scores, mask)
    return torch.einsum("bhs,bshd->bhd", probs, values)


def attend(hidden: Tensor, u: Tensor, *, cu_seqlens: Tensor | None = None, mask: Tensor | None = None,
           impl: str = "auto", max_seqlen: int | None = None) -> tuple[Tensor, Tensor]:
    """The absorbed "attend(u) -> c" (module docstring), the one entry point of every absorbed attention
    (SequenceToTokenAttention and OpenRLHF's policy side): c_e = sum_s softmax_s(h_s . u_e) h_s over each sequence, and
    lse_e, the log-sum-exp of its scores.

    hidden: packed [N, D_p] with ``cu_seqlens`` [B + 1], or padded [B, S, D_p] with ``mask`` [B, S] (bool; padding
    may hold anything); u [B, H, D_p]. Returns c [B, H, D_p] and lse [B, H], float32 (float64 for a float64 u on
    the ``torch`` path), differentiable in u (hidden gets no gradient). A zero-length sequence gives c = 0,
    lse = -inf and zero gradient. impl: ``torch``, ``triton`` (`r2m.kernels.seq_to_token_attention`) or ``auto``.
    ``cu_seqlens`` must be well formed (`r2m.packed.check_cu_seqlens`); ``max_seqlen``, the longest sequence, spares
    the Triton launcher reading it from the device.
    """
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"attend: impl must be 'auto', 'torch' or 'triton', got {impl!r} (naive projects keys and "
                         f"values: it is SequenceToTokenAttention's)")
    if (mask is None) == (cu_seqlens is None):
        raise ValueError("attend: pass exactly one of mask (with padded hidden [B, S, D_p]) or cu_seqlens (with "
                         "packed hidden [N, D_p])")
    batch = hidden.shape[0] if mask is not None else cu_seqlens.numel() - 1
    if not isinstance(u, Tensor) or u.dim() != 3 or u.shape[0] != batch or u.shape[2] != hidden.shape[-1]:
        got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"u must have shape [batch={batch}, heads, D_p={hidden.shape[-1]}], got {got}")
    if _resolve_impl(impl, hidden) == "triton":
        from r2m.kernels import seq_to_token_attention

        if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"impl='triton' takes bfloat16, float16 or float32 hidden states, got {hidden.dtype}; "
                            f"use impl='torch' for other dtypes")
        if cu_seqlens is None:
            hidden, cu_seqlens, max_seqlen = *pack(hidden, mask), hidden.shape[1]
        return seq_to_token_attention(hidden, cu_seqlens.to(device=hidden.device, dtype=torch.int32),
                                      u.to(device=hidden.device, dtype=torch.float32).contiguous(),
                                      max_seqlen=max_seqlen)
    dtype = torch.promote_types(u.dtype, torch.float32)
    padded, mask = _zero_padded(hidden, mask, cu_seqlens, dtype)
    return _attend_torch(padded, mask, u.to(device=hidden.device, dtype=dtype))


def attend_torch(hidden: Tensor, mask: Tensor, u: Tensor) -> Tensor:
    """The absorbed attention c_e = sum_s softmax_s(h_s . u_e) h_s: hidden [B, S, D_p], u [B, H, D_p] -> [B, H, D_p].

    ``hidden`` must be zero at masked positions (so padding garbage cannot leak into c).
    """
    return _attend_torch(hidden, mask, u)[0]


def _attend_torch(hidden: Tensor, mask: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """`attend_torch`'s c and the log-sum-exp of the scores [B, H] (-inf for a sequence with no valid token)."""
    scores = torch.einsum("bsd,bhd->bhs", hidden, u)
    has_token, usable = _usable(mask)
    lse = torch.logsumexp(scores.masked_fill(~usable, float("-inf")), dim=-1)
    context = torch.einsum("bhs,bsd->bhd", _masked_softmax(scores, mask), hidden)
    return context, lse.masked_fill(~has_token[:, None], float("-inf"))


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over the last axis restricted to ``mask`` [B, S]; all-masked rows give zeros with zero gradient."""
    has_token, usable = _usable(mask)
    probs = torch.softmax(scores.masked_fill(~usable, float("-inf")), dim=-1)
    return probs * has_token[:, None, None]


def _usable(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Which rows have a valid token [B], and the positions a softmax may use [B, 1, S]: the valid ones, or every
    position of a row without any (so no -inf-only row makes a NaN gradient; its result is zeroed after)."""
    has_token = mask.any(dim=1)
    return has_token, (mask | ~has_token[:, None])[:, None, :]


def _zero_padded(hidden: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Padded states in ``dtype`` [B, S, D] with zeros wherever the mask is off, and the mask, from packed ``hidden``
    + ``cu_seqlens`` or padded ``hidden`` + ``mask`` (copying only if needed)."""
    if cu_seqlens is not None:
        return unpack(hidden.to(dtype), cu_seqlens.to(hidden.device))
    mask = mask.to(device=hidden.device, dtype=torch.bool)
    if bool(mask.all()):
        return hidden.to(dtype), mask
    if hidden.dtype != dtype:
        return hidden.to(dtype).masked_fill_(~mask[..., None], 0), mask
    return hidden.masked_fill(~mask[..., None], 0), mask


def _resolve_impl(impl: str, hidden: Tensor) -> str:
    """``auto`` -> ``triton`` for CUDA states, ``torch`` otherwise; any other implementation as it is."""
    if impl != "auto":
        return impl
    return "triton" if hidden.is_cuda else "torch"


class SequenceToTokenAttention(nn.Module):
    """One reward-token query attending over the policy's hidden states: Ĥ = softmax(q k^T / sqrt(d_h)) v W_o.

    q = H W_q, k = h W_k, v = h W_v, all bias-free (paper Eq. 3). ``o_proj`` starts at zero, so an untrained
    R2M scores exactly like the wrapped reward model while gradients still reach every projection.

    impl: ``naive`` projects keys and values (the reference), ``torch`` never projects the sequence (the absorbed form),
    ``triton`` runs the fused kernel of ``r2m.kernels``, ``auto`` picks ``triton`` for CUDA inputs and ``torch``
    otherwise. Hidden states may arrive in any float dtype and on another device; the work is done in float32
    on the module's device.
    """

    def __init__(self, rm_dim: int, policy_dim: int, attn_dim: int, num_heads: int = 1, impl: str = "auto"):
        super().__init__()
        for name, value in (("rm_dim", rm_dim), ("policy_dim", policy_dim), ("attn_dim", attn_dim),
                            ("num_heads", num_heads)):
            check_int(f"SequenceToTokenAttention: {name}", value)
        if attn_dim % num_heads:
            raise ValueError(f"SequenceToTokenAttention: attn_dim ({attn_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if impl not in IMPLS:
            raise ValueError(f"SequenceToTokenAttention: impl must be one of {IMPLS}, got {impl!r}")
        self.rm_dim, self.policy_dim, self.attn_dim, self.num_heads = rm_dim, policy_dim, attn_dim, num_heads
        self.head_dim = attn_dim // num_heads
        self.impl = impl
        self.q_proj = nn.Linear(rm_dim, attn_dim, bias=False)
        self.k_proj = nn.Linear(policy_dim, attn_dim, bias=False)
        self.v_proj = nn.Linear(policy_dim, attn_dim, bias=False)
        self.o_proj = nn.Linear(attn_dim, rm_dim, bias=False)
        nn.init.zeros_(self.o_proj.weight)

    def extra_repr(self) -> str:
        return (f"rm_dim={self.rm_dim}, policy_dim={self.policy_dim}, attn_dim={self.attn_dim}, "
                f"num_heads={self.num_heads}, impl={self.impl!r}")

    def forward(self, rte: Tensor, hidden: Tensor, mask: Tensor | None = None,
                cu_seqlens: Tensor | None = None) -> Tensor:
        """rte [B, D_rm] with hidden [B, S, D_p] + mask [B, S], or packed hidden [N, D_p] + cu_seqlens [B + 1]
        -> Ĥ [B, D_rm] in float32."""
        rte = self._check_rte(rte)
        hidden, mask, cu_seqlens = self.check_hidden(hidden, mask, cu_seqlens, rte.shape[0])
        return self._attend(rte, hidden, mask, cu_seqlens, None)

    def forward_states(self, rte: Tensor, states: PackedStates) -> Tensor:
        """rte [B, D_rm] and the B samples' `PackedStates` (checked when they were built, so neither checked again
        nor read back from the device here) -> Ĥ [B, D_rm] in float32."""
        rte = self._check_rte(rte)
        hidden = states.hidden.to(self.q_proj.weight.device)
        return self._attend(rte, hidden, None, states.cu_seqlens.to(hidden.device), states.max_seqlen)

    def _attend(self, rte: Tensor, hidden: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
                max_seqlen: int | None) -> Tensor:
        impl = self.resolve_impl(hidden)
        if impl == "naive":
            return self._forward_naive(rte, *_zero_padded(hidden, mask, cu_seqlens, self.k_proj.weight.dtype))
        context, _ = attend(hidden, self.query_vectors(rte), cu_seqlens=cu_seqlens, mask=mask, impl=impl,
                            max_seqlen=max_seqlen)
        return self.project_context(context)

    def query_vectors(self, rte: Tensor) -> Tensor:
        """u_e = W_k,e q_e / sqrt(d_h): the only thing the sequence is ever dotted with. [B, D_rm] -> [B, H, D_p]."""
        q = rearrange(self.q_proj(rte), "b (h d) -> b h d", h=self.num_heads)
        w_k = rearrange(self.k_proj.weight, "(h d) p -> h d p", h=self.num_heads)
        return torch.einsum("bhd,hdp->bhp", q, w_k) / math.sqrt(self.head_dim)

    def project_context(self, context: Tensor) -> Tensor:
        """Ĥ = concat_e(c_e W_v,e) W_o from the attended policy states c [B, H, D_p] -> [B, D_rm]."""
        w_v = rearrange(self.v_proj.weight, "(h d) p -> h d p", h=self.num_heads)
        heads = torch.einsum("bhp,hdp->bhd", context.to(w_v.dtype), w_v)
        return self.o_proj(rearrange(heads, "b h d -> b (h d)"))

    def resolve_impl(self, hidden: Tensor) -> str:
        return _resolve_impl(self.impl, hidden)

    def _forward_naive(self, rte: Tensor, hidden: Tensor, mask: Tensor) -> Tensor:
        split = "b s (h d) -> b s h d"
        q = rearrange(self.q_proj(rte), "b (h d) -> b h d", h=self.num_heads)
        keys = rearrange(self.k_proj(hidden), split, h=self.num_heads)
        values = rearrange(self.v_proj(hidden), split, h=self.num_heads)
        heads = attend_naive(q, keys, values, mask)
        return self.o_proj(rearrange(heads, "b h d -> b (h d)"))

    def _check_rte(self, rte: Tensor) -> Tensor:
        if not isinstance(rte, Tensor) or rte.dim() != 2 or rte.shape[1] != self.rm_dim:
            got = tuple(rte.shape) if isinstance(rte, Tensor) else type(rte).__name__
            raise ValueError(f"rte must be a tensor of shape [batch, rm_dim={self.rm_dim}], got {got}")
        if not rte.is_floating_point():
            raise TypeError(f"rte must be a floating-point tensor, got {rte.dtype}")
        weight = self.q_proj.weight
        return rte.to(device=weight.device, dtype=weight.dtype)

    def check_hidden(self, hidden: Tensor, mask: Tensor | None, cu_seqlens: Tensor | None,
                     batch: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Validates policy states for a batch of ``batch`` samples; returns them on the module's device with the
        mask as bool or cu_seqlens as int32."""
        if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
            raise TypeError(f"hidden must be a floating-point tensor, got "
                            f"{hidden.dtype if isinstance(hidden, Tensor) else type(hidden).__name__}")
        if hidden.shape[-1] != self.policy_dim:
            raise ValueError(f"hidden's last dimension must be policy_dim={self.policy_dim} (the policy's hidden "
                             f"size), got shape {tuple(hidden.shape)}")
        device = self.q_proj.weight.device
        hidden = hidden.to(device)
        if (mask is None) == (cu_seqlens is None):
            raise ValueError("pass exactly one of mask (with padded hidden [B, S, D_p]) or cu_seqlens "
                             "(with packed hidden [N, D_p])")
        if mask is not None:
            if hidden.dim() != 3 or hidden.shape[0] != batch:
                raise ValueError(f"hidden must have shape [batch={batch}, seq, {self.policy_dim}] with a mask, got "
                                 f"{tuple(hidden.shape)}")
            if mask.shape != hidden.shape[:2]:
                raise ValueError(f"mask must have shape {tuple(hidden.shape[:2])} (batch, seq of hidden), got "
                                 f"{tuple(mask.shape)}")
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(f"mask must be bool or integer (1 = valid token), got {mask.dtype}")
            return hidden, mask.to(device=device, dtype=torch.bool), None
        if hidden.dim() != 2:
            raise ValueError(f"packed hidden must have shape [total_tokens, {self.policy_dim}] with cu_seqlens, got "
                             f"{tuple(hidden.shape)}")
        cu_seqlens = check_cu_seqlens(cu_seqlens, batch, hidden.shape[0])
        return hidden, None, cu_seqlens.to(device=device, dtype=torch.int32)
