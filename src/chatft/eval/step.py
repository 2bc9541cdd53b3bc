"""`chatft run eval/model_eval`: score base, adapter and merged model on the same chat rows.

In: an `EvalConfig` and the output dir (`job.yaml` is already there when `chatft run` calls). Out: eval_results.json
and eval_results.md in the output dir (the table is printed too), one record appended to the `validations`
of each target's `chatft_manifest.json` where it has one, and the results in the experiment trackers the config
turns on (`tracking`).

Each target is a separate validation point scored with identical settings (`scoring`): one chat template for
all (`dataset.chat_template`, else the first target's tokenizer that has one), the rows tokenized and masked
once by training's pipeline, the loss over the supervised tokens, greedy answers to the same prompts. When both
adapter (base + adapter, not merged) and merged are scored, their losses must agree within a dtype-dependent
tolerance: a disagreement means the merged model is not this adapter merged into this base, and the step fails
after writing its results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from chatft.config.compile import CompiledConfig
from chatft.config.schema import EvalConfig
from chatft.errors import ChatftError
from chatft.eval.results import RESULTS_JSON, write_results
from chatft.eval.targets import checked_targets
from chatft.eval.tracking import send_to_trackers
from chatft.trackers import require_extras

# A merged model whose loss differs from base + adapter is not this adapter merged into this base: the id
# convert/merge_lora raises when its own logit check finds the same.
AGREEMENT_ERROR_ID = "merge_not_equivalent"


def run_eval(cfg: EvalConfig, output_dir: str | Path, *, resolved_config: dict[str, Any] | None = None,
             ) -> dict[str, Any]:
    """Score every target, then write eval_results.json / .md, print the table, append manifest records.
    Returns the results; raises after writing them when adapter and merged disagree."""
    from chatft.eval.scoring import score_targets  # keeps torch out of the fast CLI path (preflight)

    output_dir = Path(output_dir)
    require_extras(cfg)  # a tracker whose package is missing is named before any model loads
    targets = checked_targets(cfg, output_dir)  # refuses a wrong base before loading anything
    scores = score_targets(cfg, targets)
    results = write_results(cfg, targets, scores, output_dir, resolved_config)
    send_to_trackers(cfg, output_dir, results, output_dir / RESULTS_JSON)
    check = scores.agreement
    if check is not None and not check["passed"] and check["adapter_on_4bit_base"]:
        raise ChatftError(
            AGREEMENT_ERROR_ID,
            f"the merged model {cfg.merged} records another adapter than {cfg.adapter} in its chatft_manifest.json "
            f"(the adapter was scored on its 4-bit base, so the losses {check['adapter_loss']:.6f} and "
            f"{check['merged_loss']:.6f} are not compared; results were written to {output_dir})",
            "merge this adapter into this base (chatft run convert/merge_lora lora_checkpoint=ADAPTER "
            "output_hf_path=DIR) and evaluate that, or point adapter/base/merged at artifacts that belong together",
        )
    if check is not None and not check["passed"]:
        raise ChatftError(
            AGREEMENT_ERROR_ID,
            f"adapter and merged disagree: loss {check['adapter_loss']:.6f} (adapter {cfg.adapter} on its "
            f"{'full-precision ' if check['adapter_target'] != 'adapter' else ''}base) vs "
            f"{check['merged_loss']:.6f} (merged {cfg.merged}), relative difference {check['relative_difference']:.2e} "
            f"> {check['tolerance']:.0e} allowed in {check['dtype']}: the merged model is most likely not this "
            f"adapter merged into this base (results were written to {output_dir})",
            "merge this adapter into this base (chatft run convert/merge_lora lora_checkpoint=ADAPTER "
            "output_hf_path=DIR) and evaluate that, or point adapter/base/merged at artifacts that belong together",
        )
    return results


def preflight(compiled: CompiledConfig) -> None:
    """For `chatft run` to call before it writes job.yaml into output_dir: refuses a missing adapter, a wrong
    base or an output_dir inside an input before anything lands there."""
    require_extras(compiled.validated)
    checked_targets(compiled.validated, compiled.output_dir())


def run_step(compiled: CompiledConfig) -> None:
    run_eval(compiled.validated, compiled.output_dir(), resolved_config=compiled.effective())
