"""TEST-ONLY STAND-IN: the name openrlhf.trainer.ray.vllm_engine imports."""

from r2m_test_standin import unavailable

random_uuid = unavailable("vllm.utils.random_uuid")
