"""The benchmark workloads, and how `--quick` and the machine turn one into the settings of a run.

A `Workload` says what is trained (model, LoRA or full SFT, dtype, length limit, conversations per step, data);
`resolve` applies `--quick` (toy shapes, short rows) and the device the run can use, and returns `RunSettings`,
the one record every worker reads, so that all systems of a run see exactly the same numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEED = 7
# Every linear layer of a Llama/Qwen2 decoder block; the output head is left out on purpose.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIMIZER = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "max_grad_norm": 1.0}

QUICK_MAX_LENGTH = 256
QUICK_STEPS, QUICK_WARMUP, QUICK_REPEATS = 3, 1, 1
DEFAULT_STEPS, DEFAULT_WARMUP, DEFAULT_REPEATS = 10, 2, 3


@dataclass(frozen=True)
class ModelShape:
    """A decoder built from its config with random weights (no download)."""

    architecture: str  # "qwen2" | "llama"
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    rope_theta: float
    max_positions: int

    def config(self, **settings: Any) -> Any:
        """The transformers config of this shape (`settings` added or overriding, e.g. token ids)."""
        from transformers import LlamaConfig, Qwen2Config

        config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[self.architecture]
        return config_class(**{
            "hidden_size": self.hidden, "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions, "use_cache": False, **settings})

    def toy(self, vocab: int) -> ModelShape:
        """Two layers with head dim 16 and one kv head, keeping the model's heads-per-kv-head ratio and its
        intermediate/hidden ratio; the vocabulary shrinks to the tokenizer's, since a 150k-wide head at toy
        width would be most of the work (and of the memory) of a CPU run."""
        ratio = self.heads // self.kv_heads
        hidden = 16 * ratio
        return dataclasses.replace(self, hidden=hidden, intermediate=round(hidden * self.intermediate / self.hidden),
                                   layers=2, heads=ratio, kv_heads=1, vocab=vocab)


QWEN25_05B = ModelShape("qwen2", hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936,
                        tied=True, rope_theta=1e6, max_positions=32768)
# Llama 3.1's rope scaling (rope_type llama3) is left out: it changes position frequencies, not the work.
LLAMA31_8B = ModelShape("llama", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
                        tied=False, rope_theta=500000.0, max_positions=131072)


@dataclass(frozen=True)
class Workload:
    name: str
    summary: str
    model: ModelShape | None  # None: the real SmolLM2-135M-Instruct (or --model DIR)
    lora: bool
    dtype: str  # "float32" | "bfloat16"
    max_length: int
    local_batch: int  # conversations per micro-batch
    accumulation: int  # micro-batches per optimizer step
    lr: float
    data: str  # "alpaca" | "synthetic"
    device: str  # "cpu" | "cuda"
    activation_checkpointing: bool = False
    lora_r: int = 16
    lora_alpha: int = 32

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.accumulation


WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("cpu-smollm-lora", "SmolLM2-135M-Instruct, LoRA, float32, CPU", None, lora=True, dtype="float32",
             max_length=512, local_batch=4, accumulation=1, lr=2e-4, data="alpaca", device="cpu"),
    Workload("cpu-smollm-full", "SmolLM2-135M-Instruct, full SFT, float32, CPU", None, lora=False, dtype="float32",
             max_length=512, local_batch=4, accumulation=1, lr=2e-5, data="alpaca", device="cpu"),
    Workload("gpu-small-full", "Qwen2.5-0.5B shapes, random weights, full SFT, bf16", QWEN25_05B, lora=False,
             dtype="bfloat16", max_length=2048, local_batch=4, accumulation=4, lr=2e-5, data="synthetic",
             device="cuda"),
    # Micro-batches of 2: a padded 2 x 4096 batch with a 128k-wide head still fits an 80 GB GPU with
    # checkpointing; the same split is given to every system.
    Workload("gpu-8b-lora", "Llama-3.1-8B shapes, random weights, LoRA, bf16", LLAMA31_8B, lora=True,
             dtype="bfloat16", max_length=4096, local_batch=2, accumulation=4, lr=2e-4, data="synthetic",
             device="cuda", activation_checkpointing=True),
)}


@dataclass
class RunSettings:
    """Everything a worker needs; written once to the work dir as job.json."""

    workload: str
    quick: bool
    device: str  # where the run actually trains: "cpu" | "cuda"
    dtype: str
    lora: bool
    lora_r: int
    lora_alpha: int
    lora_targets: list[str]
    max_length: int
    local_batch: int
    accumulation: int
    lr: float
    activation_checkpointing: bool
    attn_implementation: str
    threads: int | None  # torch threads on CPU; None leaves torch's default (GPU runs)
    steps: int
    warmup: int
    repeats: int
    seed: int = SEED
    optimizer: dict[str, Any] = field(default_factory=lambda: dict(OPTIMIZER))
    model_dir: str = ""
    model_shape: dict[str, Any] | None = None
    rows: str = ""  # messages JSONL every matched system trains, in order
    packed_pool: str | None = None  # a longer prefix of the same rows for trl-packed
    packs_needed: int = 0

    @property
    def global_batch(self) -> int:
        return self.local_batch * self.accumulation

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunSettings:
        return cls(**data)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def flash_attention_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def resolve(workload: Workload, *, quick: bool, steps: int | None, warmup: int | None, repeats: int | None,
            has_cuda: bool, activation_checkpointing: bool | None = None) -> RunSettings:
    """Apply --quick, the machine and the command line's overrides: where it trains, in which dtype, how long the
    rows are, and whether activations are recomputed (None: the workload's own setting)."""
    if workload.device == "cuda":
        if has_cuda:
            device = "cuda"
        elif quick:
            device = "cpu"
        else:
            raise SystemExit(f"{workload.name} needs a CUDA GPU (none found); --quick runs it at toy size on CPU")
    else:
        device = "cpu"
    # bf16 matmuls on a CPU without bf16 units are slower than float32, which would make a toy run crawl.
    dtype = "float32" if (device == "cpu" and quick) else workload.dtype
    attn = "flash_attention_2" if device == "cuda" and flash_attention_available() else "sdpa"
    return RunSettings(
        workload=workload.name, quick=quick, device=device, dtype=dtype, lora=workload.lora, lora_r=workload.lora_r,
        lora_alpha=workload.lora_alpha, lora_targets=list(LORA_TARGETS),
        max_length=QUICK_MAX_LENGTH if quick else workload.max_length,
        local_batch=workload.local_batch, accumulation=workload.accumulation, lr=workload.lr,
        activation_checkpointing=(workload.activation_checkpointing if activation_checkpointing is None
                                  else activation_checkpointing),
        attn_implementation=attn,
        threads=2 if device == "cpu" else None,
        steps=steps if steps is not None else (QUICK_STEPS if quick else DEFAULT_STEPS),
        warmup=warmup if warmup is not None else (QUICK_WARMUP if quick else DEFAULT_WARMUP),
        repeats=repeats if repeats is not None else (QUICK_REPEATS if quick else DEFAULT_REPEATS),
    )


# --------------------------------------------------------------------------- models


def _demo_model_script():
    """scripts/get_demo_model.py: the demo model and chatft's cache dir ($CHATFT_CACHE_DIR)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import get_demo_model

    return get_demo_model


def demo_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct as a plain HF dir (converted once by scripts/get_demo_model.py)."""
    return Path(_demo_model_script().ensure_demo_model())


def cache_root() -> Path:
    return _demo_model_script().cache_dir() / "bench-models"


def _model_config(shape: ModelShape, tokenizer: Any) -> Any:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return shape.config(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id)


def model_dir_tokenizer(shape: ModelShape, tokenizer_dir: Path) -> Any:
    """The tokenizer as the benchmark loads it from `random_model_dir`, without building the model.
    AutoTokenizer reads the dir's config.json too: a qwen2 config turns a generic tokenizer into Qwen2Tokenizer,
    with Qwen's normaliser and pre-tokenizer, so it can split text unlike the tokenizer at `tokenizer_dir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    with tempfile.TemporaryDirectory() as tmp:
        _model_config(shape, tokenizer).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp)


def random_model_dir(shape: ModelShape, tokenizer_dir: Path, dtype: str, *, where: Path,
                     build_device: str = "cpu") -> Path:
    """A model dir with random weights of `shape` (seeded) and the tokenizer of `tokenizer_dir`.

    Built once per (shape, tokenizer, dtype, seed) under `where` and reused: an 8B model takes minutes to
    initialise on CPU (torch's CPU generator is single-threaded) and seconds on a GPU, then as long again to write.
    `build_device` "cuda" initialises on the GPU, for a process that then exits (`run.py --build-model`): a CUDA
    context left in the benchmark's parent would hold GPU memory while the workers are measured. The weights
    differ from a CPU build (another generator); the work per token does not. Writes go to a temporary sibling
    that is renamed into place, so an interrupted build never looks complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    source = {"shape": dataclasses.asdict(shape), "tokenizer": str(Path(tokenizer_dir).resolve()),
              "tokenizer_size": len(tokenizer), "dtype": dtype, "seed": SEED}
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:12]
    out = where / f"{shape.architecture}-h{shape.hidden}-l{shape.layers}-{key}"
    marker = out / "BENCH_MODEL.json"
    if marker.exists():
        return out
    config = _model_config(shape, tokenizer)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    torch.manual_seed(SEED)
    with torch.device(build_device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "BENCH_MODEL.json").write_text(json.dumps(source, indent=1))
    del model
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
