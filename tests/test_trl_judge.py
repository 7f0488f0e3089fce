"""R2MReward over generative judges (r2m.R2MJudgeModel) inside real TRL GRPOTrainer runs on tiny models (CPU).

The judges run a tiny random local model through the real transformers backend. To get verdicts that parse, its
decoding is constrained by a logits processor that makes it write a rule's reply (prefill and decode steps run as
usual, so the RTE is the model's real hidden state); in every batch one group gets a malformed reply, so the
failure paths (None rewards, skipped groups) run next to the working ones. A gibberish (unconstrained) judge
checks that nothing breaks when no reward parses.
"""

import math
import re
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import LogitsProcessor, LogitsProcessorList, TrainerCallback
from trl import GRPOTrainer

import r2m
from r2m.adapters import OpenAIChatBackend, RMR1Judge, SPCTJudge, TransformersBackend
from r2m.integrations.trl import R2MReward

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "adapters"))
import tiny_judge
import trl_tiny
from chat_server import ChatServer, Reply, completion

GENERATIONS, PROMPTS_PER_STEP = 4, 2


class ScriptedReplies(LogitsProcessor):
    """Constrained decoding: each row writes ``reply(judge input text)`` and then EOS, whatever the weights."""

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply = tokenizer, reply
        self.start = tokenizer.convert_tokens_to_ids("<|assistant|>")  # the chat template's generation prompt
        self.targets: dict[tuple[int, ...], list[int]] = {}

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -math.inf)
        for row, ids in enumerate(input_ids.tolist()):
            start = len(ids) - ids[::-1].index(self.start)
            prompt = tuple(ids[:start])
            if prompt not in self.targets:
                text = self.reply(self.tokenizer.decode(list(prompt), skip_special_tokens=True))
                self.targets[prompt] = [*self.tokenizer.encode(text, add_special_tokens=False),
                                        self.tokenizer.eos_token_id]
            target = self.targets[prompt]
            forced[row, target[min(len(ids) - start, len(target) - 1)]] = 0.0
        return forced


def word_score(response):
    """1..10 from the policy's words (w0..w59)."""
    return 1 + sum(int(word[1:]) for word in response.split() if word[1:].isdigit()) % 10


def judged(query):
    """The rule judges prompts that start with an even word and answers the others with something malformed."""
    return int(query.split()[0][1:]) % 2 == 0


def spct_reply(text):
    query = re.findall(r"\[Query\]\n(.*?)\n", text)[-1]
    responses = re.findall(r"\[Response \d+\]\n(.*?)\n\[End of Response \d+\]", text, re.DOTALL)
    if not judged(query):
        return "I cannot decide."
    return "Scores: [" + ", ".join(str(word_score(r)) for r in responses) + "]"


def rm_r1_reply(text):
    question = re.findall(r"\[Client Question\]\n(.*?)\n", text)[-1]
    a, b = (re.findall(rf"\[The Start of Chatbot {x}'s Response\]\n(.*?)\n\[The End of Chatbot {x}'s Response\]",
                       text, re.DOTALL)[-1] for x in "AB")
    if not judged(question):
        return "no verdict"
    return f"<answer>[[{'A' if word_score(a) > word_score(b) else 'B'}]]</answer>"


def make_judge(kind, scripted=True):
    tokenizer = tiny_judge.tokenizer()
    kwargs = {"max_new_tokens": 24, "batch_size": 16}
    if scripted:
        reply = spct_reply if kind == "spct" else rm_r1_reply
        kwargs["generation_kwargs"] = {"logits_processor": LogitsProcessorList([ScriptedReplies(tokenizer, reply)])}
    else:
        kwargs["max_new_tokens"] = 4
    backend = TransformersBackend(tiny_judge.judge_model(tokenizer), tokenizer, **kwargs)
    return SPCTJudge(backend) if kind == "spct" else RMR1Judge(backend)


def dataset():
    """Prompts in order (no shuffling): every step judges one even (parsed) and one odd (malformed) prompt."""
    return Dataset.from_dict({"prompt": [f"w{i} w{(i + 10) % 60}" for i in range(16)]})


def args(output_dir, **overrides):
    return trl_tiny.args("grpo", str(output_dir), **{
        "per_device_train_batch_size": GENERATIONS * PROMPTS_PER_STEP, "num_generations": GENERATIONS,
        "shuffle_dataset": False, "max_steps": 3, **overrides})


def config(**overrides):
    return r2m.R2MConfig(**{"lr": 1e-2, "attn_dim": 16, "seed": 0, **overrides})


def spy(reward):
    """Record what the trainer receives from ``reward`` and what its judge returned for each call."""
    seen, results = [], []
    call, score = reward.__call__, reward.judge.score

    class Spy(type(reward)):
        def __call__(self, *a, **k):
            seen.append(call(*a, **k))
            return seen[-1]

    reward.__class__ = Spy
    reward.judge.score = lambda prompts, completions, **k: results.append((prompts, score(prompts, completions, **k))
                                                                          ) or results[-1][1]
    return seen, results


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def train(reward, output_dir, callbacks=(), resume=None, **overrides):
    policy, policy_tokenizer, *_ = trl_tiny.models_()
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward, *callbacks],
                          args=args(output_dir, **overrides), train_dataset=dataset(),
                          processing_class=policy_tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["spct", "rm_r1"])
def test_grpo_with_an_r2m_wrapped_judge(kind, tmp_path):
    judge = make_judge(kind)
    judge_state = {k: v.clone() for k, v in judge.judge_model.state_dict().items()}
    reward = R2MReward(judge, config=config())
    seen, results = spy(reward)
    initial = Snapshot(reward)
    trainer = train(reward, tmp_path, callbacks=[initial], log_completions=True)

    assert isinstance(reward.r2m, r2m.R2MJudgeModel) and reward.r2m.judge_model is judge.judge_model
    assert len(seen) == len(results) == 3
    for step, (rewards, (prompts, result)) in enumerate(zip(seen, results, strict=True)):
        parsed = [judged(p) for p in prompts]
        assert sum(parsed) == GENERATIONS  # one judged group and one malformed group per step
        assert [r is None for r in rewards] == [not p for p in parsed]
        assert [r is None for r in result.rewards] == [not p for p in parsed]
        assert all(math.isfinite(r) for r in rewards if r is not None)  # no NaN reaches TRL
        if step == 0:  # w(0) = 1: R2M gives exactly the judge's rewards (in float32)
            assert rewards == [None if r is None else float(torch.tensor(r, dtype=torch.float32))
                               for r in result.rewards]
    assert len({r for r in seen[0] if r is not None}) > 1  # the judge tells the completions apart
    assert logged(trainer, "r2m/reward_nonfinite") == [float(GENERATIONS)] * 3
    assert logged(trainer, f"{judge.__name__}/no_reward") == [float(GENERATIONS)] * 3
    if kind == "spct":
        assert logged(trainer, "spct/dropped_samples") == [1.0] * 3
    else:
        assert logged(trainer, "rm_r1/unparseable") == [float(GENERATIONS * (GENERATIONS - 1))] * 3
    assert all(math.isfinite(v) for v in logged(trainer, "rewards/r2m/mean"))

    updates = trl_tiny.updates(trainer)
    assert [u["groups_skipped"] for u in updates] == [1.0] * 3
    assert [u["groups_used"] for u in updates] == [1.0] * 3
    assert all(u["refreshed"] == 1.0 for u in updates)
    for name in ("fusion", "head"):
        assert any(not torch.equal(v, initial.state[k]) for k, v in reward_state(reward.r2m).items()
                   if k.startswith(name)), f"{name} did not train"
    assert all(torch.isfinite(p).all() for p in reward.r2m.trainable_parameters())
    for key, value in judge.judge_model.state_dict().items():
        assert torch.equal(value, judge_state[key]), f"the judge model changed: {key}"
    texts = trainer._logs["extra"][f"{judge.__name__}/judge"]
    assert texts and any(("voted" if kind == "spct" else "[[") in t for t in texts)


@pytest.mark.slow
def test_gibberish_judge_gives_none_and_skips_every_group(tmp_path):
    judge = make_judge("spct", scripted=False)
    reward = R2MReward(judge, config=config())
    seen, _ = spy(reward)
    initial = Snapshot(reward)
    trainer = train(reward, tmp_path, callbacks=[initial], max_steps=2)
    assert seen == [[None] * (GENERATIONS * PROMPTS_PER_STEP)] * 2
    assert [u["groups_skipped"] for u in trl_tiny.updates(trainer)] == [2.0, 2.0]
    assert logged(trainer, "r2m/reward_nonfinite") == [8.0, 8.0] and logged(trainer, "spct/no_reward") == [8.0, 8.0]
    for key, value in reward_state(reward.r2m).items():
        assert torch.equal(value, initial.state[key]), f"{key} changed although no group had rewards"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def reward_state(model):
    state = {f"fusion.{k}": v for k, v in model.fusion.state_dict().items()}
    state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    for index, values in model.optimizer.state_dict()["state"].items():
        state.update({f"optim.{index}.{k}": torch.as_tensor(v) for k, v in values.items()})
    return state


class Snapshot(TrainerCallback):
    """The R2M state when training begins (after R2MReward built it: pass after the reward in callbacks)."""

    def __init__(self, reward):
        self.reward, self.state = reward, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = {k: v.clone() for k, v in reward_state(self.reward.r2m).items()}


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


@pytest.mark.slow
def test_resume_with_a_judge_equals_the_uninterrupted_run(tmp_path):
    def run(output_dir, **kwargs):
        reward = R2MReward(make_judge("spct"), config=config())
        trainer = train(reward, output_dir, max_steps=4, save_strategy="steps", save_steps=2, **kwargs)
        return reward, trainer

    reference, reference_trainer = run(tmp_path / "reference")
    _, interrupted = run(tmp_path / "resumed", callbacks=[StopAt(2)])
    assert len(trl_tiny.updates(interrupted)) == 2
    assert (tmp_path / "resumed" / "checkpoint-2" / "r2m" / "r2m_model.safetensors").is_file()
    resumed, resumed_trainer = run(tmp_path / "resumed", resume=True)
    expected_updates, resumed_updates = trl_tiny.updates(reference_trainer), trl_tiny.updates(resumed_trainer, 2)
    assert len(resumed_updates) == 2
    assert [u["loss"] for u in resumed_updates] == [u["loss"] for u in expected_updates[2:]]
    assert all(u["groups_used"] == 1.0 for u in expected_updates)
    expected, got = reward_state(reference.r2m), reward_state(resumed.r2m)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_a_remote_judge_is_refused_but_still_works_as_a_plain_reward_function():
    with ChatServer(lambda body: Reply(body=completion(["Scores: [3, 8]"]))) as server:
        judge = SPCTJudge(OpenAIChatBackend(server.url, "judge", timeout=10.0, max_retries=0))
        with pytest.raises(ValueError, match=r"R2M needs the judge's hidden states .* runs on OpenAIChatBackend"):
            R2MReward(judge)
        assert judge(["w1 w2", "w1 w2"], ["w3", "w4"]) == [3.0, 8.0]


def test_judge_construction_errors(tmp_path):
    judge = make_judge("spct", scripted=False)
    with pytest.raises(ValueError, match="reward_tokenizer is not used with a judge"):
        R2MReward(judge, tiny_judge.tokenizer())
    with pytest.raises(TypeError, match="pass the r2m.adapters judge"):
        R2MReward(r2m.wrap(judge, 32, config()))

    policy, policy_tokenizer, *_ = trl_tiny.models_()
    policy_tokenizer.chat_template = tiny_judge.CHAT_TEMPLATE
    reward = R2MReward(SPCTJudge(TransformersBackend(policy, policy_tokenizer)), config=config())
    with pytest.raises(ValueError, match="the judge runs the policy's own model"):
        GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[reward], args=args(tmp_path),
                    train_dataset=dataset(), processing_class=policy_tokenizer)
    assert all(p.requires_grad for p in policy.parameters())  # nothing was frozen
