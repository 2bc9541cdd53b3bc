"""Resumable checkpoints under `<run>/checkpoints/`.

In: the model, the optimizer, the trainer's position (a small JSON-able dict), the `World`. Out:
`checkpoints/step_N/`, in one of two layouts.

One process, or processes that each hold the whole model (ddp), rank 0 writes:

    trainable.safetensors  the trainable parameters by name (all weights for full SFT, the LoRA weights for LoRA)
    optimizer.pt           the optimizer's state_dict (tensors and numbers only; loaded with weights_only=True)
    rng.pt                 torch CPU (and CUDA) generator states (tensors; loaded with weights_only=True)
    trainer_state.json     step, data position (epoch, step in epoch), schedule, Python RNG, counters

Processes that each hold a shard (fsdp2) write their own shards, so no process ever holds the whole state:

    sharded/               Distributed Checkpoint (DCP): each process's shards of the trainable weights and
                           optimizer state (`__R_0.distcp`), and rank 0's `.metadata` index
    rng_rank{R}.pt         each process's torch generator states
    trainer_state.json     as above (rank 0's Python RNG)

Either layout resumes at any world size under either strategy: DCP re-cuts the shards for the processes that
read them (one process included), and the files are split into shards when a sharded run reads them
(`sharding.load_full_state`). A sharded checkpoint of a run on several machines needs a checkpoint dir that all
of them share (a network filesystem): each writes its own shards there, and a dir that is not shared is refused
before it is taken for a complete checkpoint.

and `checkpoints/LATEST`, one line naming the newest complete step dir.

Crash safety: a checkpoint is written into `.tmp-step_N` and renamed into place only once every file is
flushed to disk (DCP flushes its own) and, for a sharded one, every process has written its part; only then is
LATEST replaced (write `LATEST.tmp`, `os.replace`). A kill at any moment leaves either the old LATEST or the new
one, each naming a complete dir; leftovers of an interrupted save are removed by the next run. Loading never
unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from chatft.errors import ChatftError
from chatft.run_layout import CHECKPOINTS, checkpoints_dir
from chatft.train import sharding
from chatft.train.distributed import World

LATEST = "LATEST"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
RNG = "rng.pt"
STATE = "trainer_state.json"
SHARDED = "sharded"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous() for name, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], keep_last: int,
    *, world: World, sharded: bool = False,
) -> Path:
    """Write `checkpoints/step_{step}` atomically, point LATEST at it, keep the newest `keep_last`; a collective
    that every process calls. `sharded`: the model is split across the processes (FSDP2), and each writes its
    shards (DCP); otherwise rank 0 writes the files alone."""
    root = checkpoints_dir(run_dir)
    final, tmp = root / f"step_{step}", root / f".tmp-step_{step}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    written_here: list[str] = []  # what rank 0 writes and flushes itself (DCP and the other ranks flush theirs)
    if sharded:
        world.barrier()  # the empty dir exists before any process writes into it
        sharding.save_sharded(model, optimizer, tmp / SHARDED)
        torch.save(rng_state(), tmp / rng_file(world.rank))
        _fsync(tmp / rng_file(world.rank))
        world.barrier()  # every process's part is on disk
        if world.is_main:
            _check_shared(tmp, [SHARDED, *(rng_file(rank) for rank in range(world.size))], world)
    elif world.is_main:
        save_file(trainable_state(model), str(tmp / WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        torch.save(rng_state(), tmp / RNG)
        written_here = [WEIGHTS, OPTIMIZER, RNG]
    if world.is_main:
        python_rng = random.getstate()
        full_state = {**state, "step": step, "python_rng": [python_rng[0], list(python_rng[1]), python_rng[2]],
                      "layout": SHARDED if sharded else "files", "world_size": world.size}
        (tmp / STATE).write_text(json.dumps(full_state, indent=2) + "\n", encoding="utf-8")
        for name in (*written_here, STATE):
            _fsync(tmp / name)
        if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _point_latest(root, final.name)
        prune(root, keep_last)
    world.barrier()  # ranks: the checkpoint is complete for every process
    return final


def _check_shared(tmp: Path, written: list[str], world: World) -> None:
    """Every process's part of a sharded checkpoint is in rank 0's dir: it is not, when the checkpoint dir is a
    local disk of each machine."""
    missing = [name for name in written if not (tmp / name).exists()]
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ChatftError(
            "config_invalid",
            f"checkpoint dir {tmp.parent} is not shared by the {world.size} processes: rank 0 does not see "
            f"{', '.join(missing[:3])} written by the others (each machine wrote into its own local dir)",
            "set checkpoint.checkpoint_dir to a filesystem every machine mounts at the same path (NFS, Lustre, ...)",
        )


def _point_latest(root: Path, name: str) -> None:
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(name + "\n", encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, root / LATEST)
    _fsync_dir(root)


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step dirs, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted((p for p in found if (p / STATE).is_file()), key=_step_of)


def prune(root: Path, keep_last: int) -> None:
    latest = latest_checkpoint_in(root)
    for path in complete_checkpoints(root)[:-keep_last]:
        if latest is None or path.resolve() != latest.resolve():
            shutil.rmtree(path, ignore_errors=True)


def remove_partial_saves(run_dir: Path) -> list[Path]:
    """Delete what an interrupted save left behind (`.tmp-step_N`, `LATEST.tmp`)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.name.startswith(".tmp-") or p.name == LATEST + ".tmp"]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return leftovers


def latest_checkpoint_in(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text(encoding="utf-8").strip()
    return target if (target / STATE).is_file() else None


def latest_checkpoint(run_dir: Path) -> Path | None:
    return latest_checkpoint_in(checkpoints_dir(run_dir))


def resolve_resume_path(value: str) -> Path:
    """`checkpoint.resume=PATH`: a step dir, a `checkpoints/` dir or a run dir (their LATEST)."""
    path = Path(value).expanduser()
    for candidate in (path, path / LATEST, path / CHECKPOINTS / LATEST):
        if candidate.is_dir() and (candidate / STATE).is_file():
            return candidate
        if candidate.is_file() and candidate.name == LATEST:
            found = latest_checkpoint_in(candidate.parent)
            if found is not None:
                return found
    raise ChatftError(
        "config_invalid",
        f"checkpoint.resume={value}: no complete checkpoint there (expected a checkpoints/step_N dir "
        f"with {STATE}, or a run dir whose checkpoints/LATEST names one)",
        "point checkpoint.resume at a checkpoints/step_N dir, or use checkpoint.resume=auto / false",
    )


def read_state(path: Path) -> dict[str, Any]:
    """The trainer state of the checkpoint at `path` (state.json), without loading any tensor."""
    return json.loads((path / STATE).read_text(encoding="utf-8"))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                    *, rank: int = 0, sharded: bool = False) -> dict[str, Any]:
    """Restore weights, optimizer and RNG states from `path` (either layout); return the trainer state. `sharded`:
    the model is split across processes (FSDP2), and each keeps its shard."""
    if (path / SHARDED).is_dir():
        sharding.load_sharded(model, optimizer, path / SHARDED, where=str(path))
    else:
        _load_files(path, model, optimizer, device, sharded)
    own = path / rng_file(rank)
    rng = torch.load(own if own.is_file() else _first_rng(path), map_location="cpu", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = read_state(path)
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state


def _first_rng(path: Path) -> Path:
    """The generator states a process takes when the checkpoint has none of its own: rank 0's (a run resumed on
    more processes than wrote it, or from the files layout, which keeps rank 0's only)."""
    return path / rng_file(0) if (path / rng_file(0)).is_file() else path / RNG


def _load_files(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                sharded: bool) -> None:
    weights = load_file(str(path / WEIGHTS), device="cpu" if sharded else str(device))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise sharding.checkpoint_mismatch(path, f"{len(missing)} trainable tensors missing (e.g. {missing[:3]}), "
                                                 f"{len(extra)} unexpected (e.g. {extra[:3]})")
    optimizer_state = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True)
    if sharded:
        sharding.load_full_state(model, optimizer, weights, optimizer_state)
        return
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    optimizer.load_state_dict(optimizer_state)
