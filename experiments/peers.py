"""Several processes (``--coordinator``): a lost process ends the others cleanly.

What must stay true (tests/test_resume.py kills a process of two to check it): when a
process dies, every survivor exits non-zero within 30 s with one line on stderr that names
the lost process, without an abort or a C++ stack, and process 0, which writes the files,
first writes the report of what completed (a resumable run).

How, with jax 0.10's distributed runtime:

- The processes join with ``jax_enable_recoverability`` (a lost process does not make the
  coordination service abort the others) and a heartbeat timeout of
  :data:`HEARTBEAT_TIMEOUT_S` (how soon the service declares a silent process lost).
- In recoverable mode a barrier does not fail when a process is lost: it waits its full
  timeout (orbax's checkpoint barriers: 300 s). So :func:`watch` starts a thread that
  beats, every second, a counter of this process in the service's key-value store and
  reads the others'. A counter that stops for :data:`HEARTBEAT_TIMEOUT_S` is a lost
  process; if the main thread has not reached :func:`finish` within :data:`GRACE_S` (a
  collective that fails at once leads it there), the thread ends the process itself,
  process 0 first writing the report from results.json (the claims completed).
- :func:`finish`: at the end every process meets the others through
  ``get_live_nodes``, which waits for the live ones and leaves out the lost ones. With a
  process lost, the survivor writes its line, flushes and leaves with ``os._exit``:
  ``jax.distributed.shutdown`` would wait for the lost process. Otherwise the processes
  disconnect in order, process 0, which hosts the service, last: recoverable mode has no
  shutdown barrier, and a process whose service is gone when it disconnects aborts.
- A process other than 0 aborts, from a thread of jax's runtime, as soon as the service
  in process 0 is gone (jaxlib 0.10's ``missed_heartbeat_callback`` cannot take a Python
  function). So :func:`supervise` runs its work in a child process, which dies with it,
  passes the child's stderr through without the abort's log and stack, and turns that
  abort into the one line naming process 0.

The private names used here, ``jax._src.distributed.global_state.client`` (as
``jax.experimental.multihost_utils.live_devices`` uses it), live in :func:`_client`; without
them (another jax) :func:`finish` leaves the exit to jax.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["GRACE_S", "HEARTBEAT_TIMEOUT_S", "LOST_EXIT_STATUS", "finish", "supervise",
           "watch"]

HEARTBEAT_TIMEOUT_S = 10  # seconds without a heartbeat before a process counts as lost
GRACE_S = 5  # then, seconds the main thread has to reach finish() before the watch ends it
LOST_EXIT_STATUS = 3  # the exit status of a survivor
_WORKER = "EXPERIMENTS_SUPERVISED_WORKER"  # set in the child that supervise() starts
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# The start of the runtime's fatal log (absl: severity F, then the date) when the service
# is gone; what follows it (the status, the stack) is not passed through.
_FATAL = re.compile(rb"^F\d{4} ")
_SERVICE_LOST = b"JAX distributed service detected fatal errors"


def _lost_line(lost: list[int], num_processes: int, detail: str, written: str = "") -> str:
    names = ", ".join(map(str, lost))
    return (f"python -m experiments: lost process {names} of {num_processes} ({detail}); "
            f"{written}this process stops with exit status {LOST_EXIT_STATUS}")


def _die_with_parent(parent: int) -> None:
    """In the child, before it runs: SIGKILL when the parent dies (Linux), so killing the
    process the user started kills its work too."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def supervise(argv: list[str], process_id: int, num_processes: int) -> int | None:
    """Runs ``python -m experiments ARGV`` in a child process and returns its exit status,
    or returns None where nothing is to be done: in that child, in process 0 (it hosts the
    coordination service, which outlives any other process), off Linux.

    The child's stdout is this process's; its stderr is passed through line by line up to
    the runtime's fatal log. A child killed by that fatal error (the coordination service,
    in process 0, is gone) becomes one line naming process 0 and :data:`LOST_EXIT_STATUS`.
    """
    if os.environ.get(_WORKER) or process_id == 0 or not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    child = subprocess.Popen(
        [sys.executable, "-m", "experiments", *argv], env={**os.environ, _WORKER: "1"},
        stderr=subprocess.PIPE, preexec_fn=lambda: _die_with_parent(parent),
    )
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the child
    held: list[bytes] = []  # the fatal log, from its first line
    try:
        assert child.stderr is not None
        for line in child.stderr:
            if held or _FATAL.match(line):
                held.append(line)
            else:
                sys.stderr.buffer.write(line)
                sys.stderr.flush()
        status = child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if held and _SERVICE_LOST in held[0]:
        print(_lost_line([0], num_processes, "the coordinator: its service is gone"),
              file=sys.stderr, flush=True)
        return LOST_EXIT_STATUS
    sys.stderr.buffer.write(b"".join(held))  # another fatal error: as it was
    sys.stderr.flush()
    return status if status >= 0 else 128 - status


def _client() -> Any:
    """jax's distributed runtime client, or None (not started, or another jax)."""
    try:
        from jax._src import distributed
    except ImportError:
        return None
    return getattr(getattr(distributed, "global_state", None), "client", None)


class _Watch:
    """The thread of :func:`watch` and what it found."""

    def __init__(self, client: Any, process_id: int, num_processes: int, out: str):
        self.client, self.process_id, self.out = client, process_id, out
        self.num_processes = num_processes
        self.lost: list[int] = []
        self.finishing = threading.Event()  # the main thread is in finish(): judge no more
        self.stopping = threading.Event()  # the main thread disconnects: stop beating
        self.thread = threading.Thread(target=self._run, name="experiments.peers.watch",
                                       daemon=True)
        self.thread.start()

    def _key(self, process_id: int) -> str:
        return f"experiments/peers/beat/{process_id}"

    def _run(self) -> None:
        others = [i for i in range(self.num_processes) if i != self.process_id]
        seen = {i: ("", time.monotonic()) for i in others}  # last value, since when
        beat = 0
        while not (self.lost or self.stopping.is_set()):
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(self._key(self.process_id), str(beat), True)
                values = {i: self._try_get(i) for i in others}
            except Exception:  # the service is gone, or jax shut down at the end
                return
            seen = {i: seen[i] if values[i] == seen[i][0] else (values[i], now) for i in others}
            if not self.finishing.is_set():
                self.lost = [i for i in others if now - seen[i][1] > HEARTBEAT_TIMEOUT_S]
            self.stopping.wait(1.0)
        if self.lost and not self.finishing.wait(GRACE_S):  # the main thread is stuck
            written = ""
            if self.process_id == 0:
                from . import report

                with contextlib.suppress(Exception):  # the line matters more
                    written = (f"the report of what completed is in "
                               f"{report.write_report(self.out)}; ")
            _exit_lost(self.lost, self.num_processes,
                       f"no heartbeat for {HEARTBEAT_TIMEOUT_S} s", written)

    def _try_get(self, process_id: int) -> str:
        try:
            return self.client.key_value_try_get(self._key(process_id))
        except Exception:  # not set yet
            return ""


_watch: _Watch | None = None


def watch(num_processes: int, out: str) -> None:
    """Starts watching the other processes (once jax.distributed is initialized): a lost
    one ends this process within ``HEARTBEAT_TIMEOUT_S + GRACE_S`` seconds, in one line."""
    import jax

    global _watch
    client = _client()
    if client is not None and _watch is None:
        _watch = _Watch(client, jax.process_index(), num_processes, out)


def _exit_lost(lost: list[int], num_processes: int, detail: str, written: str) -> None:
    print(_lost_line(lost, num_processes, detail, written), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(LOST_EXIT_STATUS)  # jax.distributed.shutdown would wait for the lost


def finish(num_processes: int, out: str) -> None:
    """Meets the other processes at the end of the run and disconnects from them in order.

    A process lost meanwhile is named on stderr in one line and this process exits at once
    with :data:`LOST_EXIT_STATUS` (its files are written; ``out`` is where).
    """
    import jax

    client = _client()
    if client is None or not hasattr(client, "get_live_nodes"):
        return  # jax's own shutdown at exit
    written = f"the report of what completed is in {out}; " if jax.process_index() == 0 else ""
    if _watch is not None:
        _watch.finishing.set()
        if _watch.lost:
            _exit_lost(_watch.lost, num_processes, f"no heartbeat for {HEARTBEAT_TIMEOUT_S} s",
                       written)
    everyone = list(range(num_processes))
    try:
        live = client.get_live_nodes(everyone)  # waits for every live process
    except Exception as error:  # the service, in process 0, is gone
        live, detail = {}, f"the coordinator: {str(error).splitlines()[0]}"
    else:
        detail = f"no heartbeat for {HEARTBEAT_TIMEOUT_S} s"
    lost = [i for i in everyone if i not in live and i != jax.process_index()]
    if lost:
        _exit_lost(lost, num_processes, detail, written)
    if _watch is not None:
        _watch.stopping.set()
        _watch.thread.join()
    if jax.process_index() == 0:
        client.get_live_nodes(everyone)  # returns once every other process disconnected
    jax.distributed.shutdown()
