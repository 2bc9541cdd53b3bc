"""The processes of one training run: who this process is, and the few collectives training needs.

In: the environment `torchrun` gives each process it starts (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, ...; see
`chatft.launch`) and `dist_env.*`. Out: a `World`: rank, local rank, world size, and the operations the trainer
calls at the places a multi-process run differs from one process:
- `sum_` : add numbers across processes (a step's supervised tokens, its loss, validation sums);
- `reduce_gradients`: add the trainable parameters' gradients across processes once per optimizer step;
- `on_main`: run a decision on rank 0 and hand every process its result, or the same `ChatftError`;
- `barrier`, `any_`.
With one process (no torchrun) every operation is the identity and nothing is initialised.

Why the gradients are added here rather than by wrapping the model in `DistributedDataParallel`: the trainer
runs the decoder and the loss head as separate calls (`losses.loss_sum`, chunked head), a process may have fewer
micro-batches than another in a step (a token budget packs its rows differently) or none at all (a step's last
rows), and a model may have weights a given batch never reaches. Each process's loss is already divided by the
supervised tokens of the whole step, so the step's gradient is exactly the sum of the processes' gradients: one
all-reduce per optimizer step, in buckets, after the last micro-batch, which is what DDP computes under
`no_sync` accumulation. The weights and optimizer states are replicated (strategy `ddp`). Strategy `fsdp2` splits
them across the processes instead (`sharding`); which one a run uses: `strategy_for`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from chatft import launch
from chatft.errors import ChatftError
from chatft.run_layout import rank_log

T = TypeVar("T")
BUCKET_BYTES = 32 * 1024 * 1024  # gradients all-reduced per call: few calls, bounded extra memory
# Rank 0 tokenizes the data while the others wait: a large dataset takes far longer than a collective's usual
# timeout, so that one wait has its own.
DATA_WAIT = datetime.timedelta(hours=4)


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    nodes: int = 1
    backend: str | None = None  # None: one process, nothing initialised
    _data_group: Any = None  # a gloo group with the long `DATA_WAIT` timeout

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ------------------------------------------------------------------ collectives

    def sum_(self, values: Iterable[float]) -> list[float]:
        """Each value added across processes (float64)."""
        values = list(values)
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_tensor_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Add a device tensor across processes in place (no host read)."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def max_int(self, value: int) -> int:
        """The largest of the processes' values."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def gather_int(self, value: int) -> list[int]:
        """`value` of every process, in rank order, on every process."""
        if not self.distributed:
            return [value]
        device = self._collective_device()
        parts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.size)]
        dist.all_gather(parts, torch.tensor([value], dtype=torch.int64, device=device))
        return [int(part.item()) for part in parts]

    def broadcast_trainable(self, model: torch.nn.Module) -> None:
        """Give every process rank 0's trainable weights (they load the same files, but a LoRA initialisation or
        a model's own random init must not be trusted to agree). Weights on the CPU under NCCL (FSDP2 loads there)
        travel through this process's GPU, one tensor at a time."""
        if not self.distributed:
            return
        device = self._collective_device()
        for param in model.parameters():
            if not param.requires_grad:
                continue
            if param.device == device:
                dist.broadcast(param.data, src=0)
            else:
                on_device = param.data.to(device)
                dist.broadcast(on_device, src=0)
                param.data.copy_(on_device)

    def record(self, strategy: str) -> dict[str, Any]:
        """How the run was spread, for the manifest's metrics (nothing for one process)."""
        if not self.distributed:
            return {}
        return {"world_size": self.size, "nodes": self.nodes, "strategy": strategy, "launcher": "torchrun",
                "backend": self.backend}

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each parameter's gradient by the sum over processes (a missing gradient counts as zeros: a
        process whose rows never reached a weight, or that had no rows this step)."""
        if not self.distributed:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            bucket.append(param.grad)
            size += param.grad.numel() * param.grad.element_size()
            if size >= BUCKET_BYTES:
                _all_reduce_flat(bucket)
                bucket, size = [], 0
        if bucket:
            _all_reduce_flat(bucket)

    def on_main(self, decide: Callable[[], T]) -> T:
        """Run `decide` on rank 0 only and give every process its result; a `ChatftError` it raises is raised on
        every process, so each stops with the same error (shown once: only rank 0 writes to the console)."""
        if not self.distributed:
            return decide()
        outcome: list[Any] = [None]
        if self.is_main:
            try:
                outcome = [("ok", decide())]
            except ChatftError as err:
                outcome = [("error", err)]
        dist.broadcast_object_list(outcome, src=0, group=self._data_group)
        kind, value = outcome[0]
        if kind == "error":
            raise value
        return value

    def main_first(self, work: Callable[[], T]) -> T:
        """Rank 0 does `work` (e.g. tokenizes and fills the cache), then the others do it (reading the cache).
        The others wait up to `DATA_WAIT`, not the collectives' usual timeout. An error on rank 0 reaches them."""
        if not self.distributed:
            return work()
        if self.is_main:
            try:
                result = work()
            except ChatftError as err:
                dist.broadcast_object_list([err], src=0, group=self._data_group)
                raise
            dist.broadcast_object_list([None], src=0, group=self._data_group)
            return result
        failure: list[Any] = [None]
        dist.broadcast_object_list(failure, src=0, group=self._data_group)
        if failure[0] is not None:
            raise failure[0]
        return work()

    def _collective_device(self) -> torch.device:
        """Where the host numbers of a collective go: NCCL reduces only GPU tensors, gloo takes CPU ones."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _all_reduce_flat(tensors: list[torch.Tensor]) -> None:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def strategy_for(configured: str | None, world_size: int, lora: bool) -> str:
    """`distributed.strategy` as a run uses it: one process is `single`; `auto` (or unset) shards full SFT, whose
    weights and optimizer states are the memory (`fsdp2`), and replicates LoRA, whose trained part is small and
    whose frozen base then needs no gathering (`ddp`). The planner makes the same choice (`plan.fit`)."""
    if world_size == 1:
        return "single"
    if configured in (None, "auto"):
        return "ddp" if lora else "fsdp2"
    return configured


def backend_for(configured: str | None) -> str:
    """`dist_env.backend`, or NCCL when this process has a GPU, else gloo."""
    return configured or ("nccl" if torch.cuda.is_available() else "gloo")


def start(backend: str | None, timeout_minutes: int) -> World:
    """Join the processes torchrun started (or one process when there is no torchrun environment)."""
    env = launch.joined_env()
    if env is None or env.world_size == 1:
        return World()
    backend = backend_for(backend)
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)  # "cuda" is this process's GPU from here on
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    data_group = dist.new_group(backend="gloo", timeout=DATA_WAIT)
    return World(env.rank, env.local_rank, env.world_size, env.nodes, backend, data_group)


@contextlib.contextmanager
def process_output(run_dir: Path, world: World) -> Iterator[None]:
    """Every process writes its output to `logs/rank_N.log` in the run dir; rank 0 also to the console, the
    others nowhere else (one progress bar, one error block). Also file descriptors 1 and 2 of the other ranks, so
    what C code or a crash prints lands in their log too."""
    if not world.distributed:
        yield
        return
    path = rank_log(run_dir, world.rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1, encoding="utf-8") as log:
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        log.write(f"{launch.RANK_LOG_HEADER}{world.rank} of {world.size} (local rank {world.local_rank}), pid {os.getpid()}, "
                  f"host {socket.gethostname()}, {started}\n")
        if world.is_main:
            streams = (sys.stdout, sys.stderr)
            sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
            try:
                yield
            except ChatftError as err:  # the CLI prints it to the console; the log keeps it too
                log.write(err.render() + "\n")
                raise
            except Exception:
                if not launch.launched_by_chatft():
                    raise  # the user's own torchrun: its console shows the traceback, as for any script
                # chatft's launcher names the failed process and its log in one error block; the traceback (often
                # a collective broken by another process's death) stays in this log.
                log.write(traceback.format_exc())
                raise SystemExit(1) from None
            finally:
                sys.stdout, sys.stderr = streams
        else:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield


class _Tee:
    """A text stream writing to the console and the rank's log."""

    def __init__(self, console: Any, log: Any) -> None:
        self.console, self.log = console, log

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.console.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.console.flush()

    def isatty(self) -> bool:
        return self.console.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)
