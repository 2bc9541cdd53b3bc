"""Evaluation: `eval/model_eval`, base, adapter and merged model scored side by side.

In: a validated `EvalConfig` (targets, their paths, the eval rows, generation settings) and the output dir.
Out: `eval_results.json` and `eval_results.md` in the output dir, and a validation record appended to each
target's `chatft_manifest.json` where it has one.

Modules, in the order a run uses them:
  step.py      `run_eval()`: score, then write; `preflight` / `run_step(compiled)` for `chatft run`
  targets.py   what each target is (model dir, Hub id, adapter on its base) and the checks that load nothing
  loading.py   a target's tokenizer and model; the one chat template every target is scored with
  prompts.py   the generation prompts: conversations up to their last assistant turn
  scoring.py   loss on the supervised tokens, greedy answers and their scores, adapter vs merged agreement
  results.py   eval_results.json / .md and the records appended to the targets' manifests
  report.py    the markdown table of eval_results.md
Torch is imported by loading.py and scoring.py only, so `chatft run`'s preflight (targets.py) stays fast.
Which base an adapter belongs to is `chatft.adapter_base`; the output-dir check is `chatft.output_paths`.
"""

from __future__ import annotations

import sys

from chatft import console


def log(line: str) -> None:
    """Progress and warnings go to stderr; the results table goes to stdout."""
    if line.startswith("warning: "):
        console.warning(line.removeprefix("warning: "))
    else:
        console.info(line, sys.stderr)
