"""HiddenStateCapture: stitched generation states, reused forwards, the training-pass listener, PEFT reference pass."""

import pytest
import torch

from r2m import tiny
from r2m.capture import HiddenStateCapture, _select, find_backbone, pack

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15, 16, 17]]


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def reference_states(policy, sequence):
    """What a full forward of the unpadded sequence gives at its first S-1 positions."""
    with torch.no_grad():
        out = find_backbone(policy)(input_ids=torch.tensor([sequence]), use_cache=False)
    return out.last_hidden_state[0, :-1]


def build(family, seed=0):
    tokenizer = tiny.build_tokenizer()
    torch.manual_seed(seed)
    return tokenizer, tiny.build_policy(tokenizer, family, hidden_size=32).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_stitched_generation_equals_full_forward(family):
    tokenizer, policy = build(family)
    ids, mask = left_pad(PROMPTS)
    with HiddenStateCapture(policy) as capture:
        torch.manual_seed(1)
        out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        generated = out[:, ids.shape[1]:].tolist()
        completions = [generated[0], generated[1][:3], generated[2][:1], generated[3][:5]]  # as if EOS came early
        states = capture.pop_generation(completions)
    for prompt, completion, hidden, tokens in zip(PROMPTS, completions, states.hidden, states.tokens, strict=True):
        assert tokens == tuple(prompt + completion)
        expected = reference_states(policy, prompt + completion)
        assert hidden.shape == expected.shape == (len(prompt) + len(completion) - 1, 32)
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)


def test_generation_mismatch_gives_none_and_trace_is_consumed():
    tokenizer, policy = build("llama")
    ids, mask = left_pad(PROMPTS)
    with HiddenStateCapture(policy) as capture:
        out = policy.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
        completions = out[:, ids.shape[1]:].tolist()
        completions[1] = [completions[1][0] + 1, *completions[1][1:]]  # not what was fed back
        completions[2] = completions[2] + [4, 4]  # longer than what was generated
        states = capture.pop_generation(completions)
        assert states.hidden[0] is not None and states.hidden[3] is not None
        assert states.hidden[1] is None and states.hidden[2] is None
        assert capture.pop_generation(completions).hidden == [None] * 4


def test_chunked_forwards_are_reused_row_by_row():
    _, policy = build("llama")
    completions = [[20, 21], [22], [23, 24, 25], [26, 27]]
    prompt_ids, prompt_mask = left_pad(PROMPTS)
    width = max(len(c) for c in completions)
    completion_ids = torch.tensor([c + [0] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    input_ids, attention_mask = torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1)
    with HiddenStateCapture(policy) as capture, torch.no_grad():
        policy(input_ids=input_ids[:1], attention_mask=attention_mask[:1])  # an older, unrelated forward
        for chunk in (slice(0, 2), slice(2, 4)):  # a trainer's log-prob pass in chunks of 2
            policy(input_ids=input_ids[chunk], attention_mask=attention_mask[chunk], use_cache=False)
        states = capture.pop_forwards([completions[0], completions[1], [99], completions[3]])
    assert states.hidden[2] is None and states.tokens[2] is None
    for i in (0, 1, 3):
        expected = reference_states(policy, PROMPTS[i] + completions[i])
        assert states.tokens[i] == tuple(PROMPTS[i] + completions[i])
        torch.testing.assert_close(states.hidden[i], expected, rtol=1e-5, atol=1e-5)


def test_extra_forward_and_training_listener():
    _, policy = build("gpt2")
    seen = []
    sequences = [[5, 6, 7, 8], [9, 10]]
    capture = HiddenStateCapture(policy, offload=True, on_train_forward=seen.append)
    states = capture.forward(sequences)
    assert capture._handle is None
    for sequence, hidden in zip(sequences, states.hidden, strict=True):
        assert hidden.device.type == "cpu"
        torch.testing.assert_close(hidden, reference_states(policy, sequence), rtol=1e-5, atol=1e-5)
    policy.train()
    with capture:
        loss = policy(input_ids=torch.tensor(sequences[:1]), labels=torch.tensor(sequences[:1])).loss
        loss.backward()
        assert capture.pop_forwards([sequences[0]]).hidden == [None]  # a training pass is not kept for rewards
    assert len(seen) == 1 and seen[0].tokens == [tuple(sequences[0])]
    assert not seen[0].hidden[0].requires_grad and seen[0].hidden[0].shape == (3, 32)


def test_peft_reference_pass_is_not_captured():
    peft = pytest.importorskip("peft")
    _, policy = build("llama")
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(policy, lora)
    sequence = [[5, 6, 7, 8]]
    with HiddenStateCapture(model) as capture, torch.no_grad():
        model(input_ids=torch.tensor(sequence))
        with model.disable_adapter():
            model(input_ids=torch.tensor(sequence))
        assert len(capture._forwards) == 1
        policy_states = capture.pop_forwards(sequence).hidden[0]
    with torch.no_grad():
        adapted = find_backbone(model)(input_ids=torch.tensor(sequence)).last_hidden_state[0, :-1]
        with model.disable_adapter():
            base = find_backbone(model)(input_ids=torch.tensor(sequence)).last_hidden_state[0, :-1]
    torch.testing.assert_close(policy_states, adapted)
    assert not torch.allclose(adapted, base)


def test_select_slices_contiguous_positions_and_gathers_the_rest():
    rows = torch.arange(6.0)[:, None]
    contiguous = _select(rows, torch.tensor([0, 1, 1, 1, 0, 0]).bool())
    assert contiguous.tolist() == [[1.0], [2.0], [3.0]] and contiguous.data_ptr() == rows[1].data_ptr()
    assert _select(rows, torch.tensor([1, 0, 1, 1, 0, 1]).bool()).tolist() == [[0.0], [2.0], [3.0], [5.0]]
    assert _select(rows, torch.zeros(6, dtype=torch.bool)).shape == (0, 1)


def test_pack():
    packed, cu = pack([torch.ones(2, 3), torch.zeros(0, 3), torch.ones(1, 3)])
    assert packed.shape == (3, 3) and cu.tolist() == [0, 2, 2, 3] and cu.dtype == torch.int32
    with pytest.raises(ValueError, match="at least one"):
        pack([])


def test_find_backbone_rejects_a_bare_module():
    with pytest.raises(ValueError, match="transformer body"):
        find_backbone(torch.nn.Linear(2, 2))
