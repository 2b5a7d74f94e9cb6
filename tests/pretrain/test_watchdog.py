"""A dead rank ends the job within a bounded time (``pretrain.watchdog``), on real gloo
process groups whose ranks are started as independent processes, as on two nodes: no
launcher is there to notice that one died."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import CPU_ONLY

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent("""
    import sys, time
    import torch
    from pretrain import distributed as D, watchdog

    mode, minutes = sys.argv[1], float(sys.argv[2])
    D.init(timeout_minutes=30, dead_rank_minutes=minutes)
    print("ready", flush=True)


    def body():  # as one mode of the command line
        if mode == "busy" and D.rank() == 0:
            until = time.monotonic() + 4 * minutes * 60  # CPU-bound, holding the GIL by turns
            while time.monotonic() < until:
                sum(range(1000))
        if mode == "stranger" and D.rank() == 0:  # garbage on the monitor's port
            import socket
            port = watchdog._state["sockets"][0].getsockname()[1]
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"HELLO x\\nHELLO 99 y\\nnonsense\\n")
                time.sleep(0.5)
        if mode == "error" and D.rank() == 1:
            print("mdlm: a user error", file=sys.stderr, flush=True)
            raise SystemExit(2)
        steps = 0
        while mode == "loop" or steps < (400 if mode == "stranger" else 20):
            D.all_reduce(torch.ones(1))
            steps += 1
            time.sleep(0.01)
        D.barrier()
        print("finished", flush=True)


    ok = False
    try:  # what pretrain.cli.dispatch does around a mode
        body()
        ok = True
    finally:
        watchdog.leave(ok)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, mode: str, minutes: float, world: int = 2):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, **CPU_ONLY, RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=os.getcwd())
        procs.append(subprocess.Popen([sys.executable, str(script), mode, str(minutes)],
                                      env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:  # every rank has joined the group and the watchdog
        lines = []
        while not lines or lines[-1] not in ("ready", ""):
            lines.append(p.stdout.readline().strip())
        assert lines[-1] == "ready", lines
    return procs


def finish(proc, timeout: float):
    started = time.monotonic()
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err, time.monotonic() - started


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_stops_the_others_at_once(tmp_path, victim):
    procs = start(tmp_path, "loop", minutes=5)
    time.sleep(0.5)
    procs[victim].send_signal(signal.SIGKILL)
    survivor = procs[1 - victim]
    code, text, seconds = finish(survivor, timeout=60)
    procs[victim].wait()
    assert code != 0 and seconds < 10, (code, seconds, text)
    assert f"rank {victim}" in text and "died" in text and "Traceback" not in text


def test_a_frozen_rank_stops_the_others_after_the_timeout(tmp_path):
    procs = start(tmp_path, "loop", minutes=0.05)  # 3 s of silence
    time.sleep(0.5)
    procs[1].send_signal(signal.SIGSTOP)  # alive, connection open, silent: a frozen node
    try:
        code, text, seconds = finish(procs[0], timeout=60)
    finally:
        procs[1].send_signal(signal.SIGCONT)  # it wakes to find rank 0 gone
    assert code != 0 and 2 < seconds < 20, (code, seconds, text)
    assert "rank 1" in text and "went silent" in text and "dead_rank_timeout_minutes" in text
    code, text, _ = finish(procs[1], timeout=60)
    assert code != 0 and "rank 0 died" in text and "went silent" not in text, text


def test_a_busy_rank_is_not_taken_for_dead(tmp_path):
    procs = start(tmp_path, "busy", minutes=0.03)  # rank 0 computes for 4x the timeout
    for p in procs:
        code, text, _ = finish(p, timeout=60)
        assert code == 0 and "finished" in text and "died" not in text, text


def test_a_stranger_on_the_port_changes_nothing(tmp_path):
    procs = start(tmp_path, "stranger", minutes=0.02)  # 400 steps: over 4x the timeout
    for p in procs:
        code, text, _ = finish(p, timeout=60)
        assert code == 0 and "finished" in text and "mdlm:" not in text, text


def test_a_rank_that_stops_on_an_error_stops_the_others(tmp_path):
    procs = start(tmp_path, "error", minutes=5)
    code, text, seconds = finish(procs[0], timeout=60)
    assert code != 0 and seconds < 15, (code, seconds, text)
    assert "rank 1" in text and "stopped on an error" in text
    code, text, _ = finish(procs[1], timeout=10)
    assert code == 2 and "a user error" in text
