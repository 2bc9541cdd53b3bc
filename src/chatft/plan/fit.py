"""Memory per GPU for full SFT and LoRA, and the first settings on the `oom` advice ladder that fit.

In: `ModelFacts`, the layout (GPUs per node x nodes), the memory per GPU, `seq_length` and the starting
`local_batch_size`. Out: `GpuEstimate`s.

The numbers come from the training engine's own formula, `chatft.train.memory.estimate_memory`, run on the
model's `meta` skeleton with `torch.device("cuda")` and `torch_dtype: bfloat16` (neither touches CUDA, so this
works on a machine without a GPU). What the planner adds is the layout. On several GPUs, either mode runs
replicated data parallel (`ddp`: every process holds the whole model, gradients and optimizer states, so each
GPU needs what one process needs) or FSDP2, which shards weights, gradients and optimizer states over the
processes and holds the root unit and two decoder layers whole while it computes: both are training's own
per-process estimate (`estimate_memory(..., world_size=...)`), the one `error[oom]` checks before a run. The
allocator slack of `check_fits` (x1.10) is added. With `--gpus 0` the plan is for CPU training in float32.

The ladder follows the `oom` hint's order: full SFT -> LoRA, then a smaller `local_batch_size` (grad
accumulation keeps the global batch), then activation checkpointing; LoRA on a 4-bit NF4 base (QLoRA) is walked
the same way when plain LoRA fits nowhere; a smaller model is the user's call. On
several GPUs it walks every rung replicated before any sharded: DDP wherever it fits (as the field does, LoRA
commonly), FSDP2 only for what fits nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from chatft.config.schema import TrainingConfig
from chatft.plan.models import ModelFacts

GB = 2**30
DEFAULT_GPU_GB = 80.0
DEFAULT_LOCAL_BATCH = 4


@dataclass(frozen=True)
class Layout:
    gpus: int  # per node; 0 = CPU
    nodes: int
    memory: int  # bytes per GPU (or of host RAM for CPU plans)

    @property
    def world(self) -> int:
        return max(self.gpus, 1) * self.nodes

    @property
    def device(self) -> str:
        return "cuda" if self.gpus > 0 else "cpu"

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.gpus > 0 else "float32"

    @property
    def slack(self) -> float:
        from chatft.train.memory import CUDA_SLACK  # torch loads when an estimate is made, not when plan starts

        return CUDA_SLACK if self.gpus > 0 else 1.0


@dataclass(frozen=True)
class GpuEstimate:
    lora: bool
    strategy: str  # fsdp2 | ddp | single
    seq_length: int
    local_batch_size: int
    activation_checkpointing: bool
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    slack: float
    budget: int
    gathered: int = 0  # FSDP2: the layers all-gathered whole at a time
    quantization: str | None = None  # QLoRA: the base's 4-bit type

    @property
    def total(self) -> int:
        return int((self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.gathered)
                   * self.slack)

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def mode(self) -> str:
        if self.quantization:
            return f"LoRA on a 4-bit {self.quantization.upper()} base"
        return "LoRA" if self.lora else "full SFT"

    def settings(self) -> str:
        return (f"local_batch_size {self.local_batch_size}"
                + (", activation checkpointing" if self.activation_checkpointing else ""))

    def line(self) -> str:
        def gb(value: float) -> str:
            return f"{value / GB:,.1f}"

        strategy = {"fsdp2": "FSDP2-sharded", "ddp": "DDP, replicated", "single": "one process"}[self.strategy]
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"{self.mode} ({strategy}, {self.settings()}): {gb(self.total)} GB per GPU, {verdict} in "
                f"{gb(self.budget)} GB = (weights {gb(self.weights)} + gradients {gb(self.gradients)} + optimizer "
                f"{gb(self.optimizer)} + activations {gb(self.activations)} + logits {gb(self.logits)}"
                + (f" + gathered layers {gb(self.gathered)}" if self.gathered else "") + ")"
                + (f" x {self.slack:.2f} allocator slack" if self.slack != 1 else ""))


def estimate(model: ModelFacts, layout: Layout, *, lora: bool, seq_length: int, local_batch_size: int,
             activation_checkpointing: bool = False, strategy: str | None = None,
             quantization: str | None = None) -> GpuEstimate:
    """One configuration's memory per GPU, from `estimate_memory` plus the sharding of its strategy. Without a
    strategy: `single` on one process; on several, FSDP2 for full SFT (the least full SFT can need: what the
    `lora_first` rule compares against) and DDP for LoRA. `quantization` (LoRA only): the base in 4 bits."""
    import torch

    from chatft.train.distributed import strategy_for  # torch loads when an estimate is made, not when plan starts
    from chatft.train.memory import estimate_memory

    strategy = strategy or strategy_for(None, layout.world, lora)  # training's own rule for `auto`
    cfg = TrainingConfig.model_validate({
        "model": {"pretrained_model_name_or_path": model.location, "torch_dtype": layout.dtype,
                  "quantization": quantization if lora else None},
        "dataset": {"path_or_dataset_id": "planned", "seq_length": seq_length},
        "step_scheduler": {"global_batch_size": local_batch_size, "local_batch_size": local_batch_size},
        "distributed": {"activation_checkpointing": activation_checkpointing,
                        "strategy": None if strategy == "single" else strategy},
        "peft": "lora" if lora else None,  # the default LoRA block: what both training steps use
    })
    skeleton, scale = model.skeleton()
    # Training's own estimate for one process of this layout (under FSDP2: its shards and gathered layers).
    raw: Any = estimate_memory(cfg, skeleton, torch.device(layout.device), world_size=layout.world)
    if lora:  # gradients == the float32 adapters; the rest of `weights` is the frozen base
        weights = (raw.weights - raw.gradients) * scale + raw.gradients
        gradients, optimizer = raw.gradients, raw.optimizer
    else:
        weights, gradients, optimizer = raw.weights * scale, raw.gradients * scale, raw.optimizer * scale
    # (QLoRA: the frozen base's bytes, 4-bit layers and float32 rest, scale with the model like any base.)
    # `ddp` needs exactly what one process needs: chatft adds the gradients across processes after the last
    # micro-batch's backward, through a flat buffer of at most `BUCKET_BYTES` plus one gradient, at a moment
    # when the activations counted here are already freed.
    return GpuEstimate(lora, strategy, seq_length, local_batch_size, activation_checkpointing,
                       int(weights + raw.compute_copies * scale), int(gradients), int(optimizer),
                       raw.activations, raw.logits, layout.slack, layout.memory,
                       gathered=int(raw.gathered * scale), quantization=quantization if lora else None)


def ladder(model: ModelFacts, layout: Layout, *, lora: bool, seq_length: int, local_batch_size: int,
           batch_fixed: bool, quantization: str | None = None) -> GpuEstimate | None:
    """The first rung that fits: lower local_batch_size (unless the user fixed it), then activation
    checkpointing. On several GPUs, every rung replicated (DDP) before any sharded (FSDP2): DDP needs no gathers,
    so a smaller batch or recomputation is the better price than sharding."""
    sizes = [local_batch_size]
    while not batch_fixed and sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    # A 4-bit base is not sharded (chatft's FSDP2 does not shard bitsandbytes weights): QLoRA is planned replicated.
    strategies = (["ddp"] if quantization else ["ddp", "fsdp2"]) if layout.world > 1 else [None]
    for strategy in strategies:
        for checkpointing in (False, True):
            for size in sizes:
                result = estimate(model, layout, lora=lora, seq_length=seq_length, local_batch_size=size,
                                  activation_checkpointing=checkpointing, strategy=strategy,
                                  quantization=quantization)
                if result.fits:
                    return result
    return None
