"""A dead rank ends the job within a bounded time.

Collectives wait on every rank: when one rank dies (SIGKILL, the OOM killer, a lost node)
the others sit in their next all-reduce until the process group's timeout
(``trainer.collective_timeout_minutes``), and a launcher on another node never learns of
it. So every rank of a multi-rank run holds one TCP connection to a small monitor that
rank 0 runs in a thread:

- a process that dies has its connection closed by the kernel at once, so the monitor
  learns which rank died within milliseconds, whatever killed it;
- a lost or frozen node closes nothing: both ends send a heartbeat every few seconds, and
  ``trainer.dead_rank_timeout_minutes`` of silence counts as death;
- a rank that finishes says goodbye first; one that stops on an error it reported itself
  says so, and the others stop when its process has ended.

The monitor then prints one line naming the rank, tells every other rank to stop, and each
rank exits with status ``EXIT_STATUS`` (rank 0 last), so the launcher (deepspeed, srun,
torchrun) returns non-zero. Nothing is saved on the way out: the next start resumes from
the last published checkpoint.

The heartbeats run in threads of their own, so a rank that is merely busy (rank 0 building
shards or scoring generative perplexity while the others wait) is never taken for dead.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import threading
import time

DEFAULT_MINUTES = 2.0
EXIT_STATUS = 1
# an error a rank reported itself stops the others this many seconds later
FAIL_GRACE_SECONDS = 3.0
# a failing rank waits this long for the watchdog to report a dead rank behind its error
EXPLAIN_SECONDS = 1.0
# a rank has this long (or the timeout, when longer) to connect after the process group forms
JOIN_SECONDS = 30.0
_state: dict = {}


def beat_seconds(timeout: float) -> float:
    """How often each end sends its heartbeat: often enough that a few may be lost."""
    return max(0.05, min(5.0, timeout / 6))


def check_minutes(minutes) -> float:
    from pretrain.ds_config import RunConfigError

    minutes = DEFAULT_MINUTES if minutes is None else float(minutes)
    if not minutes >= 0:
        raise RunConfigError(
            f"trainer.dead_rank_timeout_minutes={minutes:g} must be positive (how long a "
            f"silent rank may go before the job stops; default {DEFAULT_MINUTES:g}), or 0 to "
            "turn the watchdog off.")
    return minutes


def start(rank: int, world: int, minutes: float | None, share) -> None:
    """Starts this rank's side of the monitor. ``share(value)`` returns rank 0's value on
    every rank (a broadcast over the process group), used once to publish its address."""
    timeout = check_minutes(minutes) * 60
    if world < 2 or _state or timeout == 0:  # 0: off (collectives' own timeout only)
        return
    if rank == 0:
        server = socket.create_server(("", 0))
        address = (os.environ.get("MASTER_ADDR", "127.0.0.1"), server.getsockname()[1])
    else:
        server, address = None, None
    address = share(address)
    _state.update(rank=rank, lock=threading.Lock(), sockets=[])
    if rank == 0:
        target, args = _serve, (server, world, timeout)
        _state["sockets"].append(server)
    else:
        target, args = _watch, (address, rank, timeout)
    os.register_at_fork(after_in_child=_forget_in_child)
    thread = threading.Thread(target=_guarded, args=(target, *args),
                              name="mdlm-rank-watchdog", daemon=True)
    _state["thread"] = thread
    thread.start()


def leave(ok: bool) -> None:
    """Called as this rank's command ends: a goodbye when ``ok``, else word that it stopped
    on an error (rank 0's word goes to every other rank).

    An error may itself come from a dead rank (gloo fails the collective at once when a
    peer's connection drops), so a failing rank first gives the watchdog a moment to name
    the dead rank and end the process with that one line instead of a traceback."""
    if not _state or _state.get("ended"):
        return
    if not ok:
        time.sleep(EXPLAIN_SECONDS)
    _state["ended"] = "ok" if ok else "failed"
    _tell_all(b"BYE\n" if ok else b"FAIL\n")
    if not ok and _state["rank"] == 0:
        time.sleep(0.2)  # the word reaches the others before this process is gone


def _guarded(target, *args) -> None:
    """Runs one side of the watchdog; if it fails (a bug), the job goes on unwatched: the
    others are told to stop watching, and nobody is stopped for it."""
    try:
        target(*args)
    except Exception as err:  # noqa: BLE001  (the thread must never take the job down)
        print(f"\nmdlm: note: the rank watchdog stopped ({type(err).__name__}: {err}); the "
              "job goes on without it.", file=sys.stderr, flush=True)
        _tell_all(b"BYE\n")  # rank 0: stop watching me; others: I am done


def _tell_all(message: bytes) -> None:
    """``message`` to every connection this rank holds: rank 0's to each other rank, or
    another rank's to rank 0."""
    with _state.get("lock") or threading.Lock():
        for sock in list(_state.get("peers", {}).values()) + [_state.get("conn")]:
            if sock is not None:
                _send(sock, message)


def _forget_in_child() -> None:
    """A forked child (a data-loader worker, a pool process) closes its copies of the
    monitor's sockets and never speaks for the rank."""
    for sock in _state.get("sockets", []):
        try:
            sock.close()
        except OSError:
            pass
    _state.clear()
    _state["ended"] = "ok"


def _send(sock, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def _stop(line: str, quiet: bool = False) -> None:
    """Prints ``line`` (unless ``quiet``) and ends this process at once: its main thread may
    be blocked in a collective that will never complete. A rank whose command has ended
    well is not stopped."""
    if _state.get("ended") == "ok":
        return
    if not quiet:
        print(f"\nmdlm: {line}", file=sys.stderr, flush=True)  # below a progress bar
    os._exit(EXIT_STATUS)


def _lines(buffer: bytearray, data: bytes) -> list[str]:
    buffer.extend(data)
    *complete, rest = bytes(buffer).split(b"\n")
    buffer[:] = rest
    return [line.decode(errors="replace") for line in complete]


# ------------------------------------------------------------------------ rank 0
def _serve(server, world: int, timeout: float) -> None:
    beat = beat_seconds(timeout)
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ)
    peers: dict[int, socket.socket] = {}
    _state["peers"] = peers
    who: dict[int, str] = {}  # rank -> "host, pid"
    by_socket: dict[socket.socket, int | None] = {}
    buffers: dict[socket.socket, bytearray] = {}
    started = last_beat = time.monotonic()
    heard: dict[int, float] = {}
    failed_at: dict[int, float] = {}
    done: set[int] = set()

    def dead(rank: int, reason: str) -> None:
        if _state.get("ended") == "ok":
            return
        place = f" ({who[rank]})" if rank in who else ""
        print(f"\nmdlm: rank {rank}{place} {reason}; stopping all {world} ranks. The next "
              "start resumes from the last published checkpoint.", file=sys.stderr,
              flush=True)
        with _state["lock"]:
            for r, sock in peers.items():
                if r != rank and r not in done:
                    _send(sock, f"STOP {rank}\n".encode())
        time.sleep(0.2)  # the word reaches the others before this process is gone
        _stop("", quiet=True)

    while True:
        for key, _ in selector.select(timeout=beat):
            sock = key.fileobj
            if sock is server:
                conn, _ = server.accept()
                selector.register(conn, selectors.EVENT_READ)
                by_socket[conn], buffers[conn] = None, bytearray()
                _state["sockets"].append(conn)
                continue
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            rank = by_socket.get(sock)
            if not data:
                selector.unregister(sock)
                sock.close()
                if rank in failed_at:
                    dead(rank, "stopped on an error (its message is above)")
                elif rank is not None and rank not in done:
                    dead(rank, "died (its process ended without a word: killed, or out "
                               "of memory)")
                continue
            for line in _lines(buffers[sock], data):
                word, _, rest = line.partition(" ")
                if word == "HELLO":
                    rank_text, _, place = rest.partition(" ")
                    if not rank_text.isdigit() or not 0 < int(rank_text) < world:
                        continue  # not one of this job's ranks
                    rank = by_socket[sock] = int(rank_text)
                    peers[rank], who[rank] = sock, place
                elif word == "BYE" and rank is not None:
                    done.add(rank)
                elif word == "FAIL" and rank is not None:
                    failed_at.setdefault(rank, time.monotonic())
                if rank is not None:
                    heard[rank] = time.monotonic()
        now = time.monotonic()
        for rank, when in failed_at.items():
            if now - when > FAIL_GRACE_SECONDS:
                dead(rank, "stopped on an error (its message is above)")
        if now - last_beat >= beat:
            last_beat = now
            with _state["lock"]:
                for rank, sock in peers.items():
                    if rank not in done:
                        _send(sock, b"BEAT\n")
        silent = [r for r in range(1, world) if r not in done and r not in failed_at and
                  now - heard.get(r, started) > (timeout if r in heard else
                                                 max(timeout, JOIN_SECONDS))]
        if silent and not selector.select(timeout=0):  # nothing unread either: this
            # process may itself have been stopped, and what came meanwhile is read first
            rank = silent[0]
            verb = "never joined" if rank not in heard else "went silent"
            dead(rank, f"{verb} for {timeout / 60:g} minute(s) "
                       "(trainer.dead_rank_timeout_minutes): its node is lost or frozen")


# ------------------------------------------------------------------------ ranks > 0
def _watch(address, rank: int, timeout: float) -> None:
    beat = beat_seconds(timeout)
    deadline = time.monotonic() + max(timeout, JOIN_SECONDS)
    conn = None
    while conn is None:
        try:
            conn = socket.create_connection(tuple(address), timeout=beat)
        except OSError:
            if time.monotonic() > deadline:
                _stop(f"rank {rank} cannot reach rank 0's monitor at {address[0]}:"
                      f"{address[1]}; stopping.")
            time.sleep(beat)
    conn.settimeout(None)
    _state["conn"] = conn
    _state["sockets"].append(conn)
    with _state["lock"]:
        _send(conn, f"HELLO {rank} {socket.gethostname()}, pid {os.getpid()}\n".encode())
    selector = selectors.DefaultSelector()
    selector.register(conn, selectors.EVENT_READ)
    buffer = bytearray()
    heard = last_beat = time.monotonic()
    first = rank_is_first_on_node()
    while True:
        if selector.select(timeout=beat):
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            if not data:
                _stop(f"rank 0 died (its monitor closed); rank {rank} stops.")
                return
            heard = time.monotonic()
            for line in _lines(buffer, data):
                word, _, rest = line.partition(" ")
                if word == "STOP":
                    _stop(f"rank {rank} stops: rank {rest} is gone.", quiet=not first)
                elif word == "FAIL":
                    time.sleep(FAIL_GRACE_SECONDS)
                    _stop(f"rank {rank} stops: rank 0 stopped on an error.", quiet=not first)
                elif word == "BYE":
                    return  # rank 0 finished: nothing left to watch
        now = time.monotonic()
        if now - heard > timeout and not selector.select(timeout=0):  # see _serve
            _stop(f"rank 0 went silent for {timeout / 60:g} minute(s) "
                  f"(trainer.dead_rank_timeout_minutes): its node is lost or frozen; rank "
                  f"{rank} stops.")
        if now - last_beat >= beat:
            last_beat = now
            with _state["lock"]:
                if not _send(conn, b"BEAT\n"):
                    _stop(f"rank 0 died (its monitor closed); rank {rank} stops.")


def rank_is_first_on_node() -> bool:
    """Only one rank per node reports a stop: a thousand identical lines help nobody."""
    return os.environ.get("LOCAL_RANK", "0") == "0"
