"""The pieces of FSDP2 training that do not need several processes: which strategy a run takes, what the sharded
path refuses, and that the optimizer state it gathers is keyed as one process's `optimizer.state_dict()` (so a
checkpoint is the same files at any world size). Two processes through the CLI: tests/test_distributed_cli.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chatft.errors import ChatftError
from chatft.train import sharding
from chatft.train.distributed import strategy_for
from chatft.train.precision import precision_for


@pytest.mark.parametrize("configured,world,lora,expected", [
    (None, 1, False, "single"), ("fsdp2", 1, False, "single"),
    (None, 2, False, "fsdp2"), ("auto", 2, False, "fsdp2"), (None, 2, True, "ddp"), ("auto", 8, True, "ddp"),
    ("ddp", 2, False, "ddp"), ("fsdp2", 2, True, "fsdp2"),
])
def test_the_strategy_a_run_takes(configured, world, lora, expected):
    assert strategy_for(configured, world, lora) == expected


@pytest.mark.parametrize("dtype,master,missing", [
    (torch.float16, "auto", "float16 loss scaling"),
    (torch.bfloat16, "stochastic_rounding", "stochastic rounding"),
])
def test_what_the_sharded_path_does_not_do_yet_is_refused_by_name(dtype, master, missing):
    with pytest.raises(ChatftError) as refused:
        sharding.check_supported(precision_for(dtype, False, master))
    assert refused.value.id == "not_available_yet" and missing in str(refused.value)
    assert "distributed.strategy=ddp" in refused.value.hint


@pytest.mark.parametrize("dtype,master", [(torch.float32, "auto"), (torch.bfloat16, "auto"),
                                          (torch.bfloat16, "float32")])
def test_master_weights_and_float32_are_sharded(dtype, master):
    sharding.check_supported(precision_for(dtype, False, master))


def _trained_model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    model[1].weight.requires_grad_(False)  # a frozen weight has no optimizer state
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": trainable[:2], "weight_decay": 0.1},
                                   {"params": trainable[2:], "weight_decay": 0.0}], lr=1e-2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_the_gathered_optimizer_state_is_keyed_as_one_processes_state_dict():
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model, optimizer = _trained_model_and_optimizer()
    by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    by_index = sharding._keyed_by_index(by_name)
    expected = optimizer.state_dict()
    assert [g["params"] for g in by_index["param_groups"]] == [g["params"] for g in expected["param_groups"]]
    assert by_index["state"].keys() == expected["state"].keys()
    for index, state in expected["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(by_index["state"][index][key]), torch.as_tensor(value)), (index, key)
    back = sharding._keyed_by_name(expected, model, optimizer)
    assert back["state"].keys() == by_name["state"].keys()
    assert [g["params"] for g in back["param_groups"]] == [g["params"] for g in by_name["param_groups"]]
