"""How a ``tipcap`` command's OpenMP threads wait: the spin token across processes, and the machine's load."""

import os
import subprocess
import sys
import textwrap

import pytest

from tipcap.cli.threads import other_runnable_tasks

# A fresh interpreter, as a command starts: torch not loaded, the machine's load read as idle unless the
# first argument says otherwise. It prints the policy chosen for the command and the environment it set,
# then holds on (and so holds the spin token, if it took it) until its standard input closes.
CHOOSE = textwrap.dedent(
    """
    import os, sys
    from tipcap.cli import threads
    busy = int(sys.argv[1])
    threads.other_runnable_tasks = lambda: busy
    policy = threads.choose_wait_policy(sys.argv[2])
    print(policy, os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT"), flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def fresh_env(tmp_path):
    """The environment of a command started by hand, with its own temporary-files folder (where the spin
    token's lock file lives)."""
    unset = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TIPCAP_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["TMPDIR"] = str(tmp_path)
    return env


def start(env, busy=0, command="train", **extra):
    process = subprocess.Popen(
        [sys.executable, "-c", CHOOSE, str(busy), command],
        env={**env, **extra},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, process.stdout.readline().split()


def stop(process):
    process.stdin.close()
    assert process.wait(timeout=60) == 0


def test_one_command_at_a_time_spins_and_the_next_sleeps_until_the_first_ends(fresh_env, tmp_path):
    first, chosen = start(fresh_env)
    # OpenMP's default: nothing is set, and its threads spin 300,000 times before they sleep.
    assert chosen == ["spin", "None", "None"]
    assert (tmp_path / f"tipcap-spin-{os.getuid()}.lock").is_file()
    second, chosen = start(fresh_env)
    assert chosen == ["sleep", "PASSIVE", "None"]
    stop(second)
    stop(first)
    # The kernel drops the lock with the process that held it.
    third, chosen = start(fresh_env)
    assert chosen == ["spin", "None", "None"]
    stop(third)


def test_a_busy_machine_sleeps_and_leaves_the_token(fresh_env):
    busy, chosen = start(fresh_env, busy=1)
    assert chosen == ["sleep", "PASSIVE", "None"]
    # It did not take the token: a command started on an idle machine beside it spins.
    idle, chosen = start(fresh_env)
    assert chosen == ["spin", "None", "None"]
    stop(idle)
    stop(busy)


def test_the_server_the_users_settings_and_one_thread_are_left_as_they_are(fresh_env):
    server, chosen = start(fresh_env, command="serve")
    assert chosen == ["bounded", "None", "3000"]
    stop(server)
    for extra, expected in [
        ({"OMP_WAIT_POLICY": "ACTIVE"}, ["yours", "ACTIVE", "None"]),
        ({"GOMP_SPINCOUNT": "10"}, ["yours", "None", "10"]),
        ({"OMP_NUM_THREADS": "1"}, ["single", "None", "None"]),
    ]:
        process, chosen = start(fresh_env, **extra)
        assert chosen == expected
        stop(process)
    # The server took no token.
    process, chosen = start(fresh_env)
    assert chosen == ["spin", "None", "None"]
    stop(process)


@pytest.mark.skipif(not os.path.exists("/proc/loadavg"), reason="reads Linux's /proc/loadavg")
def test_a_process_that_keeps_a_core_busy_counts_as_another_runnable_task():
    burner = subprocess.Popen(
        [sys.executable, "-c", "print('spinning', flush=True)\nwhile True: pass"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # Once it has said so, it is in its loop: runnable at every reading, running or waiting for a core.
        assert burner.stdout.readline().strip() == "spinning"
        assert other_runnable_tasks(samples=20, interval=0.002) >= 1
    finally:
        burner.kill()
        burner.wait()
