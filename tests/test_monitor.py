"""r2m.monitor: pooled response states and within-group similarity, against direct per-sample computations."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from r2m.monitor import group_state_similarity, pooled_response_states
from r2m.packed import PackedStates


def test_pooled_response_states_average_the_last_positions_of_each_sample():
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randn(n, 5, generator=generator, dtype=torch.float64) for n in (4, 1, 6, 3)]
    states = PackedStates.from_samples(samples, [(i,) for i in range(4)])
    lengths = [2, 3, 6, 0]  # the second asks for more positions than it has; the last for none
    pooled = pooled_response_states(states.hidden, states.cu_seqlens, lengths)
    expected = [samples[0][-2:].mean(0), samples[1].mean(0), samples[2].mean(0), torch.zeros(5)]
    torch.testing.assert_close(pooled, torch.stack(expected).float())
    with pytest.raises(ValueError, match="3 entries for 4 samples"):
        pooled_response_states(states.hidden, states.cu_seqlens, lengths[:3])


def test_group_similarity_is_the_mean_pairwise_cosine():
    generator = torch.Generator().manual_seed(1)
    pooled = torch.randn(6, 4, generator=generator)
    pooled[3:] = pooled[3] * torch.tensor([[1.0], [2.0], [0.5]])  # group 2: one direction, three scales
    similarity = group_state_similarity(pooled, 3)
    for group in range(2):
        rows = pooled[3 * group: 3 * group + 3]
        pairs = [F.cosine_similarity(rows[i], rows[j], dim=0) for i, j in itertools.permutations(range(3), 2)]
        assert similarity[group] == pytest.approx(float(torch.stack(pairs).mean()), abs=1e-6)
    assert similarity[1] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="group_size=4"):
        group_state_similarity(pooled, 4)
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        group_state_similarity(pooled, 1)
