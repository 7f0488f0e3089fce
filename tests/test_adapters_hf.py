"""The transformers backend with a tiny random judge (gibberish output: every failure path), its RTE, r2m.wrap
over a judge, and the sequence-classifier meta reward model."""

import asyncio
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

import r2m
from r2m.adapters import OpenAIChatBackend, RMR1Judge, SequenceClassifierRater, SPCTJudge, TransformersBackend, spct
from r2m.adapters.conversation import to_messages
from r2m.adapters.rm_r1 import build_messages

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "adapters"))
import tiny_judge
from chat_server import ChatServer, Reply, completion

POLICY_DIM = 16
PROMPTS = ["Name a prime."] * 3 + ["Say hi."] * 2
COMPLETIONS = ["7", "nine", "2 is the only even prime", "hi", "hello there"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_judge.tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_judge.judge_model(tokenizer)


def backend(model, tokenizer, **overrides):
    return TransformersBackend(model, tokenizer, **{"max_new_tokens": 6, "batch_size": 2, **overrides})


def reference_rte(model, tokenizer, text):
    """The judge's last hidden state at the end of ``text``, computed the way R2MJudgeModel does."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    judge = r2m.R2MJudgeModel(model, POLICY_DIM, r2m.R2MConfig(attn_dim=16, total_steps=4))
    return judge.rte(ids)[0]


def test_batched_generation_left_padding_and_rte(model, tokenizer):
    conversations = [[{"role": "user", "content": "q" * n}] for n in (1, 30, 7)]
    batched = backend(model, tokenizer).generate_sync(conversations)
    alone = [backend(model, tokenizer).generate_sync([c])[0] for c in conversations]
    for b, a, conversation in zip(batched, alone, conversations, strict=True):
        assert len(b.texts) == 1 and b.error is None
        assert b.texts == a.texts, "left padding must not change greedy replies"
        text = backend(model, tokenizer).render(conversation)
        assert text.startswith("<|user|>") and text.endswith("<|assistant|>")
        torch.testing.assert_close(b.rte, reference_rte(model, tokenizer, text), atol=1e-4, rtol=1e-4)


def test_sampling_and_sample_counts(model, tokenizer):
    conversations = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "a longer question"}]]
    torch.manual_seed(0)
    sampled = asyncio.run(backend(model, tokenizer, temperature=1.0, top_p=0.9).generate(conversations, 3))
    greedy = backend(model, tokenizer).generate_sync(conversations, 3)
    assert [len(g.texts) for g in sampled] == [3, 3] and len({*sampled[1].texts}) > 1
    assert [len(g.texts) for g in greedy] == [3, 3] and len({*greedy[0].texts}) == 1
    for s, g in zip(sampled, greedy, strict=True):
        torch.testing.assert_close(s.rte, g.rte, atol=1e-4, rtol=1e-4)


def test_loads_from_a_local_path(model, tokenizer, tmp_path):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = TransformersBackend(str(tmp_path), max_new_tokens=4)
    conversation = [[{"role": "user", "content": "hello"}]]
    assert loaded.generate_sync(conversation)[0].texts == backend(model, tokenizer, max_new_tokens=4).generate_sync(
        conversation)[0].texts


def test_backend_argument_checks(model, tokenizer):
    with pytest.raises(ValueError, match="has no chat_template"):
        TransformersBackend(model, tiny_judge.tokenizer().__class__(tokenizer_object=tokenizer.backend_tokenizer))
    with pytest.raises(ValueError, match="tokenizer .* is required"):
        TransformersBackend(model)
    with pytest.raises(TypeError, match="model must be a transformers causal LM"):
        TransformersBackend(torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        backend(model, tokenizer, temperature=-1)


def test_rm_r1_gibberish_judge_counts_logs_and_gives_none(model, tokenizer, caplog):
    extra, metrics = {}, {}
    judge = RMR1Judge(backend(model, tokenizer), name="rmr1_tiny")
    with caplog.at_level(logging.WARNING, logger="r2m.adapters.reward_function"):
        rewards = judge(PROMPTS, COMPLETIONS, completion_ids=[[1]] * 5, trainer_state=None,
                        log_extra=extra.__setitem__, log_metric=metrics.__setitem__)
    assert rewards == [None] * 5
    assert metrics["rmr1_tiny/comparisons"] == 8 and metrics["rmr1_tiny/unparseable"] == 8
    assert metrics["rmr1_tiny/no_reward"] == 5 and metrics["rmr1_tiny/ties"] == 4
    assert len(extra["rmr1_tiny/judge"]) == 5 and "no verdict" in extra["rmr1_tiny/judge"][0]
    assert "rmr1_tiny: no reward for 5 of 5 completions" in caplog.text


def test_rm_r1_rte_is_the_mean_over_the_inputs_showing_a_completion(model, tokenizer):
    judge = RMR1Judge(backend(model, tokenizer), mode="anchor", both_orders=False)
    result = judge.score(PROMPTS, COMPLETIONS)
    assert result.rte.shape == (5, 32) and torch.isfinite(result.rte).all()
    render = judge.backend.render
    inputs = {i: render(build_messages(to_messages(PROMPTS[0]), COMPLETIONS[i], COMPLETIONS[0])) for i in (1, 2)}
    for i in (1, 2):
        torch.testing.assert_close(result.rte[i], reference_rte(model, tokenizer, inputs[i]), atol=1e-4, rtol=1e-4)
    anchor_mean = torch.stack([reference_rte(model, tokenizer, inputs[i]) for i in (1, 2)]).mean(0)
    torch.testing.assert_close(result.rte[0], anchor_mean, atol=1e-4, rtol=1e-4)


def test_spct_gibberish_judge_drops_every_sample(model, tokenizer):
    metrics = {}
    judge = SPCTJudge(backend(model, tokenizer, temperature=1.0), num_samples=3)
    rewards = judge(PROMPTS, COMPLETIONS, log_metric=metrics.__setitem__)
    assert rewards == [None] * 5
    assert metrics["spct/samples"] == 6 and metrics["spct/dropped_samples"] == 6 and metrics["spct/voters"] == 0
    assert metrics["spct/no_reward"] == 5


def test_wrap_gives_an_r2m_reward_over_a_local_judge(model, tokenizer):
    judge = SPCTJudge(backend(model, tokenizer))
    result = judge.score(PROMPTS, COMPLETIONS)
    group_prompt = judge.backend.render([{"role": "user",
                                          "content": spct.build_prompt(to_messages(PROMPTS[0]), COMPLETIONS[:3])}])
    expected = reference_rte(model, tokenizer, group_prompt)
    for i in range(3):
        torch.testing.assert_close(result.rte[i], expected, atol=1e-4, rtol=1e-4)

    rm = r2m.wrap(judge, POLICY_DIM, r2m.R2MConfig(attn_dim=16, total_steps=4, seed=0))
    assert isinstance(rm, r2m.R2MJudgeModel) and rm.judge_model is model and rm.rm_dim == 32
    base = torch.tensor([math.nan if r is None else r for r in result.rewards])
    base[[0, 3]] = torch.tensor([12.0, 5.0])  # the gibberish judge gave none: stand-ins for a real judge's rewards
    hidden, mask = torch.randn(5, 4, POLICY_DIM), torch.ones(5, 4, dtype=torch.bool)
    rewards = rm.reward_from_rte(result.rte, hidden, mask, step=1, base_rewards=base)
    torch.testing.assert_close(rewards[[0, 3]], rm.omega_at(1) * base[[0, 3]])
    assert torch.isnan(rewards[[1, 2, 4]]).all()

    remote = SPCTJudge(OpenAIChatBackend("http://127.0.0.1:1/v1", "m"))
    assert remote.judge_model is None
    with pytest.raises(TypeError, match="or an r2m.adapters judge with a local model"):
        r2m.wrap(remote, POLICY_DIM)


def test_sequence_classifier_rater_matches_unbatched_forwards(tokenizer):
    rater_model = tiny_judge.rater_model(tokenizer)
    rater = SequenceClassifierRater(rater_model, tokenizer, batch_size=2)
    prompts, outputs = ["judge prompt one", "two", "three is longer than the others"], ["a", "bb bb", "c"]
    ratings = rater(prompts, outputs)
    for prompt, output, rating in zip(prompts, outputs, ratings, strict=True):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": output}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            assert rating == pytest.approx(float(rater_model(ids).logits[0, 0]), abs=1e-5)


def test_rater_guides_spct_voting(tokenizer):
    rater = SequenceClassifierRater(tiny_judge.rater_model(tokenizer), tokenizer)
    samples = [f"Critique {i}: {'good ' * i}\nScores: [{i}, {10 - i}]" for i in range(1, 6)]
    with ChatServer(lambda body: Reply(body=completion(samples))) as server:
        judge = SPCTJudge(OpenAIChatBackend(server.url, "judge"), num_samples=5, meta_rm=rater, k_meta=2)
        result = judge.score(["p", "p"], ["x", "y"])
    prompt = server.requests[0]["messages"][0]["content"]
    ratings = rater([prompt] * 5, samples)
    top = sorted(sorted(range(5), key=lambda s: -ratings[s])[:2])
    assert result.rewards == [sum(s + 1 for s in top), sum(9 - s for s in top)]
