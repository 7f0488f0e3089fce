"""HiddenStateCapture: stitched generation states, reused forwards, the training-pass listener, PEFT reference pass."""

import pytest
import torch

from r2m.benchmarks import tiny_models as tiny
from r2m.capture import HiddenStateCapture, _gather, _valid_but_last
from r2m.hf_models import find_body
from r2m.packed import PackedStates

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15, 16, 17]]


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def reference_states(policy, sequence):
    """What a full forward of the unpadded sequence gives at its first S-1 positions."""
    with torch.no_grad():
        out = find_body(policy)(input_ids=torch.tensor([sequence]), use_cache=False)
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
    assert states.missing == [] and states.hidden.shape == (states.cu_seqlens[-1], 32)
    for i, (prompt, completion, tokens) in enumerate(zip(PROMPTS, completions, states.tokens, strict=True)):
        hidden = states.sample(i)
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
        assert states.missing == [1, 2] and states.sample(1) is None and states.sample(2) is None
        for i in (0, 3):
            expected = reference_states(policy, PROMPTS[i] + completions[i])
            torch.testing.assert_close(states.sample(i), expected, rtol=1e-5, atol=1e-5)
        assert capture.pop_generation(completions).missing == [0, 1, 2, 3]


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
    assert states.missing == [2] and states.sample(2) is None and states.tokens[2] is None
    for i in (0, 1, 3):
        expected = reference_states(policy, PROMPTS[i] + completions[i])
        assert states.tokens[i] == tuple(PROMPTS[i] + completions[i])
        torch.testing.assert_close(states.sample(i), expected, rtol=1e-5, atol=1e-5)


def test_extra_forward_and_training_listener():
    _, policy = build("gpt2")
    seen = []
    sequences = [[5, 6, 7, 8], [9, 10]]
    capture = HiddenStateCapture(policy, offload=True, on_train_forward=seen.append)
    states = capture.forward(sequences)
    assert capture._handle is None
    assert states.hidden.device.type == "cpu" and states.missing == []
    for i, sequence in enumerate(sequences):
        torch.testing.assert_close(states.sample(i), reference_states(policy, sequence), rtol=1e-5, atol=1e-5)
    policy.train()
    with capture:
        torch.manual_seed(3)
        loss = policy(input_ids=torch.tensor(sequences[:1]), labels=torch.tensor(sequences[:1])).loss
        loss.backward()
        assert capture.pop_forwards([sequences[0]]).missing == [0]  # a training pass is not kept for rewards
    assert len(seen) == 1 and seen[0].tokens == [tuple(sequences[0])]
    assert not seen[0].hidden.requires_grad and seen[0].sample(0).shape == (3, 32)
    torch.manual_seed(3)  # the same dropout masks
    expected = find_body(policy)(input_ids=torch.tensor(sequences[:1])).last_hidden_state[0, :-1]
    torch.testing.assert_close(seen[0].sample(0), expected, rtol=1e-5, atol=1e-5)


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
        policy_states = capture.pop_forwards(sequence).sample(0)
    with torch.no_grad():
        adapted = find_body(model)(input_ids=torch.tensor(sequence)).last_hidden_state[0, :-1]
        with model.disable_adapter():
            base = find_body(model)(input_ids=torch.tensor(sequence)).last_hidden_state[0, :-1]
    torch.testing.assert_close(policy_states, adapted)
    assert not torch.allclose(adapted, base)


def test_gather_keeps_the_valid_positions_but_the_last_row_by_row():
    hidden = torch.arange(12.0).view(2, 6, 1)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 0, 1, 1, 0, 1]]).bool()  # left/right padding; holes
    keep = _valid_but_last(mask)
    assert keep.tolist() == [[False, True, True, False, False, False], [True, False, True, True, False, False]]
    packed, kept = _gather(hidden, keep)
    assert packed.flatten().tolist() == [1.0, 2.0, 6.0, 8.0, 9.0] and kept.tolist() == [2, 3]
    assert packed.data_ptr() != hidden.data_ptr()  # a copy: the pass's activations are not pinned
    assert _valid_but_last(torch.zeros(1, 3, dtype=torch.bool)).sum() == 0


def test_captured_states_pack_replace_copy_and_count():
    a, b = torch.ones(2, 3), torch.full((1, 3), 2.0)
    states = PackedStates.from_samples([a, None, b], [(1, 2, 3), None, (4, 5)])
    assert states.cu_seqlens.tolist() == [0, 2, 2, 3] and states.missing == [1] and states.sample(1) is None
    filled = states.replace([1], PackedStates.from_samples([torch.zeros(4, 3)], [(6,) * 5]))
    assert filled.missing == [] and filled.cu_seqlens.tolist() == [0, 2, 6, 7] and filled.tokens[1] == (6,) * 5
    assert torch.equal(filled.sample(2), b) and filled.nonfinite_samples() == 0

    source = PackedStates.from_samples([torch.full((1, 3), 7.0), torch.full((2, 3), 9.0, dtype=torch.float64)],
                                         [(4, 5), (1, 2, 3)])
    filled.copy_samples_([0], source, [1])  # a gather from the source
    assert filled.hidden.dtype == torch.float64  # promoted: the refresh keeps the wider dtype
    assert filled.sample(0).eq(9.0).all() and filled.sample(2).eq(2.0).all() and filled.sample(1).eq(0.0).all()
    source.hidden += 1
    filled.copy_samples_([2, 0], source, [0, 1])  # every source sample once, in order: copied as it is
    assert filled.sample(0).eq(10.0).all() and filled.sample(2).eq(8.0).all() and filled.sample(1).eq(0.0).all()
    with pytest.raises(ValueError, match="lengths"):
        filled.copy_samples_([1], source, [0])

    filled.hidden[3, 1] = float("nan")
    assert filled.nonfinite_samples() == 1
    assert PackedStates.concat([filled, PackedStates.none_found(2)]).cu_seqlens.tolist() == [0, 2, 6, 7, 7, 7]


def test_find_body_rejects_a_bare_module():
    with pytest.raises(ValueError, match="transformer body"):
        find_body(torch.nn.Linear(2, 2))
