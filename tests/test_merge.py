"""convert/merge_lora on tiny models: the merged model equals base+adapter, keeps the base's tokens, and every
refusal (other base, overlapping output, no adapter, Megatron) is one error block."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from clirun import assert_error_block
from clirun import run_chatft as chatft
from conftest import load_module_from_path

from chatft import artifacts
from chatft import merge as merge_module
from chatft.config.compile import compile_config
from chatft.config.schema import MergeConfig
from chatft.errors import ChatftError
from chatft.adapter_fit import check_adapter_fits
from chatft.merge import merge, plan_merge
from chatft.steps.registry import resolve_step
from chatft.train.step import train
from chatft.train.model import load_tokenizer

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")
FIXTURES = Path(__file__).parent / "fixtures" / "automodel"


def merge_config(**keys) -> MergeConfig:
    return MergeConfig.model_validate({"show_progress": False, **{k: str(v) if isinstance(v, Path) else v
                                                                  for k, v in keys.items()}})


def refusal(error_id: str, **keys) -> ChatftError:
    with pytest.raises(ChatftError) as err:
        merge(merge_config(**keys))
    assert err.value.id == error_id, err.value.render()
    assert err.value.hint
    return err.value


def logits(model, rows) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=torch.tensor([r.input_ids])).logits[0] for r in rows]


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A peft/automodel run dir: a few LoRA steps with a checkpoint on the way, final/ at the end."""
    run_dir = tmp_path_factory.mktemp("runs") / "peft"
    cfg = helpers.training_config(tiny_model_dir, run_dir, lora=True, step_scheduler__max_steps=4,
                                  step_scheduler__ckpt_every_steps=2, optimizer__lr=3e-2)
    tokenizer = load_tokenizer(cfg.model)
    train(cfg, run_dir, helpers.prepared(helpers.chat_rows(tokenizer, 16)), tokenizer=tokenizer)
    return run_dir


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merge") / "merged"
    return merge(merge_config(lora_checkpoint=lora_run, output_hf_path=out)), out


# --------------------------------------------------------------------------- the merged model


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_merged_logits_equal_base_plus_adapter(merged, lora_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, out = merged
    assert result.output == out.resolve() and result.dtype == "float32"
    assert 0 < result.tolerance and result.max_abs_diff <= result.tolerance
    assert result.max_abs_diff < 1e-4 and result.adapter_effect > 0.1
    # Independently of the merge's own check: plain transformers + PEFT on rows the merge never probed.
    rows = helpers.chat_rows(AutoTokenizer.from_pretrained(out), 4, offset=50)
    merged_logits = logits(AutoModelForCausalLM.from_pretrained(out).eval(), rows)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = logits(base.eval(), rows)
    adapted = PeftModel.from_pretrained(base, lora_run / "final").eval()
    for m, a, b in zip(merged_logits, logits(adapted, rows), base_logits):
        assert (m - a).abs().max() < 1e-4
        assert (m - b).abs().max() > 0.05  # the adapter really was folded in
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")) == ["model.safetensors"]


def test_merged_manifest_records_base_adapter_and_check(merged, lora_run, tiny_model_dir):
    result, out = merged
    manifest = artifacts.read_manifest(out)
    adapter_manifest = artifacts.read_manifest(lora_run / "final")
    assert manifest["kind"] == "merged"
    assert manifest["base_model"]["fingerprint"] == artifacts.weights_fingerprint(tiny_model_dir)
    assert manifest["base_model"]["name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert manifest["adapter"]["path"] == str((lora_run / "final").resolve())
    assert manifest["adapter"]["fingerprint"] == artifacts.weights_fingerprint(lora_run / "final")
    assert manifest["lora"] == adapter_manifest["lora"] and manifest["data"] == adapter_manifest["data"]
    check = manifest["metrics"]["merge_check"]
    assert check["max_abs_logit_diff"] == result.max_abs_diff and check["dtype"] == "float32"
    assert check["tolerance"] == result.tolerance and check["probe_rows"] == 3
    assert manifest["validations"] == [] and manifest["config"]["output_hf_path"] == str(out)


def test_base_tokenizer_chat_template_and_eos_are_kept(merged, lora_run, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    _, out = merged
    base_tok, merged_tok = AutoTokenizer.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(out)
    assert merged_tok.chat_template == base_tok.chat_template is not None
    assert (merged_tok.eos_token, merged_tok.pad_token) == (base_tok.eos_token, base_tok.pad_token)
    assert artifacts.tokenizer_fingerprint(merged_tok) == artifacts.tokenizer_fingerprint(base_tok)
    base_config = json.loads((tiny_model_dir / "config.json").read_text())
    merged_config = json.loads((out / "config.json").read_text())
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        assert merged_config.get(key) == base_config.get(key)
    base_gen, merged_gen = GenerationConfig.from_pretrained(tiny_model_dir), GenerationConfig.from_pretrained(out)
    assert (merged_gen.eos_token_id, merged_gen.pad_token_id) == (base_gen.eos_token_id, base_gen.pad_token_id)

    # An adapter dir whose tokenizer was rewritten (eos = the pad token): the merge still ships the base's.
    adapter = shutil.copytree(lora_run / "final", tmp_path / "adapter")
    config = json.loads((adapter / "tokenizer_config.json").read_text())
    (adapter / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|endoftext|>"}))
    merge(merge_config(lora_checkpoint=adapter, output_hf_path=tmp_path / "merged2"))
    assert AutoTokenizer.from_pretrained(tmp_path / "merged2").eos_token == "<|im_end|>"


def test_the_chat_template_training_used_wins_over_the_base_one(lora_run, tmp_path, capsys):
    from transformers import AutoTokenizer

    adapter = shutil.copytree(lora_run / "final", tmp_path / "adapter")
    tok = AutoTokenizer.from_pretrained(adapter)
    tok.chat_template = tok.chat_template.replace("'\\n' }}", "'\\n\\n' }}")
    tok.save_pretrained(adapter)
    manifest = artifacts.read_manifest(adapter)
    manifest["tokenizer"]["chat_template_sha256"] = artifacts.chat_template_sha256(tok)
    artifacts.write_manifest(adapter, manifest)
    merge(merge_config(lora_checkpoint=adapter, output_hf_path=tmp_path / "merged"))
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tok.chat_template
    assert "trained with a chat template other than the base's" in capsys.readouterr().err


# ChatML whose turns end with <|endoftext|> instead of <|im_end|> when rendered with plain_close=true: a template
# whose end of turn depends on the run's dataset.chat_template_kwargs.
KWARG_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{{ ('<|endoftext|>' if plain_close else '<|im_end|>') + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_merge_renders_with_the_chat_template_kwargs_training_recorded(lora_run, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from chatft.merge import probe_rows

    adapter = shutil.copytree(lora_run / "final", tmp_path / "adapter")
    manifest = artifacts.read_manifest(adapter)
    assert manifest["config"]["dataset"]["chat_template_kwargs"] == {}  # where training records them
    tok = AutoTokenizer.from_pretrained(adapter)
    tok.chat_template = KWARG_TEMPLATE
    tok.save_pretrained(adapter)
    manifest["tokenizer"]["chat_template_sha256"] = artifacts.chat_template_sha256(tok)
    manifest["config"]["dataset"]["chat_template_kwargs"] = {"plain_close": True}
    artifacts.write_manifest(adapter, manifest)
    end_of_text, im_end = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])

    # the probe rows are rendered as training rendered its rows
    assert all(end_of_text in row and im_end not in row for row in probe_rows(tok, {"plain_close": True})[:2])
    merge(merge_config(lora_checkpoint=adapter, output_hf_path=tmp_path / "merged"))
    # the base's EOS first, then the turn end the template writes under the recorded kwargs
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [im_end, end_of_text]


def test_bfloat16_output_and_auto_dtype(lora_run, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "merged-bf16"
    result = merge(merge_config(lora_checkpoint=lora_run, output_hf_path=out, torch_dtype="bf16"))
    assert result.dtype == "bfloat16" and result.max_abs_diff <= result.tolerance
    assert result.max_abs_diff > 0  # rounding to bfloat16 shows up, and stays within the tolerance
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    assert artifacts.checkpoint_dtype(out) == "bfloat16"


def test_a_merge_that_does_not_reproduce_the_logits_is_refused(lora_run, tmp_path, monkeypatch):
    monkeypatch.setattr(merge_module, "TOLERANCE", {"float32": -1.0, "float16": -1.0, "bfloat16": -1.0})
    out = tmp_path / "merged"
    err = refusal("merge_not_equivalent", lora_checkpoint=lora_run, output_hf_path=out)
    assert "probe rows" in err.message and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # the temporary dir is gone too


# --------------------------------------------------------------------------- inputs


def test_adapter_dir_or_run_dir(lora_run, tmp_path, tiny_model_dir):
    final = (lora_run / "final").resolve()
    assert artifacts.find_adapter_dir(lora_run) == final
    assert artifacts.find_adapter_dir(final) == final
    assert artifacts.find_adapter_dir(final / "adapter_config.json") == final
    # An unfinished run: its checkpoints hold resume state, not an adapter.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(lora_run / "checkpoints", unfinished / "checkpoints")
    assert sorted(p.name for p in (unfinished / "checkpoints").iterdir()) == ["LATEST", "step_2", "step_4"]
    for path in (unfinished, unfinished / "checkpoints" / "step_4"):
        err = refusal("adapter_not_found", lora_checkpoint=path, output_hf_path=tmp_path / "o")
        assert "adapter_config.json" in err.message and "resume state" in err.message
    err = refusal("adapter_not_found", lora_checkpoint=tiny_model_dir, output_hf_path=tmp_path / "o")
    assert "full model" in err.message
    assert "does not exist" in refusal("adapter_not_found", lora_checkpoint=tmp_path / "nope",
                                       output_hf_path=tmp_path / "o").message
    (tmp_path / "megatron" / "iter_0000100").mkdir(parents=True)
    refusal("route_not_supported", lora_checkpoint=tmp_path / "megatron", output_hf_path=tmp_path / "o")


def test_base_defaults_to_the_recorded_one_and_another_model_of_the_same_shape_is_refused(
        lora_run, tiny_model_dir, tiny_model_other_weights_dir, tmp_path):
    plan = plan_merge(merge_config(lora_checkpoint=lora_run, output_hf_path=tmp_path / "o"))
    assert plan.base == str(Path(tiny_model_dir).resolve())
    # A copy of the recorded base elsewhere is the same model.
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    assert plan_merge(merge_config(lora_checkpoint=lora_run, base_hf_path=copy, output_hf_path=tmp_path / "o")).base \
        == str(copy.resolve())
    err = refusal("base_model_mismatch", lora_checkpoint=lora_run, base_hf_path=tiny_model_other_weights_dir,
                  output_hf_path=tmp_path / "o")
    assert str(tiny_model_other_weights_dir) in err.message and str(Path(tiny_model_dir).resolve()) in err.message
    # Without a manifest, the base adapter_config.json names is compared instead.
    bare = shutil.copytree(lora_run / "final", tmp_path / "bare")
    (bare / artifacts.MANIFEST_FILE).unlink()
    err = refusal("base_model_mismatch", lora_checkpoint=bare, base_hf_path=tiny_model_other_weights_dir,
                  output_hf_path=tmp_path / "o")
    assert "adapter_config.json" in err.message and str(tiny_model_other_weights_dir) in err.message
    assert plan_merge(merge_config(lora_checkpoint=bare, base_hf_path=copy, output_hf_path=tmp_path / "o"))
    # The recorded base changed in place since training.
    moved = shutil.copytree(lora_run / "final", tmp_path / "moved")
    manifest = artifacts.read_manifest(moved)
    manifest["base_model"]["name_or_path"] = str(tiny_model_other_weights_dir)
    artifacts.write_manifest(moved, manifest)
    assert "has changed" in refusal("base_model_mismatch", lora_checkpoint=moved,
                                    output_hf_path=tmp_path / "o").message


def test_adapter_weights_must_fit_the_base_shapes(lora_run):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((lora_run / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"]
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ChatftError) as err:
        check_adapter_fits(other, lora_run / "final", strict=True)
    assert err.value.id == "base_model_mismatch" and "differ in size" in err.value.message
    one_layer = LlamaForCausalLM(LlamaConfig(vocab_size=1003, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ChatftError) as err:
        check_adapter_fits(one_layer, lora_run / "final", strict=True)
    assert "match no module" in err.value.message
    assert "strict=false" in check_adapter_fits(one_layer, lora_run / "final", strict=False)[0]


def test_output_must_not_overlap_the_inputs(lora_run, tiny_model_dir, tmp_path):
    final = lora_run / "final"
    for out in (final, final / "merged", lora_run, lora_run.parent, tiny_model_dir, tiny_model_dir / "merged"):
        err = refusal("output_path_overlaps_inputs", lora_checkpoint=lora_run, output_hf_path=out)
        assert str(out) in err.message
    # Existing output: only job.yaml (written by `chatft run`) counts as empty; the rest needs overwrite=true.
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.yaml").write_text("step: convert/merge_lora\n")
    assert plan_merge(merge_config(lora_checkpoint=lora_run, output_hf_path=out)).output == out.resolve()
    (out / "notes.txt").write_text("mine")
    assert "overwrite=true" in refusal("config_invalid", lora_checkpoint=lora_run, output_hf_path=out).hint
    assert "does not hold a model" in refusal("config_invalid", lora_checkpoint=lora_run, output_hf_path=out,
                                              overwrite=True).message
    refusal("config_invalid", lora_checkpoint=lora_run, output_hf_path=tmp_path / "o", safe_serialization=False)


def test_overwrite_replaces_an_earlier_merge_and_keeps_this_job_yaml(lora_run, merged, tmp_path):
    out = shutil.copytree(merged[1], tmp_path / "merged")
    (out / "stale.txt").write_text("from before")
    (out / "job.yaml").write_text("step: convert/merge_lora\n")
    merge(merge_config(lora_checkpoint=lora_run, output_hf_path=out, overwrite=True))
    assert not (out / "stale.txt").exists() and (out / "job.yaml").read_text() == "step: convert/merge_lora\n"
    assert artifacts.read_manifest(out)["kind"] == "merged"


def test_unvalidated_adapters_warn_or_are_refused(lora_run, tmp_path):
    plan = plan_merge(merge_config(lora_checkpoint=lora_run, output_hf_path=tmp_path / "o"))
    assert len(plan.warnings) == 1 and plan.warnings[0].startswith("[adapter_not_validated]")
    refusal("adapter_not_validated", lora_checkpoint=lora_run, output_hf_path=tmp_path / "o", require_validated=True)
    validated = shutil.copytree(lora_run / "final", tmp_path / "validated")
    manifest = artifacts.read_manifest(validated)
    manifest["validations"] = [{"target": "adapter", "metrics": {"loss": 1.0}}]
    artifacts.write_manifest(validated, manifest)
    plan = plan_merge(merge_config(lora_checkpoint=validated, output_hf_path=tmp_path / "o", require_validated=True))
    assert plan.warnings == []


# --------------------------------------------------------------------------- configs and the command line


def test_upstream_merge_config_compiles_with_one_warning_per_megatron_key(monkeypatch):
    monkeypatch.setenv("RUNS_DIR", "/scratch/runs")
    monkeypatch.delenv("LORA_CHECKPOINT", raising=False)
    monkeypatch.delenv("MERGED_HF_PATH", raising=False)
    monkeypatch.setenv("BASE_HF_PATH", "/models/llama")
    compiled = compile_config(resolve_step("convert/merge_lora"), str(FIXTURES / "upstream_merge_lora.yaml"))
    cfg = compiled.validated
    assert (cfg.lora_checkpoint, cfg.base_hf_path, cfg.output_hf_path) == (
        "/scratch/runs/peft", "/models/llama", "/scratch/runs/merged")
    assert (cfg.backend, cfg.torch_dtype, cfg.device_map, cfg.strict) == ("auto", "bfloat16", "auto", True)
    warned = [line.split("`")[1].split(":")[0] for line in compiled.warnings]
    assert len(warned) == len(set(warned))  # one line per key
    assert set(warned) - {"base_megatron_path"} == {"upstream_script", "hf_model_id", "hf_model_path",
                                                    "output_megatron_path", "export_hf", "cpu", "tp", "pp", "ep",
                                                    "nproc_per_node", "debug"}
    assert all("Megatron-Bridge only" in line for line in compiled.warnings)
    with pytest.raises(ChatftError) as err:
        compile_config(resolve_step("convert/merge_lora"), str(FIXTURES / "upstream_merge_lora.yaml"),
                       ["backend=megatron_bridge"])
    assert err.value.id == "route_not_supported" and "Megatron-Bridge" in err.value.message


def test_cli_merges_and_refuses(lora_run, tiny_model_dir, tiny_model_other_weights_dir, tmp_path):
    out = tmp_path / "merged"
    result = chatft("run", "convert/merge_lora", f"lora_checkpoint={lora_run}", f"base_hf_path={tiny_model_dir}",
                    f"output_hf_path={out}", "show_progress=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"done: merged model in {out}" in result.stdout and "tolerance" in result.stdout
    assert "warning: [adapter_not_validated]" in result.stderr
    assert {"job.yaml", "model.safetensors", "config.json", "chatft_manifest.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()}
    stderr = assert_error_block(chatft("run", "convert/merge_lora", f"lora_checkpoint={lora_run}",
                                       f"base_hf_path={tiny_model_other_weights_dir}",
                                       f"output_hf_path={tmp_path / 'other'}", cwd=tmp_path), "base_model_mismatch")
    assert str(tiny_model_other_weights_dir) in stderr
    # (An output that contains the run dir: `chatft run` writes job.yaml into the output before the step.)
    assert_error_block(chatft("run", "convert/merge_lora", f"lora_checkpoint={lora_run}",
                              f"output_hf_path={lora_run.parent}", cwd=tmp_path), "output_path_overlaps_inputs")
    assert_error_block(chatft("run", "convert/merge_lora", f"lora_checkpoint={lora_run}", "output_hf_path=o",
                              "backend=megatron_bridge", cwd=tmp_path), "route_not_supported")


def test_merge_progress_over_its_check_in_json_lines_plain_lines_and_quiet(lora_run, tmp_path):
    def run(name: str, *flags: str):
        result = chatft(*flags, "run", "convert/merge_lora", f"lora_checkpoint={lora_run}",
                        f"output_hf_path={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    result = run("json", "--log-format", "json")
    out = [json.loads(line) for line in result.stdout.splitlines()]
    [json.loads(line) for line in result.stderr.splitlines()]  # transformers' own bars stay off: only JSON lines
    progress = {e["task"]: e for e in out if e["event"] == "progress"}
    rows = len(merge_module.PROBE_CONVERSATIONS)
    assert {task: (e["done"], e["total"], e["unit"]) for task, e in progress.items() if "check" in task} == {
        "merge check (base + adapter)": (2 * rows, 2 * rows, "rows"),  # the reference, and the base alone
        "merge check (merged model)": (rows, rows, "rows")}
    layers = progress["merging LoRA layers"]
    assert layers["done"] == layers["total"] > 0 and layers["unit"] == "layers"
    assert not [e for e in json_lines_of(run("quiet", "--quiet", "--log-format", "json")) if e["event"] == "progress"]
    plain = run("plain")  # not a terminal: lines only, no bar redrawn in place (transformers' included)
    assert "\r" not in plain.stdout + plain.stderr and "done: merged model" in plain.stdout


def json_lines_of(result) -> list[dict]:
    return [json.loads(line) for line in (result.stdout + result.stderr).splitlines()]
