"""Judge-output parsers against recorded outputs, and the judges' prompt layouts."""

import json
from pathlib import Path

import pytest

from r2m.adapters import rm_r1, spct
from r2m.adapters.conversation import response_text, strip_thinking, to_messages

OUTPUTS = json.loads((Path(__file__).parent / "fixtures" / "adapters" / "judge_outputs.json").read_text())


@pytest.mark.parametrize("case", OUTPUTS["rm_r1"], ids=[c["name"] for c in OUTPUTS["rm_r1"]])
def test_parse_verdict(case):
    assert rm_r1.parse_verdict(case["text"]) == case["verdict"]


@pytest.mark.parametrize("case", OUTPUTS["spct"], ids=[c["name"] for c in OUTPUTS["spct"]])
def test_parse_scores(case):
    assert spct.parse_scores(case["text"], case["num_responses"]) == case["scores"]


def test_parsers_reject_non_text():
    assert rm_r1.parse_verdict(None) is None
    assert spct.parse_scores(None, 2) is None


def test_parsers_cover_both_outcomes():
    """The recorded table exercises every outcome, so a parser that always says None cannot pass it."""
    assert {c["verdict"] for c in OUTPUTS["rm_r1"]} == {"A", "B", None}
    assert sum(c["scores"] is None for c in OUTPUTS["spct"]) >= 5
    assert sum(c["scores"] is not None for c in OUTPUTS["spct"]) >= 5


def test_strip_thinking():
    assert strip_thinking("<think>a</think>b<THINK>c</THINK>d") == "bd"
    assert strip_thinking("opened by the template</think>answer") == "answer"
    assert strip_thinking("answer<think>cut off") == "answer"


def test_rm_r1_single_turn_layout_is_exactly_spec_7_1():
    user = rm_r1.build_user_prompt([{"role": "user", "content": "What is 2+2?"}], "4", "5")
    assert user == ("[Client Question]\nWhat is 2+2?\n\n"
                    "[The Start of Chatbot A's Response]\n4\n[The End of Chatbot A's Response]\n\n"
                    "[The Start of Chatbot B's Response]\n5\n[The End of Chatbot B's Response]")


def test_rm_r1_instruct_layout():
    messages = rm_r1.build_messages(to_messages("Q?"), "ra", "rb", layout="instruct")
    assert [m["role"] for m in messages] == ["system", "user"]
    system = messages[0]["content"]
    for tag in ("<type>Chat</type>", "<type>Reasoning</type>", "<rubric>", "<justify>", "<eval>", "<solution>",
                "<quote_A>", "<summary_A>", "<quote_B>", "<summary_B>", "<answer>[[A]]</answer>",
                "<answer>[[B]]</answer>"):
        assert tag in system, tag
    assert system.index("<type>Reasoning</type>") < system.index("<solution>")
    assert rm_r1.parse_verdict(system) is None, "echoing the instructions must not read as a verdict"
    assert messages[1]["content"] == rm_r1.build_user_prompt(to_messages("Q?"), "ra", "rb")
    custom = rm_r1.build_messages(to_messages("Q?"), "ra", "rb", system_prompt="Judge.")
    assert custom[0] == {"role": "system", "content": "Judge."}


def test_rm_r1_reasoning_layout():
    messages = rm_r1.build_messages(to_messages("Q?"), "ra", "rb", layout="reasoning")
    assert [m["role"] for m in messages] == ["user"]
    content = messages[0]["content"]
    layout = rm_r1.build_user_prompt(to_messages("Q?"), "ra", "rb")
    assert content == f"{rm_r1.REASONING_INSTRUCTION}\n\n{layout}\n\n{rm_r1.REASONING_VERDICT_FORMAT}"
    assert "'<answer>[[A]]</answer>'" in content and "'<answer>[[B]]</answer>'" in content
    with pytest.raises(ValueError, match="layout must be one of"):
        rm_r1.build_messages(to_messages("Q?"), "a", "b", layout="chatml")


def test_rm_r1_multi_turn_layout():
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]
    user = rm_r1.build_user_prompt(conversation, "Paris.", "Lyon.")
    assert user == (
        "[The Start of the Conversation between Chatbot A and the Client]\n"
        "System: Be brief.\n\nClient: Hi\n\nChatbot A: Hello!\n\nClient: Capital of France?\n\nChatbot A: Paris.\n"
        "[The End of the Conversation between Chatbot A and the Client]\n\n"
        "[The Start of the Conversation between Chatbot B and the Client]\n"
        "System: Be brief.\n\nClient: Hi\n\nChatbot B: Hello!\n\nClient: Capital of France?\n\nChatbot B: Lyon.\n"
        "[The End of the Conversation between Chatbot B and the Client]")


def test_spct_prompt_layout():
    prompt = spct.build_prompt(to_messages("Sum 2 and 3."), ["5", "6"])
    head = spct.INSTRUCTIONS.format(count=2, plural="s", low=1, high=10)
    assert prompt == (f"{head}\n\n[Query]\nSum 2 and 3.\n\n[Response 1]\n5\n[End of Response 1]\n\n"
                      f"[Response 2]\n6\n[End of Response 2]\n\n"
                      "End your reply with one final line that lists the scores in the order of the responses, in "
                      "exactly this form:\nScores: [score of Response 1, score of Response 2]")
    for word in ("Principles", "weight", "Critique", "integer score from 1"):
        assert word in prompt
    assert spct.parse_scores(prompt, 2) is None, "echoing the prompt must not read as scores"
    single = spct.build_prompt(to_messages("Q"), ["only"])
    assert "1 candidate response." in single and single.endswith("Scores: [score of Response 1]")
    with pytest.raises(ValueError, match="at least one response"):
        spct.build_prompt(to_messages("Q"), [])


def test_spct_multi_turn_prompt():
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Name a prime."}]
    prompt = spct.build_prompt(conversation, ["7", "9"])
    assert "[Conversation]\nUser: Hi\n\nAssistant: Hello!\n\nUser: Name a prime.\n\n[Response 1]\n7\n" in prompt


def test_message_normalisation():
    assert to_messages("q") == [{"role": "user", "content": "q"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "text",
                                                                                           "text": "b"}]}]
    assert to_messages(parts) == [{"role": "user", "content": "ab"}]
    assert response_text([{"role": "assistant", "content": "x"}]) == "x"
    with pytest.raises(TypeError, match="a prompt must be a string or a list of chat messages"):
        to_messages(3)
