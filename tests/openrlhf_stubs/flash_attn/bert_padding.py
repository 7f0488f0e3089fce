"""TEST-ONLY STAND-IN: the names openrlhf.models.ring_attn_utils imports (used only with packing)."""

from r2m_test_standin import unavailable

index_first_axis = unavailable("flash_attn.bert_padding.index_first_axis")
pad_input = unavailable("flash_attn.bert_padding.pad_input")
rearrange = unavailable("flash_attn.bert_padding.rearrange")
unpad_input = unavailable("flash_attn.bert_padding.unpad_input")
