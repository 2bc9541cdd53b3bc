"""The pieces of FSDP2 training that do not need several processes: which strategy a run takes, what the sharded
path refuses, how a files-layout optimizer state is named for the sharded path, and the sharded (DCP) checkpoint
read back in one process. Two processes through the CLI: tests/test_distributed_cli.py."""

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


def test_what_the_sharded_path_does_not_do_yet_is_refused_by_name():
    with pytest.raises(ChatftError) as refused:
        sharding.check_supported(precision_for(torch.bfloat16, False, "stochastic_rounding"))
    assert refused.value.id == "not_available_yet" and "stochastic rounding" in str(refused.value)
    assert "distributed.strategy=ddp" in refused.value.hint


@pytest.mark.parametrize("dtype,master", [(torch.float32, "auto"), (torch.bfloat16, "auto"),
                                          (torch.bfloat16, "float32"), (torch.float16, "auto")])
def test_master_weights_and_float32_are_sharded(dtype, master):
    sharding.check_supported(precision_for(dtype, False, master))


@pytest.mark.parametrize("dtype,lora,master,gathered", [
    (torch.bfloat16, False, "float32", torch.bfloat16),  # float32 master weights: gathered as the matmuls use them
    (torch.float16, False, "auto", torch.float16),
    (torch.float32, False, "auto", None), (torch.bfloat16, True, "auto", None),  # the weights' own dtype
])
def test_the_dtype_fsdp2_gathers_layers_in(dtype, lora, master, gathered):
    assert sharding.gather_dtype(precision_for(dtype, lora, master)) == gathered


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


def test_an_optimizer_state_keyed_by_index_is_named_as_torch_names_it():
    """The files layout keeps one process's `optimizer.state_dict()` (keyed by index); a sharded run reading it
    gives torch the state keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model, optimizer = _trained_model_and_optimizer()
    by_name = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    back = sharding._keyed_by_name(optimizer.state_dict(), model, optimizer)
    assert back["state"].keys() == by_name["state"].keys()
    assert [g["params"] for g in back["param_groups"]] == [g["params"] for g in by_name["param_groups"]]
    for name, state in by_name["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(back["state"][name][key]), torch.as_tensor(value)), (name, key)


def test_a_sharded_checkpoint_read_by_one_process_restores_weights_and_optimizer(tmp_path):
    """DCP in one process (no process group): what two processes read back is in tests/test_distributed_cli.py."""
    model, optimizer = _trained_model_and_optimizer()
    sharding.save_sharded(model, optimizer, tmp_path / "sharded")
    fresh, fresh_optimizer = _trained_model_and_optimizer()
    with torch.no_grad():
        for param in fresh.parameters():
            param.add_(1.0)
    fresh_optimizer.step()  # moments that differ from the saved ones
    sharding.load_sharded(fresh, fresh_optimizer, tmp_path / "sharded", where="step_1")
    for (name, saved), loaded in zip(model.state_dict().items(), fresh.state_dict().values()):
        if name != "1.weight":  # frozen: not in the checkpoint, and left as it was
            assert torch.equal(saved, loaded), name
    saved_state, loaded_state = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    for index, state in saved_state.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(loaded_state[index][key]), torch.as_tensor(value)), (index, key)


def test_a_sharded_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    model, optimizer = _trained_model_and_optimizer()
    sharding.save_sharded(model, optimizer, tmp_path / "sharded")
    other = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2), nn.Linear(2, 2))
    with pytest.raises(ChatftError) as refused:
        sharding.load_sharded(other, torch.optim.AdamW(other.parameters()), tmp_path / "sharded", where="step_1")
    assert refused.value.id == "config_invalid" and "step_1 does not fit this model" in str(refused.value)
