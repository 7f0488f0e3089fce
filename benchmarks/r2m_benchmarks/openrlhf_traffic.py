"""Bytes moved between OpenRLHF's policy and reward actors per sample, per R2M routing (paper Section 6.1).

Runs the integration's real routing code (`PolicyStateStore` on the policy side, `PolicyFeedback` +
`R2MRewardSide` on the reward side) on synthetic policy states, with every message between the two sides pickled
and unpickled (protocol 5, as Ray serializes task arguments and results). Reported per sample: the payload (tensor
data and sample keys) and the pickled message size, for scoring one sample (experience making) and for one
update step of the GREBT update.

    r2m bench openrlhf_traffic                       # S=1024 valid tokens, D_p=4096, bf16 states, H=1 and 4
    python benchmarks/r2m_benchmarks/openrlhf_traffic.py --seq-len 4096 --heads 1
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
from pathlib import Path
from typing import Any

import torch

import r2m
from r2m.benchmarks.tiny_models import build_reward_model, build_tokenizer
from r2m.integrations.openrlhf.policy_side import PolicyStateStore
from r2m.integrations.openrlhf.reward_side import (
    ROUTINGS,
    PolicyFeedback,
    R2MRewardSide,
    Traffic,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class PicklingEndpoint:
    """A `PolicyStateStore` behind a serialization boundary: counts the pickled bytes of every message."""

    def __init__(self, store: PolicyStateStore):
        self.store = store
        self.pickled = 0

    def submit(self, method: str, *args: Any) -> Any:
        args = self._cross(args)
        return self._cross(getattr(self.store, method)(*args))

    def result(self, pending: Any) -> Any:
        return pending

    def _cross(self, message: Any) -> Any:
        data = pickle.dumps(message, protocol=5)
        self.pickled += len(data)
        return pickle.loads(data)


def measure(seq_len: int = 1024, policy_dim: int = 4096, heads: int = 1, batch: int = 8, group_size: int = 4,
            dtype: str = "bf16", rm_dim: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """One row per routing: bytes per sample for scoring and for one update step (``seq_len`` valid tokens per
    sample, so ``seq_len - 1`` policy states)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    reward_model = build_reward_model(tokenizer, "llama", hidden_size=rm_dim, num_layers=1)
    config = r2m.R2MConfig(num_heads=heads, attn_dim=rm_dim - rm_dim % heads, total_steps=10, impl="torch")
    keys = [f"{i:032x}" for i in range(batch)]
    states = [torch.randn(seq_len - 1, policy_dim).to(DTYPES[dtype]) for _ in keys]
    rte = torch.randn(batch, rm_dim)
    annotation = torch.randn(batch)
    rows = []
    for routing in ROUTINGS:
        store = PolicyStateStore(impl="torch")
        store.put(keys, states)
        endpoint = PicklingEndpoint(store)
        side = R2MRewardSide(r2m.wrap(reward_model, policy_dim, config), routing)
        measured = {}
        for phase in ("score", "update"):
            traffic, endpoint.pickled = Traffic(), 0
            feedback = PolicyFeedback(keys, [(endpoint, range(batch))], traffic=traffic)
            if phase == "score":
                side.rewards(rte, feedback, step=5)
            else:
                side.update(rte, feedback, annotation, group_size, step=5)
            measured[phase] = {"payload_bytes_per_sample": (traffic.sent + traffic.received) / batch,
                               "pickled_bytes_per_sample": endpoint.pickled / batch}
        rows.append({"routing": routing, "seq_len": seq_len, "policy_dim": policy_dim, "heads": heads,
                     "states_dtype": dtype, "batch": batch, **{f"{phase}_{k}": v for phase, values in measured.items()
                                                              for k, v in values.items()}})
    states_bytes = (seq_len - 1) * policy_dim * torch.finfo(DTYPES[dtype]).bits // 8
    vector_bytes = heads * policy_dim * 4
    for row in rows:
        row["formula_score_bytes"] = states_bytes if row["routing"] == "full" else 2 * vector_bytes
        row["formula_update_bytes"] = states_bytes if row["routing"] == "full" else 4 * vector_bytes
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| routing | S | D_p | H | states | score: payload B/sample | score: pickled B/sample | "
             "update step: payload B/sample | update step: pickled B/sample |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['routing']} | {r['seq_len']} | {r['policy_dim']} | {r['heads']} | {r['states_dtype']} | "
                     f"{r['score_payload_bytes_per_sample']:,.0f} | {r['score_pickled_bytes_per_sample']:,.0f} | "
                     f"{r['update_payload_bytes_per_sample']:,.0f} | {r['update_pickled_bytes_per_sample']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="r2m bench openrlhf_traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=1024, help="valid tokens per sample (S)")
    parser.add_argument("--policy-dim", type=int, default=4096, help="policy hidden size (D_p)")
    parser.add_argument("--heads", type=str, default="1,4", help="comma-separated numbers of heads (H)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the policy states")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/openrlhf-traffic"))
    args = parser.parse_args(argv)
    rows = [row for heads in (int(h) for h in args.heads.split(","))
            for row in measure(args.seq_len, args.policy_dim, heads, args.batch, args.group_size, args.dtype)]
    table = markdown(rows)
    print(table)
    for heads in sorted({r["heads"] for r in rows}):
        full, compact = (next(r for r in rows if r["heads"] == heads and r["routing"] == name)
                         for name in ("full", "compact"))
        score, update = (full[f"{phase}_pickled_bytes_per_sample"] / compact[f"{phase}_pickled_bytes_per_sample"]
                         for phase in ("score", "update"))
        print(f"H={heads}: compact moves {score:.0f}x fewer bytes per sample when scoring, {update:.0f}x fewer per "
              f"update step")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "python": platform.python_version(),
            "args": vars(args) | {"out": str(args.out)}}
    (args.out / "openrlhf_traffic.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (args.out / "openrlhf_traffic.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
