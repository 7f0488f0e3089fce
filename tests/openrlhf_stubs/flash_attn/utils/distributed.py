"""TEST-ONLY STAND-IN: the name openrlhf.models.ring_attn_utils imports (used only with ring attention)."""

from r2m_test_standin import unavailable

all_gather = unavailable("flash_attn.utils.distributed.all_gather")
