"""Loading what eval/model_eval scores: each target's tokenizer and model, and the one chat template for all.

In: an `EvalConfig` and its resolved `Target`s. Out: a target's tokenizer; its model on a device in a dtype, in
eval mode (the adapter target: its base with the adapter loaded by PEFT, not merged); a `TemplateUse`, the
tokenizer and chat template every target's rows are tokenized with, so all see the same token ids and masks.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from chatft import quantization
from chatft.adapter_base import check_weights
from chatft.artifacts import text_sha256
from chatft.config.schema import EvalConfig
from chatft.data.pipeline import TemplateChoice, choose_template
from chatft.errors import ChatftError
from chatft.eval import log
from chatft.eval.targets import Target
from chatft.train.model import load_model, load_tokenizer


def load_target_tokenizer(cfg: EvalConfig, target: Target):
    source = target.tokenizer_source
    return load_tokenizer(target.model_section(cfg, source), key=target.key if source == target.model else "adapter")


def precision_note(target: Target, dtype_name: str) -> str | None:
    """What a QLoRA adapter's point says about its base: 4-bit as trained, or the unquantized one."""
    if target.quantization:
        return f"scored on its base in {quantization.describe(target.quantization)}, as trained"
    if target.trained_quantization:
        return (f"scored on the full-precision base ({dtype_name}), not on the "
                f"{quantization.describe(target.trained_quantization)} base it was trained on")
    return None


def load_target_model(cfg: EvalConfig, target: Target, device: Any, dtype: Any):
    """The target's model on `device` in `dtype`, in eval mode; the adapter target is its base with the
    adapter loaded by PEFT, not merged. A QLoRA adapter's base is quantized as `target.quantization` says (as in
    training), or not at all for its full-precision point."""
    section = target.model_section(cfg)
    record = target.quantization
    if record:
        section = section.model_copy(update=quantization.section_update(record))
    note = precision_note(target, str(dtype).removeprefix("torch."))
    if note:
        target.notes.append(note)
        log(f"{target.name}: {note}")
    model = load_model(section, device, dtype, key=target.key, training=False)
    if target.adapter_base is None:
        return model.eval()
    from peft import PeftModel  # imported only when an adapter is scored

    base = check_weights(target.adapter_base)  # a Hub base is in the local cache now that it has loaded
    if base.unverified:
        target.notes.append(base.unverified)
        log(f"warning: {base.unverified}")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(target.adapter_dir), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise ChatftError(
            "base_model_mismatch",
            f"the adapter {target.adapter_dir} does not fit the base {target.model}: {str(exc).splitlines()[0]}",
            "set base to the model the adapter was trained on (its chatft_manifest.json or adapter_config.json "
            "names it)",
        ) from None
    return (model if record else model.to(device)).eval()  # a 4-bit base is placed by its loading already


def _template_text(tokenizer: Any) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return template.get("default")
    return template or None


@dataclass
class TemplateUse:
    tokenizer: Any  # the tokenizer the rows are tokenized with; carries the chosen template
    choice: TemplateChoice
    origin: str  # dataset.chat_template | tokenizer of <target>
    differs: list[str]  # targets whose own tokenizer carries another template


def choose_eval_template(cfg: EvalConfig, targets: list[Target]) -> TemplateUse:
    """One template for every target. `dataset.chat_template` when set; else the template of the first
    target (in `targets` order) whose tokenizer has one, so a template-less base next to a fine-tuned model
    is scored with the template it was trained on. Every target must share one vocabulary: the token ids
    are computed once."""
    tokenizers = [(t, load_target_tokenizer(cfg, t)) for t in targets]
    first_target, first = tokenizers[0]
    vocabulary = first.get_vocab()
    for target, tokenizer in tokenizers[1:]:
        if tokenizer.get_vocab() != vocabulary or tokenizer.eos_token_id != first.eos_token_id:
            raise ChatftError(
                "config_invalid",
                f"the targets have different tokenizers ({first_target.name}: {first_target.tokenizer_source}, "
                f"{target.name}: {target.tokenizer_source}), so the same token ids cannot score both",
                "evaluate models that share a tokenizer (a base and what was fine-tuned from it) in one run; "
                "score other models in runs of their own",
            )
    if cfg.dataset.chat_template:
        chosen_target, tokenizer, origin = first_target, first, "dataset.chat_template"
    else:
        with_template = [(t, tok) for t, tok in tokenizers if _template_text(tok)]
        chosen_target, tokenizer = with_template[0] if with_template else (first_target, first)
        origin = f"tokenizer of {chosen_target.name}"
    choice = choose_template(tokenizer, cfg.dataset.chat_template)  # chat_template_missing when there is none
    chosen_sha = text_sha256(_template_text(tokenizer) or "")
    differs = [t.name for t, tok in tokenizers
               if _template_text(tok) and t is not chosen_target and text_sha256(_template_text(tok)) != chosen_sha]
    return TemplateUse(tokenizer, choice, origin, differs)
