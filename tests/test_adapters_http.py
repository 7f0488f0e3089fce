"""The OpenAI-compatible backend and both judges against a real chat-completions server on loopback."""

import asyncio
import json
import pickle
import re
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from trl.trainer.utils import is_async_callable

from r2m.adapters import OpenAIChatBackend, RMR1Judge, SPCTJudge, openrlhf_reward_func

FIXTURES = Path(__file__).parent / "fixtures" / "adapters"
sys.path.insert(0, str(FIXTURES))
from chat_server import ChatServer, Reply, completion  # noqa: E402

RECORDED = {c["name"]: c["text"] for kind in json.loads((FIXTURES / "judge_outputs.json").read_text()).values()
            for c in kind}
CHAT_A = RECORDED["chat rubric, A"]
CHAT_B = CHAT_A.replace("<answer>[[A]]</answer>", "<answer>[[B]]</answer>")
GIBBERISH = RECORDED["gibberish"]


def quality(text):
    match = re.search(r"quality (\d+)", text)
    return int(match.group(1)) if match else 0


def between(text, start, end):
    return re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), text, re.DOTALL).group(1)


def rm_r1_rule(body):
    """A recorded RM-R1 judge: prefers the response of higher 'quality N' (B on equal quality: position bias);
    replies gibberish when a response asks to 'confuse', fails with 500 when one says 'fail'."""
    user = body["messages"][-1]["content"]
    a = between(user, "[The Start of Chatbot A's Response]", "[The End of Chatbot A's Response]")
    b = between(user, "[The Start of Chatbot B's Response]", "[The End of Chatbot B's Response]")
    if "fail" in a + b:
        return Reply(500, {"error": {"message": "engine died"}})
    if "confuse" in a + b:
        return Reply(body=completion([GIBBERISH]))
    return Reply(body=completion([CHAT_A if quality(a) > quality(b) else CHAT_B]))


def spct_rule(body):
    """A recorded SPCT judge: sample s scores each response quality + (0, +1, -1)[s], reports 'confidence'
    (0.2, 0.9, 0.5)[s]; the fourth sample is malformed; every sample is malformed when a response says 'confuse'."""
    user = body["messages"][-1]["content"]
    responses = re.findall(r"\[Response \d+\]\n(.*?)\n\[End of Response \d+\]", user, re.DOTALL)
    texts = []
    for s in range(body["n"]):
        if s == 3 or any("confuse" in r for r in responses):
            texts.append(f"Critique: unsure.\nconfidence: 0.99\nScores: [{', '.join('?' for _ in responses)}]")
            continue
        scores = ", ".join(str(quality(r) + (0, 1, -1)[s % 3]) for r in responses)
        texts.append(f"Principles: accuracy (100%).\nCritique: ...\nconfidence: {(0.2, 0.9, 0.5)[s % 3]}\n"
                     f"Scores: \\boxed{{{scores}}}")
    return Reply(body=completion(texts))


def backend(server, **overrides):
    return OpenAIChatBackend(server.url, "judge", **{"timeout": 5.0, "max_retries": 2, "backoff": 0.0, **overrides})


def conversations(count):
    return [[{"role": "user", "content": f"question {i}"}] for i in range(count)]


# ---- the HTTP backend ---------------------------------------------------------------------------------------------

def test_request_payload_and_samples():
    with ChatServer(lambda body: Reply(body=completion([f"s{i}" for i in range(body["n"])]))) as server:
        out = asyncio.run(backend(server, max_tokens=77, temperature=0.7, top_p=0.9, api_key="k",
                                  extra_body={"seed": 3}).generate(conversations(2), num_samples=3))
    assert [g.texts for g in out] == [["s0", "s1", "s2"]] * 2 and all(g.error is None for g in out)
    assert len(server.requests) == 2
    request = server.requests[0]
    assert request["model"] == "judge" and request["n"] == 3 and request["max_tokens"] == 77
    assert (request["temperature"], request["top_p"], request["seed"]) == (0.7, 0.9, 3)
    assert request["messages"] in conversations(2)


def test_server_errors_are_retried_with_backoff():
    calls = []

    def flaky(body):
        calls.append(body)
        return Reply(500, {"error": "overloaded"}) if len(calls) <= 2 else Reply(body=completion(["ok"]))

    with ChatServer(flaky) as server:
        start = time.perf_counter()
        [out] = asyncio.run(backend(server, max_retries=3, backoff=0.1).generate(conversations(1)))
        elapsed = time.perf_counter() - start
    assert out.texts == ["ok"] and out.attempts == 3 and len(server.requests) == 3
    assert elapsed >= 0.1 + 0.2 - 0.02  # waited backoff, then 2 * backoff


def test_persistent_500_gives_up_after_max_retries():
    with ChatServer(lambda body: Reply(500, {"error": "down"})) as server:
        [out] = asyncio.run(backend(server, max_retries=2).generate(conversations(1)))
    assert out.texts == [] and out.attempts == 3 and len(server.requests) == 3
    assert out.error.startswith("HTTP 500")


def test_client_errors_are_not_retried():
    with ChatServer(lambda body: Reply(400, {"error": "bad request"})) as server:
        [out] = asyncio.run(backend(server, max_retries=4).generate(conversations(1)))
    assert out.texts == [] and out.attempts == 1 and len(server.requests) == 1 and "HTTP 400" in out.error


def test_timeouts_are_retried_then_reported():
    with ChatServer(lambda body: Reply(body=completion(["late"]), delay=1.0)) as server:
        start = time.perf_counter()
        [out] = asyncio.run(backend(server, timeout=0.2, max_retries=1).generate(conversations(1)))
        elapsed = time.perf_counter() - start
    assert out.texts == [] and out.attempts == 2 and out.error == "timed out after 0.2 s"
    assert len(server.requests) == 2 and elapsed < 1.0


@pytest.mark.parametrize("body", ["this is not json", {"choices": []}, {"choices": [{"message": {}}]},
                                  {"object": "error"}, {"choices": [{"message": {"content": 5}}]}])
def test_malformed_bodies_are_retried_then_reported(body):
    with ChatServer(lambda _: Reply(body=body)) as server:
        [out] = asyncio.run(backend(server, max_retries=1).generate(conversations(1)))
    assert out.texts == [] and out.attempts == 2 and len(server.requests) == 2
    assert out.error.startswith("malformed chat-completions body")


def test_connection_refused_is_retried_then_reported():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    [out] = asyncio.run(OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "judge", max_retries=2, backoff=0.0,
                                          timeout=2.0).generate(conversations(1)))
    assert out.texts == [] and out.attempts == 3 and "ConnectError" in out.error


def test_concurrency_limit_holds_across_concurrent_calls():
    with ChatServer(lambda body: Reply(body=completion(["ok"]), delay=0.15)) as server:
        client = backend(server, max_concurrency=2)

        async def both():
            return await asyncio.gather(client.generate(conversations(3)), client.generate(conversations(3)))

        start = time.perf_counter()
        first, second = asyncio.run(both())
        elapsed = time.perf_counter() - start
    assert all(g.texts == ["ok"] for g in first + second)
    assert server.max_in_flight == 2 and len(server.requests) == 6
    assert elapsed >= 3 * 0.15 - 0.02


def test_backend_argument_checks():
    with pytest.raises(ValueError, match="base_url must be an http"):
        OpenAIChatBackend("localhost:8000", "m")
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        OpenAIChatBackend("http://x/v1", "m", timeout=0)
    with pytest.raises(ValueError, match="max_concurrency must be an int >= 1"):
        OpenAIChatBackend("http://x/v1", "m", max_concurrency=0)
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        asyncio.run(OpenAIChatBackend("http://x/v1", "m").generate(conversations(1), 0))


# ---- RM-R1 end to end -----------------------------------------------------------------------------------------

def test_rm_r1_round_robin_rewards_logging_and_call_counts():
    prompts = ["p1"] * 3 + ["p2"] * 2
    completions = ["quality 1", "quality 5", "quality 3", "quality 2", "also quality 2"]
    extra, metrics = {}, {}
    with ChatServer(rm_r1_rule) as server:
        judge = RMR1Judge(backend(server))
        rewards = judge(prompts, completions, completion_ids=None, trainer_state=None,
                        log_extra=lambda k, v: extra.setdefault(k, v), log_metric=metrics.__setitem__)
    assert rewards == [0.0, 1.0, 0.5, 0.5, 0.5]
    assert len(server.requests) == 3 * 2 + 1 * 2  # all pairs, both orders
    assert all(r["messages"][0]["role"] == "system" for r in server.requests)
    assert metrics == {"rm_r1/comparisons": 8.0, "rm_r1/failed": 0.0, "rm_r1/retries": 0.0,
                       "rm_r1/unparseable": 0.0, "rm_r1/ties": 1.0, "rm_r1/no_reward": 0.0,
                       "rm_r1/position_consistency": 0.75}
    [column] = extra
    assert column == "rm_r1/judge" and len(extra[column]) == 5
    assert extra[column][0].count("===") == 2 * 4 and "<rubric>" in extra[column][0]
    assert "#0 as A vs #1 as B: B" in extra[column][0]


def test_rm_r1_bradley_terry_and_single_order():
    prompts, completions = ["p"] * 3, ["quality 1", "quality 5", "quality 3"]
    with ChatServer(rm_r1_rule) as server:
        bt = RMR1Judge(backend(server), scoring="bradley_terry").score(prompts, completions)
        assert len(server.requests) == 6
        single = RMR1Judge(backend(server), both_orders=False).score(prompts, completions)
        assert len(server.requests) == 6 + 3
    assert bt.rewards[1] > bt.rewards[2] > bt.rewards[0] and abs(sum(bt.rewards)) < 1e-9
    assert single.rewards == [0.0, 1.0, 0.5] and "position_consistency" not in single.metrics


def test_rm_r1_position_bias_cancels_with_both_orders():
    prompts, completions = ["p"] * 3, ["quality 4"] * 3  # equal quality: this judge always says B
    with ChatServer(rm_r1_rule) as server:
        both = RMR1Judge(backend(server)).score(prompts, completions)
        single = RMR1Judge(backend(server), both_orders=False).score(prompts, completions)
    assert both.rewards == [0.5, 0.5, 0.5] and both.metrics["position_consistency"] == 0.0
    assert single.rewards == [0.0, 0.5, 1.0]


def test_rm_r1_anchor_call_counts():
    prompts, completions = ["p"] * 4, ["quality 3", "quality 1", "quality 5", "quality 3"]
    with ChatServer(rm_r1_rule) as server:
        one = RMR1Judge(backend(server), mode="anchor", both_orders=False).score(prompts, completions)
        assert len(server.requests) == 3  # K - 1
        assert RMR1Judge(backend(server), mode="anchor").score(prompts, completions).metrics["comparisons"] == 6
        assert len(server.requests) == 3 + 6
        reference = RMR1Judge(backend(server), mode="anchor", both_orders=False, reference_column="reference")
        ref = reference.score(prompts, completions, reference=["quality 2"] * 4)
        assert len(server.requests) == 3 + 6 + 4  # K against the reference
    assert one.rewards == [2 / 3, 0.0, 1.0, 0.0]
    assert ref.rewards == [1.0, 0.0, 1.0, 1.0]
    assert all("[The Start of Chatbot B's Response]\nquality 2\n" in r["messages"][1]["content"]
               for r in server.requests[-4:])
    with pytest.raises(ValueError, match="reference_column 'reference' is not among the dataset columns"):
        reference.score(prompts, completions)


def test_rm_r1_unparseable_verdicts_are_draws_and_counted():
    prompts, completions = ["p"] * 3, ["quality 1", "confuse me", "quality 3"]
    with ChatServer(rm_r1_rule) as server:
        result = RMR1Judge(backend(server)).score(prompts, completions)
    assert result.rewards == [0.25, None, 0.75]
    assert result.metrics["unparseable"] == 4 and result.metrics["no_reward"] == 1
    assert result.metrics["ties"] == 2 and result.metrics["position_consistency"] == 1.0
    assert "no verdict" in result.details[1]


def test_rm_r1_failed_requests_are_draws_and_counted():
    prompts, completions = ["p"] * 2 + ["q"] * 2, ["quality 1", "fail", "quality 1", "quality 2"]
    with ChatServer(rm_r1_rule) as server:
        result = RMR1Judge(backend(server, max_retries=1)).score(prompts, completions)
    assert len(server.requests) == 2 * 2 + 2
    assert result.rewards == [None, None, 0.0, 1.0]
    assert result.metrics["failed"] == 2 and result.metrics["retries"] == 2 and result.metrics["no_reward"] == 2
    assert "request failed: HTTP 500" in result.details[0]
    assert result.rte is None


def test_rm_r1_singletons_and_empty_batches():
    with ChatServer(rm_r1_rule) as server:
        judge = RMR1Judge(backend(server))
        assert judge(["a", "b"], ["quality 1", "quality 2"]) == [None, None]
        assert judge([], []) == []
    assert server.requests == []


def test_group_size_and_argument_checks():
    with ChatServer(rm_r1_rule) as server:
        judge = RMR1Judge(backend(server), group_size=2)
        assert judge(["p", "p", "p", "p"], ["quality 1", "quality 2", "quality 3", "quality 1"]) == [0, 1, 1, 0]
        with pytest.raises(ValueError, match="not a whole number of groups of group_size=2"):
            judge(["p"] * 3, ["x"] * 3)
        with pytest.raises(ValueError, match="do not share one prompt"):
            judge(["p", "q"], ["x", "y"])
        with pytest.raises(ValueError, match="got 2 prompts but 1 completions"):
            judge(["p", "p"], ["x"])
        with pytest.raises(ValueError, match="mode must be one of"):
            RMR1Judge(backend(server), mode="swiss")
        with pytest.raises(ValueError, match="reference_column is the anchor of mode='anchor'"):
            RMR1Judge(backend(server), reference_column="ref")
        with pytest.raises(TypeError, match="backend must be an r2m.adapters JudgeBackend"):
            RMR1Judge("http://127.0.0.1:1/v1")


def test_conversational_inputs():
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Rate me"}]
    completions = [[{"role": "assistant", "content": "quality 2"}], [{"role": "assistant", "content": "quality 7"}]]
    seen = []

    def multi_turn(body):
        user = body["messages"][-1]["content"]
        seen.append(user)
        a = between(user, "[The Start of the Conversation between Chatbot A and the Client]",
                    "[The End of the Conversation between Chatbot A and the Client]")
        b = between(user, "[The Start of the Conversation between Chatbot B and the Client]",
                    "[The End of the Conversation between Chatbot B and the Client]")
        return Reply(body=completion([CHAT_A if quality(a) > quality(b) else CHAT_B]))

    with ChatServer(multi_turn) as server:
        assert RMR1Judge(backend(server))([prompt, prompt], completions) == [0.0, 1.0]
    # both orders are sent concurrently: either may arrive first
    assert any("Client: Rate me\n\nChatbot A: quality 2" in user for user in seen)
    assert any("Client: Rate me\n\nChatbot B: quality 2" in user for user in seen)


# ---- SPCT end to end ------------------------------------------------------------------------------------------

def test_spct_voting_sum_mean_and_dropped_samples():
    prompts, completions = ["p"] * 2 + ["q"], ["quality 4", "quality 7", "quality 9"]
    with ChatServer(spct_rule) as server:
        summed = SPCTJudge(backend(server, temperature=1.0), num_samples=4).score(prompts, completions)
        assert len(server.requests) == 2 and {r["n"] for r in server.requests} == {4}
        mean = SPCTJudge(backend(server, temperature=1.0), num_samples=4, reduce="mean").score(prompts, completions)
    assert summed.rewards == [4 + 5 + 3, 7 + 8 + 6, 9 + 10 + 8]
    assert mean.rewards == [4.0, 7.0, 9.0]
    assert summed.metrics == {"requests": 2.0, "failed": 0.0, "retries": 0.0, "samples": 8.0,
                              "dropped_samples": 2.0, "voters": 3.0, "no_reward": 0.0}
    assert "malformed, dropped" in summed.details[0] and "voted" in summed.details[0]
    assert summed.details[0].startswith("(response 1 of 2)") and summed.details[1].startswith("(response 2 of 2)")


def confidence(outputs):
    return [float(re.search(r"confidence: ([\d.]+)", o).group(1)) for o in outputs]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_spct_meta_rm_guided_voting(asynchronous):
    rated = []

    def meta(judge_prompts, judge_outputs):
        rated.append((judge_prompts, judge_outputs))
        return confidence(judge_outputs)

    async def async_meta(judge_prompts, judge_outputs):
        return meta(judge_prompts, judge_outputs)

    prompts, completions = ["p"] * 2, ["quality 4", "quality 7"]
    with ChatServer(spct_rule) as server:
        judge = SPCTJudge(backend(server), num_samples=4, meta_rm=async_meta if asynchronous else meta, k_meta=2)
        result = judge.score(prompts, completions)
    assert result.rewards == [5 + 3, 8 + 6]  # samples rated 0.9 and 0.5 vote; the malformed 0.99 is never rated
    [(judge_prompts, outputs)] = rated
    assert len(outputs) == 3 and all("Scores: \\boxed" in o for o in outputs)
    assert judge_prompts[0] == server.requests[0]["messages"][0]["content"]
    assert result.metrics["voters"] == 2.0 and "not selected" in result.details[0]
    assert SPCTJudge(backend(server), num_samples=5, meta_rm=meta).k_meta == 3


def test_spct_no_valid_sample_gives_none():
    prompts, completions = ["p"] * 2 + ["q"] * 2, ["confuse", "quality 3", "quality 1", "quality 2"]
    metrics = {}
    with ChatServer(spct_rule) as server:
        rewards = SPCTJudge(backend(server), num_samples=2)(prompts, completions, log_metric=metrics.__setitem__)
    assert rewards == [None, None, 1 + 2, 2 + 3]
    assert metrics["spct/dropped_samples"] == 2 and metrics["spct/no_reward"] == 2


def test_spct_failed_request_gives_none():
    with ChatServer(lambda body: Reply(503, {"error": "busy"})) as server:
        result = SPCTJudge(backend(server, max_retries=1), num_samples=3).score(["p", "p"], ["a", "b"])
    assert result.rewards == [None, None] and result.metrics["failed"] == 1 and result.metrics["samples"] == 0
    assert len(server.requests) == 2 and "request failed: HTTP 503" in result.details[0]


def test_spct_argument_checks():
    b = OpenAIChatBackend("http://127.0.0.1:1/v1", "m")
    with pytest.raises(ValueError, match="k_meta selects the samples a meta reward model rates highest"):
        SPCTJudge(b, num_samples=4, k_meta=2)
    with pytest.raises(ValueError, match=r"k_meta must be an int in \[1, 4\] \(at most num_samples\)"):
        SPCTJudge(b, num_samples=4, meta_rm=confidence, k_meta=5)
    with pytest.raises(TypeError, match="meta_rm must be callable"):
        SPCTJudge(b, meta_rm=3)


# ---- reward-function forms ------------------------------------------------------------------------------------

def test_async_reward_function_runs_judges_concurrently():
    prompts, completions = ["p"] * 2, ["quality 1", "quality 2"]
    with ChatServer(lambda body: Reply(body=rm_r1_rule(body).body, delay=0.3)) as server:
        first = RMR1Judge(backend(server), name="first").async_reward_function
        second = RMR1Judge(backend(server), name="second").async_reward_function
        assert is_async_callable(first) and not is_async_callable(RMR1Judge(backend(server)))
        assert first.__name__ == "first"
        logged = {}

        async def both():
            return await asyncio.gather(first(prompts=prompts, completions=completions, completion_ids=[[1], [2]],
                                              log_metric=logged.__setitem__),
                                        second(prompts=prompts, completions=completions, completion_ids=[[1], [2]]))

        start = time.perf_counter()
        results = asyncio.run(both())
        elapsed = time.perf_counter() - start
    assert results == [[0.0, 1.0], [0.0, 1.0]] and logged["first/comparisons"] == 2
    assert server.max_in_flight == 4 and elapsed < 2 * 0.3 * 2


def test_openrlhf_reward_func():
    with ChatServer(rm_r1_rule) as server:
        judge = RMR1Judge(backend(server), mode="anchor", reference_column="label", both_orders=False)
        prompts = ["<user>p</user>"] * 3
        queries = [p + c for p, c in zip(prompts, ["quality 1", "quality 5", "confuse"], strict=True)]
        out = judge.reward_func(queries, prompts, ["quality 3"] * 3)
        plain = openrlhf_reward_func(judge, missing_reward=-1.0)
        assert plain.__name__ == "reward_func" and callable(plain)
        again = plain(queries, prompts, ["quality 3"] * 3)
    assert torch.equal(out["rewards"], torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(again["rewards"], torch.tensor([0.0, 1.0, -1.0]))
    assert torch.equal(out["scores"], out["rewards"])
    assert out["extra_logs"]["rm_r1/unparseable"].tolist() == [1.0] * 3
    users = [request["messages"][1]["content"] for request in server.requests]  # sent concurrently: any order
    assert all("[Client Question]\n<user>p</user>\n" in user for user in users)
    assert any("Chatbot A's Response]\nquality 1\n" in user for user in users)


def test_sync_call_inside_a_running_event_loop_and_pickling():
    with ChatServer(rm_r1_rule) as server:
        judge = RMR1Judge(backend(server))

        async def from_a_coroutine():
            return judge(["p", "p"], ["quality 2", "quality 1"])

        assert asyncio.run(from_a_coroutine()) == [1.0, 0.0]
        copy = openrlhf_reward_func(pickle.loads(pickle.dumps(judge)))  # Ray ships the judge to its workers
        assert copy(["pquality 1", "pquality 3"], ["p", "p"], None)["rewards"].tolist() == [0.0, 1.0]
    assert len(server.requests) == 4
