"""Where a worker's training time goes: torch.profiler over the training steps, when `CHATFT_BENCH_PROFILE=DIR`.

    CHATFT_BENCH_PROFILE=/tmp/prof python bench/run.py --workload gpu-8b-lora --peers '' --steps 4 --warmup 1 ...

Each system's worker writes DIR/<workload>-<system>-profile.txt: the time of the device's kernels (CPU: of the
operators) summed by kind (matmul, attention, loss, ...), that sum against the wall clock of the profiled window
(`Trainer.train` for chatft, `SFTTrainer.train` for TRL: loading excluded; on a GPU the rest is the device waiting on the host), and torch.profiler's
table of the top entries by self time. On a GPU only the kernels are recorded, which keeps the profiler's own cost
low; still, a profiled run's throughput is not the benchmark's figure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "CHATFT_BENCH_PROFILE"

# Kernel (or operator) names by kind, matched in this order on the lower-cased name: the first match wins.
KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "varlen")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "aten::mm", "addmm", "aten::bmm", "sm90")),
    ("loss / softmax", ("softmax", "nll", "cross_entropy", "logsumexp")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "fused_")),
    ("norm", ("norm",)),
    ("copy / cast", ("copy", "memcpy", "memset", "cat", "fill")),
    ("elementwise / reduce", ("elementwise", "vectorized", "unrolled", "reduce", "aten::")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lowered for k in keys)), "other")


@contextlib.contextmanager
def training_window(workload: str, system: str, device: str) -> Iterator[None]:
    """Profile the block when CHATFT_BENCH_PROFILE is set, else do nothing."""
    directory = os.environ.get(ENV)
    if not directory:
        yield
        return
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        began = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - began
    averages = prof.key_averages()
    if cuda:
        entries = [(e.key, e.self_device_time_total) for e in averages if e.device_type == DeviceType.CUDA]
        sort_by, what = "self_device_time_total", "kernel"
    else:  # on CPU the leaf operators' self time is where the work happens
        entries = [(e.key, e.self_cpu_time_total) for e in averages]
        sort_by, what = "self_cpu_time_total", "operator"
    total_us = sum(us for _, us in entries) or 1.0
    by_kind: dict[str, float] = {}
    for name, us in entries:
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + us
    lines = [f"{workload} / {system} on {device}: {what} self time {total_us / 1e6:.2f} s in a {wall_s:.2f} s "
             f"window of training steps (busy {total_us / 1e6 / wall_s:.0%})", "",
             f"{'kind':24} {'seconds':>9} {'share':>7}"]
    for kind, us in sorted(by_kind.items(), key=lambda item: -item[1]):
        lines.append(f"{kind:24} {us / 1e6:9.3f} {us / total_us:7.1%}")
    lines += ["", averages.table(sort_by=sort_by, row_limit=40, max_name_column_width=100)]
    out = Path(directory) / f"{workload}-{system}-profile.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def around_method(owner: Any, name: str, workload: str, system: str, device: str) -> Iterator[None]:
    """Profile each call of `owner.name` made inside the block (chatft's `Trainer.train`, reached through its one
    entry into training, which also loads the model: only the steps are profiled). Nothing when not profiling."""
    if not os.environ.get(ENV):
        yield
        return
    original = getattr(owner, name)

    @functools.wraps(original)
    def profiled(*args: Any, **kwargs: Any) -> Any:
        with training_window(workload, system, device):
            return original(*args, **kwargs)

    setattr(owner, name, profiled)
    try:
        yield
    finally:
        setattr(owner, name, original)
