"""TEST-ONLY STAND-IN: the name openrlhf.trainer.ray.vllm_engine imports."""

from r2m_test_standin import unavailable

TokensPrompt = unavailable("vllm.inputs.TokensPrompt")
