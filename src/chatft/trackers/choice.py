"""Which trackers a training or eval config turns on (both have the same `logging`, `wandb` and `mlflow` sections).

TensorBoard is on with `logging.tensorboard: true`. A `wandb:` section is on when its project resolves to a name,
an `mlflow:` section when its tracking URI does: the config's value, else the library's own environment variable
(WANDB_PROJECT, MLFLOW_TRACKING_URI). Upstream configs read both from the environment
(`${oc.env:WANDB_PROJECT,null}`), so a section that resolves to null is off with one info line, never an error.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from chatft.config.schema import EvalConfig, TrainingConfig
from chatft.errors import ChatftError

TrackedConfig = TrainingConfig | EvalConfig


@dataclass(frozen=True)
class Extra:
    """How a tracker is asked for, the module it imports and the pip extra that installs it."""

    asked_by: str
    module: str
    extra: str
    turn_off: str


EXTRAS = {
    "tensorboard": Extra("logging.tensorboard=true", "torch.utils.tensorboard", "tensorboard",
                         "logging.tensorboard=false"),
    "wandb": Extra("the `wandb` section", "wandb", "wandb", "wandb=null"),
    "mlflow": Extra("the `mlflow` section", "mlflow", "mlflow", "mlflow=null"),
}


def wandb_project(cfg: TrackedConfig) -> str | None:
    if cfg.wandb is None:
        return None
    return cfg.wandb.project or os.environ.get("WANDB_PROJECT") or None


def mlflow_tracking_uri(cfg: TrackedConfig) -> str | None:
    if cfg.mlflow is None:
        return None
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def trackers_on(cfg: TrackedConfig) -> list[str]:
    """The names of the trackers this config turns on, in EXTRAS order."""
    on = {"tensorboard": cfg.logging.tensorboard, "wandb": wandb_project(cfg) is not None,
          "mlflow": mlflow_tracking_uri(cfg) is not None}
    return [name for name in EXTRAS if on[name]]


def off_lines(cfg: TrackedConfig) -> list[str]:
    """One info line for each tracker section that is set but resolves to off."""
    lines = []
    if cfg.wandb is not None and wandb_project(cfg) is None:
        lines.append("info: W&B logging is off: wandb.project is null and WANDB_PROJECT is not set")
    if cfg.mlflow is not None and mlflow_tracking_uri(cfg) is None:
        lines.append("info: MLflow logging is off: mlflow.tracking_uri is null and MLFLOW_TRACKING_URI is not set")
    return lines


def require_extras(cfg: TrackedConfig) -> None:
    """Refuse, before anything loads, a tracker the config turns on whose package is not installed."""
    for name in trackers_on(cfg):
        extra = EXTRAS[name]
        try:
            importlib.import_module(extra.module)
        except ImportError:
            raise ChatftError(
                "config_invalid",
                f"{extra.asked_by} turns on {name} logging, but {name} is not installed",
                f"pip install 'chatft[{extra.extra}]', or set {extra.turn_off}",
            ) from None
