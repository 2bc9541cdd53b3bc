"""What eval/model_eval scores: each target's location, resolved and checked before anything is loaded.

In: an `EvalConfig`. Out: one `Target` per name in `targets` (base | adapter | merged): a model dir (a training run
dir means its final/) or a Hub id; for the adapter, the adapter dir and the base it loads on, decided by
`chatft.adapter_base` (the rule convert/merge_lora uses). A QLoRA adapter (its manifest records a 4-bit base) is
one or two points, as `qlora_base` asks: `adapter` on its base quantized as in training, and/or
`adapter_on_full_precision` on the unquantized base. `checked_targets` adds the refusals that need no model: the
data path, and an output_dir inside an input. Torch-free: `chatft run` calls it before job.yaml is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatft import artifacts
from chatft.adapter_base import AdapterBase, resolve_adapter_base
from chatft.config.schema import EvalConfig, ModelSection
from chatft.data.guards import check_dataset_path
from chatft.errors import ChatftError
from chatft.output_paths import check_output_path
from chatft.run_layout import final_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# The point of a QLoRA adapter scored on the unquantized base (`qlora_base: full_precision | both`).
ADAPTER_ON_FULL_PRECISION = "adapter_on_full_precision"


@dataclass
class Target:
    """One validation point: what to load, and where its tokenizer and manifest are."""

    name: str  # base | adapter | adapter_on_full_precision | merged
    model: str  # a model dir or Hub id; for the adapter target, the base it is loaded on
    revision: str | None = None
    adapter_dir: Path | None = None  # adapter target only
    adapter_base: AdapterBase | None = None  # adapter target: its base, how it was chosen and checked
    trained_quantization: dict[str, Any] | None = None  # a QLoRA adapter: how its base was quantized in training
    quantization: dict[str, Any] | None = None  # how the base is quantized here (None: full precision)
    notes: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The config key that names this target's model (the adapter target's model is `base`)."""
        return "base" if self.adapter_dir is not None else self.name

    @property
    def artifact_dir(self) -> Path | None:
        """The local dir of what this target evaluates (the adapter for the adapter target)."""
        if self.adapter_dir is not None:
            return self.adapter_dir
        path = Path(self.model).expanduser()
        return path.resolve() if path.is_dir() else None

    @property
    def tokenizer_source(self) -> str:
        """The adapter's own tokenizer (saved with it by training) when it has one, else the model's."""
        if self.adapter_dir is not None and any((self.adapter_dir / f).is_file() for f in TOKENIZER_FILES):
            return str(self.adapter_dir)
        return self.model

    def model_section(self, cfg: EvalConfig, path: str | None = None) -> ModelSection:
        """Loading settings for the model (or, with `path`, another location such as the adapter dir)."""
        return ModelSection(pretrained_model_name_or_path=path or self.model,
                            revision=self.revision if path in (None, self.model) else None,
                            torch_dtype=cfg.torch_dtype, trust_remote_code=cfg.trust_remote_code)

    def describe(self) -> str:
        if self.adapter_dir is not None:
            return f"{self.adapter_dir} on {self.model}"
        return self.model


def _is_adapter_dir(path: Path) -> bool:
    return (path / artifacts.ADAPTER_CONFIG).is_file()


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def resolve_model_path(key: str, value: str) -> str:
    """A model dir (a training run dir means its `final/`), or a Hub id passed on as given."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not _is_model_dir(path) and _is_model_dir(final_dir(path)):
            path = final_dir(path)
        if _is_adapter_dir(path) and not _is_model_dir(path):
            raise ChatftError(
                "config_invalid",
                f"{key}={value} is a LoRA adapter, not a model",
                f"evaluate it as the adapter target: targets=[base,adapter] adapter={value} (or merge it first "
                "with convert/merge_lora and evaluate the merged dir)",
            )
        return str(path.resolve())
    if path.exists():
        raise ChatftError("config_invalid", f"{key}={value} is a file, not a model dir",
                          "give the save_pretrained dir that holds config.json")
    return value  # a Hub id, or a path that does not exist: loading says which


def resolve_targets(cfg: EvalConfig) -> list[Target]:
    """Every target's paths, and the adapter's base checked against the adapter's record, before anything is
    loaded. A base whose weights are not local yet (a Hub id) is checked again once loading has fetched them."""
    targets = []
    for name in cfg.targets:
        if name == "adapter":
            adapter_dir = artifacts.find_adapter_dir(cfg.adapter, key="adapter")  # a run dir means its final/
            base = resolve_adapter_base(adapter_dir, "base", cfg.base,
                                        locate=lambda value: resolve_model_path("base", value))
            trained = (artifacts.read_manifest(adapter_dir) or {}).get("quantization")
            for point, quantization in adapter_points(cfg.qlora_base, trained):
                targets.append(Target(point, base.name_or_path, base.revision, adapter_dir=adapter_dir,
                                      adapter_base=base, trained_quantization=trained, quantization=quantization))
        else:
            targets.append(Target(name, resolve_model_path(name, getattr(cfg, name))))
    return targets


def adapter_points(qlora_base: str, trained: dict[str, Any] | None) -> list[tuple[str, dict[str, Any] | None]]:
    """The adapter's validation points, each a name and the quantization its base is loaded with. A plain LoRA
    adapter is one point whatever `qlora_base` says (`qlora_base_unused` warns); a QLoRA adapter is scored on
    its 4-bit base as trained (`adapter`), on the unquantized base (`adapter_on_full_precision`), or both."""
    if trained is None:
        return [("adapter", None)]
    points = {"as_trained": [("adapter", trained)], "full_precision": [(ADAPTER_ON_FULL_PRECISION, None)]}
    return points["as_trained"] + points["full_precision"] if qlora_base == "both" else points[qlora_base]


def qlora_base_unused(cfg: EvalConfig, targets: list[Target]) -> str | None:
    """The warning for a `qlora_base` that asks for a full-precision point of an adapter trained on one."""
    adapter = next((t for t in targets if t.adapter_dir is not None), None)
    if cfg.qlora_base == "as_trained" or adapter is None or adapter.trained_quantization is not None:
        return None
    return (f"qlora_base={cfg.qlora_base} has no effect: the adapter {adapter.adapter_dir} was trained on a "
            "full-precision base (its manifest records no quantization), so it is scored once, as `adapter`")


def check_output_dir(output_dir: Path, targets: list[Target], dataset_path: str) -> None:
    """Results must not land in a model, adapter or data dir (it would change that artifact). An output dir that
    merely contains an input is fine: eval only adds its two files and never deletes."""
    inputs = [(f"the {t.name} dir {t.artifact_dir}", t.artifact_dir) for t in targets]
    for target in targets:  # a Hub model's dir is its snapshot in the cache
        model_dir = artifacts.local_model_dir(target.model, target.revision)
        owner = f"{target.name}'s base" if target.adapter_dir is not None else target.name
        inputs.append((f"the {owner} dir {model_dir}", model_dir))
    data = Path(dataset_path).expanduser()
    inputs.append((f"the dataset.path_or_dataset_id dir {data}", data if data.is_dir() else None))
    check_output_path("output_dir", output_dir, inputs, "pick an output_dir of its own, e.g. output_dir=runs/eval",
                      may_contain_inputs=True)


def checked_targets(cfg: EvalConfig, output_dir: Path) -> list[Target]:
    """The refusals that need no model: the data path, every target's path and adapter base, the output dir."""
    check_dataset_path(cfg.dataset.path_or_dataset_id)
    targets = resolve_targets(cfg)
    check_output_dir(output_dir, targets, cfg.dataset.path_or_dataset_id)
    return targets
