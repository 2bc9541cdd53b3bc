"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the weights, gradients and optimizer states of a multi-process
run split across the processes instead of copied to each (strategy `fsdp2`).

In: a loaded model (LoRA applied, probes and compile done) and the `World`. Out: a `Sharded` model whose forward
and backward passes gather each decoder layer's weights just in time and reduce-scatter its gradients, and the
few operations the trainer needs around it: run a loss computation under the sharding root (`run`), bring every
process to the same number of passes per step (`pad_to_common_count`), and gather the full weights and optimizer
state for saving (`full_state`).

How the model is cut: each decoder layer is one unit, and a root unit holds the rest (embeddings, final norm,
output head; a tied head and embedding stay one tensor there). The root is not the model itself but `StepRoot`, a
module whose forward runs a given function: the trainer's loss runs the decoder and the chunked loss head as
separate calls (`losses.loss_sum`), and both must happen inside one forward of the root for FSDP to gather the
root's weights before them and reduce their gradients after the backward.

Why the gradients are summed, not averaged: each process's loss is already divided by the supervised tokens of
the whole step (`loop._optimizer_step`), so the step's gradient is the sum over processes (FSDP's default divides
by the world size). Every process must run the same number of forward and backward passes (each gathers weights
with the others): a process with fewer micro-batches in a step runs empty ones (no supervised token: loss 0,
gradient 0) to make up the count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from chatft.errors import ChatftError
from chatft.train.distributed import World
from chatft.train.layer_compile import decoder_layers
from chatft.train.precision import Precision

T = TypeVar("T")


class StepRoot(nn.Module):
    """The root FSDP unit: holds the model and runs whatever loss computation it is given as its forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, work: Callable[[], T]) -> T:  # a function, not tensors: FSDP leaves it as it is
        return work()


class Sharded:
    """A model split across the processes with FSDP2, or (one process, strategy ddp) left as it is."""

    def __init__(self, model: nn.Module, world: World, device: torch.device) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        layers = decoder_layers(model)
        if not layers:
            raise ChatftError(
                "not_available_yet",
                f"distributed.strategy=fsdp2: {type(model).__name__} names no decoder layer class to shard by",
                "use distributed.strategy=ddp (weights copied to every process)",
            )
        mesh = init_device_mesh(device.type, (world.size,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        self.root = fully_shard(StepRoot(model), mesh=mesh)
        for module in self.root.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sum, not mean: see the module docstring
                module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
        self.units = len(layers) + 1

    def run(self, work: Callable[[], T]) -> T:
        return self.root(work)


def check_supported(precision: Precision) -> None:
    """Refuse what the sharded path does not do yet (its optimizers and loss scaler see DTensor shards)."""
    if precision.loss_scaling:
        missing = "float16 loss scaling of sharded gradients"
    elif precision.stochastic_rounding:
        missing = "stochastic rounding of sharded bfloat16 weights"
    else:
        return
    raise ChatftError(
        "not_available_yet", f"distributed.strategy=fsdp2 with {missing} is not implemented yet",
        "use model.torch_dtype=bfloat16 with optimizer.master_weights=float32 (the default), "
        "or distributed.strategy=ddp",
    )


def run(sharded: Sharded | None, work: Callable[[], T]) -> T:
    """`work()` inside the sharding root's forward when the model is sharded, else as it is."""
    return sharded.run(work) if sharded is not None else work()


def pad_to_common_count(batches: list[Any], world: World, empty: Callable[[], Any]) -> list[Any]:
    """`batches` followed by empty ones up to the largest count any process has (one collective)."""
    count = world.max_int(len(batches))
    return batches + [empty() for _ in range(count - len(batches))]


def gradient_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The total 2-norm of the parameters' gradients: a plain tensor also when they are sharded (DTensors)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients down to `max_norm` in total (inf: leave them) and return their norm before."""
    norm = gradient_norm(params)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, trainable_only: bool,
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The whole weights (the trainable ones only, with `trainable_only`) and optimizer state, gathered from every
    process onto the CPU of rank 0 (the others get empty ones): a collective that every process calls. The optimizer
    state is keyed by parameter index in the order of its groups, as `optimizer.state_dict()` of one process is."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    weights = get_model_state_dict(model, options=options)
    if optimizer is None:
        return weights, None
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    return weights, _keyed_by_index(by_name) if by_name else {}


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any]) -> None:
    """Give each process its shard of full weights and an optimizer state keyed as `full_state` returns them."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, _keyed_by_name(optimizer_state, model, optimizer), options=options)


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in the order of its groups (the order of its indices)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _keyed_by_index(by_name: dict[str, Any]) -> dict[str, Any]:
    order = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    return {"state": {index[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def _keyed_by_name(by_index: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    names = _parameter_names(model, optimizer)
    return {"state": {names[int(i)]: value for i, value in by_index["state"].items()},
            "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                             for group in by_index["param_groups"]]}
