"""The demo's own dataset: valid chat rows, the same on every run, validation questions never trained on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from chatft.data.formats import convert_row

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "demo_data.py"


def load_script():
    spec = importlib.util.spec_from_file_location("chatft_demo_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_data_is_valid_deterministic_and_held_out(tmp_path):
    demo = load_script()
    train_path, val_path = demo.write(tmp_path / "a", 320)
    again, _ = demo.write(tmp_path / "b", 320)
    assert train_path.read_bytes() == again.read_bytes()
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    validation = [json.loads(line) for line in val_path.read_text().splitlines()]
    assert len(train) == 320 and len(validation) == 40
    for row in train + validation:
        assert convert_row(row, "messages").messages == row["messages"]  # passes every row guard unchanged
    trained_questions = {m["content"] for row in train for m in row["messages"] if m["role"] == "user"}
    held_out = {m["content"] for row in validation for m in row["messages"] if m["role"] == "user"}
    shared_on_purpose = {q for q, _ in demo.FOLLOW_UPS + demo.GENERAL}
    assert held_out - shared_on_purpose and not (held_out - shared_on_purpose) & trained_questions
    assert any(demo.NAME in m["content"] for row in train for m in row["messages"])
