"""The tests' own hygiene: a process group a test leaves behind fails that test (conftest.py's
``no_process_group_left``, built on helpers.py's :func:`reap_left_behind`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SESSION_MARKER, group_alive, kill_group_now, new_groups, reap_left_behind, session_alive

#: Set by :func:`test_a_test_that_leaves_a_group_fails`, for the test it runs in a pytest of its own.
LEAVE = "AIC_PROXY_TEST_LEAVE_A_GROUP"
SESSION = os.environ[SESSION_MARKER]


def sleeper(*, new_session: bool = True, seconds: float = 120) -> subprocess.Popen[bytes]:
    """A process in a process group of its own (as vLLM runs), carrying the session's marker."""
    return subprocess.Popen(
        [sys.executable, "-c", f"import time; time.sleep({seconds})"], start_new_session=new_session
    )


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts on purpose; killed (group and all) at the end whatever happens."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        kill_group_now(process.pid)
        process.kill()
        process.wait()


def test_a_group_left_behind_is_named_and_killed(started: list[subprocess.Popen[bytes]]) -> None:
    before = session_alive(SESSION)
    left = sleeper()
    started.append(left)
    assert group_alive(left.pid)
    assert set(new_groups(before, SESSION)) == {left.pid}
    report = reap_left_behind(before, SESSION, wait=0.5)
    assert len(report) == 1 and report[0].startswith(f"group {left.pid}: {left.pid} "), report
    assert "time.sleep(120)" in report[0], report
    assert left.wait(10) == -9  # killed
    assert not group_alive(left.pid)


def test_a_group_that_goes_within_the_grace_period_is_not_reported(
    started: list[subprocess.Popen[bytes]],
) -> None:
    before = session_alive(SESSION)
    stopping = sleeper(seconds=0.5)
    started.append(stopping)
    assert reap_left_behind(before, SESSION, wait=30) == []
    assert stopping.wait(10) == 0  # it ended by itself: nothing was killed


def test_groups_alive_before_and_processes_in_this_group_are_not_counted(
    started: list[subprocess.Popen[bytes]],
) -> None:
    earlier = sleeper()  # a module fixture's simulator, say
    started.append(earlier)
    before = session_alive(SESSION)
    assert earlier.pid in before.groups
    own = sleeper(new_session=False)  # a daemon: it runs in pytest's process group
    started.append(own)
    assert new_groups(before, SESSION) == {}


def test_a_named_group_is_checked_even_without_the_marker(started: list[subprocess.Popen[bytes]]) -> None:
    before = session_alive(SESSION)
    env = {name: value for name, value in os.environ.items() if name != SESSION_MARKER}
    unmarked = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True, env=env
    )
    started.append(unmarked)
    assert new_groups(before, SESSION) == {}  # the marker is how groups are found...
    assert set(new_groups(before, SESSION, {unmarked.pid})) == {unmarked.pid}  # ...or the test names them


DAEMON = """
import subprocess, sys
sys.stdin.readline()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print(child.pid, flush=True)
sys.stdin.readline()
"""


def test_a_group_held_by_a_daemon_of_a_wider_fixture_counts_once_the_daemon_is_gone(
    started: list[subprocess.Popen[bytes]],
) -> None:
    """A module's daemon launches vLLM during a test and keeps it for the next test: not a
    leftover of that test. Once the daemon is gone, the orphaned group is one."""
    daemon = subprocess.Popen([sys.executable, "-c", DAEMON], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    started.append(daemon)
    before = session_alive(SESSION)  # the daemon is running, it has started nothing yet
    assert daemon.stdin is not None and daemon.stdout is not None
    daemon.stdin.write(b"launch\n")
    daemon.stdin.flush()
    child = int(daemon.stdout.readline())
    try:
        assert group_alive(child)
        assert new_groups(before, SESSION) == {}
        daemon.kill()
        daemon.wait(10)
        assert set(new_groups(before, SESSION)) == {child}
    finally:
        kill_group_now(child)


@pytest.mark.skipif(os.environ.get(LEAVE) is None, reason="run by test_a_test_that_leaves_a_group_fails")
def test_leaves_a_group_behind() -> None:
    left = sleeper()
    Path(os.environ[LEAVE]).write_text(str(left.pid))


def test_a_test_that_leaves_a_group_fails(tmp_path: Path) -> None:
    """The autouse fixture in action: the test that left a group fails at teardown, naming it,
    and the group is gone afterwards."""
    pid_file = tmp_path / "pid"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{__file__}::test_leaves_a_group_behind"],
        env={**os.environ, LEAVE: str(pid_file), "AIC_PROXY_TEST_GROUP_GRACE": "1"},
        capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 passed, 1 error" in output, output
    pid = int(pid_file.read_text())
    assert "ERROR at teardown of test_leaves_a_group_behind" in output, output
    assert f"process groups left behind by the test (killed now):\ngroup {pid}: {pid} " in output, output
    assert not group_alive(pid)
