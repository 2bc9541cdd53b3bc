"""Writing what eval/model_eval found: eval_results.json and .md, and the targets' manifest records.

In: the `Scores` of every target, the targets, the output dir and the resolved config. Out: `eval_results.json`
(everything, with versions and the config, secrets redacted) and `eval_results.md` (`report`, also printed) in the
output dir, and one record appended to the `validations` of each target's `chatft_manifest.json` where it has
one; a dir without a manifest (a plain base, a model from elsewhere) is never touched. Nothing here loads a model.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatft import artifacts, console
from chatft.config.schema import EvalConfig
from chatft.config.secrets import redact
from chatft.eval import log
from chatft.eval.report import render_markdown
from chatft.eval.targets import Target

if TYPE_CHECKING:  # the type only: scoring imports torch, writing does not need it
    from chatft.eval.scoring import Scores

RESULTS_JSON = "eval_results.json"
RESULTS_MD = "eval_results.md"


def validation_record(target: Target, scores: Scores, created: str, results_path: Path) -> dict[str, Any]:
    """What a target's manifest keeps of this eval: the data, the metrics, the settings that change them."""
    record = {
        "target": target.name, "time": created, "dataset": scores.dataset["path"],
        "dataset_sha256": scores.dataset["sha256"], "rows": scores.dataset["rows_used"],
        "metrics": scores.targets[target.name]["metrics"],
        "chat_template_sha256": scores.settings["chat_template"]["sha256"],
        "multi_turn": scores.settings["multi_turn"], "chat_template_kwargs": scores.settings["chat_template_kwargs"],
        "torch_dtype": scores.settings["torch_dtype"], "eval_results": str(results_path.resolve()),
    }
    if target.adapter_dir is not None:
        record["base"] = target.model
        record["base_precision"] = scores.targets[target.name]["base_precision"]
    check = scores.agreement
    if check is not None and target.name in (check["adapter_target"], "merged"):
        record["adapter_merged_agreement"] = check["passed"]
    return record


def record_validation(target: Target, record: dict[str, Any]) -> str | None:
    """Append `record` to the target's chatft_manifest.json; a dir without one is never touched.
    Returns the manifest path written, or None."""
    directory = target.artifact_dir
    manifest = artifacts.read_manifest(directory) if directory is not None else None
    if manifest is None:
        return None
    manifest.setdefault("validations", []).append(record)
    return str(artifacts.write_manifest(directory, manifest))


def write_results(cfg: EvalConfig, targets: list[Target], scores: Scores, output_dir: Path,
                  resolved_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Append the manifest records, write eval_results.json / .md and print the table. Returns the results."""
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    output_dir.mkdir(parents=True, exist_ok=True)
    for target in targets:
        record = validation_record(target, scores, created, output_dir / RESULTS_JSON)
        written = record_validation(target, record)
        scores.targets[target.name]["validation_recorded"] = written
        if written is None:
            log(f"eval: {target.name}: {target.describe()} has no {artifacts.MANIFEST_FILE}: nothing recorded there")

    results = {
        "format": 1,
        "created": created,
        "dataset": scores.dataset,
        "settings": scores.settings,
        "targets": scores.targets,
        "adapter_vs_merged": scores.agreement,
        "generations": scores.generations,
        "versions": artifacts.package_versions(),
        "config": redact(resolved_config if resolved_config is not None else cfg.model_dump(mode="json")),
    }
    (output_dir / RESULTS_JSON).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n",
                                           encoding="utf-8")
    table = render_markdown(results)
    (output_dir / RESULTS_MD).write_text(table, encoding="utf-8")
    console.result(table)
    console.result(f"results: {output_dir / RESULTS_JSON} and {output_dir / RESULTS_MD}")
    return results
