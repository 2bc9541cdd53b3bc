"""Where a training step runs: in this process, as one of the processes of a torchrun that is already running
(joined: `torchrun ... -m chatft run ...`, or the processes chatft started), or on processes chatft starts itself
through torchrun's engine (`chatft run ... --nproc-per-node N`, and on each of several machines
`--nnodes K --node-rank R --rdzv-endpoint HOST:PORT`).

In: the compiled config's process layout (`run.env.*`, `distributed.dp_size`), this machine's `NodePlace` and the
environment. Out: `joined_env()` (this process's place among torchrun's), `layout_overrides` (a config that names
no layout takes torchrun's), `node_layout` (checks the flags, gives the processes of this node), and
`launch_training`, which starts them, waits for them, and turns their ending into one exit status and at most one
error block on the console.

Importing this module costs no torch: the CLI decides here before anything heavy loads. `launch_training` imports
torch's launcher when it runs (the processes it starts import torch anyway).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from chatft import console
from chatft.errors import ChatftError
from chatft.run_layout import launcher_log, logs_dir, rank_log

# Set in the processes chatft starts: they join, and leave job.yaml to the launcher that wrote it.
LAUNCHED_BY_CHATFT = "CHATFT_LAUNCHED"
EXIT_USER_ERROR = 2
RANK_LOG_HEADER = "--- rank "  # how each process starts its part of logs/rank_N.log (`train.distributed`)
# A process's error: its block, or its JSON line under --log-format json (`console.error`).
_ERROR_BLOCK = re.compile(r'^(?:error\[[a-z_]+\]: .*(?:\n  hint: .*(?:\n {8}.*)*)?|\{"event": "error", .*)$',
                          re.MULTILINE)


@dataclass(frozen=True)
class ProcessEnv:
    """This process's place among the processes torchrun started (its environment variables)."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def joined_env(environ: dict[str, str] | None = None) -> ProcessEnv | None:
    """This process's place when torchrun (or a launcher setting the same variables) started it, else None."""
    environ = os.environ if environ is None else environ
    if not all(name in environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    world = int(environ["WORLD_SIZE"])
    return ProcessEnv(int(environ["RANK"]), int(environ.get("LOCAL_RANK", 0)), world,
                      int(environ.get("LOCAL_WORLD_SIZE", world)))


@dataclass(frozen=True)
class NodePlace:
    """This machine's place in a run over several machines (`--node-rank`, `--rdzv-endpoint`); empty on one."""

    node_rank: int | None = None
    rdzv_endpoint: str | None = None


def node_layout(data_parallel_size: int, nodes: int, place: NodePlace) -> int:
    """The processes to start on this machine, after checking that the multi-node flags fit `nodes`."""
    hint = ("on each machine: chatft run ... --nnodes K --node-rank R --rdzv-endpoint HOST:PORT, where HOST:PORT is "
            "a free port on the machine with --node-rank 0, reachable from the others")
    if nodes == 1 and (place.rdzv_endpoint is not None or place.node_rank not in (None, 0)):
        raise ChatftError("config_invalid", "--node-rank and --rdzv-endpoint are for a run over several machines "
                          "(--nnodes / run.env.nodes > 1)", "drop them to train on this machine, or add " + hint)
    if nodes > 1:
        missing = [flag for flag, value in (("--node-rank", place.node_rank), ("--rdzv-endpoint", place.rdzv_endpoint))
                   if value is None]
        if missing:
            raise ChatftError("config_invalid", f"run.env.nodes={nodes} (--nnodes) needs {' and '.join(missing)}",
                              hint)
        if not 0 <= place.node_rank < nodes:
            raise ChatftError("config_invalid", f"--node-rank {place.node_rank} is outside 0..{nodes - 1}", hint)
        if not re.fullmatch(r"[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+", place.rdzv_endpoint):
            raise ChatftError("config_invalid", f"--rdzv-endpoint {place.rdzv_endpoint!r} is not HOST:PORT", hint)
    return processes_per_node(data_parallel_size, nodes)


def processes_per_node(data_parallel_size: int, nodes: int) -> int:
    """Every node runs the same number of processes."""
    if data_parallel_size % nodes:
        raise ChatftError("config_invalid", f"{data_parallel_size} data-parallel processes do not divide over "
                          f"{nodes} nodes", "give every node the same number of processes: --nproc-per-node N")
    return data_parallel_size // nodes


def launched_by_chatft() -> bool:
    """This process is one that `launch_training` started."""
    return os.environ.get(LAUNCHED_BY_CHATFT) == "1"


def layout_overrides(env: ProcessEnv) -> list[str]:
    """Overrides that give a config which names no process layout the layout torchrun started."""
    return [f"run.env.nodes={env.nodes}", f"run.env.nprocs_per_node={env.local_world_size}"]


def check_layout(data_parallel_size: int, started: int) -> None:
    """The config's data-parallel size must be the number of processes that were started (1: no launcher)."""
    if data_parallel_size != started:
        raise ChatftError(
            "config_invalid",
            f"the config asks for {data_parallel_size} data-parallel processes (run.env.* / distributed.dp_size / "
            f"--nproc-per-node) but {started} {'was' if started == 1 else 'were'} started",
            f"start them with `chatft run ... --nproc-per-node {data_parallel_size}` (or torchrun), or set "
            "--nproc-per-node / run.env.nprocs_per_node to the processes there are (distributed.dp_size: none uses "
            "all of them)",
        )


def threads_per_process(nproc: int) -> int:
    """CPU threads each process may use: the machine's cores shared out, so N processes do not oversubscribe."""
    return max(1, (os.cpu_count() or 1) // nproc)


def launch_training(run_dir: Path, nproc_per_node: int, argv: list[str], nodes: int = 1,
                    place: NodePlace = NodePlace()) -> int:
    """Start `nproc_per_node` processes of `python -m chatft <argv>` on this machine with torchrun's engine
    (elastic agent, c10d rendezvous, no restarts), wait for them, and return the exit status. On one machine the
    rendezvous takes a free local port; over `nodes` machines it is `place.rdzv_endpoint`, whose store the
    machine with node rank 0 hosts. Each process logs to `logs/rank_N.log`; rank 0 also prints to its console,
    and the agent's own messages go to `logs/launcher_node_K.log`. An error of another rank is printed here once;
    a killed or crashed process becomes `error[process_failed]`."""
    # torch's launcher: imported here, not at the top, so that `chatft --help` and the CLI's checks stay torch-free.
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    node_rank = place.node_rank or 0
    logs_dir(run_dir).mkdir(parents=True, exist_ok=True)
    _agent_log_to(launcher_log(run_dir, node_rank))
    os.environ[LAUNCHED_BY_CHATFT] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(nproc_per_node)))
    # Every node must name the same run id; the rendezvous endpoint already belongs to this one run.
    config = LaunchConfig(min_nodes=nodes, max_nodes=nodes, nproc_per_node=nproc_per_node, run_id="chatft",
                          rdzv_backend="c10d", rdzv_endpoint=place.rdzv_endpoint or "localhost:0",
                          rdzv_configs={"is_host": node_rank == 0} if nodes > 1 else {}, max_restarts=0,
                          monitor_interval=0.2)
    if nodes > 1:
        console.info(f"node {node_rank} of {nodes}: {nproc_per_node} process(es), rendezvous at "
                     f"{place.rdzv_endpoint}; rank 0 prints progress, every process logs to {logs_dir(run_dir)}/rank_N.log")
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "chatft", *argv)
    except ChildFailedError as failed:
        return _report_failures(run_dir, {rank: f.exitcode for rank, f in failed.failures.items()})
    except SignalException as stopped:  # the processes were sent the signal and have saved their checkpoint
        return 128 + int(stopped.sigval)
    return 0


def _agent_log_to(path: Path) -> None:
    agent = logging.getLogger("torch.distributed.elastic")
    agent.handlers[:] = [logging.FileHandler(path, encoding="utf-8")]
    agent.propagate = False


def _report_failures(run_dir: Path, exit_codes: dict[int, int]) -> int:
    """One exit status for the run, and the one message the user needs (rank 0 has shown its own)."""
    stopped = [code for code in exit_codes.values() if code in (128 + signal.SIGTERM, 128 + signal.SIGINT)]
    if stopped and len(stopped) == len(exit_codes):
        return stopped[0]  # stopped by a signal, checkpoint saved: rank 0 has said how to resume
    # A process stopped by a named error wrote its block to its log (rank 0 to this console as well): that is the
    # cause, whatever statuses the others got from the broken run (a failed collective, the agent's SIGTERM, which
    # may even reach the erring process while it exits).
    named = {rank: block for rank in sorted(exit_codes) if (block := _last_error_block(rank_log(run_dir, rank)))}
    if named:
        if 0 not in named:
            print(named[min(named)], file=sys.stderr)
        return EXIT_USER_ERROR
    # The cause first: a process killed by something else than the agent's SIGTERM (which the agent sends to the
    # survivors once one has failed), then one that crashed, then the lowest rank.
    rank, code = min(exit_codes.items(), key=lambda item: (item[1] == -signal.SIGTERM, item[1] >= 0, item[0]))
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    last = _last_line(rank_log(run_dir, rank))
    console.error(ChatftError(
        "process_failed",
        f"training process rank {rank} {how}{f' ({last})' if last else ''}; its log: {rank_log(run_dir, rank)}",
        "run the same command again: checkpoint.resume=auto continues from the last complete checkpoint "
        "(checkpoints/LATEST)",
    ))
    return EXIT_USER_ERROR


def _this_run(path: Path) -> str:
    """The part of a rank's log written by this run (logs are appended to: a resumed run writes on)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    start = text.rfind(RANK_LOG_HEADER)
    return text[start:] if start >= 0 else text


def _last_error_block(path: Path) -> str | None:
    blocks = _ERROR_BLOCK.findall(_this_run(path))
    return blocks[-1] if blocks else None


def _last_line(path: Path) -> str | None:
    lines = [line.strip() for line in _this_run(path).splitlines() if line.strip()]
    return lines[-1][:200] if lines else None
