"""The memory estimate before training, and the `oom` error with its advice ladder.

In: the training config (and the model, or just its `config.json`: the model is built on the `meta` device,
so nothing is loaded). Out: a `MemoryEstimate` (weights, gradients, optimizer states, activations for
the largest micro-batch, logits) that the start-up summary prints and `chatft preview` can call;
`check_fits` raises `error[oom]` when it exceeds the device's free memory, unless `force=true`.

The activation term is a rule of thumb for decoder-only transformers (per token and layer about
10*hidden + 4*intermediate values, plus the inputs LoRA dropout copies, plus S^2 attention scores for
eager attention and CPU SDPA). A mixture-of-experts model stores every expert's weights (they count in full
towards weights, gradients and optimizer states) but runs only top-k of them per token: its activations use the
active FFN width (`MoeShape`). Measured peaks are recorded next to it in every run (metrics.jsonl
`peak_mem_mb`, the manifest's `metrics`), so the rule can be recalibrated from real runs.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import sys
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from chatft.config.schema import TrainingConfig
from chatft.data.types import PreparedData
from chatft.errors import ChatftError
from chatft.train import batching, recompute
from chatft.train.distributed import strategy_for
from chatft.train.model import (expert_parameter_names, linear_module_names, lora_targets, model_skeleton,
                                output_head_name, pick_device, resolve_dtype)
from chatft.train.sharding import gather_dtype
from chatft.train.chunked_head import rows_per_chunk
from chatft.train.precision import precision_for

MB = 1024 * 1024
CUDA_SLACK = 1.10  # allocator fragmentation and the CUDA context
# On CPU, glibc's heap keeps what a step frees in holes that the next, differently sized, step's tensors do not
# all fit: peak RSS over the weights was up to 1.65x the live activations and logits (measured: LoRA on
# SmolLM2-135M; full SFT 1.0x; bench/README.md). The estimate adds that share, so a CPU run is not killed by
# the kernel's out-of-memory killer after an estimate said it fits.
CPU_HEAP_SLACK = 0.7


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    heap: int  # CPU: what the heap holds beyond the live activations and logits (CPU_HEAP_SLACK)
    runtime: int  # what the process already holds (CPU: its RSS now), not counted against free memory
    device: str
    lora: bool
    micro_batch: MicroBatchShape | None = None  # the largest micro-batch the activations and logits are for
    # Master weights under autocast: the low-precision copy of every weight that autocast makes and keeps for the
    # backward (under FSDP2 only the gathered layers hold one: the planner leaves this out there).
    compute_copies: int = 0
    quantization: str | None = None  # QLoRA: the 4-bit type of the base (its copies: one dequantized layer)
    # FSDP2 (`sharding`): weights, gradients and optimizer states above are one process's shards; `gathered` is
    # what it holds whole beyond them while it computes (`_sharded`)
    strategy: str = "single"
    world_size: int = 1
    gathered: int = 0

    @property
    def allocator(self) -> int:
        """CUDA: the caching allocator's fragmentation and the CUDA context, a share of what the run holds."""
        if self.device != "cuda":
            return 0
        return int((CUDA_SLACK - 1) * self._held)

    @property
    def _held(self) -> int:
        return (self.weights + self.compute_copies + self.gathered + self.gradients + self.optimizer + self.activations
                + self.logits)

    @property
    def training(self) -> int:
        return self._held + self.heap + self.allocator

    @property
    def total(self) -> int:
        return self.training + self.runtime

    def lines(self) -> list[str]:
        def mb(value: int) -> str:
            return f"{value / MB:,.0f} MB"

        kind = "LoRA" if self.lora else "full SFT"
        if self.quantization:
            kind = f"LoRA on a 4-bit {self.quantization.upper()} base"
        heap = f"heap {mb(self.heap)} + " if self.heap else ""
        heap += f"allocator {mb(self.allocator)} + " if self.allocator else ""
        what = "dequantized copies" if self.quantization else "autocast copies"
        copies = f" + {what} {mb(self.compute_copies)}" if self.compute_copies else ""
        copies += f" + gathered layers {mb(self.gathered)}" if self.gathered else ""
        where = self.device
        if self.strategy != "single":
            where += f", per process: {self.strategy} over {self.world_size} processes"
        lines = [
            f"memory estimate ({kind}, {where}): {mb(self.total)} = weights {mb(self.weights)}{copies} + "
            f"gradients {mb(self.gradients)} + optimizer {mb(self.optimizer)} + activations {mb(self.activations)} + "
            f"logits {mb(self.logits)} + {heap}runtime {mb(self.runtime)}"
        ]
        if self.micro_batch:
            lines.append(f"  activations and logits for the largest micro-batch: {self.micro_batch.describe()}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"weights_mb": self.weights / MB, "compute_copies_mb": self.compute_copies / MB,
                "gradients_mb": self.gradients / MB,
                "optimizer_mb": self.optimizer / MB, "activations_mb": self.activations / MB,
                "logits_mb": self.logits / MB, "heap_mb": self.heap / MB, "allocator_mb": self.allocator / MB,
                "runtime_mb": self.runtime / MB,
                "total_mb": self.total / MB,
                "device": self.device, "lora": self.lora, "quantization": self.quantization,
                "strategy": self.strategy, "world_size": self.world_size, "gathered_mb": self.gathered / MB,
                "micro_batch": dataclasses.asdict(self.micro_batch) if self.micro_batch else None}

    def weights_and_optimizer(self) -> MemoryEstimate:
        """Only what no data can change: weights, gradients and optimizer states (for a check before the data
        is read)."""
        return dataclasses.replace(self, activations=0, logits=0, heap=0, micro_batch=None)


@dataclass(frozen=True)
class MicroBatchShape:
    """The largest micro-batch of a run: its tokens, and the rows x width attention runs over (one row of all
    its tokens when conversations are concatenated)."""
    tokens: int
    rows: int
    width: int
    concatenated: bool  # padding-free rows or packs: attention runs per conversation, without a padding mask
    from_data: bool  # measured on the tokenized rows, or the config's bound (every row seq_length long)
    planned: bool = False  # the largest of the micro-batches the run forms in its own order

    def describe(self) -> str:
        layout = "padding-free" if self.concatenated else f"{self.rows} rows padded to {self.width}"
        source = ("the largest this run forms, in its order" if self.planned else
                  "the data's longest rows" if self.from_data else "rows of seq_length")
        return f"{self.tokens:,} tokens, {layout} ({source})"


@dataclass(frozen=True)
class RowLengths:
    """Token lengths of the rows a run trains on and validates on, in file order."""
    train: list[int]
    validation: list[int] = dataclasses.field(default_factory=list)


def row_lengths(train: PreparedData, validation: PreparedData | None = None) -> RowLengths:
    return RowLengths([len(row) for row in train.rows],
                      [len(row) for row in validation.rows] if validation is not None else [])


def largest_micro_batch(cfg: TrainingConfig, lengths: RowLengths | Sequence[int] | None = None) -> MicroBatchShape:
    """The largest micro-batch training can form.

    - no lengths: from the config alone (every row `seq_length` tokens);
    - `RowLengths`: the micro-batches the run will really form, in the order it will visit the rows (the order of
      each epoch is a function of the seed, `batching.epoch_order`), for as many steps as it will take, and the
      validation micro-batches;
    - a plain sequence of lengths: the longest of them together, whatever order they come in (the worst case)."""
    packing, sched = cfg.packed_sequence, cfg.step_scheduler
    local_batch, seq_length = sched.local_batch_size, cfg.dataset.seq_length
    concatenated = packing.padding_free or packing.packed_sequence_size > 0
    if isinstance(lengths, RowLengths):
        groups = planned_micro_batches(cfg, lengths)
        largest = max(groups, key=lambda group: sum(group) if concatenated else len(group) * max(group), default=None)
        if largest is not None:
            if concatenated:
                return MicroBatchShape(sum(largest), 1, sum(largest), True, True, planned=True)
            return MicroBatchShape(len(largest) * max(largest), len(largest), max(largest), False, True, planned=True)
        lengths = None
    if not lengths:
        tokens = packing.packed_sequence_size or local_batch * seq_length
        return MicroBatchShape(tokens, 1, tokens, True, False) if concatenated else \
            MicroBatchShape(tokens, local_batch, seq_length, False, False)
    longest = sorted(lengths, reverse=True)
    if packing.packed_sequence_size > 0:  # consecutive rows of one step up to the budget; a longer row alone
        tokens = max(longest[0], min(packing.packed_sequence_size, sum(longest[:sched.global_batch_size])))
        return MicroBatchShape(tokens, 1, tokens, True, True)
    rows = min(local_batch, len(longest))
    if concatenated:
        tokens = sum(longest[:rows])
        return MicroBatchShape(tokens, 1, tokens, True, True)
    return MicroBatchShape(rows * longest[0], rows, longest[0], False, True)


def planned_micro_batches(cfg: TrainingConfig, lengths: RowLengths) -> list[list[int]]:
    """The row lengths of every micro-batch the run will form on any of its processes, training steps first, then
    validation: the same order (`batching.epoch_order`), steps (`max_steps`, `num_epochs`), shares
    (`batching.step_rows`) and grouping (`batching.group_rows`) as the trainer's. A resumed run is planned from its
    first step."""
    sched, dl = cfg.step_scheduler, cfg.dataloader
    budget, local = cfg.packed_sequence.packed_sequence_size, sched.local_batch_size
    world = cfg.data_parallel_size()
    groups: list[list[int]] = []
    per_epoch = batching.steps_per_epoch(len(lengths.train), sched.global_batch_size)
    total = per_epoch * sched.num_epochs if sched.max_steps is None else min(per_epoch * sched.num_epochs,
                                                                              sched.max_steps)
    order: list[int] = []
    for step in range(total):
        epoch, step_in_epoch = divmod(step, per_epoch)
        if step_in_epoch == 0:
            order = batching.epoch_order(lengths.train, epoch, seed=cfg.seed, shuffle=dl.shuffle,
                                         group_by_length=dl.group_by_length,
                                         global_batch_size=sched.global_batch_size)
        for rank in range(world):  # the micro-batches of every process: the estimate is for the largest
            rows = [lengths.train[i] for i in batching.step_rows(order, step_in_epoch, sched.global_batch_size,
                                                                   rank=rank, world_size=world, lengths=lengths.train)]
            groups += batching.group_rows(rows, local, budget, length=int)
    return groups + [group for rank in range(world)
                     for group in batching.group_rows(lengths.validation[rank::world], local, budget, length=int)]


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


# Config keys for the same facts across MoE families (Mixtral, Qwen2/3-MoE, DeepSeek, GPT-OSS, ...).
_EXPERTS_PER_TOKEN_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k")
_EXPERT_WIDTH_KEYS = ("moe_intermediate_size", "expert_intermediate_size")


@dataclass(frozen=True)
class MoeShape:
    """How much of a mixture-of-experts FFN runs per token: `experts_per_token` of `experts` routed experts of
    `expert_width` each, plus an always-on shared expert of `shared_width` (0 where there is none)."""

    experts: int
    experts_per_token: int
    expert_width: int
    shared_width: int

    @property
    def active_width(self) -> int:
        return self.experts_per_token * self.expert_width + self.shared_width


def moe_shape(config: Any) -> MoeShape | None:
    """The routed-expert shape from a model config, or None for a dense model."""
    text = _text_config(config)
    experts = next((getattr(text, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(text, k, None)), None)
    per_token = next((getattr(text, k) for k in _EXPERTS_PER_TOKEN_KEYS if getattr(text, k, None)), None)
    if not experts or not per_token:
        return None
    # Mixtral names each expert's width `intermediate_size`; the Qwen and DeepSeek MoEs keep that name for their
    # dense layers and give the experts `moe_intermediate_size`.
    width = next((getattr(text, k) for k in _EXPERT_WIDTH_KEYS if getattr(text, k, None)), None) or \
        getattr(text, "intermediate_size", 0)
    shared = getattr(text, "shared_expert_intermediate_size", None) or \
        (getattr(text, "n_shared_experts", None) or 0) * width
    return MoeShape(experts=int(experts), experts_per_token=int(per_token), expert_width=int(width),
                    shared_width=int(shared))


def active_parameter_count(model: nn.Module) -> int:
    """Parameters one token runs through: all of them, except that of each MoE layer's stacked expert weights
    only `experts_per_token` of the experts count (every expert is stored, top-k of them compute)."""
    total = sum(p.numel() for p in model.parameters())
    shape = moe_shape(model.config)
    if shape is None:
        return total
    params = dict(model.named_parameters())
    idle = 0
    for name in expert_parameter_names(model):
        stacked = params[name]  # experts x out x in
        idle += stacked.numel() - stacked.numel() * shape.experts_per_token // stacked.shape[0]
    return total - idle


def meta_model(cfg: TrainingConfig) -> nn.Module:
    """The model's module tree on the `meta` device: shapes without weights, built in about a second."""
    return model_skeleton(cfg.model)


def current_rss() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes. On Linux the high-water mark of this program's own memory
    (`VmHWM`): `ru_maxrss` also keeps the peak of whatever ran in the process before `exec`, and Python starts
    a subprocess by vfork + exec, so a chatft started from a Python process holding 1 GB reported that 1 GB as
    its own peak (measured: 1,149 MB for a run that peaked at 466 MB, started from pytest)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def estimate_memory(
    cfg: TrainingConfig, model: nn.Module | None = None, device: torch.device | None = None,
    lengths: Sequence[int] | None = None, *, world_size: int | None = None,
) -> MemoryEstimate:
    """Bytes one process needs to train `cfg` (on `device`, default: the one training would use). `model`, if
    given, is the plain model before LoRA wrapping (on any device, `meta` included). `lengths`, the token lengths
    of the training rows, bound the largest micro-batch by the data instead of by `seq_length`
    (`largest_micro_batch`). `world_size` (default: the config's data-parallel size) and
    `distributed.strategy` decide the layout: under FSDP2 the weights, gradients and optimizer states are split
    over the processes (`_sharded`)."""

    device = device or pick_device()
    model = model if model is not None else meta_model(cfg)
    lora = cfg.peft is not None
    precision = precision_for(resolve_dtype(cfg.model.torch_dtype, device), lora, cfg.optimizer.master_weights)
    compute_bytes = _bytes(precision.compute)  # matmul outputs
    # Activations: what a layer keeps per token is about 10 hidden-sized values and 4 intermediate-sized ones
    # (`per_layer`, in bytes). Under autocast (master weights) 4 of the hidden-sized ones, the residual stream and the
    # norms around it, stay in the weights' dtype and the rest are matmul outputs in the compute dtype: measured
    # on a Llama layer with saved-tensor hooks, 0.65x float32's bytes against this split's 0.58x.
    weights_bytes = _bytes(precision.weights)
    base = model  # the plain model, before any LoRA wrapping
    total_params = sum(p.numel() for p in base.parameters())
    text = _text_config(base.config)
    hidden = getattr(text, "hidden_size", None) or base.get_input_embeddings().embedding_dim
    layers = getattr(text, "num_hidden_layers", None) or 1
    ffn = getattr(text, "intermediate_size", None) or 4 * hidden
    moe = moe_shape(text)
    moe_routing = 0
    if moe is not None:
        # The FFN a token runs is its top-k experts (and a shared one); a model mixing dense and MoE layers is
        # estimated at the wider of the two. Routing keeps, per token and layer, the router's logits and, per chosen
        # expert, the gathered input and the weighted output (a rule of thumb read off the transformers 5 expert
        # loop, not yet measured on a real MoE model).
        moe_layers = len({name.rsplit(".", 2)[0] for name in expert_parameter_names(base)})
        ffn = moe.active_width if moe_layers >= layers else max(moe.active_width, ffn)
        moe_routing = moe.experts + 2 * moe.experts_per_token * hidden
    heads = getattr(text, "num_attention_heads", None) or 1
    vocab = getattr(text, "vocab_size", None) or base.get_input_embeddings().num_embeddings

    dropout_inputs = 0  # LoRA with dropout: each wrapped layer keeps its dropped-out input for backward
    targets: list[str] = []
    if lora:
        chosen = lora_targets(base, cfg.peft)
        targets = chosen.modules
        modules, params = dict(base.named_modules()), dict(base.named_parameters())
        trainable = sum(cfg.peft.dim * (modules[t].in_features + modules[t].out_features) for t in targets)
        # PEFT adapts a stacked expert weight (experts x a x b) with a rank-r pair per expert: r*experts*(a + b)
        trainable += sum(cfg.peft.dim * params[t].shape[0] * (params[t].shape[1] + params[t].shape[2])
                         for t in chosen.expert_parameters)
        trainable_bytes = _bytes(precision.trainable)  # float32 adapters
        weights = total_params * _bytes(precision.weights) + trainable * trainable_bytes
        if cfg.peft.dropout > 0:
            dropout_inputs = sum(modules[t].in_features for t in targets) // max(1, layers)
    else:
        trainable, trainable_bytes = total_params, _bytes(precision.trainable)
        weights = total_params * _bytes(precision.weights)
    compute_copies = total_params * compute_bytes if precision.autocast and not lora else 0
    if lora and cfg.model.quantization is not None:
        frozen, compute_copies = quantized_base(base, cfg.model.double_quantization, compute_bytes,
                                                precision.autocast)
        if device.type == "cpu":
            # Quantizing on CPU reads every weight of the checkpoint through its file mapping, and those pages stay
            # resident, which the peak RSS counts: a 4-bit load of the demo model held 875 MB of RSS against 371 MB
            # for the float32 one (measured with transformers 5.25, bitsandbytes 0.50).
            frozen += total_params * weights_bytes
        weights = frozen + trainable * trainable_bytes
        weights_bytes = 4  # PEFT's k-bit preparation makes embeddings and norms float32: so is the residual stream
    shape = largest_micro_batch(cfg, lengths)
    tokens, rows, width = shape.tokens, shape.rows, shape.width
    # what a layer keeps for backward, per token
    per_layer = 4 * hidden * weights_bytes + (6 * hidden + 4 * ffn + dropout_inputs + moe_routing) * compute_bytes
    checkpointing = recompute.mode_for(cfg.distributed.activation_checkpointing, lora, device, cfg.compile.enabled)
    if checkpointing == "full":  # layer inputs kept, one layer recomputed at a time
        activations = tokens * (layers * hidden * weights_bytes + per_layer)
    elif checkpointing == "selective":  # matmul and attention outputs kept; the rest made again a layer at a time
        kept = (6 * hidden + 2 * ffn + dropout_inputs) * compute_bytes
        activations = tokens * (layers * kept + per_layer - kept)
    else:
        activations = tokens * layers * per_layer
    # Attention probabilities (S^2 per head) are kept by eager attention (over the whole row when rows are
    # concatenated) and by CPU SDPA with a padding mask; CUDA SDPA, flash attention and chatft's
    # per-conversation SDPA on padding-free rows (mask-free causal kernels) do not keep them.
    attn = cfg.model.attn_implementation
    if attn == "eager" or (device.type == "cpu" and attn == "sdpa" and not shape.concatenated):
        activations += 2 * rows * heads * width ** 2 * compute_bytes * (
            1 if checkpointing == "full" else layers)
    # The loss head. Chunked (`chunked_head`, what the trainer uses when decoder + head reproduce the model's
    # logits): one chunk of at most CHUNK_ELEMENTS logits in float32 (made into their gradient in place), plus,
    # below float32, one chunk in the matmul's dtype: first the matmul's output (freed once copied to float32),
    # then the gradient cast back for the next matmul (to the head weight's dtype, or, for float16 full SFT's
    # float32 master weights, by autocast). A model that changes its logits after the head, or whose head LoRA
    # wraps, takes its own logits for every supervised position: those, a float32 copy and the gradient.
    if _keeps_model_logits(text, cfg, targets):
        logits = tokens * vocab * (compute_bytes + 4 + 4)
    else:
        below_float32 = 0 if compute_bytes == 4 else compute_bytes
        logits = min(tokens, rows_per_chunk(vocab)) * vocab * (4 + below_float32)
    estimate = MemoryEstimate(
        weights=weights,
        compute_copies=compute_copies,
        gradients=trainable * trainable_bytes,
        optimizer=2 * trainable * _bytes(precision.moments),  # AdamW's two moments
        activations=activations,
        logits=logits,
        heap=int(CPU_HEAP_SLACK * (activations + logits)) if device.type == "cpu" else 0,
        runtime=current_rss() if device.type == "cpu" else 0,
        device=device.type,
        lora=lora,
        micro_batch=shape,
        quantization=cfg.model.quantization if lora else None,
    )
    world_size = world_size or cfg.data_parallel_size()
    strategy = strategy_for(cfg.distributed.strategy, world_size, lora)
    if strategy == "fsdp2":
        gathered = gather_dtype(precision)
        return _sharded(estimate, base, world_size, gather_bytes=_bytes(gathered or precision.weights),
                        keeps_copies=gathered is None, trainable_bytes=trainable_bytes if not lora else 0,
                        layers=layers)
    return dataclasses.replace(estimate, strategy=strategy, world_size=world_size)


def _sharded(whole: MemoryEstimate, base: nn.Module, world_size: int, *, gather_bytes: int, keeps_copies: bool,
             trainable_bytes: int, layers: int) -> MemoryEstimate:
    """One process's share of `whole` under FSDP2 (`sharding`): its shard of the weights, gradients and optimizer
    states, and what it holds whole beyond them while it computes, in the dtype it gathers in
    (`sharding.gather_dtype`):

    - the root unit (embeddings, final norm, head) stays gathered from the forward to the end of the backward
      (FSDP2 does not reshard the root after its forward);
    - two decoder layers at a time (the one computing and the next, prefetched), and, for full SFT, one layer's
      unsharded gradient before it is reduce-scattered.

    Master weights are gathered in the compute dtype, so autocast makes no copies; where the gather keeps the
    weights' dtype while autocast computes below it (`keeps_copies`), each layer's copy is kept for the backward
    as in one process."""
    root = {id(p): p.numel() for module in (base.get_input_embeddings(), base.get_output_embeddings())
            if module is not None for p in module.parameters()}  # a tied head is one tensor: counted once
    root_params = sum(root.values())
    layer_params = max(0, sum(p.numel() for p in base.parameters()) - root_params) / max(1, layers)
    gathered = (root_params + 2 * layer_params) * gather_bytes + layer_params * trainable_bytes
    return dataclasses.replace(
        whole, weights=whole.weights // world_size, gradients=whole.gradients // world_size,
        optimizer=whole.optimizer // world_size, compute_copies=whole.compute_copies if keeps_copies else 0,
        gathered=int(gathered), strategy="fsdp2", world_size=world_size)


# A 4-bit weight (bitsandbytes NF4/FP4) is half a byte, plus one scale per block of 64 weights: a float32 scale, or
# with double quantization an 8-bit one and a float32 scale per 256 of those.
QUANT_BLOCK = 64
QUANT_SCALE_BYTES = {False: 4 / QUANT_BLOCK, True: 1 / QUANT_BLOCK + 4 / (QUANT_BLOCK * 256)}


def quantized_base(base: nn.Module, double_quantization: bool, compute_bytes: int, autocast: bool) -> tuple[int, int]:
    """A QLoRA base: (bytes of its weights, bytes of the compute-dtype copies it makes while training).

    transformers quantizes every linear layer but the output head; PEFT's preparation for k-bit training upcasts
    what stays unquantized (embeddings, norms, head) to float32. A 4-bit layer dequantizes its weight into the
    compute dtype for each matmul, forward and backward, one layer at a time: the largest such copy is counted.
    Under autocast (a 16-bit compute dtype) the float32 head is also copied into it for the loss head's matmuls."""

    modules = dict(base.named_modules())
    head = output_head_name(base)
    quantized = [modules[name].weight.numel() for name in linear_module_names(base) if name != head]
    total = sum(p.numel() for p in base.parameters())
    weights = int(sum(quantized) * (0.5 + QUANT_SCALE_BYTES[double_quantization])) + (total - sum(quantized)) * 4
    copies = max(quantized, default=0) * compute_bytes
    if autocast and head is not None:
        copies += modules[head].weight.numel() * compute_bytes
    return weights, copies


# Config attributes of architectures that change the logits after the head (Gemma 2/3 soft-capping, Cohere and
# Granite scaling): their loss head cannot be chunked (`losses.head_for` checks it on the loaded model).
_LOGIT_POST_PROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _keeps_model_logits(text_config: Any, cfg: TrainingConfig, lora_targets: list[str]) -> bool:
    """Whether training will take the model's own logits rather than the chunked head, as far as the config
    tells before the model is loaded."""
    post_processed = any(getattr(text_config, name, None) not in (None, 1, 1.0) for name in _LOGIT_POST_PROCESSING)
    head_wrapped = any(target.split(".")[-1] == "lm_head" for target in lora_targets)
    return post_processed or head_wrapped or cfg.model.trust_remote_code


def _cgroup_free() -> int | None:
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def free_memory(device: torch.device) -> int | None:
    """Bytes the run can still take: CUDA `mem_get_info`, else MemAvailable (and the cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as handle:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if ":" in line}
    except (OSError, ValueError, IndexError):
        return None
    available = info.get("MemAvailable")
    cgroup = _cgroup_free()
    candidates = [v for v in (available, cgroup) if v is not None]
    return min(candidates) if candidates else None


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)  # CPU allocator


QLORA_RUNG = "train the LoRA adapter on a 4-bit base: model.quantization=nf4 (needs chatft[qlora])"


def advice_ladder(lora: bool, offer_qlora: bool = True) -> str:
    """The `oom` hint: full SFT -> LoRA -> LoRA on a 4-bit base -> shorter sequences -> a smaller model (a LoRA run
    lowers its rank first). The 4-bit rung is left out for a run already on a 4-bit base, and on CPU, where it
    saves no memory (`estimate_memory`)."""
    first = ("lower peft.dim (e.g. peft.dim=8)" if lora else
             "train a LoRA adapter instead of every weight: peft=lora (or run peft/automodel)")
    steps = [
        first,
        *([QLORA_RUNG] if offer_qlora else []),
        "lower dataset.seq_length or step_scheduler.local_batch_size (keep step_scheduler.global_batch_size: "
        "gradient accumulation rises to match)",
        "use a smaller model (model.pretrained_model_name_or_path)",
    ]
    return "in order: " + "; then ".join(f"({i}) {s}" for i, s in enumerate(steps, 1))


def oom_error(what: str, lora: bool, *, predicted: bool, offer_qlora: bool = True) -> ChatftError:
    hint = advice_ladder(lora, offer_qlora)
    if predicted:
        hint += ". force=true starts anyway if you think the estimate is wrong"
    return ChatftError("oom", what, hint)


def check_fits(estimate: MemoryEstimate, device: torch.device, force: bool, what: str = "training") -> str | None:
    """Raise `error[oom]` when the estimate exceeds free memory (unless `force`); return a note line. `what`
    names the estimate in the error."""
    free = free_memory(device)
    if free is None:
        return None
    # `runtime` (what the process holds already) is resident, so only the training share must still fit. The
    # note names no second estimate: the estimate line above it is the one number to hold the peak against.
    needed = estimate.training
    if needed <= free:
        return f"free {device.type} memory {free / MB:,.0f} MB: the estimate fits"
    note = f"free {device.type} memory {free / MB:,.0f} MB: too little for the estimate"
    if force:
        return note + " (force=true: starting anyway)"
    held = f" beyond the {estimate.runtime / MB:,.0f} MB this process holds" if estimate.runtime else ""
    raise oom_error(
        f"predicted: {what} needs about {needed / MB:,.0f} MB{held} but the {device.type} has {free / MB:,.0f} MB "
        f"free ({estimate.lines()[0]})",
        estimate.lora,
        predicted=True,
        offer_qlora=estimate.quantization is None and estimate.device != "cpu",
    )


def check_padded_fallback(cfg: TrainingConfig, device: torch.device, lengths: RowLengths, before: MemoryEstimate,
                          loaded: int) -> tuple[MemoryEstimate, str | None]:
    """When padding-free rows fall back to padded ones (after the model loaded): the estimate for the padded
    layout, which holds more tokens (and, on CPU SDPA, attention scores), checked against what is free now
    without the `loaded` bytes of parameters already in memory (what autocast has yet to make, the low-precision
    copies of master weights, is still counted). Returns the new estimate and `check_fits`'s note."""
    # The process's size before loading, as the first estimate read it: now it would count the weights twice.
    estimate = dataclasses.replace(estimate_memory(cfg.padded(), device=device, lengths=lengths),
                                   runtime=before.runtime)
    beyond_loaded = dataclasses.replace(estimate, weights=max(0, estimate.weights - loaded))
    return estimate, check_fits(beyond_loaded, device, cfg.force,
                                what="training with padded micro-batches, beyond the loaded weights,")
