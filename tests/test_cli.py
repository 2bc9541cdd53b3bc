"""The `chatft` command line, run as a subprocess exactly as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from clirun import assert_error_block
from clirun import run_chatft as chatft

from chatft import __version__

FIXTURES = Path(__file__).parent / "fixtures" / "automodel"


def test_help_and_version():
    result = chatft("--help")
    assert result.returncode == 0
    for command in ("run", "steps", "prep", "preview", "plan"):
        assert command in result.stdout
    version = chatft("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"chatft {__version__}"


def test_help_and_steps_list_do_not_import_torch():
    probe = (
        "import sys\n"
        "from chatft.cli import app\n"
        "for argv in (['--help'], ['steps', 'list'], ['steps', 'show', 'peft/automodel', '--json']):\n"
        "    try:\n"
        "        app(argv, standalone_mode=True)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'datasets') if m in sys.modules]\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stderr, result.stderr


def test_steps_list_table_and_json_shape():
    table = chatft("steps", "list")
    assert table.returncode == 0
    for step_id in ("data_prep/chat_jsonl", "sft/automodel", "peft/automodel", "convert/merge_lora", "eval/model_eval"):
        assert step_id in table.stdout
    steps = json.loads(chatft("steps", "list", "--json").stdout)
    assert len(steps) == 5
    for step in steps:
        assert set(step) == {"id", "name", "category", "description", "tags", "consumes", "produces", "parameters"}
        for port in step["consumes"] + step["produces"]:
            assert set(port) == {"type", "required", "description"}
        for parameter in step["parameters"]:
            assert set(parameter) == {"name", "default", "description", "choices"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--category", "peft"], ["peft/automodel"]),
        (["--consumes", "checkpoint_lora"], ["convert/merge_lora", "eval/model_eval"]),
        (["--produces", "eval_results"], ["eval/model_eval"]),
        (["--consumes", "training_jsonl", "--produces", "checkpoint_lora"], ["peft/automodel", "sft/automodel"]),
    ],
)
def test_steps_list_filters(args, expected):
    result = chatft("steps", "list", "--json", *args)
    assert [s["id"] for s in json.loads(result.stdout)] == expected


def test_steps_show_text_and_json():
    text = chatft("steps", "show", "merge_lora")
    assert text.returncode == 0
    for section in ("consumes", "produces", "parameters", "strategies", "errors", "base_model_mismatch"):
        assert section in text.stdout
    details = json.loads(chatft("steps", "show", "peft/automodel", "--json").stdout)
    assert details["id"] == "peft/automodel"
    assert {"strategies", "errors", "configs"} <= set(details)
    assert any(e["id"] == "oom" for e in details["errors"])
    assert {"when", "then"} == set(details["strategies"][0])


def test_unknown_step_is_an_error_block_with_suggestions():
    stderr = assert_error_block(chatft("steps", "show", "peft/automdel"), "config_invalid")
    assert "did you mean peft/automodel" in stderr
    assert_error_block(chatft("run", "merge-lora", "--dry-run"), "config_invalid")


def test_unknown_artifact_type_filter_is_an_error_block():
    assert_error_block(chatft("steps", "list", "--consumes", "checkpoint_loar"), "config_invalid")


def test_dry_run_prints_the_compiled_config_and_writes_nothing(tmp_path):
    result = chatft("run", "peft/automodel", "-c", "tiny", "--dry-run", "peft.dim=8", "step_scheduler.max_steps=3",
                    cwd=tmp_path, env={"CHATFT_RUNS_DIR": str(tmp_path / "runs")})
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []
    assert "# gradient accumulation: 4 micro-batches" in result.stdout
    compiled = yaml.safe_load(result.stdout)
    assert compiled["peft"]["dim"] == 8
    assert compiled["step_scheduler"]["max_steps"] == 3
    assert compiled["checkpoint"]["checkpoint_dir"] == str(tmp_path / "runs" / "tiny-peft")
    assert compiled["model"]["torch_dtype"] == "float32"


def test_secrets_never_reach_the_terminal_or_job_yaml(tmp_path):
    default = Path(__file__).parents[1] / "src/chatft/steps/sft/automodel/config/default.yaml"
    config = tmp_path / "secret.yaml"
    config.write_text(
        f"defaults: {default}\n"
        "run:\n  env:\n    hf_token: ${oc.env:MY_HF_TOKEN}\n"
        "mlflow:\n  experiment_name: exp\n  tags:\n    apiKey: ${oc.env:MY_HF_TOKEN}\n    team: chat\n"
        f"checkpoint:\n  checkpoint_dir: {tmp_path / 'run'}\n"
        f"model:\n  pretrained_model_name_or_path: {tmp_path}\n"  # a folder that exists: the model is not loaded
    )
    env = {"MY_HF_TOKEN": "s3cr3t-value"}
    args = ["run", "sft/automodel", "-c", str(config), "mlflow.tags.db_password=hunter2"]
    dry = chatft(*args, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "`run.env.hf_token: ******` does not apply" in dry.stderr
    compiled = yaml.safe_load(dry.stdout)
    assert compiled["mlflow"]["tags"] == {"apiKey": "******", "team": "chat", "db_password": "******"}
    # a run that gets as far as writing job.yaml (and then stops at the model folder, which holds no model)
    started = chatft(*args, "run.env.hf_token=hunter2", env={**env, "MLFLOW_TRACKING_URI": ""})
    assert started.returncode == 2
    job_text = (tmp_path / "run" / "job.yaml").read_text()
    for output in (dry.stdout, dry.stderr, started.stderr, job_text):
        assert "s3cr3t-value" not in output and "hunter2" not in output
    job = yaml.safe_load(job_text)
    assert "run.env.hf_token=******" in job["argv"]
    assert job["raw"]["run"]["env"]["hf_token"] == "******"
    bad = chatft("run", "sft/automodel", "-c", str(config), "--dry-run", "mlflow.tags.api_token=[1,2]", env=env)
    assert "[1, 2]" not in assert_error_block(bad, "config_invalid")


def test_peft_null_override_gives_full_sft(tmp_path):
    result = chatft("run", "sft/automodel", "-c", str(FIXTURES / "llm_chat_peft.yaml"), "--dry-run", "peft=null")
    assert result.returncode == 0, result.stderr
    assert "# mode: full SFT" in result.stdout
    assert yaml.safe_load(result.stdout)["peft"] is None


def test_automodel_config_prints_one_warning_line_per_setting():
    result = chatft("run", "sft/automodel", "-c", str(FIXTURES / "step_catalog_sft.yaml"), "--dry-run")
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert result.returncode == 0, result.stderr
    assert len(warnings) == 4
    assert any("`model.backend.attn: te`" in w for w in warnings)
    # FSDP2Config names the strategy, which 16 processes run as it says: no warning about it
    assert not any("distributed.strategy" in w for w in warnings)
    compiled = yaml.safe_load(result.stdout)
    assert compiled["run"]["env"]["nodes"] == 2 and compiled["distributed"]["strategy"] == "fsdp2"


def test_unknown_targets_are_refused_from_the_cli():
    stderr = assert_error_block(chatft("run", "sft/automodel", "-c", str(FIXTURES / "foreign_targets.yaml"),
                                       "--dry-run"), "unsupported_target")
    assert "subprocess.run" in stderr


def test_invalid_keys_are_listed_at_once():
    stderr = assert_error_block(chatft("run", "peft/automodel", "--dry-run", "peft.rank=8", "optimizer.learning_rate=1",
                                       "step_scheduler.global_batch_size=30"), "config_invalid")
    assert "unknown key `peft.rank`" in stderr
    assert "unknown key `optimizer.learning_rate`" in stderr


def test_missing_config_name_lists_the_step_configs():
    stderr = assert_error_block(chatft("run", "peft/automodel", "-c", "tinyy", "--dry-run"), "config_invalid")
    assert "did you mean tiny" in stderr


def test_real_run_writes_job_yaml_before_the_step_starts(tmp_path, tiny_model_dir):
    # The data path is wrong: the step refuses, but only after the run recorded its job.
    runs = tmp_path / "runs"
    result = chatft("run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={tiny_model_dir}",
                    "optimizer.lr=3e-4", "dataset.path_or_dataset_id=missing.jsonl", cwd=tmp_path,
                    env={"CHATFT_RUNS_DIR": str(runs)})
    assert_error_block(result, "dataset_not_found")
    job = yaml.safe_load((runs / "tiny-peft" / "job.yaml").read_text())
    assert job["step"] == "peft/automodel"
    assert job["argv"][:4] == ["run", "peft/automodel", "-c", "tiny"]
    assert job["raw"]["checkpoint"]["checkpoint_dir"] == "${oc.env:CHATFT_RUNS_DIR,runs}/tiny-peft"
    assert job["resolved"]["checkpoint"]["checkpoint_dir"] == str(runs / "tiny-peft")
    assert job["resolved"]["optimizer"]["lr"] == 3e-4
    assert {"chatft", "python", "torch", "transformers", "peft"} <= set(job["versions"])
    assert "cuda_available" in job["host"]


def test_merge_refusals_come_before_anything_is_written(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    result = chatft("run", "merge_lora", f"lora_checkpoint={adapter}", f"output_hf_path={adapter / 'merged'}",
                    cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert list(adapter.iterdir()) == []


def test_nproc_per_node_sets_the_data_parallel_size():
    result = chatft("run", "sft/automodel", "--dry-run", "--nproc-per-node", "4")
    assert "x data-parallel 4 = global batch 32" in result.stdout and result.returncode == 0, result.stderr
    stderr = assert_error_block(chatft("run", "sft/automodel", "--dry-run", "--nproc-per-node", "3"), "config_invalid")
    assert "data-parallel size (3)" in stderr


def test_prep_shorthand_compiles_the_data_prep_step(tmp_path):
    result = chatft("prep", "raw data.json", "-o", str(tmp_path / "out.jsonl"), "--format", "sharegpt",
                    "--val-fraction", "0.1", "--dry-run")
    assert result.returncode == 0, result.stderr
    compiled = yaml.safe_load(result.stdout)
    assert compiled["input"] == "raw data.json"
    assert compiled["format"] == "sharegpt" and compiled["val_fraction"] == 0.1
    assert_error_block(chatft("prep", "x.json", "-o", "o.jsonl", "--format", "csv", "--dry-run"), "config_invalid")


def test_an_output_folder_under_a_regular_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "somefile.txt").write_text("not a folder\n")
    (tmp_path / "rows.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                         '{"role": "assistant", "content": "hello"}]}\n')
    for result in (
        chatft("run", "sft/automodel", "checkpoint.checkpoint_dir=somefile.txt/run",
               "dataset.path_or_dataset_id=rows.jsonl", f"model.pretrained_model_name_or_path={tmp_path}",
               cwd=tmp_path),
        chatft("prep", "rows.jsonl", "-o", "somefile.txt/out.jsonl", cwd=tmp_path),
        chatft("prep", "rows.jsonl", "-o", "somefile.txt/deeper/out.jsonl", cwd=tmp_path),
    ):
        stderr = assert_error_block(result, "config_invalid")
        assert "somefile.txt/" in stderr and f"{tmp_path / 'somefile.txt'} is a file" in stderr
    assert (tmp_path / "somefile.txt").read_text() == "not a folder\n"


def test_a_missing_local_model_path_is_named_as_a_path_without_asking_the_hub(tmp_path):
    for value in ("./no/such/dir", "no/such/dir", str(tmp_path / "nope"), "~/no-such-chatft-model"):
        result = chatft("run", "sft/automodel", f"model.pretrained_model_name_or_path={value}",
                        f"checkpoint.checkpoint_dir={tmp_path / 'run'}", cwd=tmp_path)
        stderr = assert_error_block(result, "config_invalid")
        assert f"model.pretrained_model_name_or_path={value}" in stderr and "does not exist" in stderr
        assert "Repo id must be" not in stderr and "huggingface.co" not in stderr
        assert not (tmp_path / "run").exists()  # refused before job.yaml is written


def test_an_uncached_hub_model_offline_is_refused_at_once(tmp_path):
    result = chatft("run", "sft/automodel", "model.pretrained_model_name_or_path=some-org/not-cached-model",
                    f"checkpoint.checkpoint_dir={tmp_path / 'run'}", cwd=tmp_path,
                    env={"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub")})
    stderr = assert_error_block(result, "config_invalid")
    assert "some-org/not-cached-model" in stderr and "HF_HUB_OFFLINE" in stderr and "not in the local" in stderr
    assert "Retrying" not in stderr
    assert not (tmp_path / "run").exists()


def test_hugging_face_trainer_argument_names_get_chatft_keys():
    stderr = assert_error_block(chatft("run", "sft/automodel", "--dry-run", "learning_rate=1e-4",
                                       "optimizer.learning_rate=1e-4", "num_train_epochs=2", "output_dir=out",
                                       "step_scheduler.gradient_accumulation_steps=4", "weight_decay=0.1",
                                       "mlflow.tags.learning_rate=x"), "config_invalid")
    assert "unknown key `learning_rate`" in stderr
    assert "`learning_rate` is `optimizer.lr`" in stderr
    assert "`optimizer.learning_rate` is `optimizer.lr`" in stderr
    assert "`num_train_epochs` is `step_scheduler.num_epochs`" in stderr
    assert "`output_dir` is `checkpoint.checkpoint_dir`" in stderr
    # accumulation is not a key: it follows from the batch sizes
    assert "`step_scheduler.gradient_accumulation_steps`" in stderr and "global_batch_size" in stderr
    assert "unknown key `weight_decay` (did you mean optimizer.weight_decay?)" in stderr  # the schema's own suggestion
    assert "mlflow.tags.learning_rate" not in stderr  # tags may hold any name
