"""Experiment trackers for real: one `chatft run` logs to TensorBoard, to an offline W&B run and to a local MLflow
store, and each is read back with that tracker's own reader (tensorboard's EventAccumulator, W&B's record format
through its protobuf schema, MlflowClient). A section that resolves to null is off with one line, a missing extra
is a named error before the model loads, and a tracker that fails mid-run is reported once while training
finishes."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
from clirun import assert_error_block, run_chatft
from conftest import load_module_from_path

from chatft.errors import ChatftError
from chatft.run_layout import METRICS_FILE, TENSORBOARD_DIR, VALIDATION_FILE
from chatft.train.loop import Trainer
from chatft.train.step import train

helpers = load_module_from_path("chatft_tests_train_rows", Path(__file__).parent / "fixtures" / "train_rows.py")

ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(12)]
SECRET = "s3cr3t-tag-value"
# W&B offline, MLflow's file store allowed, and nothing from the caller's environment picks another project/server.
TRACKER_ENV = {"WANDB_MODE": "offline", "WANDB_PROJECT": "", "WANDB_SILENT": "true", "MLFLOW_TRACKING_URI": "",
               "MLFLOW_ALLOW_FILE_STORE": "true"}


def write_data(work: Path) -> None:
    (work / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (work / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS[:4]))


def tiny_run_args(model_dir: Path, *extra: str) -> list[str]:
    """Three LoRA steps of the tiny config on the tiny model, validated at steps 2 and 3, into `run/`."""
    return ["run", "peft/automodel", "-c", "tiny", f"model.pretrained_model_name_or_path={model_dir}",
            "dataset.path_or_dataset_id=train.jsonl", "validation_dataset.path_or_dataset_id=val.jsonl",
            "checkpoint.checkpoint_dir=run", "dataset.seq_length=128", "step_scheduler.global_batch_size=4",
            "step_scheduler.max_steps=3", "step_scheduler.val_every_steps=2", *extra]


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, tmp_path_factory) -> Path:
    """One CLI run logging to all three trackers; returns the work dir (run in `run/`, MLflow store in `mlruns/`)."""
    work = tmp_path_factory.mktemp("trackers")
    write_data(work)
    result = run_chatft(*tiny_run_args(tiny_model_dir, "logging.tensorboard=true", "wandb.project=chatft-tests",
                                       "wandb.tags=[tiny,lora]", "wandb.group=trackers",
                                       f"mlflow.tracking_uri=file:{work / 'mlruns'}", "mlflow.experiment_name=chatft",
                                       "mlflow.tags.team=chat", f"mlflow.tags.api_key={SECRET}"),
                        cwd=work, env=TRACKER_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    tracking = [line for line in result.stdout.splitlines() if line.startswith("tracking: ")]
    assert [line.split(",")[0] for line in tracking] == ["tracking: tensorboard", "tracking: wandb", "tracking: mlflow"]
    assert "offline in " in tracking[1] and f"at file:{work / 'mlruns'}" in tracking[2]
    assert "warning" not in result.stderr and SECRET not in result.stdout + result.stderr
    return work


def no_file_holds(folder: Path, secret: str) -> None:
    for path in folder.rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path


def logged(run: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    validations = [json.loads(line) for line in (run / VALIDATION_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and [v["step"] for v in validations] == [2, 3]
    return rows, validations


def test_tensorboard_event_files_hold_every_step(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    run = tracked / "run"
    rows, validations = logged(run)
    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    for prefix, expected, keys in (("train", rows, ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb")),
                                   ("validation", validations, ("loss", "token_accuracy", "tokens"))):
        for key in keys:
            points = [(e.step, e.value) for e in events.Scalars(f"{prefix}/{key}")]
            assert points == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in expected], (prefix, key)

    def text(tag: str) -> str:
        (event,) = events.Tensors(f"{tag}/text_summary")
        return tensor_util.make_ndarray(event.tensor_proto).item().decode()

    config = text("config")
    assert "peft:" in config and "api_key: '******'" in config
    no_file_holds(run / TENSORBOARD_DIR, SECRET)
    assert text("final_artifact") == str((run / "final").resolve())


def wandb_records(run_file: Path) -> list:
    """The records of a `.wandb` file, parsed with W&B's own protobuf schema. The file is W&B's LevelDB-style log:
    a 7-byte header, then 32 KiB blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle,
    4 last); a block's tail shorter than a chunk header is padding."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def item_key(item) -> str:
    """A history, summary or config item's name: W&B writes it as `key` or as the path `nested_key`."""
    return item.key or ".".join(item.nested_key)


def test_wandb_offline_run_holds_config_steps_and_artifact(tracked):
    run = tracked / "run"
    rows, validations = logged(run)
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    no_file_holds(run / "wandb", SECRET)  # nor its record of the command line
    records = wandb_records(run_file)
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.project, info.display_name, list(info.tags), info.run_group) == ("chatft-tests", "run",
                                                                                  ["tiny", "lora"], "trackers")
    config = {item_key(item): json.loads(item.value_json) for item in info.config.update}
    assert config["peft"]["dim"] == 16 and config["mlflow"]["tags"] == {"team": "chat", "api_key": "******"}
    history: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item_key(item): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    for prefix, expected in (("train", rows), ("validation", validations)):
        for row in expected:
            for key in ("loss", "tokens") + (("lr", "grad_norm") if prefix == "train" else ("token_accuracy",)):
                assert history[row["step"]][f"{prefix}/{key}"] == pytest.approx(row[key], rel=1e-9), (prefix, key)
    summary = {item_key(item): json.loads(item.value_json) for r in records
               if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert summary["final_artifact"] == str((run / "final").resolve())
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 0


def test_mlflow_file_store_holds_config_steps_and_artifact(tracked, monkeypatch, tmp_path):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run = tracked / "run"
    rows, validations = logged(run)
    client = MlflowClient(tracking_uri=f"file:{tracked / 'mlruns'}")
    (found,) = client.search_runs([client.get_experiment_by_name("chatft").experiment_id])
    assert found.info.run_name == "run" and found.info.status == "FINISHED"
    assert found.data.tags["team"] == "chat" and found.data.tags["api_key"] == "******"
    assert found.data.tags["final_artifact"] == str((run / "final").resolve())
    params = found.data.params
    assert params["peft.dim"] == "16" and params["dataset.path_or_dataset_id"] == "train.jsonl"
    assert params["mlflow.tags.api_key"] == "******"
    for prefix, expected, key in (("train", rows, "loss"), ("train", rows, "lr"),
                                  ("validation", validations, "loss"), ("validation", validations, "token_accuracy")):
        history = client.get_metric_history(found.info.run_id, f"{prefix}/{key}")
        assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r[key])) for r in expected]
    config = Path(client.download_artifacts(found.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "experiment_name: chatft" in config
    no_file_holds(tracked / "mlruns", SECRET)


def test_an_eval_sends_every_target_to_the_trackers(tracked, tiny_model_dir, monkeypatch, tmp_path):
    """`chatft run eval/model_eval` with training's tracker sections: one run per tracker holding each target's
    metrics as eval/<target>/<metric> and the results' path; MLflow params split one level deep
    (`mlflow.flatten_depth=1`), and AutoModel's `mlflow.resume` warned about once (an eval has no run to continue)."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    result = run_chatft("run", "eval/model_eval", "targets=[base,adapter]", f"base={tiny_model_dir}", "adapter=run",
                        "dataset.path_or_dataset_id=val.jsonl", "dataset.seq_length=128", "generation.num_prompts=1",
                        "generation.max_new_tokens=4", "generation.scoring=contains", "torch_dtype=float32",
                        "output_dir=evals/first", "logging.tensorboard=true", "wandb.project=chatft-tests",
                        f"mlflow.tracking_uri=file:{tracked / 'mlruns'}", "mlflow.experiment_name=chatft-evals",
                        "mlflow.flatten_depth=1", "mlflow.resume=true", "mlflow.tags.team=chat",
                        cwd=tracked, env=TRACKER_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.count("warning: `mlflow.resume: true` does not apply: each eval starts an MLflow run") == 1
    assert result.stderr.count("warning:") == 1
    out = tracked / "evals" / "first"
    results_file = (out / "eval_results.json").resolve()
    results = json.loads(results_file.read_text())
    expected = {(name, key): value for name, target in results["targets"].items()
                for key, value in target["metrics"].items()}
    assert {name for name, _ in expected} == {"base", "adapter"}
    assert {"loss", "perplexity", "token_accuracy", "contains", "supervised_tokens"} <= {key for _, key in expected}

    events = EventAccumulator(str(out / TENSORBOARD_DIR))
    events.Reload()
    for (name, key), value in expected.items():
        assert [(e.step, e.value) for e in events.Scalars(f"eval/{name}/{key}")] == \
            [(0, pytest.approx(value, rel=1e-6))], (name, key)
    (artifact,) = events.Tensors("final_artifact/text_summary")
    assert tensor_util.make_ndarray(artifact.tensor_proto).item().decode() == str(results_file)

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert info.display_name == "first"
    (history,) = [{item_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
                  if r.WhichOneof("record_type") == "history"]
    assert history["_step"] == 0
    for (name, key), value in expected.items():
        assert history[f"eval/{name}/{key}"] == pytest.approx(value, rel=1e-9), (name, key)

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{tracked / 'mlruns'}")
    (found,) = client.search_runs([client.get_experiment_by_name("chatft-evals").experiment_id])
    assert found.info.run_name == "first" and found.info.status == "FINISHED"
    assert found.data.tags["final_artifact"] == str(results_file) and found.data.tags["team"] == "chat"
    for (name, key), value in expected.items():
        history = client.get_metric_history(found.info.run_id, f"eval/{name}/{key}")
        assert [(m.step, m.value) for m in history] == [(0, pytest.approx(value))], (name, key)
    params = found.data.params
    assert params["qlora_base"] == "as_trained" and params["generation.max_new_tokens"] == "4"
    assert json.loads(params["mlflow.tags"]) == {"team": "chat"} and "mlflow.tags.team" not in params
    assert "mlflow.resume" not in params


def block(package: str, folder: Path) -> dict[str, str]:
    """The environment of a process in which `package` cannot be imported, as where its extra is not installed."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(f"import sys\nsys.modules[{package!r}] = None\n")
    return {"PYTHONPATH": str(folder)}


def test_a_missing_extra_is_named_before_the_model_loads(tmp_path):
    """The model dir is empty: loading anything before the check would fail with another error."""
    (tmp_path / "empty-model").mkdir()
    write_data(tmp_path)
    result = run_chatft(*tiny_run_args(tmp_path / "empty-model", "wandb.project=p"), cwd=tmp_path,
                        env={**TRACKER_ENV, **block("wandb", tmp_path / "blocker")})
    stderr = assert_error_block(result, "config_invalid")
    assert "the `wandb` section turns on wandb logging, but wandb is not installed" in stderr
    assert "hint: pip install 'chatft[wandb]', or set wandb=null" in stderr


@pytest.mark.parametrize("setting, package, turn_off", [({"logging__tensorboard": True}, "tensorboard",
                                                          "logging.tensorboard=false"),
                                                         ({"wandb": {"project": "p"}}, "wandb", "wandb=null"),
                                                         ({"mlflow": {"tracking_uri": "http://127.0.0.1:9"}}, "mlflow",
                                                          "mlflow=null")])
def test_each_missing_extra_is_refused_before_training_sets_up(tiny_model_dir, tmp_path, monkeypatch, setting,
                                                               package, turn_off):
    monkeypatch.setitem(sys.modules, package, None)
    monkeypatch.setattr(Trainer, "setup", lambda *args, **kwargs: pytest.fail("refused only after loading"))
    with pytest.raises(ChatftError) as err:
        train(helpers.training_config(tiny_model_dir, tmp_path, **setting), tmp_path)
    assert err.value.id == "config_invalid" and err.value.hint == f"pip install 'chatft[{package}]', or set {turn_off}"


def test_a_section_that_resolves_to_null_is_off_with_one_line(tiny_model_dir, tokenizer, tmp_path, monkeypatch,
                                                              capsys):
    """Upstream configs read the project and the tracking URI from the environment; unset, the tracker is off."""
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = helpers.training_config(tiny_model_dir, tmp_path / "run", step_scheduler__max_steps=1,
                                  wandb={"project": None, "name": "x"}, mlflow={"experiment_name": "e"})
    train(cfg, tmp_path / "run", helpers.prepared(helpers.chat_rows(tokenizer, 4)), tokenizer=tokenizer)
    out = capsys.readouterr().out
    assert out.count("info: W&B logging is off: wandb.project is null and WANDB_PROJECT is not set\n") == 1
    assert out.count("info: MLflow logging is off: mlflow.tracking_uri is null and MLFLOW_TRACKING_URI is not "
                     "set\n") == 1
    assert "tracking:" not in out
    assert not (tmp_path / "run" / "wandb").exists() and not (tmp_path / "mlruns").exists()


def test_a_tracker_failing_mid_run_is_reported_once_and_training_finishes(tiny_model_dir, tokenizer, tmp_path,
                                                                          monkeypatch, capsys):
    """MLflow's client loses its server at step 2: one warning, no more MLflow calls, TensorBoard and training go
    on to the end."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    real_log_batch, metric_calls = MlflowClient.log_batch, []

    def log_batch(self, run_id, metrics=(), params=(), tags=(), synchronous=None):
        if metrics:
            metric_calls.append(metrics[0].step)
            if metrics[0].step >= 2:
                raise ConnectionError("Connection refused: the tracking server went away")
        return real_log_batch(self, run_id, metrics=metrics, params=params, tags=tags, synchronous=synchronous)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    store = f"file:{tmp_path / 'mlruns'}"
    cfg = helpers.training_config(tiny_model_dir, tmp_path / "run", step_scheduler__max_steps=4,
                                  logging__tensorboard=True, mlflow={"tracking_uri": store})
    result = train(cfg, tmp_path / "run", helpers.prepared(helpers.chat_rows(tokenizer, 8)), tokenizer=tokenizer)
    captured = capsys.readouterr()
    assert captured.err.count("warning: mlflow failed at step 2 (ConnectionError: Connection refused: the tracking "
                              "server went away); it records nothing more of this run, training goes on\n") == 1
    assert captured.err.count("warning:") == 1 and metric_calls == [1, 2]
    assert result.steps == 4 and (tmp_path / "run" / "final" / "chatft_manifest.json").exists()
    assert len((tmp_path / "run" / METRICS_FILE).read_text().splitlines()) == 4
    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    client = MlflowClient(tracking_uri=store)
    (found,) = client.search_runs(["0"])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")] == [1]


def test_two_processes_make_one_tracker_run(tiny_model_dir, tmp_path, monkeypatch):
    """Rank 0 alone logs: one event file, one W&B run and one MLflow run, each with every step."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_data(tmp_path)
    result = run_chatft(*tiny_run_args(tiny_model_dir, "validation_dataset=null", "logging.tensorboard=true",
                                       "wandb.project=chatft-tests", f"mlflow.tracking_uri=file:{tmp_path / 'mlruns'}",
                                       "--nproc-per-node", "2"), cwd=tmp_path, env=TRACKER_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "run"
    assert len(list((run / TENSORBOARD_DIR).iterdir())) == 1
    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert len(list((run / "wandb").glob("offline-run-*/run-*.wandb"))) == 1
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    (found,) = client.search_runs(["0"])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")] == [1, 2, 3]


def test_a_resumed_run_continues_its_tracker_runs(tiny_model_dir, tokenizer, tmp_path, monkeypatch, capsys):
    """Three steps with a checkpoint at step 2, then the same run dir resumed from that checkpoint up to step 4:
    TensorBoard shows each step once, with the resumed attempt's step 3; MLflow and W&B go on in the runs the
    first attempt started (MLflow's history keeps both values of step 3); `mlflow.resume=false` starts anew."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for key, value in TRACKER_ENV.items():
        monkeypatch.setenv(key, value)
    store, run = f"file:{tmp_path / 'mlruns'}", tmp_path / "run"
    data = helpers.prepared(helpers.chat_rows(tokenizer, 8))

    def attempt(max_steps: int, **more) -> str:
        cfg = helpers.training_config(tiny_model_dir, run, step_scheduler__max_steps=max_steps,
                                      step_scheduler__ckpt_every_steps=2, lr_scheduler__lr_decay_style="constant",
                                      logging__tensorboard=True, wandb={"project": "chatft-tests"},
                                      mlflow={"tracking_uri": store}, **more)
        train(cfg, run, data, tokenizer=tokenizer)
        return capsys.readouterr().out

    attempt(3)
    first = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    kept = json.loads((run / "trackers.json").read_text())
    out = attempt(4, checkpoint__resume=str(run / "checkpoints" / "step_2"))
    assert f"tracking: tensorboard, {run / TENSORBOARD_DIR}, continued after step 2" in out
    assert "tracking: wandb, offline in " in out and f"continuing run {kept['wandb']['id']}" in out
    assert f"tracking: mlflow, run {kept['mlflow']['run_id']} at {store}, continued after step 2" in out
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[:2] == first[:2]

    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]

    client = MlflowClient(tracking_uri=store)
    (found,) = client.search_runs(["0"])
    assert found.info.run_id == kept["mlflow"]["run_id"] and found.info.status == "FINISHED"
    history = [(m.step, m.value) for m in client.get_metric_history(found.info.run_id, "train/loss")]
    assert sorted(history) == sorted((r["step"], r["loss"]) for r in first + rows[2:])
    assert found.data.params["step_scheduler.max_steps"] == "3"  # MLflow never changes a param
    assert {a.path for a in client.list_artifacts(found.info.run_id)} == {"config.yaml", "config.resumed-step_2.yaml"}

    run_files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2
    ids = {r.run.run_id for f in run_files for r in wandb_records(f) if r.WhichOneof("record_type") == "run"}
    assert ids == {kept["wandb"]["id"]}

    out = attempt(5, checkpoint__resume=str(run / "checkpoints" / "step_4"), mlflow__resume=False)
    assert len(client.search_runs(["0"])) == 2 and "continued" not in out.split("tracking: mlflow")[1]
