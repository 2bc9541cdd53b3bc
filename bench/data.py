"""The rows a benchmark trains: real Alpaca conversations or a seeded synthetic chat set.

Both end the same way: `messages` JSONL rows passed through chatft's own row guards at the run's length limit
(so no system drops or truncates anything later), the first `global batch x steps` of them written as the rows
every matched system trains in that order, and, when TRL's packing is measured, a longer prefix of the same
rows, long enough to fill its packs for every step.

Synthetic rows take a while to make (each is tokenized until it lands on its drawn length: about 40 s for
gpu-small-full's trl-packed pool on 2 cores), so they are kept in a cache keyed by everything they depend on
(`data_cache_dir`); bench/device/kit.sh fills it on the dev machine so the GPU session spends no lease on them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.workloads import ROOT, cache_root

ALPACA_NAME = "alpaca_en_demo.json"

# Synthetic conversation lengths (rendered tokens): log-normal with median 350 and 5% above 1500 tokens,
# i.e. sigma = ln(1500 / 350) / z(0.95).
SYNTHETIC_MEDIAN = 350
SYNTHETIC_P95 = 1500
SYNTHETIC_SIGMA = math.log(SYNTHETIC_P95 / SYNTHETIC_MEDIAN) / 1.6448536269514722
SYNTHETIC_REFERENCE_LENGTH = 2048  # the distribution is defined for this limit; toy runs scale it down
# Text that tells tokenizers apart by how they split it (cache keys of the synthetic rows).
TOKENIZER_PROBE = "Hello world, it's 2024!\n\n  Caf\u00e9 na\u00efve \u4f60\u597d 12345  tabs\tand\u00a0spaces  \U0001f600 x=y+1;"
# Rows are aimed this many tokens under the limit, so a system that renders a token more than chatft
# (a trailing newline, say) still never truncates.
LENGTH_MARGIN = 4


@dataclass
class PreparedRows:
    rows: Path  # the matched rows
    lengths: list[int]  # chatft's rendered length of each matched row
    info: dict[str, Any]  # what went in and what was dropped, for the report
    pool: Path | None = None  # the longer prefix for trl-packed
    pool_rows: int = 0
    packs_needed: int = 0


def shared_data_dir() -> Path:
    """`../shared/data` beside the checkout, else the machine-wide copy."""
    beside = ROOT.parent / "shared" / "data"
    return beside if (beside / ALPACA_NAME).exists() else Path("/work/shared/data")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- Alpaca through `chatft prep`


def alpaca_messages(work: Path) -> tuple[Path, dict[str, Any]]:
    """Convert the Alpaca file with the real `chatft prep` CLI, as a user would."""
    source = shared_data_dir() / ALPACA_NAME
    if not source.exists():
        raise SystemExit(f"Alpaca data not found at {source}")
    out_dir = work / "prep"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "alpaca.jsonl"
    cmd = [sys.executable, "-m", "chatft.cli", "prep", str(source), "-o", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"chatft prep failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    report = json.loads((out_dir / "prep_report.json").read_text())
    return out, {"source": str(source), "converted_by": "python -m chatft.cli prep SOURCE -o OUT.jsonl",
                 "prep_rows_in": report.get("rows_in"), "prep_rows_out": report.get("rows_out"),
                 "prep_dropped": report.get("dropped")}


# --------------------------------------------------------------------------- synthetic chats


def vocabulary_words(tokenizer: Any) -> list[str]:
    """Lower-case ASCII words that are one token each with their leading space, in id order, so a message of
    n random words is close to n tokens whatever the tokenizer."""
    words = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        text = tokenizer.convert_tokens_to_string([token])
        word = text[1:]
        if text.startswith(" ") and word.isascii() and word.isalpha() and word.islower() and 3 <= len(word) <= 10:
            words.append(word)
    if len(words) < 50:
        raise SystemExit(f"the tokenizer has only {len(words)} whole-word tokens; too few for synthetic chats")
    return words


def rendered_length(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat(user: list[str], assistant: list[str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(user)}, {"role": "assistant", "content": " ".join(assistant)}]


class SyntheticChats:
    """Row i is a function of (seed, i) alone, so a longer set starts with the rows of a shorter one."""

    def __init__(self, tokenizer: Any, max_length: int, seed: int) -> None:
        self.tokenizer, self.seed = tokenizer, seed
        self.words = vocabulary_words(tokenizer)
        self.scale = max_length / SYNTHETIC_REFERENCE_LENGTH if max_length < SYNTHETIC_REFERENCE_LENGTH else 1.0
        self.overhead = rendered_length(tokenizer, chat(["a"], ["a"])) - 2  # template tokens of a one-turn chat
        self.cap = max_length - LENGTH_MARGIN
        self.floor = self.overhead + 8

    def target(self, rng: random.Random) -> int:
        length = rng.lognormvariate(math.log(SYNTHETIC_MEDIAN * self.scale), SYNTHETIC_SIGMA)
        return max(self.floor, min(self.cap, round(length)))

    def row(self, index: int) -> dict[str, Any]:
        rng = random.Random(f"bench-synthetic:{self.seed}:{index}")
        target = self.target(rng)
        content = target - self.overhead
        user_n = max(1, round(content * rng.uniform(0.1, 0.5)))
        user = rng.choices(self.words, k=user_n)
        assistant = rng.choices(self.words, k=max(1, content - user_n))
        # Words are about one token each; a few corrections land the rendered length on the target.
        for _ in range(8):
            diff = target - rendered_length(self.tokenizer, chat(user, assistant))
            if diff == 0:
                break
            if diff > 0:
                assistant += rng.choices(self.words, k=diff)
            else:
                assistant = assistant[:max(1, len(assistant) + diff)]
        while len(assistant) > 1 and rendered_length(self.tokenizer, chat(user, assistant)) > self.cap:
            assistant = assistant[:-1]
        return {"messages": chat(user, assistant)}

    def rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        return [self.row(i) for i in range(start, stop)]


# --------------------------------------------------------------------------- chatft's guards, packing


def usable_rows(path: Path, tokenizer: Any, max_length: int) -> tuple[list[int], list[int], dict[str, Any]]:
    """Run chatft's row guards at `max_length` (drop what does not fit, as training would); returns the
    0-based line numbers of the usable rows in file order, their rendered lengths, and the drop counts."""
    from chatft.config.schema import DatasetSection
    from chatft.data.pipeline import prepare_training_data

    section = DatasetSection(path_or_dataset_id=str(path), seq_length=max_length, truncation="drop",
                             train_on="last_assistant")
    data = prepare_training_data(section, tokenizer, use_cache=False, log=lambda line: None)
    kept = sorted((row.source_row - 1, len(row)) for row in data.rows)  # source_row is 1-based
    return [i for i, _ in kept], [n for _, n in kept], {
        "rows_checked": data.report.rows_in, "usable": data.report.rows_used,
        "dropped_by_reason": dict(data.report.dropped_by_reason)}


def best_fit_decreasing_bins(lengths: list[int], capacity: int) -> int:
    """How many packs TRL's default packing ("bfd": longest first, each into the fullest pack it fits in)
    makes of these lengths."""
    free: list[int] = []
    for length in sorted(lengths, reverse=True):
        fits = [i for i, space in enumerate(free) if space >= length]
        if fits:
            best = min(fits, key=lambda i: free[i])
            free[best] -= length
        else:
            free.append(capacity - length)
    return len(free)


def pool_size(lengths: list[int], capacity: int, packs_needed: int) -> int | None:
    """The shortest prefix of `lengths` that TRL's packing turns into at least `packs_needed` packs."""
    low, high = 1, len(lengths)
    if best_fit_decreasing_bins(lengths, capacity) < packs_needed:
        return None
    while low < high:
        mid = (low + high) // 2
        if best_fit_decreasing_bins(lengths[:mid], capacity) >= packs_needed:
            high = mid
        else:
            low = mid + 1
    return low


def length_summary(lengths: list[int]) -> dict[str, Any]:
    ordered = sorted(lengths)
    if not ordered:
        return {}

    def quantile(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"rows": len(ordered), "mean": round(sum(ordered) / len(ordered), 1), "p50": quantile(0.5),
            "p90": quantile(0.9), "p95": quantile(0.95), "max": ordered[-1]}


def data_cache_dir() -> Path:
    """Where prepared synthetic rows are kept: $CHATFT_BENCH_DATA, else beside the bench's random models."""
    return Path(os.environ.get("CHATFT_BENCH_DATA") or cache_root().parent / "bench-data")


def _cache_key(settings: Any, tokenizer: Any, data_kind: str, want_pool: bool) -> str:
    """Everything the prepared rows depend on: the run's shape, the tokenizer, this file and chatft's row
    guards (the code under chatft/data)."""
    import chatft.data

    # The tokenizer by what it does (its serialisation can change with the tokenizers release): its vocabulary,
    # how it splits a probe text (normaliser, pre-tokenizer, merges) and its chat template.
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()))
    split = json.dumps(tokenizer(TOKENIZER_PROBE, add_special_tokens=True)["input_ids"])
    digest = hashlib.sha256()
    for part in (type(tokenizer).__name__, vocabulary, split, str(tokenizer.chat_template or ""),
                 json.dumps([data_kind, settings.global_batch, settings.steps, settings.max_length, settings.seed,
                             want_pool])):
        digest.update(part.encode())
    for source in [Path(__file__), *sorted(Path(chatft.data.__file__).parent.glob("*.py"))]:
        digest.update(source.read_bytes())
    return f"{data_kind}-{digest.hexdigest()[:16]}"


def _save(prepared: PreparedRows, entry: Path) -> None:
    partial = entry.with_name(entry.name + f".partial-{os.getpid()}")
    partial.mkdir(parents=True)
    shutil.copy(prepared.rows, partial / prepared.rows.name)
    if prepared.pool is not None:
        shutil.copy(prepared.pool, partial / prepared.pool.name)
    (partial / "prepared.json").write_text(json.dumps({
        "rows": prepared.rows.name, "pool": prepared.pool.name if prepared.pool else None, "lengths": prepared.lengths,
        "info": prepared.info, "pool_rows": prepared.pool_rows, "packs_needed": prepared.packs_needed}))
    try:
        partial.rename(entry)  # whole or not at all; another process may have made the same entry meanwhile
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)


def _load(entry: Path, work: Path) -> PreparedRows:
    saved = json.loads((entry / "prepared.json").read_text())
    rows = Path(shutil.copy(entry / saved["rows"], work / saved["rows"]))
    pool = Path(shutil.copy(entry / saved["pool"], work / saved["pool"])) if saved["pool"] else None
    return PreparedRows(rows, saved["lengths"], saved["info"], pool, saved["pool_rows"], saved["packs_needed"])


def prepare(settings: Any, tokenizer: Any, work: Path, data_kind: str, want_pool: bool,
            log: Callable[[str], None] = print) -> PreparedRows:
    """The matched rows (global batch x steps) and, if asked, the trl-packed pool; synthetic ones from the
    cache when they were made before."""
    if data_kind == "alpaca":  # a few seconds: chatft's guards over one file
        prepared = _prepare(settings, tokenizer, work, data_kind, want_pool)
    else:
        entry = data_cache_dir() / _cache_key(settings, tokenizer, data_kind, want_pool)
        if (entry / "prepared.json").exists():
            prepared = _load(entry, work)
            log(f"data: made before, from {entry}")
        else:
            prepared = _prepare(settings, tokenizer, work, data_kind, want_pool)
            _save(prepared, entry)
    log(f"data: {json.dumps(prepared.info)}")
    return prepared


def _prepare(settings: Any, tokenizer: Any, work: Path, data_kind: str, want_pool: bool) -> PreparedRows:
    needed = settings.global_batch * settings.steps
    packs_needed = needed  # a packed TRL step takes as many packs as the others take conversations
    if data_kind == "alpaca":
        source, info = alpaca_messages(work)
        all_rows = read_jsonl(source)
        keep, lengths, guard = usable_rows(source, tokenizer, settings.max_length)
        info["chatft_row_guards"] = {**guard, "seq_length": settings.max_length}
        ordered = [all_rows[i] for i in keep]
    else:
        generator = SyntheticChats(tokenizer, settings.max_length, settings.seed)
        info = {"source": "synthetic", "seed": settings.seed, "words": len(generator.words),
                "length_distribution": (f"log-normal, median {SYNTHETIC_MEDIAN * generator.scale:.0f} tokens, "
                                        f"5% above {SYNTHETIC_P95 * generator.scale:.0f}, capped at "
                                        f"{generator.cap} (limit {settings.max_length} minus {LENGTH_MARGIN})")}
        ordered, lengths, dropped = [], [], 0
        wanted, made = needed, 0
        while True:
            batch = generator.rows(made, wanted)
            made = wanted
            path = write_jsonl(work / "synthetic_candidates.jsonl", batch)
            keep, got, _ = usable_rows(path, tokenizer, settings.max_length)
            ordered += [batch[i] for i in keep]
            lengths += got
            dropped += len(batch) - len(keep)
            enough = len(ordered) >= needed
            if enough and want_pool:
                enough = pool_size(lengths, settings.max_length, packs_needed) is not None
            if enough or made >= 64 * needed:
                break
            # Packs hold several conversations, so trl-packed needs several times the rows: double until enough.
            wanted = 2 * made
        info["chatft_row_guards"] = {"rows_checked": made, "usable": len(ordered), "dropped": dropped,
                                     "seq_length": settings.max_length}
    if len(ordered) < needed:
        raise SystemExit(f"only {len(ordered)} usable rows at max length {settings.max_length}; {needed} needed "
                         f"({settings.global_batch} per step x {settings.steps} steps)")
    rows = write_jsonl(work / "rows.jsonl", ordered[:needed])
    info["rows_used"] = needed
    info["row_lengths"] = length_summary(lengths[:needed])
    single_turn = all(sum(m["role"] == "assistant" for m in r["messages"]) == 1 for r in ordered[:needed])
    info["every_row_has_one_assistant_turn"] = single_turn
    prepared = PreparedRows(rows, lengths[:needed], info)
    if want_pool:
        size = pool_size(lengths, settings.max_length, packs_needed)
        if size is None:
            raise SystemExit(f"trl-packed: the {len(lengths)} usable rows make fewer than {packs_needed} packs of "
                             f"{settings.max_length} tokens; use fewer --steps")
        # A few spare rows: TRL renders each row itself, and a token more in some rows must not leave it a pack
        # short; it trains the first `packs_needed` packs it makes.
        size = min(len(ordered), math.ceil(size * 1.05) + 2)
        prepared.pool = write_jsonl(work / "packed_pool.jsonl", ordered[:size])
        prepared.pool_rows, prepared.packs_needed = size, packs_needed
        info["trl_packed_pool"] = {"rows": size, "packs_needed": packs_needed,
                                   "row_lengths": length_summary(lengths[:size])}
    return prepared
