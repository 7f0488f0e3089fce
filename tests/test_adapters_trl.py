"""Both judges as reward functions of a real TRL GRPOTrainer run (tiny policy saved to disk, CPU): RM-R1 as a
sync reward function on a loopback chat-completions server, SPCT as an async one on a local transformers judge."""

import math
import re
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from r2m.adapters import OpenAIChatBackend, RMR1Judge, SPCTJudge, TransformersBackend
from r2m.benchmarks import tiny_models as tiny

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "adapters"))
import tiny_judge
from chat_server import ChatServer, Reply, completion

STEPS, GENERATIONS = 2, 4


def prefers_more_ones(body):
    """A rule judge: the response with more '1' characters wins (B on a tie)."""
    user = body["messages"][-1]["content"]
    a, b = (re.search(rf"\[The Start of Chatbot {x}'s Response\]\n(.*?)\n\[The End of Chatbot {x}'s Response\]",
                      user, re.DOTALL).group(1) for x in "AB")
    verdict = "A" if a.count("1") > b.count("1") else "B"
    return Reply(body=completion([f"<type>Chat</type>\n<rubric>ones (100%)<justify>x</justify></rubric>\n"
                                  f"<eval><quote_A>{a}</quote_A></eval>\n<answer>[[{verdict}]]</answer>"]))


@pytest.mark.slow
def test_grpo_with_both_judges(tmp_path):
    tokenizer = tiny.build_tokenizer(60)
    policy = tiny.build_policy(tokenizer, "llama", hidden_size=32)
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    judge_tokenizer = tiny_judge.tokenizer()
    spct_judge = SPCTJudge(TransformersBackend(tiny_judge.judge_model(judge_tokenizer), judge_tokenizer,
                                               max_new_tokens=4, temperature=1.0), num_samples=2)
    prompts = [" ".join(f"w{(5 * i + j) % 60}" for j in range(3)) for i in range(STEPS)]
    with ChatServer(prefers_more_ones) as server:
        rm_r1 = RMR1Judge(OpenAIChatBackend(server.url, "judge", timeout=10.0, max_retries=1))
        args = GRPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=STEPS,
                          per_device_train_batch_size=GENERATIONS, num_generations=GENERATIONS,
                          max_completion_length=5, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                          beta=0.0, seed=0, disable_tqdm=True, log_completions=True)
        trainer = GRPOTrainer(model=str(tmp_path / "policy"),
                              reward_funcs=[rm_r1, spct_judge.async_reward_function], args=args,
                              train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer)
        trainer.train()
    assert len(server.requests) == STEPS * GENERATIONS * (GENERATIONS - 1)  # one group per step, all ordered pairs

    history = [h for h in trainer.state.log_history if "rewards/rm_r1/mean" in h]
    assert len(history) == STEPS
    for entry in history:
        assert entry["rm_r1/comparisons"] == GENERATIONS * (GENERATIONS - 1)
        assert entry["rm_r1/failed"] == 0 and entry["rm_r1/unparseable"] == 0
        assert entry["rewards/rm_r1/mean"] == pytest.approx(0.5)  # win rates of a full round robin average 1/2
        assert entry["spct/samples"] == 2 and entry["spct/dropped_samples"] == 2  # the random judge: gibberish
        assert entry["spct/no_reward"] == GENERATIONS
        assert entry["rewards/spct/mean"] is None or math.isnan(entry["rewards/spct/mean"])  # TRL logs NaN as None
    judged = trainer._logs["extra"]
    assert len(judged["rm_r1/judge"]) == len(judged["spct/judge"]) >= GENERATIONS  # TRL keeps the latest rows
    assert all("<answer>[[" in text for text in judged["rm_r1/judge"])
    assert all("malformed, dropped" in text for text in judged["spct/judge"])
