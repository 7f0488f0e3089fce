"""RM-R1 ("Chain-of-Rubrics") pairwise judge: prompts, verdict parsing, and group rewards from pairwise verdicts.

The judge classifies the task (``<type>Chat</type>`` or ``<type>Reasoning</type>``), writes a weighted rubric
(Chat) or its own solution (Reasoning), compares the two responses in ``<eval>`` with quote/summary tags, and ends
with ``<answer>[[A]]</answer>`` or ``<answer>[[B]]</answer>``. Released judges come in two layouts: ``instruct``
(Qwen2.5-Instruct based: the instructions are a system prompt) and ``reasoning`` (DeepSeek-distilled: no system
prompt, the instructions are part of the user turn).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from r2m.adapters.aggregation import (
    Pair,
    Verdict,
    anchor_pairs,
    bradley_terry,
    comparison_matrix,
    round_robin_pairs,
    win_rates,
)
from r2m.adapters.backends import JudgeBackend
from r2m.adapters.conversation import Message, is_single_turn, render_turns, strip_thinking
from r2m.adapters.reward_function import GenerativeJudge, Group, JudgeResult, mean_rte
from r2m.checks import check_int

Layout = Literal["instruct", "reasoning"]
LAYOUTS = ("instruct", "reasoning")
MODES = ("round_robin", "anchor")
SCORINGS = ("win_rate", "bradley_terry")

INSTRUCT_SYSTEM_PROMPT = """\
You are an impartial judge. Compare the responses of two AI chatbots, Chatbot A and Chatbot B, to the Client's \
question shown below, and decide which response is better.

First, classify the task as <type>Reasoning</type> or <type>Chat</type>:
- <type>Reasoning</type>: math, coding, or questions that need domain knowledge, multi-step inference, logical \
deduction, or combining facts to reach a conclusion.
- <type>Chat</type>: open-ended or factual conversation, rewriting or style requests, safety-related questions, and \
general help that does not call for deep reasoning.

For a Reasoning task:
1. Solve the Client's question yourself and put your solution inside <solution>...</solution>.
2. Judge both responses on correctness, completeness and quality of reasoning, checking them against your solution.
3. Write this evaluation inside <eval>...</eval>, citing the chatbots with <quote_A>...</quote_A> (an exact quote \
of Chatbot A), <summary_A>...</summary_A> (a paraphrase of Chatbot A), <quote_B>...</quote_B> and \
<summary_B>...</summary_B>.

For a Chat task:
1. Write evaluation criteria (a rubric) suited to the Client's question and its context inside \
<rubric>...</rubric>, and give each criterion a weight according to its importance.
2. Inside the rubric, explain your choice of criteria and weights in <justify>...</justify>.
3. Compare the two responses against the rubric inside <eval>...</eval>, citing them with the <quote_A>, \
<summary_A>, <quote_B> and <summary_B> tags described above.

In both cases, finish with your verdict: <answer>[[A]]</answer> if Chatbot A is better, or <answer>[[B]]</answer> \
if Chatbot B is better.

Judge only what the responses say: their order, their length and the chatbots' names must not sway you. Follow \
the output format of the task type exactly.

Output format for a Reasoning task:
<type>Reasoning</type>

<solution> your own solution to the problem </solution>

<eval>
  direct comparisons supported by <quote_A>...</quote_A> or <summary_A>...</summary_A>, and <quote_B>...</quote_B> \
or <summary_B>...</summary_B>
</eval>

<answer>[[A/B]]</answer>

Output format for a Chat task:
<type>Chat</type>

<rubric>
  the weighted rubric items
  <justify> why these criteria and weights </justify>
</rubric>

<eval>
  direct comparisons supported by <quote_A>...</quote_A> or <summary_A>...</summary_A>, and <quote_B>...</quote_B> \
or <summary_B>...</summary_B>
</eval>

<answer>[[A/B]]</answer>"""

REASONING_INSTRUCTION = ("You are an impartial judge. Evaluate the quality of the responses that two AI chatbots "
                         "gave to the Client question displayed below.")
REASONING_VERDICT_FORMAT = ("Give your final verdict at the very end, strictly in this format: "
                            "'<answer>[[A]]</answer>' if Chatbot A is better, or '<answer>[[B]]</answer>' if "
                            "Chatbot B is better.")

SINGLE_TURN_TEMPLATE = ("[Client Question]\n{question}\n\n"
                        "[The Start of Chatbot A's Response]\n{response_a}\n[The End of Chatbot A's Response]\n\n"
                        "[The Start of Chatbot B's Response]\n{response_b}\n[The End of Chatbot B's Response]")
MULTI_TURN_TEMPLATE = ("[The Start of the Conversation between Chatbot A and the Client]\n{conversation_a}\n"
                       "[The End of the Conversation between Chatbot A and the Client]\n\n"
                       "[The Start of the Conversation between Chatbot B and the Client]\n{conversation_b}\n"
                       "[The End of the Conversation between Chatbot B and the Client]")

_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)
_PARAGRAPH_END = re.compile(r"\n\s*\n")
_VERDICT = re.compile(r"\[\[\s*([AB])\s*\]\]", re.IGNORECASE)


def parse_verdict(text: str | None) -> Verdict | None:
    """The verdict of the LAST well-formed ``<answer>[[A]]</answer>`` / ``[[B]]`` tag outside thinking blocks.

    Case and whitespace do not matter; a missing ``</answer>`` ends the answer at the next blank line. An answer
    tag without a verdict (``[[A/B]]``, empty) is skipped. None when there is no verdict, or when it is ambiguous:
    the last answer names both A and B, or shares its line with an answer naming the other (an echo of the
    instructions, "<answer>[[A]]</answer> if ..., or <answer>[[B]]</answer> if ...").
    """
    if not isinstance(text, str):
        return None
    text = strip_thinking(text)
    opens = list(_ANSWER_OPEN.finditer(text))
    answers: list[tuple[int, set[str]]] = []
    for k, tag in enumerate(opens):
        end = opens[k + 1].start() if k + 1 < len(opens) else len(text)
        close = _ANSWER_CLOSE.search(text, tag.end(), end)
        paragraph = _PARAGRAPH_END.search(text, tag.end(), end)
        end = close.start() if close else (paragraph.start() if paragraph else end)
        line = text.count("\n", 0, tag.start())
        answers.append((line, {m.group(1).upper() for m in _VERDICT.finditer(text, tag.end(), end)}))
    for line, letters in reversed(answers):
        if len(letters) == 1 and not any(other - letters for other_line, other in answers if other_line == line):
            return letters.pop()
        if letters:
            return None
    return None


def build_user_prompt(conversation: Sequence[Message], response_a: str, response_b: str) -> str:
    """The user turn showing the question (or conversation so far) and the two responses (the layout of RM-R1's
    released prompts)."""
    if is_single_turn(conversation):
        return SINGLE_TURN_TEMPLATE.format(question=conversation[0]["content"], response_a=response_a,
                                           response_b=response_b)
    conversations = {}
    for letter, response in (("a", response_a), ("b", response_b)):
        labels = {"user": "Client", "assistant": f"Chatbot {letter.upper()}", "system": "System"}
        turns = [*conversation, {"role": "assistant", "content": response}]
        conversations[f"conversation_{letter}"] = render_turns(turns, labels)
    return MULTI_TURN_TEMPLATE.format(**conversations)


def build_messages(conversation: Sequence[Message], response_a: str, response_b: str, layout: Layout = "instruct",
                   system_prompt: str | None = None) -> list[Message]:
    """The judge's chat messages for one comparison (``system_prompt`` replaces the instruct layout's own)."""
    user = build_user_prompt(conversation, response_a, response_b)
    if layout == "instruct":
        return [{"role": "system", "content": INSTRUCT_SYSTEM_PROMPT if system_prompt is None else system_prompt},
                {"role": "user", "content": user}]
    if layout == "reasoning":
        return [{"role": "user", "content": f"{REASONING_INSTRUCTION}\n\n{user}\n\n{REASONING_VERDICT_FORMAT}"}]
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


class RMR1Judge(GenerativeJudge):
    """RM-R1 pairwise judge turned into per-completion rewards for groups of completions of one prompt.

    ``mode="round_robin"``: every pair of the group (both orders when ``both_orders``, cancelling position bias);
    ``mode="anchor"``: each completion against one reference only, the completion at ``anchor_index`` (K - 1
    comparisons, twice that with both orders) or, with ``reference_column``, the text in that dataset column (K
    comparisons). Reward: each completion's win rate (``scoring="win_rate"``) or its Bradley-Terry log-strength
    fitted on the group's comparisons with ``bt_prior`` drawn games per compared pair (``"bradley_terry"``).

    An unparseable verdict (or a failed request) counts as a draw and is counted; a completion none of whose
    comparisons produced a verdict gets None.
    """

    def __init__(self, backend: JudgeBackend, *, mode: Literal["round_robin", "anchor"] = "round_robin",
                 both_orders: bool = True, scoring: Literal["win_rate", "bradley_terry"] = "win_rate",
                 bt_prior: float = 1.0, anchor_index: int = 0, reference_column: str | None = None,
                 layout: Layout = "instruct", system_prompt: str | None = None, group_size: int | None = None,
                 name: str = "rm_r1"):
        super().__init__(backend, name, group_size)
        for arg, value, allowed in (("mode", mode, MODES), ("scoring", scoring, SCORINGS), ("layout", layout, LAYOUTS)):
            if value not in allowed:
                raise ValueError(f"{arg} must be one of {allowed}, got {value!r}")
        if reference_column is not None and mode != "anchor":
            raise ValueError("reference_column is the anchor of mode='anchor'; it has no use with mode='round_robin'")
        check_int("anchor_index", anchor_index, minimum=0)
        if not (isinstance(bt_prior, (int, float)) and bt_prior > 0):
            raise ValueError(f"bt_prior must be a number > 0, got {bt_prior!r}")
        if system_prompt is not None and layout != "instruct":
            raise ValueError("system_prompt replaces the instruct layout's system prompt; the reasoning layout has "
                             "none")
        self.mode, self.both_orders, self.scoring = mode, bool(both_orders), scoring
        self.bt_prior, self.anchor_index, self.reference_column = float(bt_prior), anchor_index, reference_column
        self.layout, self.system_prompt = layout, system_prompt

    def pairs(self, group_size: int) -> tuple[list[Pair], int]:
        """The comparisons for a group of ``group_size`` completions and the number of players (the completions,
        plus the reference as the last player when there is a reference column)."""
        if self.mode == "round_robin":
            return (round_robin_pairs(group_size, self.both_orders) if group_size > 1 else []), group_size
        if self.reference_column is not None:
            return anchor_pairs(group_size + 1, group_size, self.both_orders), group_size + 1
        if self.anchor_index >= group_size:
            raise ValueError(f"anchor_index={self.anchor_index} but a group has only {group_size} completions")
        return (anchor_pairs(group_size, self.anchor_index, self.both_orders) if group_size > 1 else []), group_size

    async def _score_groups(self, groups: list[Group], batch_size: int) -> JudgeResult:
        plans: list[tuple[Group, list[Pair], int]] = []
        requests: list[list[Message]] = []
        for group in groups:
            pairs, players = self.pairs(len(group.responses))
            texts = list(group.responses)
            if self.reference_column is not None:
                if self.reference_column not in group.columns:
                    raise ValueError(f"reference_column {self.reference_column!r} is not among the dataset columns "
                                     f"passed to the judge: {sorted(group.columns)}")
                texts.append(str(group.columns[self.reference_column]))
            plans.append((group, pairs, players))
            requests.extend(build_messages(group.messages, texts[a], texts[b], self.layout, self.system_prompt)
                            for a, b in pairs)
        generations = await self.backend.generate(requests, 1) if requests else []
        outputs = [g.texts[0] if g.texts else None for g in generations]
        verdicts = [parse_verdict(text) for text in outputs]

        rewards: list[float | None] = [None] * batch_size
        details = [""] * batch_size
        members: list[list[int]] = [[] for _ in range(batch_size)]
        counts = {"comparisons": len(requests), "failed": sum(not g.texts for g in generations),
                  "retries": sum(g.attempts - 1 for g in generations),
                  "unparseable": sum(t is not None and v is None for t, v in zip(outputs, verdicts, strict=True)),
                  "ties": 0}
        agree = checked = 0
        offset = 0
        for group, pairs, players in plans:
            calls = list(range(offset, offset + len(pairs)))
            offset += len(pairs)
            group_verdicts = [verdicts[c] for c in calls]
            points = comparison_matrix(players, pairs, group_verdicts)
            values = win_rates(points) if self.scoring == "win_rate" else bradley_terry(points, self.bt_prior)
            met = {tuple(sorted(pair)) for pair in pairs}
            counts["ties"] += sum(points[a, b] == points[b, a] for a, b in met)
            if self.both_orders:
                shown = dict(zip(pairs, group_verdicts, strict=True))
                both = [(shown[a, b], shown[b, a]) for a, b in met if None not in (shown[a, b], shown[b, a])]
                checked += len(both)
                agree += sum((first == "A") == (second == "B") for first, second in both)
            size = len(group.indices)
            for local, index in enumerate(group.indices):
                involved = [c for c, pair in zip(calls, pairs, strict=True) if local in pair]
                members[index] = involved
                decided = any(verdicts[c] is not None for c in involved)
                rewards[index] = float(values[local]) if decided else None
                details[index] = "\n\n".join(_detail(pairs[c - calls[0]], size, verdicts[c], outputs[c],
                                                      generations[c].error) for c in involved)
        metrics = {k: float(v) for k, v in counts.items()}
        metrics["no_reward"] = float(sum(r is None for r in rewards))
        if checked:
            metrics["position_consistency"] = agree / checked
        return JudgeResult(rewards, details, metrics, mean_rte(generations, members))


def _detail(pair: Pair, group_size: int, verdict: Verdict | None, output: str | None, error: str | None) -> str:
    names = ["reference" if p >= group_size else f"#{p}" for p in pair]
    body = output if output is not None else f"(request failed: {error})"
    return f"=== {names[0]} as A vs {names[1]} as B: {verdict or 'no verdict'} ===\n{body}"
