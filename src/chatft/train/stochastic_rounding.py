"""AdamW for bfloat16 weights without a float32 copy of them: stochastic rounding.

In: bfloat16 parameters with bfloat16 gradients (full SFT with `optimizer.master_weights=stochastic_rounding`).
Out: the parameters updated in place; float32 moments in the optimizer's state (`exp_avg`, `exp_avg_sq`, `step`,
as torch's AdamW names them, so checkpoints hold the same keys).

Each weight's update is computed in float32 from the bfloat16 weight, then the result is rounded to one of its
two bfloat16 neighbours at random, up with a probability equal to how far it lies towards the upper one. An update
a hundred times smaller than the rounding step then still moves the weight on one step in a hundred, so the
expected weight follows the float32 run's instead of staying put.

The random bits are a hash of (seed, step, which parameter, which element of the whole tensor), not draws from a
generator: every weight gets the same bits whichever process holds it, so a run sharded with FSDP2 (each process
updating its rows of each tensor, as DTensor shards) rounds exactly as one process does, at any world size, and a
resumed run rounds as an uninterrupted one.

Large tensors are updated a slice at a time, so the scratch is bounded (`SLICE_ELEMENTS`), not the size of the
embedding matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SLICE_ELEMENTS = 1 << 22  # 4M elements: float32 and int64 scratch slices of 16 and 32 MB at most
_LOW_BITS = 1 << 16  # float32 bits below bfloat16's 7-bit mantissa
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as a signed int32: keeps sign, exponent and bfloat16's mantissa
_WORD = 0xFFFFFFFF
_MIX = 0x45D9F3B  # an odd multiplier below 2**31: a 32-bit value times it stays inside int64, so nothing overflows


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift, multiply, twice) of each int64 element in [0, 2**32), in place."""
    x.bitwise_xor_(x >> 16).mul_(_MIX).bitwise_and_(_WORD)
    x.bitwise_xor_(x >> 16).mul_(_MIX).bitwise_and_(_WORD)
    return x.bitwise_xor_(x >> 16)


def _mix32_int(value: int) -> int:
    """`_mix32` of one Python int, for the keys."""
    return int(_mix32(torch.tensor([value & _WORD], dtype=torch.int64))[0])


def rounding_key(seed: int, step: int, param_index: int) -> int:
    """The 32-bit key of one parameter's update at one step."""
    key = _mix32_int(seed)
    for part in (step, param_index):
        key = _mix32_int(key ^ part)
    return key


def random_low_bits(key: int, first: int, count: int, device: torch.device) -> torch.Tensor:
    """16 random bits (int32 in [0, 2**16)) for elements `first` .. `first + count - 1` of a parameter's whole,
    flattened tensor: a hash of the key and the element's index, the same whichever process holds the element."""
    index = torch.arange(first, first + count, dtype=torch.int64, device=device)
    high = index >> 32  # zero below 4G elements: folded in only for tensors that large
    bits = _mix32(index.bitwise_and_(_WORD).bitwise_xor_(key))
    if first + count > _WORD:
        bits = _mix32(bits.bitwise_xor_(high))
    return (bits >> 16).to(torch.int32)


def round_stochastically(values: torch.Tensor, out: torch.Tensor, noise: torch.Tensor) -> None:
    """Write float32 `values` into bfloat16 `out`, each rounded up or down at random in proportion to its distance
    from the two neighbours, with `noise` (uniform int32 in [0, 2**16), one per value). `values` is used as
    scratch. Adding uniform noise below the kept bits and then cutting them off rounds the magnitude up exactly
    when the noise carries into the kept bits: with the probability the dropped bits stand for. Infinities and
    NaNs stay what they are (their low bits carry nowhere that matters)."""
    bits = values.view(torch.int32)
    bits.add_(noise).bitwise_and_(_HIGH_MASK)
    out.copy_(values)  # exact: every value now has a bfloat16's bits


def _local(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The part of `tensor` this process holds, flattened, and where it starts in the whole flattened tensor. A
    plain tensor is all of itself; an FSDP2 shard (a DTensor split on dim 0 as `torch.chunk` splits it) holds
    rows rank * ceil(rows / world) onwards."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(tensor, DTensor):
        return tensor.view(-1), 0
    placements = tuple(tensor.placements)
    if placements != (Shard(0),):
        raise ValueError(f"stochastic rounding expects FSDP2's dim-0 shards, got placements {placements}")
    rows = tensor.shape[0]
    per_rank = -(-rows // tensor.device_mesh.size())
    first_row = min(tensor.device_mesh.get_local_rank() * per_rank, rows)
    row_elements = tensor.numel() // rows if rows else 0
    return tensor.to_local().view(-1), first_row * row_elements


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) over bfloat16 weights with float32 moments."""

    def __init__(self, params: Iterable, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "seed": seed})

    def load_state_dict(self, state_dict: dict) -> None:
        """torch casts a loaded state's floating-point tensors to their parameter's dtype: the moments would come
        back in bfloat16. They are put back as saved, in float32."""
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        moments = {pid: {key: value for key, value in state.items() if key in ("exp_avg", "exp_avg_sq")}
                   for pid, state in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [param for group in self.param_groups for param in group["params"]]
        for pid, param in zip(saved_ids, params):
            for key, value in moments.get(pid, {}).items():
                self.state[param][key] = value.to(device=param.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        param_index = -1  # counts every parameter, with or without a gradient: the same on every process
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                param_index += 1
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                state["step"] += 1
                step = int(state["step"].item())  # a CPU tensor, as torch's AdamW keeps it: no device sync
                key = rounding_key(group["seed"], step, param_index)
                step_size = group["lr"] / (1 - beta1 ** step)
                root_correction = math.sqrt(1 - beta2 ** step)
                decay = 1 - group["lr"] * group["weight_decay"]
                (flat_weight, first), (flat_grad, _), (flat_avg, _), (flat_avg_sq, _) = (
                    _local(t) for t in (param, param.grad, state["exp_avg"], state["exp_avg_sq"]))
                for start in range(0, flat_weight.numel(), SLICE_ELEMENTS):
                    weight, grad, exp_avg, exp_avg_sq = (t[start:start + SLICE_ELEMENTS]
                                                         for t in (flat_weight, flat_grad, flat_avg, flat_avg_sq))
                    grad = grad.float()
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denominator = exp_avg_sq.sqrt().div_(root_correction).add_(group["eps"])
                    updated = weight.float()
                    if decay != 1:
                        updated.mul_(decay)
                    updated.addcdiv_(exp_avg, denominator, value=-step_size)
                    noise = random_low_bits(key, first + start, weight.numel(), weight.device)
                    round_stochastically(updated, weight, noise)
        return loss
