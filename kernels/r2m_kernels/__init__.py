"""Triton kernels of r2m, imported as ``r2m.kernels``.

They live one level below the top-level ``kernels/`` folder, which holds no ``__init__.py``: Python run from the
repository root must not find a package named ``kernels`` there (transformers imports Hugging Face's).
"""

from r2m.kernels.seq_to_token_attention import SeqToTokenAttentionFunction, seq_to_token_attention

__all__ = ["SeqToTokenAttentionFunction", "seq_to_token_attention"]
