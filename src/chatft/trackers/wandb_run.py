"""Weights & Biases: one run per `chatft run`, from AutoModel's `wandb:` section.

The section's keys are those `wandb.init` takes (AutoModel passes them through): project, entity, name, group,
tags, notes; `save_dir` is init's `dir`. chatft's defaults where the section leaves one unset: the run is named
after the run dir and keeps its local files in the run dir (`<run>/wandb/`). WANDB_MODE=offline writes the run
there only, for `wandb sync` later.

A training run resumed from its own checkpoint continues its W&B run (the same run id, `resume="allow"`;
`continuation`). W&B keeps a run's steps increasing, so steps the interrupted attempt logged after the checkpoint
keep their first values there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatft.config.schema import WandbSection
from chatft.trackers.base import scalars

EXIT_CODES = {"FINISHED": 0, "KILLED": 143, "FAILED": 1}


class WandbRun:
    name = "wandb"

    def __init__(self, section: WandbSection, project: str, run_dir: Path, reopen: str | None = None) -> None:
        self.section, self.project, self.run_dir = section, project, run_dir
        self.reopen = reopen  # the id of the run to continue
        self.run: Any = None

    def start(self, config: dict[str, Any]) -> None:
        import wandb

        section = self.section
        local_dir = Path(section.save_dir) if section.save_dir else self.run_dir
        local_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=self.project, entity=section.entity, name=section.name or self.run_dir.name,
                              group=section.group, tags=section.tags, notes=section.notes, dir=str(local_dir),
                              config=config, id=self.reopen, resume="allow" if self.reopen else None,
                              # no system metadata: it holds the command line, whose secrets only chatft masks
                              settings=wandb.Settings(silent=True, x_disable_meta=True))

    def where(self) -> str:
        place = f"offline in {self.run.settings.sync_dir}" if self.run.offline else self.run.url
        return place + (f", continuing run {self.reopen}" if self.reopen else "")

    def log(self, prefix: str, row: dict[str, Any]) -> None:
        self.run.log({f"{prefix}/{key}": value for key, value in scalars(row).items()}, step=row["step"])

    def artifact(self, path: Path) -> None:
        self.run.summary["final_artifact"] = str(path)

    def close(self, status: str = "FINISHED") -> None:
        if self.run is not None:
            self.run.finish(exit_code=EXIT_CODES[status])

    def identity(self) -> dict[str, Any] | None:
        return {"id": self.run.id, "project": self.project} if self.run is not None else None
