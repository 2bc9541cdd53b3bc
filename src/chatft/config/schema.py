"""The typed schema of every step's config, in one place.

In: the resolved config dict, after the AutoModel compatibility pass (`automodel.py`) has removed
`_target_`s and settings that do not apply to chatft's engine. Out: a validated pydantic model, or one
`config_invalid` error that lists every problem at once (see `validate_config`).

Sections and keys follow NeMo AutoModel's LLM fine-tuning YAML so its configs run here; chatft's own keys
sit beside them in the same sections (CONTRACT.md lists them).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from chatft.config.secrets import REDACTED, is_secret_key
from chatft.errors import ChatftError, did_you_mean

TorchDtype = Literal["auto", "float32", "bfloat16", "float16"]

# Spellings found in the wild for the same dtype (AutoModel accepts torch-style names).
_DTYPE_ALIASES = {
    "fp32": "float32", "float": "float32", "torch.float32": "float32",
    "bf16": "bfloat16", "torch.bfloat16": "bfloat16",
    "fp16": "float16", "half": "float16", "torch.float16": "float16",
}


def normalise_dtype(value: Any) -> Any:
    return _DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


class Section(BaseModel):
    """A config section: unknown keys are errors, so typos never pass silently."""

    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- training (sft / peft)


class RunEnv(Section):
    nodes: int = Field(1, ge=1, description="number of nodes")
    gpus_per_node: int | None = Field(None, ge=0, description="GPUs per node")
    nprocs_per_node: int | None = Field(None, ge=1, description="processes per node (one per GPU)")


class RunSection(Section):
    """Launcher settings of the step catalog; the ones that apply set the process layout."""

    env: RunEnv = RunEnv()


class ModelSection(Section):
    pretrained_model_name_or_path: str = Field(description="Hub id or local dir of a causal LM")
    revision: str | None = Field(None, description="Hub branch, tag or commit")
    torch_dtype: TorchDtype = Field("bfloat16", description="weights and compute dtype")
    trust_remote_code: bool = Field(False, description="run the model repo's own Python code")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    quantization: Literal["nf4", "fp4"] | None = Field(
        None, description="QLoRA: load the frozen base in 4 bits through bitsandbytes (LoRA only)")
    double_quantization: bool = Field(True, description="with quantization: quantize the 4-bit blocks' scales too")
    quantization_compute_dtype: TorchDtype = Field(
        "auto", description="with quantization: the dtype 4-bit weights are dequantized to for each matmul "
        "(auto: the run's compute dtype)")

    _dtype = field_validator("torch_dtype", "quantization_compute_dtype", mode="before")(normalise_dtype)

    @field_validator("quantization", mode="before")
    @classmethod
    def _no_quantization(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() in ("none", "null", "false") else value


class DatasetSection(Section):
    path_or_dataset_id: str = Field(description="chat JSONL file/dir or a Hub dataset id")
    split: str | None = Field(None, description="split, slices allowed: train[:64]")
    name: str | None = Field(None, description="Hub dataset config name")
    seq_length: int = Field(2048, ge=16, description="maximum tokens per row")
    chat_template: str | None = Field(None, description="Jinja string, file path or bundled template name")
    truncation: Literal["drop", "truncate", "error"] = "drop"
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    mask_generation_prompt: bool = True
    multi_turn: Literal["auto", "per_turn", "as_rendered", "last_assistant"] = Field(
        "auto", description="conversations -> rows: auto (one row, or one per assistant turn where the template "
        "rewrites history), per_turn, as_rendered (one row; refuse such templates), last_assistant (final turn only)")
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="variables every chat template render gets, e.g. {enable_thinking: false}")
    num_samples_limit: int | None = Field(None, ge=1, description="use only the first N rows")

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_only(cls, value: dict[str, Any]) -> dict[str, Any]:
        # These are apply_chat_template's own arguments, which chatft sets per render.
        taken = sorted(set(value) & {"conversation", "messages", "tools", "documents", "chat_template",
                                     "add_generation_prompt", "continue_final_message", "tokenize", "padding",
                                     "truncation", "max_length", "return_tensors", "return_dict",
                                     "return_assistant_tokens_mask", "tokenizer_kwargs", "sanitize_control_tokens"})
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set here: chatft sets them for each render")
        return value


class ValidationDatasetSection(DatasetSection):
    """Rows are rendered, cut and masked as the training rows are unless set here (`INHERITED`)."""

    INHERITED: ClassVar[tuple[str, ...]] = ("seq_length", "chat_template", "truncation", "train_on",
                                            "mask_generation_prompt", "multi_turn", "chat_template_kwargs")


class DataloaderSection(Section):
    shuffle: bool = True
    num_workers: int = Field(0, ge=0)
    group_by_length: bool = False


class StepSchedulerSection(Section):
    global_batch_size: int = Field(32, ge=1, description="conversations per optimizer step")
    local_batch_size: int = Field(4, ge=1, description="conversations per micro-batch per process")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    num_epochs: int = Field(1, ge=1, description="stop after this many passes over the data")
    ckpt_every_steps: int | None = Field(None, ge=1, description="resumable checkpoint interval")
    val_every_steps: int | None = Field(None, ge=1, description="validation interval")


class OptimizerSection(Section):
    lr: float = Field(1.0e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1.0e-8, gt=0)
    master_weights: Literal["auto", "float32", "stochastic_rounding", "none"] = Field(
        "auto", description="full SFT in bfloat16: float32 master weights (auto), bfloat16 weights updated with "
        "stochastic rounding, or none (bfloat16 in place: small updates are lost)")


class LRSchedulerSection(Section):
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_decay_steps: int | None = Field(None, ge=1, description="None: decay until the last step")
    min_lr: float = Field(0.0, ge=0)


class ClipGradNormSection(Section):
    max_norm: float | None = Field(1.0, gt=0, description="None: no clipping")


class CheckpointSection(Section):
    enabled: bool = True
    checkpoint_dir: str = Field("runs/chatft", description="where the run writes everything")
    resume: str = Field("auto", description="auto | PATH | false")
    keep_last: int = Field(2, ge=1)
    overwrite: bool = False

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_bool(cls, value: Any) -> Any:
        # YAML reads `resume: false` as a bool; keep one type so errors name one expectation.
        return {False: "false", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class DistEnvSection(Section):
    backend: Literal["nccl", "gloo"] | None = Field(None, description="None: nccl on CUDA, gloo on CPU")
    timeout_minutes: int = Field(10, ge=1)


class DistributedSection(Section):
    strategy: Literal["fsdp2", "ddp", "auto"] | None = Field(
        None, description="fsdp2: weights, gradients and optimizer states split across the processes; ddp: copied to "
                          "each; auto / None: fsdp2 for full SFT, ddp for LoRA (`train/distributed.strategy_for`)")
    # AutoModel writes `dp_size: none` for "all remaining ranks"; None means the same here.
    dp_size: int | None = Field(None, ge=1)
    activation_checkpointing: bool | Literal["selective", "auto"] = Field(
        "auto", description="false | true (full: each layer run again) | selective (cheap ops run again) | auto "
                            "(selective for full SFT on CPU, else false): `train/recompute.py`")

    @field_validator("dp_size", mode="before")
    @classmethod
    def _none_string(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.lower() == "none" else value

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_words(cls, value: Any) -> Any:
        # AutoModel writes full | selective | none as well as booleans.
        if isinstance(value, str):
            return {"full": True, "true": True, "none": False, "false": False}.get(value.lower(), value.lower())
        return value


class PackedSequenceSection(Section):
    packed_sequence_size: int = Field(
        0, ge=0, description="0: micro-batches of local_batch_size conversations; N: as many consecutive "
        "conversations of the step as fit in N tokens")
    split_across_pack: bool = False
    padding_free: bool = Field(
        True, description="concatenate each micro-batch's conversations into one row: no padding, attention "
        "kept inside each conversation")


class LoraSection(Section):
    dim: int = Field(16, ge=1, description="LoRA rank r")
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    match_all_linear: bool | None = Field(None, description="all linear layers except the output head")

    @model_validator(mode="after")
    def _one_way_to_pick_targets(self) -> LoraSection:
        # Unset means: all linear layers, unless target_modules names them.
        if self.match_all_linear is None:
            self.match_all_linear = not self.target_modules
        elif self.match_all_linear and self.target_modules:
            raise ValueError("peft.match_all_linear=true and peft.target_modules are exclusive: set one")
        return self


class CompileSection(Section):
    """torch.compile of each decoder layer (AutoModel's `compile` section)."""

    enabled: bool = False
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    dynamic: bool | None = Field(True, description="row lengths change every step: compile for any length")
    fullgraph: bool = False
    backend: str = "inductor"


class LoggingSection(Section):
    tensorboard: bool = False


class WandbSection(Section):
    """Weights & Biases (extra `chatft[wandb]`, `chatft.trackers`): AutoModel's keys, passed to `wandb.init`.
    Off when the project resolves to null (and WANDB_PROJECT is unset)."""

    project: str | None = None
    entity: str | None = None
    name: str | None = Field(None, description="run name; unset or empty: the run dir's name")
    group: str | None = None
    tags: list[str] | None = None
    notes: str | None = None
    save_dir: str | None = Field(None, description="where W&B keeps its local files; unset: the run dir")


class MlflowSection(Section):
    """MLflow (extra `chatft[mlflow]`, `chatft.trackers`): AutoModel's keys. Off when the tracking URI resolves to
    null (and MLFLOW_TRACKING_URI is unset)."""

    experiment_name: str | None = Field(None, description="created when missing; unset: MLflow's Default")
    run_name: str | None = Field(None, description="unset or empty: the run dir's name")
    tracking_uri: str | None = None
    artifact_location: str | None = Field(None, description="artifact root of an experiment chatft creates")
    tags: dict[str, str] | None = None
    description: str | None = Field(None, description="the run's note in the MLflow UI")
    flatten_depth: int | None = Field(
        None, ge=0, description="how many levels of the config's sections become dotted params (1: `optimizer.lr`, "
        "deeper sections as one JSON value); unset: every level")


class TrainingMlflowSection(MlflowSection):
    """A training run's `mlflow:` section: also `resume`, which eval has no use for (each eval is a new run)."""

    resume: bool = Field(True, description="a run resumed from one of its own checkpoints continues its MLflow run "
                         "(the run id kept in the run dir); false: a new MLflow run")


class TrainingConfig(Section):
    """`sft/automodel` and `peft/automodel`."""

    seed: int = 42
    run: RunSection = RunSection()
    dist_env: DistEnvSection = DistEnvSection()
    model: ModelSection
    dataset: DatasetSection
    validation_dataset: ValidationDatasetSection | None = None
    dataloader: DataloaderSection = DataloaderSection()
    validation_dataloader: DataloaderSection = DataloaderSection(shuffle=False)
    step_scheduler: StepSchedulerSection = StepSchedulerSection()
    optimizer: OptimizerSection = OptimizerSection()
    lr_scheduler: LRSchedulerSection = LRSchedulerSection()
    clip_grad_norm: ClipGradNormSection = ClipGradNormSection()
    checkpoint: CheckpointSection = CheckpointSection()
    distributed: DistributedSection = DistributedSection()
    packed_sequence: PackedSequenceSection = PackedSequenceSection()
    peft: LoraSection | None = None
    compile: CompileSection = CompileSection()
    logging: LoggingSection = LoggingSection()
    wandb: WandbSection | None = None
    mlflow: TrainingMlflowSection | None = None
    force: bool = Field(False, description="run past a failed memory estimate")

    @field_validator("peft", mode="before")
    @classmethod
    def _peft_shorthand(cls, value: Any) -> Any:
        # `peft: lora` is the default LoRA block; `peft: null` / `none` is full SFT.
        if isinstance(value, str):
            lowered = value.lower()
            if lowered == "lora":
                return {}
            if lowered in ("none", "null", "full"):
                return None
        return value

    def data_parallel_size(self) -> int:
        if self.distributed.dp_size is not None:
            return self.distributed.dp_size
        env = self.run.env
        per_node = env.nprocs_per_node or env.gpus_per_node or 1
        return env.nodes * per_node

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainingConfig:
        sched, dp = self.step_scheduler, self.data_parallel_size()
        if sched.global_batch_size % (sched.local_batch_size * dp):
            raise ValueError(
                f"step_scheduler.global_batch_size ({sched.global_batch_size}) must be a multiple of "
                f"local_batch_size ({sched.local_batch_size}) x data-parallel size ({dp})"
            )
        return self

    @model_validator(mode="after")
    def _validation_follows_training(self) -> TrainingConfig:
        # A validation set scored under other rules (a 2048-token limit beside training's 512, another template)
        # would measure something else, and size the memory estimate for rows training never makes.
        validation = self.validation_dataset
        if validation is not None:
            for name in validation.INHERITED:
                if name not in validation.model_fields_set:
                    setattr(validation, name, getattr(self.dataset, name))
        return self

    @model_validator(mode="after")
    def _float16_keeps_master_weights(self) -> TrainingConfig:
        mode = self.optimizer.master_weights
        if self.model.torch_dtype == "float16" and self.peft is None and mode in ("stochastic_rounding", "none"):
            raise ValueError(
                f"optimizer.master_weights={mode} with model.torch_dtype=float16: float16 full SFT needs float32 "
                "master weights (its loss scaling unscales float32 gradients); leave it auto, or train in bfloat16"
            )
        return self

    @model_validator(mode="after")
    def _pack_holds_a_row(self) -> TrainingConfig:
        size, seq_length = self.packed_sequence.packed_sequence_size, self.dataset.seq_length
        if 0 < size < seq_length:
            raise ValueError(
                f"packed_sequence.packed_sequence_size ({size}) must be at least dataset.seq_length ({seq_length}) "
                "so that every row fits in a pack"
            )
        return self

    def grad_accumulation_steps(self) -> int:
        sched = self.step_scheduler
        return sched.global_batch_size // (sched.local_batch_size * self.data_parallel_size())

    def padded(self) -> TrainingConfig:
        """This config with padded micro-batches instead of padding-free ones (what training falls back to)."""
        layout = self.packed_sequence.model_copy(update={"padding_free": False})
        return self.model_copy(update={"packed_sequence": layout})


# --------------------------------------------------------------------------- data prep


class DataPrepConfig(Section):
    """`data_prep/chat_jsonl`."""

    input: str = Field(description="JSONL/JSON/Parquet file (gzip allowed) or a Hub dataset id")
    split: str | None = Field(None, description="Hub dataset split (slices allowed: train[:1000])")
    name: str | None = Field(None, description="Hub dataset config name")
    output: str = Field(description="messages JSONL to write; prep_report.json goes beside it")
    validation_output: str | None = Field(None, description="None: <output stem>.val.jsonl beside output")
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "hh", "xlam", "glaive",
                    "toolace"] = "auto"
    val_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = 42
    strict: bool = Field(False, description="stop at the first bad row with error[bad_row] instead of dropping it")
    consecutive_user: Literal["merge", "drop"] = "merge"
    text_field: str = Field("chosen", description="field holding hh-style text")
    limit: int | None = Field(None, ge=1, description="read only the first N rows")


# --------------------------------------------------------------------------- merge


class MergeConfig(Section):
    """`convert/merge_lora`: the upstream merge step's keys."""

    backend: Literal["auto", "hf_peft", "megatron_bridge"] = "auto"
    lora_checkpoint: str = Field(description="adapter dir, or a training run dir")
    base_hf_path: str | None = Field(None, description="defaults to the base recorded by the adapter")
    output_hf_path: str
    torch_dtype: TorchDtype = "auto"
    device_map: str | None = None
    low_cpu_mem_usage: bool = True
    safe_serialization: bool = True
    save_tokenizer: bool = True
    trust_remote_code: bool = False
    show_progress: bool = True
    strict: bool = True
    overwrite: bool = False
    require_validated: bool = False

    _dtype = field_validator("torch_dtype", mode="before")(normalise_dtype)


# --------------------------------------------------------------------------- eval


class EvalDatasetSection(DatasetSection):
    """The eval rows, with training's `dataset` keys (seq_length, truncation, train_on, mask_generation_prompt,
    chat_template, ...), so a row is rendered and masked exactly as in training."""


class GenerationSection(Section):
    num_prompts: int = Field(8, ge=0, description="conversations every target answers (0: none)")
    max_new_tokens: int = Field(128, ge=1, description="length cap of each greedy answer")
    scoring: Literal["none", "exact_match", "contains"] = Field(
        "none", description="compare each answer with the reference: equal, or containing it")


class EvalConfig(Section):
    """`eval/model_eval`: base, adapter and merged model as separate validation points."""

    targets: list[Literal["base", "adapter", "merged"]] = Field(["base", "adapter", "merged"], min_length=1)
    base: str | None = Field(None, description="None for the adapter target: the base its manifest records")
    adapter: str | None = Field(None, description="adapter dir, or a training run dir (its final/)")
    merged: str | None = Field(None, description="merged or fully fine-tuned model: any save_pretrained dir")
    dataset: EvalDatasetSection
    generation: GenerationSection = GenerationSection()
    torch_dtype: TorchDtype = "auto"
    trust_remote_code: bool = Field(False, description="run the model repo's own Python code")
    qlora_base: Literal["as_trained", "full_precision", "both"] = Field(
        "as_trained", description="a QLoRA adapter scored on its base quantized as in training (the `adapter` "
        "point), on the unquantized base (`adapter_on_full_precision`), or both, as separate points")
    local_batch_size: int = Field(4, ge=1)
    output_dir: str = "runs/eval"
    seed: int = 42
    # the results go to the same trackers training logs to (`chatft.trackers`), one tracker run per eval
    logging: LoggingSection = LoggingSection()
    wandb: WandbSection | None = None
    mlflow: MlflowSection | None = None

    _dtype = field_validator("torch_dtype", mode="before")(normalise_dtype)

    @model_validator(mode="after")
    def _targets_have_paths(self) -> EvalConfig:
        repeated = sorted({t for t in self.targets if self.targets.count(t) > 1})
        if repeated:
            raise ValueError(f"targets {self.targets} name {', '.join(repeated)} more than once")
        # The adapter target finds its base in the adapter's manifest when `base` is unset.
        missing = [t for t in self.targets if getattr(self, t) is None]
        if missing:
            raise ValueError(f"targets {self.targets} need paths for: {', '.join(missing)}")
        if self.qlora_base != "as_trained" and "adapter" not in self.targets:
            raise ValueError(f"qlora_base={self.qlora_base} chooses the base of the adapter target, which targets "
                             f"{self.targets} does not include")
        return self


SCHEMAS: dict[str, type[Section]] = {
    "training": TrainingConfig,
    "data_prep": DataPrepConfig,
    "merge": MergeConfig,
    "eval": EvalConfig,
}


# --------------------------------------------------------------------------- validation


def known_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key the schema accepts, e.g. `step_scheduler.max_steps`."""
    paths: list[str] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        for sub in _section_types(field.annotation):
            paths.extend(known_paths(sub, f"{path}."))
    return paths


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]


def _leaf_and_parent(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rpartition(".")
    return leaf, parent


def _unknown_key_message(path: str, all_paths: list[str]) -> str:
    leaf, parent = _leaf_and_parent(path)
    siblings = [p for p in all_paths if _leaf_and_parent(p)[1] == parent]
    close = [p for p in siblings if _leaf_and_parent(p)[0] in did_you_mean(leaf, [_leaf_and_parent(s)[0] for s in siblings])]
    if not close:  # the right key in the wrong section? (`step_scheduler.lr` -> `optimizer.lr`)
        close = [p for p in all_paths if _leaf_and_parent(p)[0] == leaf][:3]
    return f"unknown key `{path}`" + (f" (did you mean {', '.join(close)}?)" if close else "")


def _describe(error: dict[str, Any], all_paths: list[str]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return _unknown_key_message(path, all_paths)
    if error["type"] == "missing":
        return f"`{path}` is required"
    message = error["msg"].removeprefix("Value error, ")
    if not path:  # a check across keys (batch sizes, eval targets): the message names them
        return message
    secret = any(is_secret_key(part) for part in error["loc"])
    return f"`{path}`: {message} (got {REDACTED if secret else repr(error['input'])})"


def validate_config(schema_name: str, config: dict[str, Any], source: str) -> Section:
    """Validate `config`; every problem is listed in one `config_invalid` error."""
    schema = SCHEMAS[schema_name]
    try:
        return schema.model_validate(config)
    except ValidationError as exc:
        all_paths = known_paths(schema)
        problems = [_describe(err, all_paths) for err in exc.errors()]
        listing = "\n  - ".join(dict.fromkeys(problems))
        raise ChatftError(
            "config_invalid",
            f"{source} has {len(problems)} problem(s):\n  - {listing}",
            "fix each key listed; `chatft steps show <step>` lists the parameters and their defaults",
        ) from None
