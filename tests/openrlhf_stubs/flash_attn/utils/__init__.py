"""TEST-ONLY STAND-IN (see tests/openrlhf_stubs/README.md)."""
