"""How a ``tipcap`` command's OpenMP threads wait for work: spinning while the machine is theirs alone,
sleeping at once while it is shared.

libgomp, the OpenMP runtime of torch's Linux wheels, reads its wait policy once, when torch loads. An idle
thread then spins (``GOMP_SPINCOUNT`` times, 300,000 by default) before it sleeps, or sleeps at once
(``OMP_WAIT_POLICY=PASSIVE``). Spinning is fastest for a run alone, but the spinning threads of two
processes take the cores that the other's working threads need, and both crawl; threads that sleep at once
share the cores well and slow a run alone. Measured with ``benchmarks/concurrent_training.py`` (README §
Benchmarks): on 2 cores, two tiny trainings at once took 2.9–3.6x one alone with 300,000 spins and 46x with
``OMP_WAIT_POLICY=ACTIVE``; sleeping at once, 0.9x, but one alone took 1.3x (an AMD EPYC) to 1.6x (an
Intel Xeon) as long as with spinning threads.

So each command chooses as it starts, before torch loads (:func:`choose_wait_policy`). It keeps OpenMP's
spinning default when no other task is runnable on the machine and it holds the *spin token*, a lock on a
file of this user's (:func:`claim_spin_token`) that one ``tipcap`` process at a time holds, for as long as
it runs. Otherwise its threads sleep at once. Of two commands started together, one spins and the other
sleeps. The policy decides when threads run, never what they compute: results are the same bytes either
way (the thread count, which does change them, is left alone).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

BOUNDED_SPIN_COUNT = "3000"
"""Spins of an idle thread of ``tipcap serve`` before it sleeps: a server waits for requests, so it takes
no spin token, and a bounded spin keeps its latency without holding cores while it waits."""

WaitPolicy = Literal["yours", "single", "bounded", "spin", "sleep"]

_token: int | None = None
"""The open lock file whose lock this process holds (the spin token), or ``None``."""


def token_path() -> Path:
    """The spin token's lock file: one per user, in the temporary-files folder."""
    return Path(tempfile.gettempdir()) / f"tipcap-spin-{os.getuid()}.lock"


def claim_spin_token() -> bool:
    """Take the spin token unless another process holds it; held until this process ends (the kernel
    drops the lock with the process, however it ends). ``True`` also when the lock file cannot be opened:
    the processes cannot take turns then, and the machine's load alone decides."""
    global _token
    if _token is not None:
        return True
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        descriptor = os.open(token_path(), flags, 0o600)
    except OSError:
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return False
    _token = descriptor
    return True


def other_runnable_tasks(samples: int = 5, interval: float = 0.004) -> int | None:
    """Tasks runnable on the machine besides this process's one thread: the fewest over ``samples``
    readings of ``/proc/loadavg``, ``interval`` seconds apart, so that a task that wakes for a moment does
    not count; ``None`` where the file does not exist (not Linux)."""
    counts = []
    for sample in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as file:
                running = int(file.read().split()[3].partition("/")[0])
        except (OSError, ValueError, IndexError):
            return None
        counts.append(running - 1)
        if sample + 1 < samples:
            time.sleep(interval)
    return max(0, min(counts))


def choose_wait_policy(command: str | None) -> WaitPolicy:
    """Set the wait policy of this process's OpenMP threads for ``command`` (see the module); what was
    chosen. Nothing is set once torch has loaded (OpenMP has read its settings then), where the
    environment sets ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (``yours``), or for one thread per process
    (``single``: no thread waits for another)."""
    if "torch" in sys.modules or {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys():
        return "yours"
    if os.environ.get("OMP_NUM_THREADS") == "1":
        return "single"
    if command == "serve":
        os.environ["GOMP_SPINCOUNT"] = BOUNDED_SPIN_COUNT
        return "bounded"
    others = other_runnable_tasks()
    if (others is None or others == 0) and claim_spin_token():
        logger.debug("OpenMP threads spin: the machine is idle and this process holds the spin token")
        return "spin"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    logger.debug("OpenMP threads sleep at once: other runnable tasks %s, or another process spins", others)
    return "sleep"
