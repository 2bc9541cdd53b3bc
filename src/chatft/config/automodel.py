"""Accept configs written for NeMo AutoModel's LLM recipe (and the step catalog around it) unchanged.

In: the resolved config dict of a step. Out: the same dict with every `_target_` checked and removed,
AutoModel spellings moved to chatft's keys, and settings that do not apply to chatft's engine removed,
plus one warning line for each removed setting whose value asks for something chatft does not do.

`_target_` strings are never imported. A known target maps to chatft's own component (the table below);
any other target is refused with `unsupported_target`, all of them listed at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chatft.config.secrets import REDACTED, is_secret_key
from chatft.errors import ChatftError

TARGET_KEY = "_target_"

_AUTOMODEL_CAUSAL_LM = "chatft loads the model with transformers.AutoModelForCausalLM"
_CHAT_DATASET = "chatft reads OpenAI-style `messages` rows itself"
_NOT_CHAT_DATA = "this dataset class builds non-chat rows; convert the data with `chatft prep` and use a ChatDataset"

# Section path → {known _target_: what chatft uses for it}. A value of None in the inner dict would mean
# "known but refused"; refusals are in REFUSED_TARGETS so that their hint can say what to do instead.
KNOWN_TARGETS: dict[str, dict[str, str]] = {
    "recipe": {
        "nemo_automodel.recipes.llm.train_ft.TrainFinetuneRecipeForNextTokenPrediction": "chatft's training loop",
        "TrainFinetuneRecipeForNextTokenPrediction": "chatft's training loop",
    },
    "rng": {"nemo_automodel.components.training.rng.StatefulRNG": "the top-level `seed`"},
    "model": {
        "nemo_automodel.NeMoAutoModelForCausalLM.from_pretrained": _AUTOMODEL_CAUSAL_LM,
        "nemo_automodel._transformers.NeMoAutoModelForCausalLM.from_pretrained": _AUTOMODEL_CAUSAL_LM,
        "nemo_automodel.components._transformers.auto_model.NeMoAutoModelForCausalLM.from_pretrained": _AUTOMODEL_CAUSAL_LM,
        "transformers.AutoModelForCausalLM.from_pretrained": _AUTOMODEL_CAUSAL_LM,
    },
    "model.backend": {
        "nemo_automodel.components.models.common.BackendConfig": "torch kernels",
        "nemo_automodel.components.models.common.utils.BackendConfig": "torch kernels",
    },
    "distributed": {
        "nemo_automodel.components.distributed.fsdp2.FSDP2Manager": "FSDP2",
        "nemo_automodel.components.distributed.config.FSDP2Config": "FSDP2",
        "nemo_automodel.components.distributed.ddp.DDPManager": "DDP",
        "nemo_automodel.components.distributed.config.DDPConfig": "DDP",
    },
    "distributed_config": {
        "nemo_automodel.components.distributed.config.FSDP2Config": "FSDP2",
        "nemo_automodel.components.distributed.config.DDPConfig": "DDP",
    },
    "loss_fn": {
        "nemo_automodel.components.loss.masked_ce.MaskedCrossEntropy": "masked cross-entropy",
        "nemo_automodel.components.loss.linear_ce.FusedLinearCrossEntropy": "masked cross-entropy",
        "nemo_automodel.components.loss.te_parallel_ce.TEParallelCrossEntropy": "masked cross-entropy",
    },
    "dataset": {
        "nemo_automodel.components.datasets.llm.chat_dataset.ChatDataset": _CHAT_DATASET,
        "nemo_automodel.components.datasets.llm.ChatDataset": _CHAT_DATASET,
        "nemo_automodel.components.datasets.llm.tool_calling_chat_dataset.ToolCallingChatDataset": _CHAT_DATASET,
    },
    "dataloader": {
        "torchdata.stateful_dataloader.StatefulDataLoader": "chatft's resumable sampler",
        "torch.utils.data.DataLoader": "chatft's resumable sampler",
    },
    "dataloader.collate_fn": {
        "nemo_automodel.components.datasets.utils.default_collater": "dynamic padding to the longest row",
        "nemo_automodel.components.datasets.utils.packed_sequence_thd_collater": "chatft's packing",
    },
    "optimizer": {"torch.optim.AdamW": "AdamW", "torch.optim.Adam": "AdamW"},
    "peft": {"nemo_automodel.components._peft.lora.PeftConfig": "peft.LoraConfig"},
    "parallelizer": {"nemo_automodel.components.moe.parallelizer.parallelize_model": "FSDP2"},
}
for _twin, _of in (("validation_dataset", "dataset"), ("validation_dataloader", "dataloader"),
                   ("validation_dataloader.collate_fn", "dataloader.collate_fn")):
    KNOWN_TARGETS[_twin] = KNOWN_TARGETS[_of]

REFUSED_TARGETS: dict[str, str] = {
    "nemo_automodel.components.datasets.llm.hellaswag.HellaSwag": _NOT_CHAT_DATA,
    "nemo_automodel.components.datasets.llm.squad.make_squad_dataset": _NOT_CHAT_DATA,
    "nemo_automodel.components.datasets.llm.column_mapped_text_instruction_dataset."
    "ColumnMappedTextInstructionDataset": _NOT_CHAT_DATA,
}


def _is(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value in allowed


_one = _is(None, 1)
_off = _is(None, False, 0)

# Settings chatft accepts and drops. Each: the value(s) that match what chatft does anyway (dropped
# silently), and what chatft does instead (the warning for any other value).
IGNORED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "rng.ranked": (_is(True, None), "chatft seeds every rank from `seed` and its rank"),
    "model.backend.attn": (_is("sdpa", "eager", None), "Transformer Engine/flex attention is not used; chatft uses model.attn_implementation"),
    "model.backend.linear": (_is("torch", None), "Transformer Engine linear layers are not used; chatft uses torch.nn.Linear"),
    "model.backend.rms_norm": (_is("torch", "torch_fp32", None), "chatft uses the model's own RMSNorm"),
    "model.backend.rope_fusion": (_off, "chatft uses the model's own rotary embedding"),
    "model.backend.experts": (_is("torch", None), "chatft runs the model's own expert layers"),
    "model.backend.dispatcher": (_is("torch", None), "chatft runs the model's own expert routing"),
    "model.backend.enable_deepep": (_off, "DeepEP is not used"),
    "model.backend.fake_balanced_gate": (_off, "chatft runs the model's own gate"),
    "model.backend.enable_hf_state_dict_adapter": (lambda v: True, ""),
    "model.backend.te_fp8": (_off, "FP8 training is not available; chatft trains in model.torch_dtype"),
    "model.use_liger_kernel": (_off, "Liger kernels are not used"),
    "model.is_meta_device": (_off, "chatft loads weights directly"),
    "checkpoint.model_save_format": (_is("safetensors", None), "chatft writes safetensors only"),
    "checkpoint.save_consolidated": (_is(True, "final", None), "chatft always writes a consolidated HF checkpoint to final/"),
    "checkpoint.is_peft": (lambda v: True, ""),
    "checkpoint.is_async": (_off, "checkpoints are written synchronously"),
    "checkpoint.model_repo_id": (_is(None), "chatft records the base model in chatft_manifest.json"),
    "checkpoint.model_cache_dir": (_is(None), "chatft uses the Hugging Face cache (HF_HOME)"),
    "checkpoint.dequantize_base_checkpoint": (lambda v: True, ""),
    "distributed.tp_size": (_one, "tensor parallelism is not used; chatft is data parallel across all processes"),
    "distributed.cp_size": (_one, "context parallelism is not used; chatft is data parallel across all processes"),
    "distributed.pp_size": (_one, "pipeline parallelism is not used; chatft is data parallel across all processes"),
    "distributed.ep_size": (_one, "expert parallelism is not used; experts are trained data parallel like the other weights"),
    "distributed.dp_replicate_size": (_one, "hybrid sharding is not used; chatft shards across all data-parallel ranks"),
    "distributed.sequence_parallel": (_off, "sequence parallelism is not used"),
    "distributed.pipeline": (_is(None), "pipeline parallelism is not used"),
    "distributed.moe": (_is(None), "MoE-specific parallelism is not used"),
    "distributed.tp_plan": (_is(None), "tensor parallelism is not used"),
    "distributed.mp_policy": (_is(None), "chatft sets mixed precision from model.torch_dtype"),
    "distributed.offload_policy": (_is(None), "CPU offload is not available"),
    "distributed.activation_checkpointing_scope": (_is(None), "chatft checkpoints every decoder layer"),
    "distributed.defer_fsdp_grad_sync": (lambda v: True, ""),
    "distributed.reshard_after_forward": (lambda v: True, ""),
    "distributed.enable_async_tensor_parallel": (_off, "tensor parallelism is not used"),
    "distributed.enable_compile": (_off, "torch.compile is not used"),
    "distributed.enable_fsdp2_prefetch": (lambda v: True, ""),
    "distributed.autocast_dtype": (_is(None), "chatft sets precision from model.torch_dtype"),
    "loss_fn.fp32_upcast": (lambda v: True, ""),
    "loss_fn.ignore_index": (_is(-100, None), "chatft masks with its own loss mask"),
    "dataset.padding": (_is("do_not_pad", None, False), "chatft pads each micro-batch to its longest row"),
    "dataset.start_of_turn_token": (_is(None), "chatft finds assistant turns from the chat template itself"),
    "dataset.shuffle_seed": (_is(None), "shuffling follows the top-level `seed`"),
    "dataloader.batch_size": (_is(None), "use step_scheduler.local_batch_size"),
    "dataloader.pin_memory": (lambda v: True, ""),
    "dataloader.persistent_workers": (lambda v: True, ""),
    "optimizer.foreach": (lambda v: True, ""),
    "optimizer.fused": (lambda v: True, ""),
    "lr_scheduler.init_lr": (_is(None, 0, 0.0), "warm-up starts from 0"),
    "lr_scheduler.max_lr": (_is(None), "the peak learning rate is optimizer.lr"),
    "lr_scheduler.start_wd": (_is(None), "weight decay is constant (optimizer.weight_decay)"),
    "lr_scheduler.end_wd": (_is(None), "weight decay is constant (optimizer.weight_decay)"),
    "lr_scheduler.wd_incr_steps": (_is(None), "weight decay is constant (optimizer.weight_decay)"),
    "lr_scheduler.wd_incr_style": (_is(None, "constant"), "weight decay is constant (optimizer.weight_decay)"),
    "lr_scheduler.use_checkpoint_opt_param_scheduler": (lambda v: True, ""),
    "lr_scheduler.override_opt_param_scheduler": (lambda v: True, ""),
    "step_scheduler.grad_acc_steps": (_is(None), "gradient accumulation is derived: global / (local x data-parallel size)"),
    "step_scheduler.save_checkpoint_every_epoch": (_off, "checkpoints follow step_scheduler.ckpt_every_steps"),
    "step_scheduler.validate_on_checkpoint": (_off, "validation follows step_scheduler.val_every_steps"),
    "step_scheduler.log_remote_every_steps": (lambda v: True, ""),
    "step_scheduler.loss_average_window_steps": (lambda v: True, ""),
    "step_scheduler.gc_every_steps": (lambda v: True, ""),
    "step_scheduler.preemption_signal": (lambda v: True, ""),
    "peft.use_triton": (_off, "chatft uses peft's LoRA layers"),
    "peft.dropout_position": (_is("post", None), "peft applies dropout to the LoRA input"),
    "peft.lora_A_init": (_is(None), "peft's default init (kaiming-uniform A, zero B)"),
    "peft.lora_dtype": (_is(None), "trainable LoRA weights are kept in float32"),
    "peft.moe_rank_scaling": (_off, "every LoRA module uses peft.dim"),
}
for _key in [k for k in IGNORED if k.startswith(("dataset.", "dataloader."))]:
    IGNORED["validation_" + _key] = IGNORED[_key]

# Whole sections that configure other launchers or tooling: one warning each when present.
FOREIGN_SECTIONS: dict[str, str] = {
    "slurm": "launch with `chatft run --nproc-per-node N` or torchrun",
    "lepton": "launch with `chatft run --nproc-per-node N` or torchrun",
    "nemo_run": "launch with `chatft run --nproc-per-node N` or torchrun",
    "ci": "AutoModel's CI metadata does not apply",
    "parallelizer": "chatft trains data parallel; set distributed.activation_checkpointing for checkpointing",
}

RUN_ENV_USED = ("nodes", "gpus_per_node", "nprocs_per_node")

# Merge step keys that only the Megatron-Bridge backend reads.
MEGATRON_MERGE_KEYS = ("upstream_script", "hf_model_id", "hf_model_path", "output_megatron_path", "export_hf",
                       "cpu", "tp", "pp", "ep", "nproc_per_node", "debug")
MEGATRON_ROUTE_KEYS = ("base_megatron_path", "pretrained")


@dataclass
class Translation:
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    targets: dict[str, str] = field(default_factory=dict)  # section path → its accepted _target_

    def get(self, path: str) -> tuple[bool, Any]:
        node: Any = self.config
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return False, None
            node = node[part]
        return True, node

    def pop(self, path: str) -> Any:
        parent_path, _, leaf = path.rpartition(".")
        _, parent = self.get(parent_path) if parent_path else (True, self.config)
        return parent.pop(leaf)

    def set(self, path: str, value: Any) -> None:
        node = self.config
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def warn(self, path: str, value: Any, instead: str) -> None:
        self.warnings.append(does_not_apply(path, value, instead))


def does_not_apply(path: str, value: Any, instead: str) -> str:
    """The one warning line for an accepted setting that has no effect."""
    shown = REDACTED if is_secret_key(path.rsplit(".", 1)[-1]) else _show(value)
    return f"`{path}: {shown}` does not apply: {instead}"


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _walk_targets(node: Any, path: str, found: list[tuple[str, str]]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == TARGET_KEY:
                found.append((path, value))
            else:
                _walk_targets(value, f"{path}.{key}" if path else key, found)


def _check_targets(tr: Translation) -> None:
    found: list[tuple[str, str]] = []
    _walk_targets(tr.config, "", found)
    # `collate_fn` and `recipe` may name a target as a plain string.
    for section in ("dataloader.collate_fn", "validation_dataloader.collate_fn", "recipe"):
        present, value = tr.get(section)
        if present and isinstance(value, str):
            found.append((section, value))
            tr.set(section, {TARGET_KEY: value})
    for path, target in found:
        if target in REFUSED_TARGETS:
            tr.refused.append(f"`{path}._target_: {target}`: {REFUSED_TARGETS[target]}")
        elif target not in KNOWN_TARGETS.get(path, {}):
            tr.refused.append(f"`{path}._target_: {target}` is not a component chatft knows")
        else:
            tr.targets[path] = target
            tr.pop(f"{path}.{TARGET_KEY}" if path else TARGET_KEY)
    for section in ("dataloader.collate_fn", "validation_dataloader.collate_fn"):
        present, value = tr.get(section)
        if present and value == {}:
            tr.pop(section)


def _drop_emptied(tr: Translation, path: str) -> None:
    present, value = tr.get(path)
    if present and value == {}:
        tr.pop(path)


# NeMo AutoModel's QLoRA block: a top-level `quantization` section of BitsAndBytesConfig arguments, mapped to
# chatft's `model` keys (key -> the model key it sets, or None: read below).
AUTOMODEL_QUANTIZATION = {
    "load_in_4bit": None,
    "load_in_8bit": None,
    "bnb_4bit_quant_type": None,
    "bnb_4bit_use_double_quant": "model.double_quantization",
    "bnb_4bit_compute_dtype": "model.quantization_compute_dtype",
    "bnb_4bit_quant_storage": None,
}


def _translate_quantization(tr: Translation) -> None:
    present, block = tr.get("quantization")
    if not present:
        return
    tr.pop("quantization")
    block = {} if block is None else block
    unknown = [key for key in block if key not in AUTOMODEL_QUANTIZATION] if isinstance(block, dict) else [block]
    if unknown:
        raise ChatftError("config_invalid", f"`quantization` holds what AutoModel's QLoRA block does not: {unknown}",
                          f"the block takes {', '.join(AUTOMODEL_QUANTIZATION)}; or set model.quantization=nf4 "
                          "(chatft's own key)")
    if block.get("load_in_8bit"):
        raise ChatftError("not_available_yet", "`quantization.load_in_8bit: true`: an 8-bit base is not implemented",
                          "use a 4-bit base (quantization.load_in_4bit: true, or model.quantization=nf4)")
    if not block.get("load_in_4bit"):
        for key, value in block.items():
            if key not in ("load_in_4bit", "load_in_8bit") and value is not None:
                tr.warn(f"quantization.{key}", value, "quantization.load_in_4bit is not true: no quantization")
        return
    kind = block.get("bnb_4bit_quant_type") or "nf4"
    present, current = tr.get("model.quantization")
    if present and current is not None and current != kind:
        raise ChatftError("config_invalid",
                          f"model.quantization={current} and quantization.bnb_4bit_quant_type={kind} disagree",
                          "set one of them")
    tr.set("model.quantization", kind)
    for key, target in AUTOMODEL_QUANTIZATION.items():
        if target is not None and block.get(key) is not None:
            tr.set(target, block[key])
    storage = block.get("bnb_4bit_quant_storage")
    if storage not in (None, "uint8", "torch.uint8"):
        tr.warn("quantization.bnb_4bit_quant_storage", storage,
                "chatft keeps the 4-bit codes in uint8 (the same bytes); a float storage matters only for FSDP "
                "sharding of a 4-bit base, which chatft does not do")


def _translate_training(tr: Translation) -> None:
    cfg = tr.config
    _translate_quantization(tr)
    step_recipe = cfg.pop("_step_recipe", None)
    if step_recipe is not None and not str(step_recipe).endswith(":TrainFinetuneRecipeForNextTokenPrediction"):
        tr.refused.append(f"`_step_recipe: {step_recipe}` is not a recipe chatft runs")

    if "rng" in cfg:
        rng_seed = cfg["rng"].pop("seed", None)
        if rng_seed is not None and "seed" not in cfg:
            cfg["seed"] = rng_seed
    if "distributed_config" in cfg:  # AutoModel's split form of the `distributed` section
        for key, value in cfg.pop("distributed_config").items():
            cfg.setdefault("distributed", {})[key] = value

    for path, (matches, instead) in IGNORED.items():
        present, value = tr.get(path)
        if present:
            tr.pop(path)
            if not matches(value):
                tr.warn(path, value, instead)

    for path in ("distributed", "distributed_config"):  # the manager's class names the strategy
        kind = KNOWN_TARGETS[path].get(tr.targets.get(path, ""))
        if kind is not None and not tr.get("distributed.strategy")[0]:
            tr.set("distributed.strategy", kind.lower())
    present, strategy = tr.get("distributed.strategy")
    if present and strategy == "megatron_fsdp":
        tr.warn("distributed.strategy", strategy, "chatft uses torch FSDP2 (strategy fsdp2)")
        tr.set("distributed.strategy", "fsdp2")

    for ds in ("dataset", "validation_dataset"):
        present, value = tr.get(f"{ds}.truncation")
        if present and value not in ("drop", "truncate", "error"):
            mapped = "truncate" if value in (True, "longest_first", "only_first") else "drop"
            if mapped == "drop":
                tr.warn(f"{ds}.truncation", value, "rows longer than seq_length are dropped and counted (truncation: drop)")
            tr.set(f"{ds}.truncation", mapped)

    present, name = tr.get("optimizer.name")
    if present:
        tr.pop("optimizer.name")
        if str(name).lower() not in ("adam", "adamw"):
            tr.refused.append(f"`optimizer.name: {name}`: chatft trains with AdamW only")
    present, _ = tr.get("optimizer.extra_kwargs")
    if present:
        for key, value in tr.pop("optimizer.extra_kwargs").items():
            tr.set(f"optimizer.{key}", value)
    present, weight_decay = tr.get("optimizer.weight_decay")
    if tr.targets.get("optimizer") == "torch.optim.Adam" and present and weight_decay:
        tr.warn("optimizer._target_", "torch.optim.Adam", "chatft uses AdamW: weight decay is decoupled, not L2")

    for section, instead in FOREIGN_SECTIONS.items():
        if section in cfg:
            tr.warn(section, "{...}", f"section ignored; {instead}")
            cfg.pop(section)

    env = cfg.get("run", {}).get("env", {})
    for key in [k for k in env if k not in RUN_ENV_USED]:
        tr.warn(f"run.env.{key}", env.pop(key), "chatft runs in the current Python environment")
    for key in [k for k in cfg.get("run", {}) if k != "env"]:
        tr.warn(f"run.{key}", cfg["run"].pop(key), "launcher setting not used by chatft")

    # Sections whose every key was a `_target_` or a dropped setting. (`peft` stays even when emptied:
    # a block holding only its `_target_` asks for the default LoRA.)
    for section in ("recipe", "rng", "model.backend", "loss_fn", "dataloader", "validation_dataloader",
                    "run.env", "run"):
        _drop_emptied(tr, section)


def _translate_other(tr: Translation, schema: str) -> None:
    cfg = tr.config
    if "run" in cfg:
        run = cfg.pop("run")
        for key, value in (run.get("env") or {}).items():
            tr.warn(f"run.env.{key}", value, "chatft runs in the current Python environment")
    if schema == "eval":
        _drop_eval_mlflow_resume(tr)
    if schema != "merge":
        return
    if cfg.get("backend") == "megatron_bridge" or any(cfg.get(k) is not None for k in MEGATRON_ROUTE_KEYS):
        set_keys = [k for k in ("backend", *MEGATRON_ROUTE_KEYS) if cfg.get(k) not in (None, "auto", "hf_peft")]
        raise ChatftError(
            "route_not_supported",
            f"this merge asks for Megatron-Bridge ({', '.join(f'{k}={cfg[k]}' for k in set_keys)})",
            "merge Megatron checkpoints with Megatron-Bridge's merge_lora; chatft merges PEFT adapters into "
            "HF checkpoints: set backend=hf_peft, lora_checkpoint and base_hf_path",
        )
    for key in (*MEGATRON_ROUTE_KEYS, *MEGATRON_MERGE_KEYS):  # route keys left null, and the rest
        if key in cfg:
            tr.warn(key, cfg.pop(key), "Megatron-Bridge only; the hf_peft merge does not read it")


def _drop_eval_mlflow_resume(tr: Translation) -> None:
    """AutoModel's `mlflow.resume` continues a training run's MLflow run after a restart; an eval has nothing to
    continue (each eval is a run of its own), so a config that carries `resume: true` is warned once."""
    present, value = tr.get("mlflow.resume")
    if present:
        tr.pop("mlflow.resume")
        if value not in (False, None):
            tr.warn("mlflow.resume", value, "each eval starts an MLflow run of its own; only training runs continue "
                    "their MLflow run when they resume")


def _warn_remote_code(tr: Translation, path: str) -> None:
    present, value = tr.get(path)
    if present and value is True:
        tr.warnings.append(f"`{path}: true` is honoured: the model repository's own Python code will run on this "
                           "machine; chatft's configs never set it")


def translate(config: dict[str, Any], schema: str) -> tuple[dict[str, Any], list[str]]:
    """AutoModel-style config → chatft config and warnings. Refuses unknown `_target_`s."""
    tr = Translation(config)
    _check_targets(tr)
    if schema == "training":
        _translate_training(tr)
        _warn_remote_code(tr, "model.trust_remote_code")
    else:
        _translate_other(tr, schema)
        _warn_remote_code(tr, "trust_remote_code")
    if tr.refused:
        listing = "\n  - ".join(tr.refused)
        raise ChatftError(
            "unsupported_target",
            f"{len(tr.refused)} setting(s) name code chatft will not import:\n  - {listing}",
            "chatft never imports `_target_`s: remove these keys, or replace them with a known AutoModel "
            "target (`chatft steps show sft/automodel` lists the config keys)",
        )
    return tr.config, tr.warnings
