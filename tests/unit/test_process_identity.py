import subprocess
import time

from torpor.hypervisor.process import ProcessIdentity, TrackedProcess


def test_identity_tracks_exactly_one_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        identity = ProcessIdentity.of(child.pid)
        assert identity is not None and identity.is_alive()
        # Same pid, different start time: a reused pid is never ours.
        impostor = ProcessIdentity(pid=child.pid, start_time=identity.start_time + 1)
        assert not impostor.is_alive()
        assert TrackedProcess(impostor).signal(9) is False
        assert child.poll() is None  # the impostor check did not signal it
        process = TrackedProcess(identity)
        assert process.wait_exit(0.05) is False
        process.signal(15)
        assert process.wait_exit(5)  # pidfd becomes readable on exit
        child.wait()
        assert not identity.is_alive()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_zombie_counts_as_gone() -> None:
    child = subprocess.Popen(["true"])
    identity = ProcessIdentity.of(child.pid)
    assert identity is not None
    deadline = time.monotonic() + 5
    while identity.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # not yet reaped: a zombie, which must already count as gone
    assert not identity.is_alive()
    child.wait()


def test_unknown_pid() -> None:
    assert ProcessIdentity.of(2**22 + 12345) is None
