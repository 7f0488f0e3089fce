"""Triton kernels of r2m (imported as ``r2m.kernels``)."""

from r2m.kernels.seq_to_token_attention import SeqToTokenAttentionFunction, seq_to_token_attention

__all__ = ["SeqToTokenAttentionFunction", "seq_to_token_attention"]
