"""An eval's results in the experiment trackers its config turns on (`logging.tensorboard`, `wandb:`, `mlflow:`,
the sections training takes), one tracker run per eval.

In: the config, the output dir and the results `results.write_results` returned. Out: a tracker run holding the
config, every target's metrics as `eval/<target>/<metric>` (loss, perplexity, token accuracy, supervised tokens,
the answer score, ...; `adapter_on_full_precision` is a target of its own), the adapter-vs-merged check as
`eval/adapter_vs_merged/*`, all at step 0, and eval_results.json as the run's artifact. TensorBoard writes to
`<output_dir>/tensorboard`, W&B keeps its files in `<output_dir>/wandb`; the runs are named after the output dir.
A tracker that fails is reported once and the eval's results stand (`chatft.trackers.fanout`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatft.config.schema import EvalConfig

STEP = 0  # an eval is one point in time; each target is a series of its own


def tracker_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """`(prefix, row)` for every target's metrics and the adapter-vs-merged check."""
    rows = [(f"eval/{name}", {"step": STEP, **target["metrics"]}) for name, target in results["targets"].items()]
    check = results.get("adapter_vs_merged")
    if check is not None:
        rows.append(("eval/adapter_vs_merged", {"step": STEP, "relative_difference": check["relative_difference"],
                                                "tolerance": check["tolerance"], "passed": check["passed"]}))
    return rows


def send_to_trackers(cfg: EvalConfig, output_dir: Path, results: dict[str, Any], results_file: Path) -> None:
    """One tracker run per tracker the config turns on (none: nothing happens); FAILED when the adapter and
    merged model disagree, so the run list shows it."""
    from chatft.trackers import record_once  # keeps torch out of the fast CLI path (preflight)

    check = results.get("adapter_vs_merged")
    status = "FAILED" if check is not None and not check["passed"] else "FINISHED"
    record_once(cfg, output_dir, results["config"], tracker_rows(results), results_file.resolve(), status)
