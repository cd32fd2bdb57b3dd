"""The run lock: one writer per output, taken atomically, released only by its holder.

Real processes race for it (forked, released together by a barrier); a holder is killed
with SIGKILL to leave a stale lock behind.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from orchestration.errors import DatagenError
from orchestration.run_lock import LOCK, RunLock

CTX = mp.get_context("fork")
RACERS = 8


def _race(out: str, barrier, results, release, no_flock: bool) -> None:
    if no_flock:
        RunLock._try_flock = lambda self: None  # a filesystem that refuses flock
    barrier.wait()
    try:
        with RunLock(out):
            results.put(("won", os.getpid()))
            release.wait(60)
    except DatagenError as exc:
        results.put(("lost", str(exc)))


@pytest.mark.parametrize("no_flock", [False, True], ids=["flock", "exclusive-create"])
def test_exactly_one_of_many_simultaneous_runs_takes_the_lock(tmp_path, no_flock):
    barrier, results, release = CTX.Barrier(RACERS), CTX.Queue(), CTX.Event()
    procs = [
        CTX.Process(target=_race, args=(str(tmp_path), barrier, results, release, no_flock))
        for _ in range(RACERS)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    winners = [who for kind, who in outcomes if kind == "won"]
    try:
        assert len(winners) == 1, outcomes
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == winners[0]
        assert all("another datagen job" in msg for kind, msg in outcomes if kind == "lost")
    finally:
        release.set()
        for p in procs:
            p.join(60)
    assert not (tmp_path / LOCK).exists(), "the winner removes its lock when done"


def _try_and_exit(out: str, results) -> None:
    try:
        with RunLock(out):
            results.put("won")
    except DatagenError as exc:
        results.put(str(exc))


def test_a_loser_exiting_leaves_the_holders_lock(tmp_path):
    results = CTX.Queue()
    with RunLock(str(tmp_path)) as held:
        p = CTX.Process(target=_try_and_exit, args=(str(tmp_path), results))
        p.start()
        p.join(60)
        assert f"pid {os.getpid()}" in results.get(timeout=5)
        assert json.loads((tmp_path / LOCK).read_text())["token"] == held.token
        with pytest.raises(DatagenError, match="another datagen job"):  # same process, too
            RunLock(str(tmp_path)).__enter__()
        assert json.loads((tmp_path / LOCK).read_text())["token"] == held.token
    assert not (tmp_path / LOCK).exists()


def test_a_run_never_removes_a_lock_it_does_not_hold(tmp_path):
    """Someone removes A's lock file by hand and B takes the output; A ending must not
    remove B's lock."""
    a = RunLock(str(tmp_path)).__enter__()
    (tmp_path / LOCK).unlink()
    with RunLock(str(tmp_path)) as b:
        a.__exit__(None, None, None)
        assert json.loads((tmp_path / LOCK).read_text())["token"] == b.token
    assert not (tmp_path / LOCK).exists()


def _hold_forever(out: str, results) -> None:
    with RunLock(out):
        results.put(os.getpid())
        time.sleep(600)


@pytest.mark.parametrize("no_flock", [False, True], ids=["flock", "exclusive-create"])
def test_the_lock_of_a_killed_job_is_taken_over(tmp_path, monkeypatch, no_flock):
    results = CTX.Queue()
    p = CTX.Process(target=_hold_forever, args=(str(tmp_path), results))
    p.start()
    pid = results.get(timeout=60)
    if no_flock:
        monkeypatch.setattr(RunLock, "_try_flock", lambda self: None)
    with pytest.raises(DatagenError, match=f"pid {pid}"):
        RunLock(str(tmp_path)).__enter__()
    os.kill(pid, signal.SIGKILL)
    p.join(60)
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == pid  # left behind
    with RunLock(str(tmp_path)) as lock:
        assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.token
    assert not (tmp_path / LOCK).exists()


@pytest.mark.parametrize("content", [b"\x00\xffgarbage", b"[1, 2]", b"{not json"])
def test_a_garbled_lock_file_says_how_to_remove_it(tmp_path, content):
    (tmp_path / LOCK).write_bytes(content)
    with pytest.raises(DatagenError) as err:
        RunLock(str(tmp_path)).__enter__()
    assert f"remove {tmp_path / LOCK} if no job is running" in str(err.value)
    assert (tmp_path / LOCK).read_bytes() == content  # left for the user to judge


def test_another_hosts_lock_is_honoured_for_a_day(tmp_path):
    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time() - 60}))
    with pytest.raises(DatagenError, match="held by host elsewhere pid 1; remove"):
        RunLock(str(tmp_path)).__enter__()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time() - 2 * 86400}))
    with RunLock(str(tmp_path)):
        assert json.loads(lock.read_text())["host"] == socket.gethostname()


def test_object_store_outputs_use_exclusive_create(tmp_path):
    """fsspec outputs (memory:// here): exclusive create, stale takeover, own token only."""
    import fsspec

    fs = fsspec.filesystem("memory")
    out = f"memory://{tmp_path.name}-lock"
    path = f"/{tmp_path.name}-lock/{LOCK}"
    with RunLock(out) as held:
        assert json.loads(fs.cat(path))["token"] == held.token
        with pytest.raises(DatagenError, match="another datagen job"):
            RunLock(out).__enter__()
    assert not fs.exists(path)

    dead = CTX.Process(target=os.getpid)
    dead.start()
    dead.join()
    fs.pipe(
        path, json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0}).encode()
    )
    with RunLock(out) as taker:
        assert json.loads(fs.cat(path))["token"] == taker.token
        fs.pipe(path, json.dumps({"host": "elsewhere", "pid": 2, "started": time.time()}).encode())
    assert json.loads(fs.cat(path))["host"] == "elsewhere", "not ours any more: left in place"
    fs.rm(path)
    fs.pipe(path, b"\x00garbled")
    with pytest.raises(DatagenError, match="if no job is running"):
        RunLock(out).__enter__()
    fs.rm(path)


def test_lock_file_is_not_followed_through_a_symlink(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).symlink_to(victim)
    with pytest.raises(OSError):
        RunLock(str(out)).__enter__()
    assert victim.read_text() == "precious"
    assert Path(out / LOCK).is_symlink()
