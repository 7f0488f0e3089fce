"""r2m.buffer: the rollout store (keys, refresh, release) and the collective decision, on real gloo processes."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r2m.benchmarks import tiny_models as tiny
from r2m.buffer import RolloutStore, agree
from r2m.capture import HiddenStateCapture
from r2m.packed import PackedStates

DIM = 3


def states(lengths, fill=None, keys=None):
    """PackedStates with sample i of ``lengths[i]`` rows, every value ``fill[i]`` (default: i), keyed ``keys``."""
    fill = range(len(lengths)) if fill is None else fill
    hidden = [torch.full((n, DIM), float(v)) for n, v in zip(lengths, fill, strict=True)]
    keys = [(i,) for i in range(len(lengths))] if keys is None else keys
    return PackedStates.from_samples(hidden, keys)


def test_refresh_replaces_the_newest_batch_holding_each_key_and_counts_rows():
    store = RolloutStore()
    old = store.add(states([2, 1], keys=[("a",), ("b",)]), [("a",), ("b",)], release_at=2)
    new = store.add(states([2, 3, 2], fill=[5, 6, 7], keys=[("a",), ("c",), ("a",)]),
                    [("a",), ("c",), ("a",)], release_at=4)
    replaced = store.refresh([("a",), ("zzz",), None], states([2, 1, 1], fill=[9, 8, 8], keys=[("a",), None, None]))
    assert replaced == 2  # both rows of key a in the newest batch; unknown and None keys ignored
    assert torch.equal(new.states.sample(0), torch.full((2, DIM), 9.0))
    assert torch.equal(new.states.sample(2), torch.full((2, DIM), 9.0))
    assert torch.equal(new.states.sample(1), torch.full((3, DIM), 6.0))
    assert torch.equal(old.states.sample(0), torch.zeros(2, DIM))  # the older batch keeps its states
    assert new.refreshed == {0, 2} and new.refreshed_share == pytest.approx(2 / 3) and old.refreshed_share == 0
    assert store.is_refreshed(("a",)) and not store.is_refreshed(("b",)) and not store.is_refreshed(("zzz",))


def test_refresh_refuses_states_of_another_length():
    store = RolloutStore()
    store.add(states([2]), [(0,)], release_at=1)
    with pytest.raises(ValueError, match="lengths"):
        store.refresh([(0,)], states([3]))


def test_lookup_release_and_bytes():
    store = RolloutStore()
    store.add(states([2, 1]), [(0,), (1,)], release_at=2, payload="first")
    store.add(states([1], fill=[4]), [(0,)], release_at=3, payload="second")
    assert store.stored_bytes == 4 * DIM * 4
    looked = store.lookup([(1,), (0,), (1,)])
    assert looked.cu_seqlens.tolist() == [0, 1, 2, 3]
    assert looked.hidden[:, 0].tolist() == [1.0, 4.0, 1.0]  # key (0,) from the newest batch
    assert looked.missing == [] and torch.equal(looked.sample(1), torch.full((1, DIM), 4.0))
    assert (0,) in store and (7,) not in store and store.keys() == {(0,), (1,)}
    with pytest.raises(KeyError):
        store.lookup([(7,)])
    assert store.release(1) == []
    assert [r.payload for r in store.release(3)] == ["first", "second"]
    assert store.pending == [] and store.stored_bytes == 0


def test_a_batch_added_as_refreshed_counts_every_keyed_row():
    rollout = RolloutStore().add(states([1, 2, 1]), [(0,), None, (2,)], release_at=1, refreshed=True)
    assert rollout.refreshed == {0, 2}


def test_add_checks_the_keys_match_the_batch():
    with pytest.raises(ValueError, match="2 keys for a batch of 1"):
        RolloutStore().add(states([1]), [(0,), (1,)], release_at=1)


def test_agree_is_the_identity_on_one_process():
    assert agree(3) == 3 and agree(0) == 0


def test_forward_runs_exactly_the_agreed_number_of_calls():
    tokenizer = tiny.build_tokenizer(20)
    torch.manual_seed(0)
    policy = tiny.build_policy(tokenizer, hidden_size=16)
    calls = []
    policy.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    capture = HiddenStateCapture(policy, pad_token_id=tokenizer.pad_token_id)
    sequences = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    found = capture.forward(sequences, batch_size=2, calls=4)
    assert len(calls) == 4 and len(found) == 3 and found.missing == []
    with torch.no_grad():
        for i, sequence in enumerate(sequences):
            expected = policy.model(input_ids=torch.tensor([sequence])).last_hidden_state[0, :-1]
            torch.testing.assert_close(found.sample(i), expected, rtol=1e-5, atol=1e-5)
    calls.clear()
    assert len(capture.forward([], batch_size=2, calls=2)) == 0 and len(calls) == 2  # a rank with nothing missing
    with pytest.raises(ValueError, match="fewer than the 2 chunks"):
        capture.forward(sequences, batch_size=2, calls=1)


def _agree_worker(rank, world, port, values, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = agree(values[rank])
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_agree_takes_the_largest_value_over_ranks():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_agree_worker, args=(2, port, [0, 3], out), nprocs=2, join=True)
    assert dict(out) == {0: 3, 1: 3}
