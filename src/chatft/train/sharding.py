"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the weights, gradients and optimizer states of a multi-process
run split across the processes instead of copied to each (strategy `fsdp2`).

In: a loaded model (LoRA applied, probes and compile done) and the `World`. Out: a `Sharded` model whose forward
and backward passes gather each decoder layer's weights just in time and reduce-scatter its gradients, and the
few operations the trainer needs around it: run a loss computation under the sharding root (`run`), bring every
process to the same number of passes per step (`pad_to_common_count`), gather the full weights for the final
artifact (`full_weights`), and write and read resumable state shard by shard (`save_sharded`, `load_sharded`).
Only rank 0 reads the weights from disk: the others build the model on the meta device and receive their shards
(`fill_from_rank0`), so one process holds the whole model in memory, not every process.

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

import contextlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
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

    def __init__(self, model: nn.Module, world: World, device: torch.device, precision: Precision) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        layers = decoder_layers(model)
        if not layers:
            raise ChatftError(
                "not_available_yet",
                f"distributed.strategy=fsdp2: {type(model).__name__} names no decoder layer class to shard by",
                "use distributed.strategy=ddp (weights copied to every process)",
            )
        mesh = init_device_mesh(device.type, (world.size,))
        gathered = gather_dtype(precision)
        policy = MixedPrecisionPolicy(param_dtype=gathered, reduce_dtype=precision.trainable)
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        self.root = fully_shard(StepRoot(model), mesh=mesh, mp_policy=policy)
        for module in self.root.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # sum, not mean: see the module docstring
                module.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
        self.units = len(layers) + 1

    def run(self, work: Callable[[], T]) -> T:
        return self.root(work)


def gather_dtype(precision: Precision) -> torch.dtype | None:
    """The dtype FSDP2 gathers a layer's weights in: the compute dtype for master weights under autocast (float32
    shards gathered as bfloat16: half the traffic, and the gathered copy is the one the matmuls use, freed after the
    layer like any gathered weight), else the weights' own (None: FSDP2 leaves them as they are). Without it,
    autocast would make a bfloat16 copy of each gathered float32 layer and autograd would keep every one of them
    for the backward: a whole model's copies per process. Gradients are reduced in the trained dtype."""
    return precision.compute if precision.autocast and precision.weights != precision.compute else None


def grad_scaler(sharded: Sharded | None, device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """float16's dynamic loss scaler. Sharded, each process sees only its shards of the gradients, so whether any
    of them overflowed is agreed across the processes (torch's `ShardedGradScaler` adds the overflow flags) before
    every process skips, or takes, the same update."""
    if sharded is None or not enabled:
        return torch.amp.GradScaler(device.type, enabled=enabled)
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    return ShardedGradScaler(device.type, enabled=True)


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


def fill_from_rank0(model: nn.Module, full_state: dict[str, torch.Tensor] | None, device: torch.device) -> None:
    """Give every process its shards of rank 0's weights, after `Sharded`: rank 0 loaded the model (`full_state`,
    its state dict taken before sharding), the others built it on the meta device (None) and get storage for their
    shards here. torch's `set_model_state_dict` broadcasts one tensor at a time and keeps each process's rows of it,
    so no process but rank 0 ever holds the whole model, and rank 0 no more than it loaded. Buffers that no state
    dict holds (rotary frequencies) are broadcast too: `to_empty` leaves them unset."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if full_state is None:
        model.to_empty(device=device)
    set_model_state_dict(model, full_state or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def full_weights(model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The whole weights (the trainable ones only, with `trainable_only`), gathered from every process onto the CPU
    of rank 0 (the others get an empty dict): a collective that every process calls."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(model, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any]) -> None:
    """Give each process its shard of full weights and of an optimizer state keyed by parameter index, as one
    process's `optimizer.state_dict()` is (a checkpoint in the files layout)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, _keyed_by_name(optimizer_state, model, optimizer), options=options)


def _trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This process's part of the trainable weights and optimizer state, keyed by parameter name: shards (DTensors)
    when the model is sharded, whole tensors when it is not."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(ignore_frozen_params=True)
    return {"model": get_model_state_dict(model, options=options),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Write the trainable weights and optimizer state with Distributed Checkpoint: each process its own shards,
    rank 0 the index (`.metadata`). A collective that every process calls."""
    import torch.distributed.checkpoint as dcp

    with _one_process_is_meant():
        dcp.save(_trainable_state(model, optimizer), checkpoint_id=str(directory))


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP warns when it runs without a process group; one process reading or writing alone is what is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, where: str) -> None:
    """Read a `save_sharded` checkpoint into this process's part of the model and optimizer, whatever the world size
    and strategy that wrote it: DCP reads the pieces of each saved shard that this process's part covers (one
    process, or a ddp process, reads whole tensors). A collective when several processes run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    state = _trainable_state(model, optimizer)
    try:
        with _one_process_is_meant():
            dcp.load(state, checkpoint_id=str(directory))
    except (Exception, CheckpointException) as exc:  # (a BaseException) a different model or peft setting:
        raise checkpoint_mismatch(where, str(exc).strip().splitlines()[-1][:300]) from None  # the missing tensor
    options = StateDictOptions(ignore_frozen_params=True, strict=False)  # frozen weights are not in the state
    set_model_state_dict(model, state["model"], options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)


def checkpoint_mismatch(where: Path | str, detail: str) -> ChatftError:
    return ChatftError(
        "config_invalid", f"checkpoint {where} does not fit this model: {detail}",
        "resume with the same model and peft settings it was written with, or checkpoint.resume=false",
    )


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer holds, in the order of its groups (the order of its indices)."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def _keyed_by_name(by_index: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    names = _parameter_names(model, optimizer)
    return {"state": {names[int(i)]: value for i, value in by_index["state"].items()},
            "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                             for group in by_index["param_groups"]]}
