"""TEST-ONLY STAND-IN for vLLM (see tests/openrlhf_stubs/README.md). Not the real package."""

from r2m_test_standin import unavailable

__version__ = "0.0.0+r2m.test.stand.in"

SamplingParams = unavailable("vllm.SamplingParams")
