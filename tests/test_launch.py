"""The launcher's decisions, without starting processes: where this process stands among torchrun's, which flags a
run over several machines needs, and how the processes' exit statuses become one status and one message."""

from __future__ import annotations

import signal

import pytest

from chatft import launch
from chatft.errors import ChatftError
from chatft.run_layout import rank_log

TORCHRUN_ENV = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


def test_torchrun_environment_is_read_and_a_plain_process_is_not_joined():
    env = launch.joined_env(TORCHRUN_ENV)
    assert (env.rank, env.local_rank, env.world_size, env.nodes) == (3, 1, 4, 2)
    assert launch.layout_overrides(env) == ["run.env.nodes=2", "run.env.nprocs_per_node=2"]
    assert launch.joined_env({"RANK": "0", "WORLD_SIZE": "2"}) is None  # no rendezvous address: not torchrun's


def test_the_config_must_ask_for_the_processes_that_were_started():
    launch.check_layout(4, 4)
    with pytest.raises(ChatftError, match="asks for 2 data-parallel processes .* but 4 were started"):
        launch.check_layout(2, 4)


@pytest.mark.parametrize("processes,nodes,place,words", [
    (4, 2, launch.NodePlace(None, "host:29500"), "needs --node-rank"),
    (4, 2, launch.NodePlace(2, "host:29500"), "--node-rank 2 is outside 0..1"),
    (4, 2, launch.NodePlace(1, "host"), "is not HOST:PORT"),
    (3, 2, launch.NodePlace(1, "host:29500"), "do not divide over 2 nodes"),
    (2, 1, launch.NodePlace(None, "host:29500"), "are for a run over several machines"),
])
def test_multi_node_flags_are_refused_with_what_is_wrong(processes, nodes, place, words):
    with pytest.raises(ChatftError, match=words) as refused:
        launch.node_layout(processes, nodes, place)
    assert refused.value.id == "config_invalid"


def test_processes_per_node():
    assert launch.node_layout(8, 2, launch.NodePlace(1, "[fe80::1]:29500")) == 4
    assert launch.node_layout(2, 1, launch.NodePlace()) == 2


def test_a_killed_process_is_named_rather_than_the_ones_the_agent_stopped(tmp_path, capsys):
    rank_log(tmp_path, 1).parent.mkdir()
    rank_log(tmp_path, 1).write_text("--- rank 1 of 2\nstep 7\n")
    status = launch._report_failures(tmp_path, {0: -signal.SIGTERM, 1: -signal.SIGKILL})
    stderr = capsys.readouterr().err
    assert status == 2 and stderr.count("error[process_failed]") == 1
    assert "rank 1 was killed by SIGKILL (step 7)" in stderr and "hint: run the same command again" in stderr


def test_an_error_of_another_rank_is_printed_once_and_rank_zeros_own_not_again(tmp_path, capsys):
    rank_log(tmp_path, 1).parent.mkdir()
    rank_log(tmp_path, 1).write_text("--- rank 1\nerror[bad_row]: row 3: no messages\n  hint: fix row 3\n")
    assert launch._report_failures(tmp_path, {0: -signal.SIGTERM, 1: 2}) == 2
    assert capsys.readouterr().err == "error[bad_row]: row 3: no messages\n  hint: fix row 3\n"
    rank_log(tmp_path, 0).write_text("--- rank 0\nerror[bad_row]: row 3: no messages\n  hint: fix row 3\n")
    assert launch._report_failures(tmp_path, {0: 2, 1: 2}) == 2  # rank 0 printed it on its own console
    assert capsys.readouterr().err == ""


def test_the_erring_process_is_found_by_its_error_whatever_status_the_agent_left_it(tmp_path, capsys):
    rank_log(tmp_path, 1).parent.mkdir()
    rank_log(tmp_path, 0).write_text("--- rank 0\nstep 2\n")
    # an earlier run's error in the same (appended) log is not this run's
    rank_log(tmp_path, 1).write_text("--- rank 1\nerror[oom]: old\n  hint: h\n--- rank 1\n"
                                     "error[oom]: out of memory at step 3\n  hint: lower peft.dim\n")
    assert launch._report_failures(tmp_path, {0: 1, 1: -signal.SIGTERM}) == 2
    assert capsys.readouterr().err == "error[oom]: out of memory at step 3\n  hint: lower peft.dim\n"
    rank_log(tmp_path, 1).write_text("--- rank 1\nerror[oom]: old\n  hint: h\n--- rank 1\nstep 3\n")
    launch._report_failures(tmp_path, {0: 1, 1: -signal.SIGKILL})
    assert "error[process_failed]: training process rank 1 was killed by SIGKILL (step 3)" in capsys.readouterr().err


def test_a_run_stopped_by_a_signal_keeps_its_status(tmp_path):
    assert launch._report_failures(tmp_path, {0: 143, 1: 143}) == 143
    assert launch._report_failures(tmp_path, {0: 130, 1: 130}) == 130
