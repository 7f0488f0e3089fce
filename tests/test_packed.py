"""r2m.packed: the one packed layout of policy states, its cu_seqlens builder and checker, row ranges and the
non-finite test, against per-sample references."""

import pytest
import torch

from r2m.packed import PackedStates, check_cu_seqlens, finite_samples, offsets, row_positions


def test_offsets_and_row_positions_against_python():
    lengths = [3, 0, 2, 4]
    assert offsets(torch.tensor(lengths)).tolist() == [0, 3, 3, 5, 9]
    starts, counts = torch.tensor([7, 2, 0, 5]), torch.tensor(lengths)
    expected = [p for s, n in zip(starts.tolist(), lengths, strict=True) for p in range(s, s + n)]
    assert row_positions(starts, counts).tolist() == expected


@pytest.mark.parametrize("cu, batch, message", [
    ([0, 4, 3, 5], 3, "never decrease"),
    ([0, 2, 4], 2, "end at total_tokens=5"),
    ([1, 2, 5], 2, "start at 0"),
    ([0, 5], 2, r"integer tensor of shape \[batch \+ 1 = 3\]"),
    ([0.0, 5.0], None, "integer tensor"),
])
def test_check_cu_seqlens_names_what_is_wrong(cu, batch, message):
    with pytest.raises(ValueError, match=message):
        check_cu_seqlens(torch.tensor(cu), batch, 5)


def test_check_cu_seqlens_returns_int64_on_the_cpu():
    cu = check_cu_seqlens(torch.tensor([0, 2, 5], dtype=torch.int32), 2, 5)
    assert cu.dtype == torch.int64 and cu.device.type == "cpu" and cu.tolist() == [0, 2, 5]


def test_finite_samples_against_a_per_sample_loop():
    generator = torch.Generator().manual_seed(0)
    lengths = [2, 0, 3, 1, 4]
    hidden = torch.randn(sum(lengths), 3, generator=generator)
    hidden[2, 1] = float("nan")
    hidden[9, 0] = float("inf")
    cu = offsets(torch.tensor(lengths))
    token_ok, sample_ok = finite_samples(hidden, cu)
    rows = torch.split(hidden, lengths)
    assert sample_ok.tolist() == [bool(torch.isfinite(r).all()) for r in rows]
    assert token_ok.tolist() == torch.isfinite(hidden).all(-1).tolist()
    states = PackedStates(hidden, cu)
    assert states.nonfinite_samples() == 2 and states.finite().tolist() == sample_ok.tolist()


def test_packed_states_from_padded_and_samples_agree():
    hidden = torch.randn(3, 4, 2)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    states = PackedStates.from_padded(hidden, mask)
    assert states.cu_seqlens.tolist() == [0, 2, 2, 6] and states.max_seqlen == 4 and len(states) == 3
    for i in range(3):
        torch.testing.assert_close(states.sample(i), hidden[i][mask[i].bool()])
    again = PackedStates.from_samples([states.sample(i) for i in range(3)])
    assert torch.equal(again.hidden, states.hidden) and torch.equal(again.cu_seqlens, states.cu_seqlens)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 4\)"):
        PackedStates.from_padded(hidden, mask[:, :3])
    with pytest.raises(TypeError, match="mask must be bool or integer"):
        PackedStates.from_padded(hidden, mask.float())
    with pytest.raises(ValueError, match="packed hidden must be a floating-point tensor"):
        PackedStates(hidden, torch.tensor([0, 3]))
