"""TEST-ONLY STAND-IN for flash-attn (see tests/openrlhf_stubs/README.md). Not the real package."""

__version__ = "0.0.0+r2m.test.stand.in"
