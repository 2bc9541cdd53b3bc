"""AdamW for bfloat16 weights without a float32 copy of them: stochastic rounding.

In: bfloat16 parameters with bfloat16 gradients (full SFT with `optimizer.master_weights=stochastic_rounding`).
Out: the parameters updated in place; float32 moments in the optimizer's state (`exp_avg`, `exp_avg_sq`, `step`,
as torch's AdamW names them, so checkpoints hold the same keys).

Each weight's update is computed in float32 from the bfloat16 weight, then the result is rounded to one of its
two bfloat16 neighbours at random, up with a probability equal to how far it lies towards the upper one. An update
a hundred times smaller than the rounding step then still moves the weight on one step in a hundred, so the
expected weight follows the float32 run's instead of staying put. The random bits come from a generator seeded
by (seed, step), so a resumed run draws the same bits as an uninterrupted one.

Large tensors are updated a slice at a time, so the float32 scratch is bounded (`SLICE_ELEMENTS`), not the size
of the embedding matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

SLICE_ELEMENTS = 1 << 24  # 16M elements: three float32 scratch slices of 64 MB at most
_LOW_BITS = 1 << 16  # float32 bits below bfloat16's 7-bit mantissa
_HIGH_MASK = -_LOW_BITS  # 0xFFFF0000 as a signed int32: keeps sign, exponent and bfloat16's mantissa


def round_stochastically(values: torch.Tensor, out: torch.Tensor, generator: torch.Generator) -> None:
    """Write float32 `values` into bfloat16 `out`, each rounded up or down at random in proportion to its distance
    from the two neighbours. `values` is used as scratch. Adding uniform noise below the kept bits and then cutting
    them off rounds the magnitude up exactly when the noise carries into the kept bits: with the probability the
    dropped bits stand for. Infinities and NaNs stay what they are (their low bits carry nowhere that matters)."""
    bits = values.view(torch.int32)
    noise = torch.randint(0, _LOW_BITS, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    bits.add_(noise).bitwise_and_(_HIGH_MASK)
    out.copy_(values)  # exact: every value now has a bfloat16's bits


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
        generators: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                state["step"] += 1
                step = int(state["step"].item())  # a CPU tensor, as torch's AdamW keeps it: no device sync
                generator = generators.get(param.device)
                if generator is None:
                    generator = generators[param.device] = torch.Generator(device=param.device)
                    generator.manual_seed(group["seed"] * 1_000_003 + step)
                step_size = group["lr"] / (1 - beta1 ** step)
                root_correction = math.sqrt(1 - beta2 ** step)
                decay = 1 - group["lr"] * group["weight_decay"]
                flat = (param.view(-1), param.grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1))
                for start in range(0, param.numel(), SLICE_ELEMENTS):
                    weight, grad, exp_avg, exp_avg_sq = (t[start:start + SLICE_ELEMENTS] for t in flat)
                    grad = grad.float()
                    exp_avg.lerp_(grad, 1 - beta1)
                    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denominator = exp_avg_sq.sqrt().div_(root_correction).add_(group["eps"])
                    updated = weight.float()
                    if decay != 1:
                        updated.mul_(decay)
                    updated.addcdiv_(exp_avg, denominator, value=-step_size)
                    round_stochastically(updated, weight, generator)
        return loss
