"""The pieces of FSDP2 training that do not need several processes: which strategy a run takes, the dtype layers are
gathered in, how a files-layout optimizer state is named for the sharded path, and the sharded (DCP) checkpoint
read back in one process, and stochastic rounding on FSDP2's shards. Two processes through the CLI: tests/test_distributed_cli.py."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from chatft.errors import ChatftError
from chatft.train import sharding
from chatft.train.distributed import strategy_for
from chatft.train.precision import precision_for
from chatft.train.stochastic_rounding import StochasticRoundingAdamW


@pytest.mark.parametrize("configured,world,lora,expected", [
    (None, 1, False, "single"), ("fsdp2", 1, False, "single"),
    (None, 2, False, "fsdp2"), ("auto", 2, False, "fsdp2"), (None, 2, True, "ddp"), ("auto", 8, True, "ddp"),
    ("ddp", 2, False, "ddp"), ("fsdp2", 2, True, "fsdp2"),
])
def test_the_strategy_a_run_takes(configured, world, lora, expected):
    assert strategy_for(configured, world, lora) == expected


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


# --------------------------------------------------------------------------- stochastic rounding of shards

SHAPES = [(7, 5), (3,), (10, 4)]  # 7 rows over 3 processes: 3, 3 and 1; 3 over 2: 2 and 1


def _round_shards(rank: int, world: int, port: int, out: str) -> None:
    """Three AdamW steps with stochastic rounding over parameters split as FSDP2 splits them (`Shard(0)` DTensors,
    gloo), the same gradients at every world size; rank 0 saves the gathered weights."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    start = [torch.randn(shape).to(torch.bfloat16) for shape in SHAPES]
    gradients = [[torch.randn(shape).to(torch.bfloat16) for shape in SHAPES] for _ in range(3)]
    params = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in start]
    optimizer = StochasticRoundingAdamW([{"params": params[:2], "weight_decay": 0.1},
                                         {"params": params[2:], "weight_decay": 0.0}], lr=1e-3, seed=3)
    for step in gradients:
        for param, gradient in zip(params, step):
            param.grad = distribute_tensor(gradient.clone(), mesh, [Shard(0)])
        optimizer.step()
    weights = [param.full_tensor() for param in params]
    if rank == 0:
        torch.save(weights, out)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_stochastic_rounding_of_shards_equals_one_process(tmp_path):
    results = {}
    for world in (1, 2, 3):
        mp.spawn(_round_shards, args=(world, _free_port(), str(tmp_path / f"{world}.pt")), nprocs=world)
        results[world] = torch.load(tmp_path / f"{world}.pt")
    for world in (2, 3):
        assert all(torch.equal(a, b) for a, b in zip(results[1], results[world])), world


# --------------------------------------------------------------------------- loading once


def _load_once(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0 builds a small Llama with tied embeddings; rank 1 builds it on the meta device. After FSDP2 splits
    both and `fill_from_rank0`, each process's logits are the ones rank 0's whole model gives."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, LlamaConfig

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    ids = (torch.arange(8) * 7 % 128).unsqueeze(0)
    torch.manual_seed(0)
    if rank == 0:
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            whole = model(input_ids=ids).logits
        full_state = model.state_dict()
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        full_state = None
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharding.fill_from_rank0(model, full_state, torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=ids).logits  # rotary frequencies are buffers no state dict holds
    gathered = [torch.zeros_like(logits) for _ in range(world)]
    dist.all_gather(gathered, logits)
    if rank == 0:
        torch.save({"whole": whole, "sharded": gathered,
                    "tied": model.lm_head.weight is model.model.embed_tokens.weight}, out)
    dist.destroy_process_group()


def test_the_other_processes_receive_rank_zeros_weights_as_shards(tmp_path):
    mp.spawn(_load_once, args=(2, _free_port(), str(tmp_path / "out.pt")), nprocs=2)
    result = torch.load(tmp_path / "out.pt")
    assert result["tied"]
    for logits in result["sharded"]:
        assert torch.allclose(logits, result["whole"], atol=1e-6)
