"""The helpers every module shares: the int argument check, the transformer body, padding that never changes the
user's tokenizer or model config, the ZeRO-3 test and rank/world look-up."""

import copy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from r2m.adapters import SequenceClassifierRater, TransformersBackend
from r2m.checks import check_int
from r2m.distributed import agree, all_gather, rank_and_world, zero3_partitioned
from r2m.hf_models import find_body, pad_token_id_set, padding_tokenizer

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "adapters"))
import tiny_judge


@pytest.mark.parametrize("value, kwargs, message", [
    (0, {}, "x must be an int >= 1, got 0"),
    (True, {}, "x must be an int >= 1, got True"),
    (1.0, {}, "x must be an int >= 1, got 1.0"),
    (1, {"minimum": 2, "hint": " (responses per prompt)"}, r"x must be an int >= 2 \(responses per prompt\), got 1"),
    (5, {"maximum": 4}, r"x must be an int in \[1, 4\], got 5"),
    ("3", {"optional": True}, "x must be None or an int >= 1, got '3'"),
])
def test_check_int_names_the_argument_and_the_bound(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_int("x", value, **kwargs)


@pytest.mark.parametrize("value, kwargs", [(1, {}), (0, {"minimum": 0}), (4, {"maximum": 4}),
                                           (None, {"optional": True})])
def test_check_int_accepts_values_in_range(value, kwargs):
    check_int("x", value, **kwargs)


def test_find_body_unwraps_ddp_style_and_falls_back_to_the_decoder():
    config = AutoConfig.for_model("qwen2", vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)
    lm = AutoModelForCausalLM.from_config(config)
    wrapper = torch.nn.Module()
    wrapper.module = lm
    assert find_body(lm) is lm.model and find_body(wrapper) is lm.model
    classifier = AutoModelForSequenceClassification.from_config(config)
    assert find_body(classifier) is classifier.model
    with pytest.raises(ValueError, match="transformer body of Linear"):
        find_body(torch.nn.Linear(2, 2))


@pytest.fixture()
def unpadded():
    tokenizer = tiny_judge.tokenizer()
    tokenizer.pad_token = None
    return tokenizer


def test_padding_tokenizer_copies_rather_than_changes_the_users_tokenizer(unpadded):
    padded = padding_tokenizer(unpadded)
    assert unpadded.pad_token is None and padded is not unpadded and padded.pad_token == unpadded.eos_token
    assert padding_tokenizer(padded) is padded
    bare = copy.deepcopy(unpadded)
    bare.eos_token = None
    with pytest.raises(ValueError, match="reward_tokenizer has neither a pad token nor an EOS token"):
        padding_tokenizer(bare, "reward_tokenizer")


def test_pad_token_id_set_restores_the_config():
    model = tiny_judge.rater_model(tiny_judge.tokenizer())
    model.config.pad_token_id = None
    with pad_token_id_set(model, 3):
        assert model.config.pad_token_id == 3
    assert model.config.pad_token_id is None
    model.config.pad_token_id = 5
    with pad_token_id_set(model, 3):
        assert model.config.pad_token_id == 5


def test_adapters_leave_the_users_tokenizer_and_config_unchanged(unpadded):
    rater_model = tiny_judge.rater_model(tiny_judge.tokenizer())
    rater_model.config.pad_token_id = None
    rater = SequenceClassifierRater(rater_model, unpadded, batch_size=2)
    ratings = rater(["a prompt", "another, longer prompt"], ["x", "y"])
    assert len(ratings) == 2 and unpadded.pad_token is None and rater_model.config.pad_token_id is None
    judge = tiny_judge.judge_model(tiny_judge.tokenizer())
    backend = TransformersBackend(judge, unpadded, max_new_tokens=2)
    assert unpadded.pad_token is None and backend.tokenizer.pad_token == unpadded.eos_token


def test_one_process_is_rank_0_of_1():
    assert rank_and_world() == (0, 1)
    assert agree(3) == 3
    values = torch.arange(3.0)
    assert all_gather(values, 1) is values


def test_zero3_partitioned_reads_the_ds_id_tag():
    layer = torch.nn.Linear(2, 2)
    assert not zero3_partitioned(layer) and not zero3_partitioned(layer.weight)
    layer.weight.ds_id = 7
    assert zero3_partitioned(layer) and zero3_partitioned(layer.weight)
