"""Model FLOPs per trained conversation, and the device peak they are divided by.

Model FLOPs count the work the model's definition needs for the tokens trained, whatever a system skips or
repeats (activation recomputation, padding, a loss head run only at supervised positions): the same rows give
every system the same FLOPs, so MFU ranks systems exactly as tokens/s does for those rows.

Per conversation of L tokens (its own length, never a padded width):
    full SFT:  6·N·L                + 3 · 2·layers·d_attn·L²
    LoRA:      (4·N + 6·N_lora)·L   + 3 · 2·layers·d_attn·L²
- N: parameters that take part in matmuls: every weight except the input embedding table (with tied
  embeddings the shared matrix is counted once, as the output head). In a mixture-of-experts model a token runs
  only its top-k of the n experts of each MoE layer, so of the stacked expert weights only k/n count (the active
  parameters); the memory estimate, by contrast, counts every expert. N_lora likewise counts k/n of the adapters
  on expert weights (PEFT adapts each expert with its own low-rank pair).
- 6·N: forward 2·N, backward 4·N (activation and weight gradients). LoRA keeps the backward through the
  activations (2·N) but computes no weight gradient for frozen weights; the adapters cost 6·N_lora.
- Attention scores: per layer and token at causal length ~L/2, forward QKᵀ and A·V are 2·(L/2)·d_attn each,
  i.e. 2·2·(L/2)·d_attn per token and 2·d_attn·L² per conversation; ×3 for forward plus backward, in LoRA
  too, since gradients still flow through attention to the adapters of earlier layers. d_attn = heads·head_dim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Dense bf16 peak of the SXM parts (NVIDIA datasheets); PCIe/NVL variants are measured instead.
GPU_BF16_PEAKS = {"H100": 989e12, "H200": 989e12}
LOWER_PEAK_VARIANTS = ("PCIE", "NVL")


@dataclass(frozen=True)
class ModelCounts:
    params: int  # N
    lora_params: int  # N_lora (0 for full SFT)
    layers: int
    attn_width: int  # heads · head_dim
    embedding_excluded: int
    idle_experts_excluded: int = 0  # MoE: weights of the experts a token does not run (total minus active)

    def per_token(self, lora: bool) -> float:
        return 4 * self.params + 6 * self.lora_params if lora else 6 * self.params

    def per_squared_length(self) -> float:
        """Coefficient of Σ L² over a step's conversations."""
        return 3 * 2 * self.layers * self.attn_width

    def formula(self, lora: bool) -> str:
        tokens = ("(4·N + 6·N_lora)" if lora else "6·N")
        return (f"FLOPs per conversation of L tokens = {tokens}·L + 3·2·layers·d_attn·L², with N={self.params:,} "
                f"(matmul weights: all parameters minus the input embedding table, {self.embedding_excluded:,} "
                f"excluded; a tied table is counted once as the head"
                + (f"; mixture of experts: only the top-k experts a token runs, {self.idle_experts_excluded:,} "
                   "weights of the other experts excluded" if self.idle_experts_excluded else "") + ")"
                + (f", N_lora={self.lora_params:,}" if lora else "")
                + f", layers={self.layers}, d_attn={self.attn_width} (heads x head_dim); L is each conversation's "
                "own length. Per token that is 6·N (full) or 4·N + 6·N_lora (LoRA) plus 6·layers·d_attn·L, "
                "i.e. 3 x (QKᵀ + AV at causal length L/2 = 2·2·(L/2)·d_attn per layer).")

    def step_flops(self, lora: bool, tokens: int, squared_lengths: int) -> float:
        return self.per_token(lora) * tokens + self.per_squared_length() * squared_lengths


def count_model(model_dir: Path, lora: bool, lora_r: int, lora_targets: list[str]) -> ModelCounts:
    """Counted on a meta-device copy built from the config: no weights are loaded, even for 8B. `lora_targets`
    are short names: of linear layers (`q_proj`) or of stacked expert weights (`gate_up_proj`)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from chatft.train.memory import active_parameter_count, moe_shape
    from chatft.train.model import expert_parameter_names

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # a tied table appears once
    idle_experts = params - active_parameter_count(model)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    excluded = 0 if tied else embedding.numel()
    lora_params = 0
    if lora:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in lora_targets:
                lora_params += lora_r * (module.in_features + module.out_features)
        moe = moe_shape(config)
        stacked = dict(model.named_parameters())
        for name in expert_parameter_names(model):
            if name.rsplit(".", 1)[-1] in lora_targets and moe is not None:
                experts, a, b = stacked[name].shape  # a rank-r pair per expert; a token runs k of them
                lora_params += lora_r * (a + b) * min(moe.experts_per_token, experts)
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return ModelCounts(params=params - excluded - idle_experts, lora_params=lora_params,
                       layers=text.num_hidden_layers, attn_width=text.num_attention_heads * head_dim,
                       embedding_excluded=excluded, idle_experts_excluded=idle_experts)


# --------------------------------------------------------------------------- device peak


def measured_matmul_peak(dtype_name: str, device: str, threads: int | None) -> float:
    """Best FLOP/s of repeated square matmuls: 2048 on CPU (5 tries), 8192 on GPU (20 tries)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    size, tries = (8192, 20) if device == "cuda" else (2048, 5)
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    torch.mm(a, b)
    sync()
    best = 0.0
    for _ in range(tries):
        began = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = max(best, 2 * size ** 3 / (time.perf_counter() - began))
    return best


def device_peaks(device: str, dtypes: set[str], threads: int | None) -> dict[str, Any]:
    """{dtype: {"flops": peak, "source": how it was found, ...}} for every compute dtype of the run."""
    import torch

    out: dict[str, Any] = {}
    name = torch.cuda.get_device_name() if device == "cuda" else None
    for dtype in sorted(dtypes):
        measured = measured_matmul_peak(dtype, device, threads)
        entry = {"measured_matmul": measured, "flops": measured,
                 "source": f"best {dtype} square matmul measured in this run"
                           + (f" with {threads} threads" if threads else "")}
        if name and dtype == "bfloat16":
            upper = name.upper()
            for part, peak in GPU_BF16_PEAKS.items():
                if part in upper and not any(v in upper for v in LOWER_PEAK_VARIANTS):
                    entry.update(flops=peak, source=f"{name}: dense bf16 datasheet peak {peak / 1e12:.0f} TFLOP/s")
        out[dtype] = entry
    return out


def merge_peaks(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Peaks measured before and after the systems: the higher of each is used (a busy moment only lowers it)."""
    merged: dict[str, Any] = {}
    for dtype in runs[0]:
        entries = [run[dtype] for run in runs]
        best = max(entries, key=lambda e: e["flops"])
        merged[dtype] = {**best, "measured_each_time": [e["measured_matmul"] for e in entries]}
    return merged
