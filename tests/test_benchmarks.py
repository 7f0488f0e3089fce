"""The benchmark scripts run end to end on tiny settings and write JSON, markdown and PNG."""

import json
import os

import pytest
import torch

from r2m.benchmarks import accuracy, lab, overhead


def outputs(path, name):
    payload = json.loads((path / f"{name}.json").read_text())
    assert (path / f"{name}.md").read_text().startswith("| ")
    assert (path / f"{name}.png").stat().st_size > 1000
    assert "torch" in payload["machine"]
    return payload


TINY_LAB = ["--steps", "4", "--groups", "2", "--generations", "4", "--rm-pairs", "64", "--sft-examples", "256",
            "--sft-epochs", "1"]


@pytest.mark.slow
def test_lab(tmp_path, capsys):
    variants = "vanilla,r2m,frozen:fusion_init=random,anchored:label_groups=1,oracle,mix=0.5,unbiased"
    assert lab.main(["--variants", variants, "--seeds", "2", "--first-seed", "1", "--premise-pairs", "60",
                     "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), *TINY_LAB]) == 0
    payload = outputs(tmp_path, "lab")
    # every stage shows its progress: proxy RMs, policy pretraining, each run
    shown = capsys.readouterr().err
    for stage in ("lab runs", "proxy RM, seed 1", "unbiased RM, seed 2", "policy SFT, seed 1", "GRPO, vanilla, seed 1",
                  "GRPO, oracle, seed 2", "GRPO, r2m, seed 2"):
        assert stage in shown, stage
    rows = {r["variant"]: r for r in payload["summary"]}
    assert list(rows) == variants.split(",") and rows["r2m"]["seeds"] == 2
    runs = payload["runs"]
    assert payload["seeds"] == [1, 2] and payload["complete"]
    assert set(runs["r2m"]) == {"1", "2"} and set(payload["premise"]) == {"1", "2"}
    assert payload["controls"] == {"oracle": "oracle", "mix=0.5": "mix", "unbiased": "unbiased"}
    for label in ("r2m", "frozen:fusion_init=random"):
        paired = rows[label]["vs_vanilla"]["gold_end"]
        diffs = [runs[label][s]["curve"][-1]["gold"] - runs["vanilla"][s]["curve"][-1]["gold"] for s in ("1", "2")]
        assert paired["n"] == 2 and paired["mean"] == pytest.approx(sum(diffs) / 2)
        assert isinstance(paired["excludes_zero"], bool)
        assert rows[label]["gold_end"]["low"] <= rows[label]["gold_end"]["mean"] <= rows[label]["gold_end"]["high"]
    curve = runs["r2m"]["1"]["curve"]
    # two policy epochs per generation batch (the lab's default): scored at steps 1 and 3, R2M updated at 2 and 4
    assert [r["step"] for r in curve] == [1, 3] and all(-1.0 <= r["gold"] <= 1.0 for r in curve)
    assert all(r["kl"] is not None and r["update_head"] > 0 and 0 <= r["onpolicy_acc_proxy"] <= 1 for r in curve)
    # o_proj starts at zero: the first scoring equals the proxy's, however the head moves later
    assert curve[0]["trained"] == pytest.approx(curve[0]["proxy"], rel=1e-5)
    assert rows["vanilla"]["update_head"]["mean"] == 0.0 and rows["r2m"]["extra_policy_forwards"] == 0
    assert rows["frozen:fusion_init=random"]["update_head"]["mean"] == 0.0
    # random fusion_init: R2M w/o Train scores unlike the proxy once w(t) < 1
    frozen = runs["frozen:fusion_init=random"]["1"]["curve"]
    assert frozen[-1]["trained"] != pytest.approx(frozen[-1]["proxy"], rel=1e-3)
    anchored = runs["anchored:label_groups=1"]["1"]["curve"]
    assert all(r["anchor_bt"] > 0 and r["label_ms"] > 0 for r in anchored)
    # the controls: the oracle's trained reward is the gold reward, so it ranks its own samples as gold does
    oracle = runs["oracle"]["1"]["curve"]
    assert all(r["trained"] == pytest.approx(r["gold"]) and r["onpolicy_acc_trained"] in (1.0, None) for r in oracle)
    assert rows["oracle"]["rank_gap"]["mean"] > 0 and "update_size" not in rows["oracle"]
    assert rows["unbiased"]["update_size"]["mean"] == 0.0 and rows["r2m"]["update_size"]["mean"] > 0
    assert all(r["rank_gap"] == pytest.approx(r["onpolicy_acc_trained"] - r["onpolicy_acc_proxy"])
               for r in runs["r2m"]["2"]["curve"] if r["rank_gap"] is not None)
    assert rows["oracle"]["oracle_gap_share"]["gold_end"] == pytest.approx(1.0)
    assert rows["vanilla"]["rank_gap"]["mean"] == pytest.approx(0.0, abs=1e-9)
    # controls do not set the matched-KL budget
    not_controls = [label for label in runs if label not in payload["controls"]]
    assert payload["kl_budget"] == pytest.approx(min(max(r["kl"] for r in run["curve"])
                                                     for label in not_controls for run in runs[label].values()))
    premise = payload["premise"]["1"]
    assert set(premise) == {"pretrained", "random_init"} and premise["pretrained"]["test_pairs"] == 18
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cache").iterdir()) == ["init", "init", "sft", "sft"]
    text = (tmp_path / "lab.md").read_text()
    assert "Premise check" in text and "Share of the vanilla-to-oracle gap" in text and "d_gold@kl=" in text
    assert "label_bt_proxy_start" in text and "anchor_bt_start" in rows["anchored:label_groups=1"]


def test_lab_refuses_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--variants: unknown mode 'best'"):
        lab.main(["--variants", "vanilla,best", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--variants: variant 'r2m:lr=1': 'lr=1' is not field=value"):
        lab.main(["--variants", "r2m:lr=1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--steps must be >= 1"):
        lab.main(["--steps", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--first-seed must be >= 0"):
        lab.main(["--first-seed", "-1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--kl-points must be > 0"):
        lab.main(["--kl-points", "0,1", "--out", str(tmp_path)])


@pytest.mark.slow
def test_accuracy(tmp_path):
    assert accuracy.main(["--seeds", "1", "--pairs", "20", "--out", str(tmp_path),
                          "--cache-dir", str(tmp_path / "cache"), *TINY_LAB]) == 0
    payload = outputs(tmp_path, "accuracy")
    summary = payload["summary"]
    assert [s["test_set"] for s in summary] == ["biased", "unbiased"]
    # the untrained R2M's o_proj is zero: it orders pairs exactly as the proxy does
    assert all(s["r2m_before"]["mean"] == s["proxy_rm"]["mean"] for s in summary)
    assert all(0.0 <= s["r2m_after"]["mean"] <= 1.0 for s in summary)
    on_policy = payload["on_policy"]
    assert [w["window"] for w in on_policy] == ["first", "last"] and on_policy[-1]["step"] == 3
    assert all(0.0 <= w[k]["mean"] <= 1.0 for w in on_policy for k in ("onpolicy_acc_proxy", "onpolicy_acc_trained"))


@pytest.mark.slow
@pytest.mark.parametrize("pairing", [[], ["--sequential"]], ids=["side-by-side", "sequential"])
def test_overhead(tmp_path, pairing):
    assert overhead.main(["--preset", "tiny", "--trainers", "grpo", "--steps", "3", "--warmup", "1", "--rounds", "1",
                          "--out", str(tmp_path), *pairing]) == 0
    payload = outputs(tmp_path, "overhead")
    side_by_side_possible = not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2
    assert payload["pairs_side_by_side"] == (side_by_side_possible and not pairing)
    row = payload["summary"][0]
    assert row["step_time_ratio"] == pytest.approx(row["r2m_step_s"] / row["vanilla_step_s"])
    assert row["extra_policy_forwards_per_step"] == 0 and row["extra_forward_share"] == 0
    assert row["r2m_capture_ms"] > 0 and row["r2m_update_ms"] > 0
    assert row["round_ratio_min"] == row["round_ratio_max"] == pytest.approx(row["step_time_ratio"])  # one round
    assert row["vanilla_reward_ms"] > 0 and row["r2m_reward_ms"] > 0
    assert row["timed_sections_ratio"] == pytest.approx(1 + (
        row["r2m_reward_ms"] - row["vanilla_reward_ms"] + row["r2m_update_ms"] + row["r2m_capture_ms"])
        / (1000 * row["vanilla_step_s"]))
    # tiny preset: 2 prompts x 2 generations, 8 prompt tokens + at most 8 completion tokens, hidden size 32, fp32
    stored = round(row["stored_hidden_mb"] * 2**20)
    assert stored % (32 * 4) == 0 and 4 * 8 * 32 * 4 <= stored <= 4 * 15 * 32 * 4
    assert row["extra_peak_mb"] == pytest.approx(row["r2m_allocated_peak_mb"] - row["vanilla_allocated_peak_mb"])
    assert row["memory_budget_mb"] == pytest.approx(1.1 * (row["stored_hidden_mb"] + row["trained_state_mb"]))
    assert row["within_memory_target"] == (row["extra_peak_mb"] <= row["memory_budget_mb"])
    # on CPU the allocated peaks are counted exactly: R2M's extra is what it holds, no hidden copies beside it
    assert row["within_memory_target"] and row["extra_peak_mb"] > 0


def test_peak_allocated_counts_the_most_bytes_alive_at_once():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        first = torch.empty(2**18)  # 1 MiB
        second = torch.empty(2**19)  # 2 MiB: 3 MiB alive
        del first
        third = torch.empty(2**17)  # 0.5 MiB: 2.5 MiB alive
        del second, third
    assert overhead._peak_allocated(profiler) == 3 * 2**20


def test_overhead_refuses_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="--trainers must name some of"):
        overhead.main(["--trainers", "grpo,ppo", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="0 <= --warmup < --steps"):
        overhead.main(["--steps", "2", "--warmup", "2", "--out", str(tmp_path)])


def test_gpu_overhead_preset_models_have_about_half_a_billion_parameters():
    with torch.device("meta"):
        _, policy, reward_model = overhead.build_models("gpu", seed=0)
    for model in (policy, reward_model):
        assert 0.4e9 <= sum(p.numel() for p in model.parameters()) <= 0.6e9
        assert model.config.max_position_embeddings >= 512 + 512
