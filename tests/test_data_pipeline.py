"""Training data: rows → token ids + masks, every guard and drop, the length policy, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from chatft.config.schema import DatasetSection
from chatft.data.masks import MaskOptions, mask_by_prefix_rendering
from chatft.data.pipeline import prepare_training_data
from chatft.errors import ChatftError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def prepare(path, tokenizer, logs=None, **settings):
    section = DatasetSection(path_or_dataset_id=str(path), **settings)
    return prepare_training_data(section, tokenizer, log=(logs.append if logs is not None else lambda _: None))


def test_every_row_is_used_or_counted(tmp_path, tokenizer):
    rows = [
        chat("hello", "hi there"),
        "{not json",
        [1, 2],
        {"text": "no messages here"},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]},
        chat("a long question " * 40, "short"),
        chat("and another", "answer"),
    ]
    data = prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, seq_length=64)
    report = data.report
    assert report.rows_in == 8 and report.rows_used == 2
    assert report.dropped_by_reason == {"invalid_json": 1, "not_an_object": 1, "messages_missing": 1,
                                        "no_assistant": 1, "no_supervised_tokens": 1, "too_long": 1}
    assert report.examples_by_reason["too_long"] == [7]
    assert [row.source_row for row in data.rows] == [1, 8]
    assert report.over_length == 1
    assert report.supervised_tokens == sum(r.num_supervised for r in data.rows)


def test_truncate_cuts_and_never_to_zero_supervised(tmp_path, tokenizer):
    rows = [chat("q " * 5, "a long answer " * 30), chat("a long question " * 40, "short")]
    data = prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, seq_length=48, truncation="truncate")
    assert data.report.truncated == 1
    assert data.report.dropped_by_reason == {"truncated_to_no_supervised": 1}
    assert len(data.rows[0]) == 48 and data.rows[0].num_supervised > 0


def test_truncation_error_names_the_row(tmp_path, tokenizer):
    rows = [chat("q", "a"), chat("a long question " * 40, "short")]
    with pytest.raises(ChatftError) as err:
        prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, seq_length=48, truncation="error")
    assert err.value.id == "sequence_too_long"
    assert "row 2 " in err.value.message and "seq_length=48" in err.value.message


def test_nothing_to_learn_is_an_error(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "train": False}]}]
    with pytest.raises(ChatftError) as err:
        prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    assert err.value.id == "no_supervised_tokens"
    assert "1 no_supervised_tokens" in err.value.message


def test_missing_template_is_refused_unless_the_config_names_one(tmp_path, tiny_model_no_template_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("hello", "hi")])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_no_template_dir)
    with pytest.raises(ChatftError) as err:
        prepare(path, tokenizer)
    assert err.value.id == "chat_template_missing"
    assert "chatml" in err.value.hint
    data = prepare(path, tokenizer, chat_template="chatml")
    assert data.report.template_source == "bundled:chatml"
    assert data.report.mask_method == "generation_tags"
    assert "{% generation %}" not in tokenizer.chat_template  # what is saved with the model serves anywhere
    assert tokenizer.decode([t for t, m in zip(data.rows[0].input_ids, data.rows[0].loss_mask) if m]) == "hi<|im_end|>"


def test_template_from_a_file_and_inline(tmp_path, tiny_model_no_template_dir, tiny_model_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("hello", "hi")])
    template = AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    (tmp_path / "t.jinja").write_text(template)
    for value, source in ((str(tmp_path / "t.jinja"), "file:"), (template, "inline")):
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_no_template_dir)
        assert prepare(path, tokenizer, chat_template=value).report.template_source.startswith(source)


def test_end_of_turn_never_supervised_is_warned(tmp_path, tokenizer):
    no_eos = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    logs: list[str] = []
    prepare(write_jsonl(tmp_path / "d.jsonl", [chat("hello", "hi")]), tokenizer, logs, chat_template=no_eos)
    assert any(line.startswith("WARNING") and "never supervised" in line for line in logs)


def test_cache_is_reused_and_invalidated_by_a_template_change(tmp_path, tokenizer, tiny_model_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [chat("hello", "hi"), chat("q", "a")])
    logs: list[str] = []
    first = prepare(path, tokenizer, logs)
    second = prepare(path, tokenizer, logs)
    assert "from the tokenization cache" in logs[-1]
    assert [r.input_ids for r in first.rows] == [r.input_ids for r in second.rows]
    assert [r.loss_mask for r in first.rows] == [r.loss_mask for r in second.rows]
    assert second.report == first.report
    other = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    prepare(path, AutoTokenizer.from_pretrained(tiny_model_dir), logs, chat_template=other)
    assert "from the tokenization cache" not in logs[-1]
    prepare(path, tokenizer, logs, seq_length=1024)  # another setting: another entry
    assert "from the tokenization cache" not in logs[-1]
    path.write_text(path.read_text() + json.dumps(chat("new", "row")) + "\n")  # other data: another entry
    assert prepare(path, tokenizer, logs).report.rows_used == 3


def test_a_cache_entry_of_another_shape_is_rebuilt(tmp_path, tokenizer):
    from safetensors.numpy import load_file, save_file

    path = write_jsonl(tmp_path / "d.jsonl", [chat("hello", "hi")])
    logs: list[str] = []
    first = prepare(path, tokenizer, logs)
    (entry,) = (tmp_path / "cache" / "tokenized").glob("*.safetensors")  # as written before an array was added
    arrays = load_file(entry)
    del arrays["message"]
    save_file(arrays, entry)
    again = prepare(path, tokenizer, logs)
    assert "from the tokenization cache" not in logs[-1]
    assert [r.input_ids for r in again.rows] == [r.input_ids for r in first.rows]


def test_packed_parquet_is_refused_with_the_source_named(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "train.jsonl", [chat("q", "a")])  # the split's name: plausibly what was packed
    write_jsonl(tmp_path / "chat.jsonl", [chat("q", "a")])  # an unrelated file beside it is not named
    table = pa.table({"input_ids": [[1, 2, 3]], "loss_mask": [[0, 1, 1]], "seq_start_id": [[0]]})
    split_dir = tmp_path / "splits" / "train"
    split_dir.mkdir(parents=True)
    pq.write_table(table, split_dir / "shard_0.parquet")
    for location in (split_dir / "shard_0.parquet", split_dir, tmp_path / "splits" / "*" / "*.parquet"):
        with pytest.raises(ChatftError) as err:
            prepare(location, tokenizer)
        assert err.value.id == "packed_parquet_used_with_automodel"
        assert str(tmp_path / "train.jsonl") in err.value.hint and "Megatron-Bridge" in err.value.hint
        assert "chat.jsonl" not in err.value.hint


def test_rows_without_messages_get_the_prep_command(tmp_path, tokenizer):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    with pytest.raises(ChatftError) as err:
        prepare(path, tokenizer)
    assert err.value.id == "messages_missing"
    assert f"chatft prep {path} -o alpaca.messages.jsonl" in err.value.hint


def test_missing_path_is_not_found(tmp_path, tokenizer):
    with pytest.raises(ChatftError) as err:
        prepare(tmp_path / "nope.jsonl", tokenizer)
    assert err.value.id == "dataset_not_found"
    assert "nope.jsonl does not exist" in err.value.message


def test_real_chat_data_on_smollm2_tags_agree_with_prefix_rendering(tmp_path, smollm2_dir):
    """SmolLM2's own template is recognised and masked with chatft's tagged twin; on every real row the
    twin's masks equal those found by rendering prefixes of the original."""
    from chatft.data.formats import convert_row

    raw = json.loads((SHARED_DATA / "dummy_conversation.json").read_text())
    path = write_jsonl(tmp_path / "train.jsonl", [convert_row(r, "sharegpt").to_row() for r in raw])
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    data = prepare(path, tokenizer, seq_length=256)
    assert data.report.rows_used == len(raw) and data.report.mask_method == "generation_tags"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row, tokenized in zip(rows, data.rows):
        ids, mask = mask_by_prefix_rendering(tokenizer, tokenizer.chat_template, row["messages"], None, MaskOptions())
        assert (ids, mask) == (tokenized.input_ids, tokenized.loss_mask)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id == eos  # pad == eos, and yet every row's end-of-turn is supervised
    assert all(any(t == eos and m for t, m in zip(r.input_ids, r.loss_mask)) for r in data.rows)


def test_worker_processes_give_the_same_rows(tmp_path, tokenizer, monkeypatch):
    import chatft.data.pipeline as pipeline

    rows = [chat(f"question {i}", f"answer number {i}") for i in range(40)] + ["{broken"]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    serial = prepare(path, tokenizer)
    monkeypatch.setattr(pipeline, "PARALLEL_MIN_ROWS", 1)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    parallel = prepare_training_data(DatasetSection(path_or_dataset_id=str(path)), tokenizer, use_cache=False,
                                     log=lambda _: None)
    assert [(r.source_row, r.input_ids, r.loss_mask) for r in parallel.rows] == \
        [(r.source_row, r.input_ids, r.loss_mask) for r in serial.rows]
    assert parallel.report.dropped_by_reason == {"invalid_json": 1}


def test_an_end_of_turn_token_other_than_eos_counts_as_supervised(tmp_path, tokenizer):
    """Like Llama 3 (<|eot_id|> ends a turn, EOS is <|end_of_text|>): no false alarm about learning to stop."""
    tokenizer.eos_token = "<|endoftext|>"
    logs: list[str] = []
    prepare(write_jsonl(tmp_path / "d.jsonl", [chat("hello", "hi")]), tokenizer, logs)
    assert not any(line.startswith("WARNING") for line in logs)


def test_messages_that_is_not_a_list_is_named_with_what_it_is(tmp_path, tokenizer):
    with pytest.raises(ChatftError) as err:
        prepare(write_jsonl(tmp_path / "d.jsonl", [{"messages": "hello"}, {"messages": "again"}]), tokenizer)
    assert err.value.id == "messages_missing"
    assert "`messages` must be a list of {role, content} objects" in err.value.message
    assert 'row 1 it is a str: "hello"' in err.value.message
    assert '{"messages": [{"role": "user", "content": ' in err.value.hint


def test_unfilled_template_placeholders_are_counted_not_dropped(tmp_path, tokenizer):
    rows = [chat("Hello {{ name }}, how are you?", "Fine."), chat("plain", "row"), chat("a", "Dear {{user_name}}"),
            chat("code: {{ 1 + 2 }} and {x}", "not a placeholder")]
    logs: list[str] = []
    data = prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, logs)
    assert data.report.rows_used == 4 and data.report.dropped_by_reason == {}
    assert data.report.flagged_by_reason == {"template_placeholder": 2}
    assert data.report.flagged_examples_by_reason == {"template_placeholder": [1, 3]}
    assert any("2 rows contain an unfilled template placeholder such as {{ name }} (first rows: 1, 3)" in line
               for line in logs)


def test_not_utf8_lines_are_named_with_the_iconv_fix(tmp_path, tokenizer):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(chat("q", "a")) + "\n" + json.dumps(chat("café", "oui"), ensure_ascii=False)
                      + "\n").encode("latin-1"))
    logs: list[str] = []
    data = prepare(path, tokenizer, logs)
    assert data.report.dropped_by_reason == {"not_utf8": 1}
    assert any("not UTF-8" in line and "iconv -f" in line for line in logs)


@pytest.mark.parametrize("template", ["tagged", "untagged"])  # masks by generation tags, and by prefix rendering
def test_transformers_length_warning_is_silenced_where_chatft_counts_long_rows(tmp_path, tiny_model_dir, caplog,
                                                                               template):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.model_max_length = 16
    plain = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}[assistant]: {% endif %}")  # a template chatft has no tagged twin of
    settings = {} if template == "tagged" else {"chat_template": plain}
    data = prepare(write_jsonl(tmp_path / "d.jsonl", [chat("q", "a"), chat("a long question " * 40, "short")]),
                   tokenizer, seq_length=64, **settings)
    assert data.report.dropped_by_reason == {"too_long": 1}  # chatft's own account of the long row
    assert data.report.mask_method == ("generation_tags" if template == "tagged" else "prefix_rendering")

    def warned() -> bool:
        return any("Token indices sequence length" in record.getMessage() for record in caplog.records)

    assert not warned()
    tokenizer("word " * 40)  # elsewhere the warning is transformers' own business, and still shown
    assert warned()
