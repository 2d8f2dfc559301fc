"""tunnel_agent.spool: the durable store of spool mode, on a real filesystem.

The write path (round trip, order, permissions, limits under concurrent writers), real OS errors (a 1 MiB
tmpfs that fills up, a directory bind-mounted read-only; an fsync that fails), replay after a simulated crash, the
forward path's and the quarantine's bookkeeping, the entry file's header against every single-byte
corruption, and a child process SIGKILLed at random moments (tests/support/spoolwriter.py) after which
every entry it reported committed is there and intact.

The tests that mount (a tmpfs, a read-only bind mount) need root; elsewhere they are skipped and say
why, and under CI=true they fail.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.fixtures import small_tmpfs
from tests.support import missing_prerequisite
from tests.support.spoolwriter import DESTINATIONS, pattern
from tunnel_agent.spool import (
    ReplayCounts,
    Spool,
    SpoolEntry,
    SpoolError,
    SpoolFull,
    SpoolIOError,
    SpoolRecord,
    SpoolStateError,
    SpoolStats,
    store,
)
from tunnel_agent.spool.entryfile import FIXED_HEADER, CorruptEntry, encode_header, read_header, seal
from tunnel_agent.spool.layout import Area, Layout

HELPER = Path(__file__).resolve().parent / "support" / "spoolwriter.py"
DEST = "dest-a"
NAME_CHARS = set("0123456789abcdef-")


def make_record(i: int = 1, destination: str = DEST, received: float | None = None) -> SpoolRecord:
    return SpoolRecord(destination=destination, calling_ae="CT_SCANNER", called_ae="CLOUD_PACS",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"1.2.826.0.1.3680043.{i}",
                       transfer_syntax="1.2.840.10008.1.2.1", study_key=f"study-{i}",
                       received=1000.0 + i if received is None else received)


def put(spool: Spool, data: bytes, i: int = 1, destination: str = DEST, chunk: int = 4096) -> SpoolEntry:
    with spool.begin(make_record(i, destination)) as writer:
        for start in range(0, len(data), chunk):
            writer.write(data[start:start + chunk])
        return writer.commit()


def files(root: Path, destination: str, area: Area) -> list[str]:
    return sorted(os.listdir(root / destination / area.value))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "state" / "spool"


@pytest.fixture
def spool(root: Path) -> Iterator[Spool]:
    root.parent.mkdir()
    with Spool(root, max_bytes=0, min_free_bytes=0) as opened:
        yield opened


# --- the write path ---------------------------------------------------------------------------------


def test_an_entry_round_trips_through_the_file_and_a_reopen(spool: Spool, root: Path) -> None:
    data = os.urandom(100_000)
    entry = put(spool, data)
    assert entry.record == dataclasses.replace(make_record(), size=len(data))
    assert files(root, DEST, Area.READY) == [entry.name]
    assert files(root, DEST, Area.INCOMING) == []
    path = root / DEST / "ready" / entry.name
    fd = os.open(path, os.O_RDONLY)
    try:
        header = read_header(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    assert header.record == entry.record
    assert path.read_bytes()[header.dataset_offset:] == data  # the dataset exactly as received, nothing after
    assert spool.ready(DEST, 10, now=0.0) == [entry]
    assert spool.claim(entry)
    with spool.open_dataset(entry) as stream:
        assert stream.read() == data
    spool.close()
    with Spool(root, max_bytes=0, min_free_bytes=0) as again:
        (found,) = again.ready(DEST, 10, now=0.0)
        assert found.record == entry.record and found.name == entry.name
        assert again.report is not None and again.report.total.possible_duplicates == 1  # it was claimed
        assert again.claim(found)
        with again.open_dataset(found) as stream:
            assert stream.read() == data


def test_an_empty_dataset_is_an_entry_too(spool: Spool) -> None:
    entry = put(spool, b"")
    assert entry.record.size == 0
    assert spool.claim(entry)
    with spool.open_dataset(entry) as stream:
        assert stream.read() == b""


def test_ready_is_oldest_first_and_skips_claimed_and_waiting_entries(spool: Spool, root: Path) -> None:
    entries = [put(spool, bytes([i]) * 10, i=i) for i in range(6)]
    names = [e.name for e in entries]
    assert names == sorted(names) == files(root, DEST, Area.READY)  # names sort in receive order
    assert [e.name for e in spool.ready(DEST, 3, now=0.0)] == names[:3]
    assert spool.claim(entries[0])
    assert spool.claim(entries[1])
    assert spool.retry(entries[1], not_before=50.0, reason="destination busy") == 1
    assert [e.name for e in spool.ready(DEST, 10, now=49.9)] == names[2:]
    at_50 = spool.ready(DEST, 10, now=50.0)
    assert [e.name for e in at_50] == names[1:]  # back in its place once its time has come
    assert (at_50[0].attempts, at_50[0].not_before, at_50[0].last_reason) == (1, 50.0, "destination busy")
    assert spool.ready("dest-unknown", 10, now=0.0) == []


def test_names_go_on_sorting_after_a_reopen_and_say_nothing_about_the_patient(spool: Spool, root: Path) -> None:
    before = [put(spool, b"x", i=i) for i in range(3)]
    spool.close()
    with Spool(root, max_bytes=0, min_free_bytes=0) as again:
        after = put(again, b"y", i=9)
        assert [e.name for e in again.ready(DEST, 10, now=0.0)] == [*(e.name for e in before), after.name]
    for entry in [*before, after]:
        assert set(entry.name) <= NAME_CHARS and len(entry.name) == 25
        assert "3680043" not in entry.name and "CT_SCANNER" not in entry.name


def test_names_sort_after_those_of_a_spool_that_was_emptied(spool: Spool, root: Path) -> None:
    old = put(spool, b"x", i=5)
    assert spool.claim(old)
    spool.delivered(old)
    spool.close()
    with Spool(root, max_bytes=0, min_free_bytes=0) as again:
        assert put(again, b"y", i=6).name > old.name  # nothing left to number after: the receive time is
        assert put(again, b"z", i=1).name > old.name  # a clock that went back does not reorder either


def test_directories_are_0700_and_files_0600_whatever_the_umask(root: Path) -> None:
    root.mkdir(parents=True, mode=0o755)
    os.chmod(root, 0o755)  # found looser: tightened
    (root / DEST).mkdir(mode=0o777)
    os.chmod(root / DEST, 0o777)
    old = os.umask(0)
    try:
        with Spool(root, max_bytes=0, min_free_bytes=0) as spool:
            entry = put(spool, b"data")
            assert spool.claim(entry)
            spool.quarantine(entry, "for the test")
            writer = spool.begin(make_record(2, "dest-b"))
            modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}
            writer.discard()
    finally:
        os.umask(old)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    dirs = {name: mode for name, mode in modes.items() if (root / name).is_dir()}
    assert set(dirs) >= {f"{d}/{a.value}" for d in (DEST, "dest-b") for a in Area}
    assert set(dirs.values()) == {0o700}, dirs
    file_modes = {name: mode for name, mode in modes.items() if name not in dirs}
    assert any(name.startswith("dest-b/incoming/") for name in file_modes)
    assert any(name.endswith(".reason") for name in file_modes)
    assert set(file_modes.values()) == {0o600}, file_modes


def test_a_second_open_is_refused_while_the_spool_is_held(spool: Spool, root: Path) -> None:
    with pytest.raises(SpoolError, match="in use"):
        Spool(root, min_free_bytes=0).open()


def test_invalid_destination_names_are_refused(spool: Spool) -> None:
    for bad in ["", "../etc", "Dest", "a" * 64, "dest/a", "dest_a"]:
        with pytest.raises(ValueError):
            spool.begin(make_record(destination=bad))
        with pytest.raises(ValueError):
            spool.ready(bad, 1, now=0.0)


def test_a_writer_used_as_a_context_manager_discards_unless_committed(spool: Spool, root: Path) -> None:
    with pytest.raises(RuntimeError), spool.begin(make_record()) as writer:
        writer.write(b"x" * 5000)
        raise RuntimeError("the association was aborted")
    assert files(root, DEST, Area.INCOMING) == []
    assert spool.stats(DEST) == SpoolStats()
    with pytest.raises(SpoolStateError):
        writer.write(b"more")
    with pytest.raises(SpoolStateError):
        writer.commit()
    writer.discard()  # harmless when already done


def test_a_writer_cannot_commit_once_the_spool_is_closed(spool: Spool, root: Path) -> None:
    writer = spool.begin(make_record())
    writer.write(b"x")
    spool.close()
    with pytest.raises(SpoolStateError):
        writer.commit()
    assert files(root, DEST, Area.INCOMING) == files(root, DEST, Area.READY) == []
    with pytest.raises(SpoolStateError):
        spool.begin(make_record())


# --- limits -----------------------------------------------------------------------------------------


def test_spool_full_at_begin_names_the_limit(root: Path) -> None:
    root.parent.mkdir()
    with Spool(root, max_bytes=0, min_free_bytes=0, destination_max_bytes={DEST: 3000}) as spool:
        put(spool, b"x" * 2500)
        with pytest.raises(SpoolFull) as caught:
            spool.begin(make_record())  # the header alone would pass the destination's limit
        assert caught.value.limit == "destination" and caught.value.errno is None
        put(spool, b"x" * 2500, destination="dest-b")  # another destination is not held back by it
    with Spool(root, max_bytes=5000, min_free_bytes=0) as spool:
        with pytest.raises(SpoolFull) as caught:
            spool.begin(make_record(destination="dest-c"))
        assert caught.value.limit == "total"
    free = shutil.disk_usage(root).free
    with Spool(root, max_bytes=0, min_free_bytes=free * 2) as spool:
        with pytest.raises(SpoolFull) as caught:
            spool.begin(make_record(destination="dest-c"))
        assert caught.value.limit == "free space"
        assert files(root, "dest-c", Area.INCOMING) == []


def test_spool_full_mid_write_discards_the_writer_and_gives_its_bytes_back(root: Path) -> None:
    root.parent.mkdir()
    with Spool(root, max_bytes=50_000, min_free_bytes=0) as spool:
        writer = spool.begin(make_record())
        writer.write(b"x" * 40_000)
        with pytest.raises(SpoolFull) as caught:
            writer.write(b"x" * 20_000)
        assert caught.value.limit == "total"
        assert files(root, DEST, Area.INCOMING) == []
        with pytest.raises(SpoolStateError):
            writer.commit()
        assert spool.stats() == SpoolStats()
        assert put(spool, b"y" * 45_000).record.size == 45_000  # the bytes were released


def test_every_way_out_of_the_spool_gives_its_bytes_back(root: Path) -> None:
    root.parent.mkdir()
    with Spool(root, max_bytes=10_000, min_free_bytes=0) as spool:
        delivered = put(spool, b"d" * 4000, i=1)
        assert spool.claim(delivered)
        spool.delivered(delivered)
        dropped = put(spool, b"q" * 4000, i=2)
        spool.quarantine(dropped, "test")
        spool.drop_quarantine(DEST, dropped.name)
        released = put(spool, b"r" * 4000, i=3, destination="dest-b")
        spool.quarantine(released, "test")
        spool.release_quarantine("dest-b", released.name)
        assert spool.claim(released) and spool.retry(released, 0.0, "test") == 1
        assert spool.claim(released)
        spool.delivered(released)
        spool.begin(make_record(4)).discard()
        assert spool.stats() == dataclasses.replace(SpoolStats(), delivered_total=2, retries_total=1)
        assert put(spool, b"f" * 9700, i=5).record.size == 9700  # the whole limit is free again
        with pytest.raises(SpoolFull):
            spool.begin(make_record(6, "dest-b"))


def test_concurrent_writers_cannot_overshoot_the_limits(root: Path) -> None:
    root.parent.mkdir()
    limit, dest_limit = 400_000, 250_000
    with Spool(root, max_bytes=limit, min_free_bytes=0, destination_max_bytes={DEST: dest_limit}) as spool:
        barrier = threading.Barrier(8)
        outcome: list[str] = []
        errors: list[BaseException] = []

        def writer_thread(k: int) -> None:
            destination = DEST if k % 2 else "dest-b"
            barrier.wait()
            try:
                for n in range(20):
                    try:
                        put(spool, bytes([k]) * 30_000, i=k * 100 + n, destination=destination, chunk=1000)
                        outcome.append("committed")
                    except SpoolFull:
                        outcome.append("full")
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        threads = [threading.Thread(target=writer_thread, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        assert "full" in outcome and "committed" in outcome
        on_disk = {d: sum((root / d / "ready" / n).stat().st_size for n in files(root, d, Area.READY))
                   for d in (DEST, "dest-b")}
        assert on_disk[DEST] <= dest_limit and sum(on_disk.values()) <= limit, on_disk
        assert spool.stats().bytes == sum(on_disk.values())
        assert spool.stats(DEST).bytes == on_disk[DEST]
        assert outcome.count("committed") == spool.stats().instances
        assert files(root, DEST, Area.INCOMING) == files(root, "dest-b", Area.INCOMING) == []


# --- OS errors --------------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of the test's own, unmounted afterwards."""
    with small_tmpfs(tmp_path / "small", "1m") as mount_point:
        yield mount_point


def test_a_full_filesystem_is_spool_full_and_the_store_stays_usable(small_fs: Path) -> None:
    root = small_fs / "spool"
    with Spool(root, max_bytes=0, min_free_bytes=0) as spool:
        writer = spool.begin(make_record())
        with pytest.raises(SpoolFull) as caught:
            for _ in range(100):
                writer.write(b"x" * 64 * 1024)  # 6 MiB into 1 MiB
        assert caught.value.errno == errno.ENOSPC and caught.value.limit == "filesystem"
        assert files(root, DEST, Area.INCOMING) == []
        assert spool.stats() == SpoolStats()
        entry = put(spool, b"z" * 100_000, i=2)  # the space came back with the partial file
        assert spool.claim(entry)
        with spool.open_dataset(entry) as stream:
            assert stream.read() == b"z" * 100_000


def test_a_read_only_directory_is_an_io_error_and_the_store_recovers(spool: Spool, root: Path) -> None:
    # incoming/ bind-mounted onto itself read-only: the kernel's own EROFS, while the spool holds its lock
    # file open for writing elsewhere on the filesystem (which a remount of the whole one would refuse).
    if os.geteuid() != 0:
        missing_prerequisite("a read-only bind mount needs root")
    put(spool, b"before")
    incoming = root / DEST / "incoming"
    for argv in (["mount", "--bind", str(incoming), str(incoming)],
                 ["mount", "-o", "remount,bind,ro", str(incoming)]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode:
            subprocess.run(["umount", str(incoming)], capture_output=True, timeout=30)
            pytest.fail(f"{' '.join(argv[:3])} failed as root: {done.stderr.strip()}")
    try:
        with pytest.raises(SpoolIOError) as caught:
            spool.begin(make_record(2))
        assert caught.value.errno == errno.EROFS and caught.value.operation == "create"
    finally:
        subprocess.run(["umount", str(incoming)], capture_output=True, timeout=30, check=True)
    assert files(root, DEST, Area.INCOMING) == []
    assert spool.stats(DEST).instances == 1 and spool.stats(DEST).bytes == spool.stats().bytes
    put(spool, b"after", i=3)
    assert spool.stats().instances == 2


@pytest.mark.parametrize("fault", ["file fsync", "rename", "directory fsync"])
def test_a_failing_commit_keeps_nothing_and_the_next_one_succeeds(
        spool: Spool, root: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    def eio(*args: object) -> None:
        raise OSError(errno.EIO, "injected")

    def failing_layout(method: str):  # the layout translates OSErrors: inject one through it
        real = getattr(Layout, method)

        def wrapper(self: Layout, *args: object, **kwargs: object) -> None:
            if Area.READY in args:
                raise SpoolIOError("injected", errno=errno.EIO, operation=method)
            real(self, *args, **kwargs)
        return wrapper

    with monkeypatch.context() as patch:
        if fault == "file fsync":
            patch.setattr(store, "_sync_data", eio)
        else:
            patch.setattr(Layout, "move" if fault == "rename" else "fsync",
                          failing_layout("move" if fault == "rename" else "fsync"))
        writer = spool.begin(make_record())
        writer.write(b"x" * 10_000)
        with pytest.raises(SpoolIOError) as caught:
            writer.commit()
        assert caught.value.errno == errno.EIO
    assert files(root, DEST, Area.INCOMING) == files(root, DEST, Area.READY) == []
    assert spool.stats() == SpoolStats() and spool.ready(DEST, 10, now=0.0) == []
    assert put(spool, b"y" * 10_000).record.size == 10_000


# --- replay -----------------------------------------------------------------------------------------


def test_replay_after_a_crash_cleans_incoming_requeues_sending_and_quarantines_corrupt_entries(
        spool: Spool, root: Path) -> None:
    kept, claimed, flipped, cut = (put(spool, bytes([i]) * 1000, i=i) for i in range(4))
    assert spool.claim(claimed)
    half = spool.begin(make_record(9))
    half.write(b"half")  # never committed: the crash comes first
    unsealed = spool.begin(make_record(10, destination="dest-b"))
    unsealed.write(b"never sealed")
    spool.close()  # the process "dies": nothing else is cleaned up
    data = bytearray((root / DEST / "ready" / flipped.name).read_bytes())
    data[FIXED_HEADER + 5] ^= 0x01
    (root / DEST / "ready" / flipped.name).write_bytes(data)
    with open(root / DEST / "ready" / cut.name, "r+b") as f:
        f.truncate(f.seek(0, 2) - 1)
    shutil.copy(root / "dest-b" / "incoming" / unsealed.name, root / "dest-b" / "ready" / unsealed.name)

    with Spool(root, max_bytes=0, min_free_bytes=0) as again:
        report = again.report
        assert report is not None
        a, b = report.by_destination[DEST], report.by_destination["dest-b"]
        assert (a.removed_incoming, a.possible_duplicates, a.corrupt, a.instances, a.quarantined) == (1, 1, 2, 2, 2)
        assert (b.removed_incoming, b.corrupt, b.instances) == (1, 1, 0)
        assert report.total.corrupt == 3 and report.total.removed_incoming == 2
        assert files(root, DEST, Area.INCOMING) == files(root, DEST, Area.SENDING) == []
        assert [e.name for e in again.ready(DEST, 10, now=0.0)] == sorted([kept.name, claimed.name])
        reasons = {q.name: q.reason for q in again.quarantined(DEST)}
        assert reasons == {flipped.name: "corrupt header: header CRC mismatch",
                           cut.name: "corrupt header: lengths do not match the file size"}
        (unsealed_q,) = again.quarantined("dest-b")
        assert unsealed_q.record is None and "never sealed" in unsealed_q.reason
        stats = again.stats(DEST)
        assert (stats.instances, stats.possible_duplicates, stats.quarantined) == (2, 1, 2)
        with pytest.raises(SpoolStateError):
            again.release_quarantine("dest-b", unsealed_q.name)  # nothing to requeue without a header
        again.drop_quarantine("dest-b", unsealed_q.name)
        assert files(root, "dest-b", Area.QUARANTINE) == []


def test_replay_keeps_the_quarantine_and_repairs_interrupted_moves(spool: Spool, root: Path) -> None:
    entries = [put(spool, b"q" * 100, i=i) for i in range(3)]
    for entry in entries:
        assert spool.claim(entry)
        spool.quarantine(entry, f"rejected {entry.record.study_key}")
    spool.close()
    quarantine = root / DEST / "quarantine"
    (quarantine / f"{entries[1].name}.reason").unlink()  # the entry was moved, its reason lost
    (quarantine / entries[2].name).rename(root / DEST / "ready" / entries[2].name)  # a release, interrupted
    with Spool(root, max_bytes=0, min_free_bytes=0) as again:
        assert {q.name: q.reason for q in again.quarantined(DEST)} == {
            entries[0].name: "rejected study-0", entries[1].name: "reason file missing"}
        assert [e.name for e in again.ready(DEST, 10, now=0.0)] == [entries[2].name]
    assert sorted(os.listdir(quarantine)) == sorted([entries[0].name, f"{entries[0].name}.reason", entries[1].name])


# --- the forward path and the quarantine --------------------------------------------------------------


def test_claim_delivered_and_retry_follow_their_contract(spool: Spool, root: Path) -> None:
    entry = put(spool, b"d" * 500)
    with pytest.raises(SpoolStateError):
        spool.delivered(entry)  # not claimed
    with pytest.raises(SpoolStateError):
        spool.open_dataset(entry)
    assert spool.claim(entry)
    assert not spool.claim(entry)  # already taken
    assert files(root, DEST, Area.SENDING) == [entry.name]
    assert spool.stats(DEST).in_flight == 1
    assert spool.retry(entry, not_before=0.0, reason="0xA700") == 1
    assert spool.claim(entry) and spool.retry(entry, not_before=0.0, reason="0xA700") == 2
    assert spool.claim(entry)
    spool.delivered(entry)
    assert not spool.claim(entry)  # gone
    with pytest.raises(SpoolStateError):
        spool.retry(entry, 0.0, "late")
    assert files(root, DEST, Area.READY) == files(root, DEST, Area.SENDING) == []
    stats = spool.stats(DEST)
    assert (stats.instances, stats.bytes, stats.delivered_total, stats.retries_total) == (0, 0, 1, 2)


def test_parallel_forwarders_deliver_every_entry_exactly_once(spool: Spool) -> None:
    count = 120
    for i in range(count):
        put(spool, i.to_bytes(2, "big") * 50, i=i)
    delivered: list[str] = []
    lock = threading.Lock()

    def forwarder() -> None:
        while batch := spool.ready(DEST, 4, now=0.0):
            for entry in batch:
                if spool.claim(entry):
                    with spool.open_dataset(entry) as stream:
                        assert stream.read() == int(entry.record.study_key[6:]).to_bytes(2, "big") * 50
                    spool.delivered(entry)
                    with lock:
                        delivered.append(entry.name)

    threads = [threading.Thread(target=forwarder) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(delivered) == len(set(delivered)) == count
    assert spool.stats(DEST).delivered_total == count and spool.stats(DEST).instances == 0


def test_quarantine_release_and_drop_keep_their_books(root: Path) -> None:
    root.parent.mkdir()
    with Spool(root, max_bytes=0, min_free_bytes=0, destination_max_bytes={DEST: 10_000}) as spool:
        first, second, third = (put(spool, b"p" * 2000, i=i) for i in range(3))
        assert spool.claim(first) and spool.retry(first, 0.0, "timeout") == 1
        assert spool.claim(first)
        spool.quarantine(first, "0xA900: dataset does not match SOP class")
        spool.quarantine(second, "ops: held for review")  # a ready entry may be set aside too
        reason = json.loads((root / DEST / "quarantine" / f"{first.name}.reason").read_bytes())
        assert reason == {"attempts": 1, "reason": "0xA900: dataset does not match SOP class"}
        listed = spool.quarantined(DEST)
        assert [(q.name, q.record, q.attempts) for q in listed] == [
            (first.name, first.record, 1), (second.name, second.record, 0)]
        stats = spool.stats(DEST)
        assert (stats.instances, stats.quarantined, stats.quarantined_bytes) == (1, 2, 2 * listed[0].size)
        with pytest.raises(SpoolFull):  # quarantined entries still take the destination's room
            put(spool, b"p" * 5000, i=7)
        assert not spool.claim(first)
        with pytest.raises(SpoolStateError):
            spool.delivered(first)

        released = spool.release_quarantine(DEST, first.name)
        assert (released.name, released.attempts) == (first.name, 0)
        assert [e.name for e in spool.ready(DEST, 10, now=0.0)] == [first.name, third.name]
        spool.drop_quarantine(DEST, second.name)
        assert os.listdir(root / DEST / "quarantine") == []
        for action in (spool.release_quarantine, spool.drop_quarantine):
            with pytest.raises(SpoolStateError):
                action(DEST, second.name)
            with pytest.raises(SpoolStateError):
                action(DEST, "../../etc/passwd")
        stats = spool.stats(DEST)
        assert (stats.instances, stats.quarantined, stats.quarantined_bytes) == (2, 0, 0)


def test_stats_add_up_over_destinations_and_hold_no_identifiers(spool: Spool) -> None:
    put(spool, b"a" * 100, i=5)
    put(spool, b"b" * 300, i=2, destination="dest-b")
    c = put(spool, b"c" * 200, i=8, destination="dest-b")
    assert spool.claim(c)
    a, b, total = spool.stats(DEST), spool.stats("dest-b"), spool.stats()
    assert (a.instances, b.instances, total.instances, total.in_flight) == (1, 2, 3, 1)
    assert total.bytes == a.bytes + b.bytes
    assert (a.oldest_received, b.oldest_received, total.oldest_received) == (1005.0, 1002.0, 1002.0)
    assert spool.stats("nothing-here") == SpoolStats()
    assert spool.destinations() == [DEST, "dest-b"]
    assert not {type(v) for v in vars_of(total)} - {int, float}


def vars_of(stats: SpoolStats) -> list[object]:
    return [getattr(stats, name) for name in SpoolStats.__dataclass_fields__]


# --- the entry file ---------------------------------------------------------------------------------


def test_the_header_is_laid_out_as_documented() -> None:
    record = make_record()
    header = encode_header(record)
    body = header[FIXED_HEADER:]
    assert header[:4] == b"\x89SPL" and header[4:6] == b"\x00\x01"
    assert int.from_bytes(header[6:8], "big") == len(body)
    assert header[8:20] == b"\xff" * 8 + b"\x00" * 4  # unsealed
    assert json.loads(body) == {k: v for k, v in vars_of_record(record).items() if k != "size"}
    offset, sealing = seal(header, 3)
    assert offset == 8 and sealing[:8] == (3).to_bytes(8, "big")
    assert int.from_bytes(sealing[8:], "big") == zlib.crc32(header[:8] + sealing[:8] + body)
    with pytest.raises(ValueError):
        encode_header(make_record(destination="Not-Valid"))


def vars_of_record(record: SpoolRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in SpoolRecord.__dataclass_fields__}


def test_every_single_byte_corruption_of_a_header_is_caught() -> None:
    header = encode_header(make_record())
    offset, sealing = seal(header, 4)
    good = header[:offset] + sealing + header[offset + len(sealing):] + b"DATA"
    fd = os.memfd_create("entry")  # in memory: a thousand corruptions, no disk

    def parse(data: bytes):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return read_header(fd, len(data))

    assert parse(good).record.size == 4
    for position in range(len(header)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(good)
            bad[position] ^= flip
            with pytest.raises(CorruptEntry):
                parse(bytes(bad))
    for cut in range(len(good)):
        with pytest.raises(CorruptEntry):
            parse(good[:cut])
    os.close(fd)


# --- SIGKILL at random moments ------------------------------------------------------------------------

KILLS = 24
KILL_DEADLINE = 120.0  # seconds for the whole loop; each kill takes well under one


def _read_lines(proc: subprocess.Popen[bytes], count: int, timeout: float) -> bytes:
    """Read the child's output (raw: nothing is left buffered) until it holds ``count`` whole lines."""
    assert proc.stdout is not None
    fd, got, end = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while got.count(b"\n") < count:
        ready, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        chunk = os.read(fd, 65536) if ready else b""
        assert chunk, f"the spool writer wrote {len(got.splitlines())} of {count} lines in {timeout} s"
        got += chunk
    return got


def _check_after_kill(root: Path, lines: list[str], expected: set[str],
                      gone: set[str]) -> tuple[set[str], ReplayCounts]:
    """Replay, check every survivor; the entries now known present, and what replay found."""
    final: dict[str, str] = {}  # entry name -> the last thing the child said about it
    for word, _destination, name, *_ in (line.split() for line in lines[1:]):
        final[name] = word
    delivering = {name for name, word in final.items() if word == "D?"}  # unlinked or not: either is right
    delivered = {name for name, word in final.items() if word == "D"}
    expected = (expected | {name for name, word in final.items() if word in ("C", "K", "R?", "R")}) \
        - delivering - delivered
    gone |= delivered
    # Claimed and in sending/ at the kill for sure; the one call in progress may have left one more there.
    in_flight = sum(1 for word in final.values() if word == "K")

    with Spool(root, max_bytes=0, min_free_bytes=0) as spool:
        report = spool.report.total if spool.report else None
        assert report is not None and report.corrupt == 0 and report.quarantined == 0
        assert report.removed_incoming <= 1  # one writer: at most one entry was being written
        assert in_flight <= report.possible_duplicates <= in_flight + 1
        present: set[str] = set()
        for destination in DESTINATIONS:
            area = root / destination
            if not area.exists():
                continue
            assert os.listdir(area / "incoming") == os.listdir(area / "sending") == []
            on_disk = sorted(os.listdir(area / "ready"))
            assert [e.name for e in spool.ready(destination, 10**6, now=float("inf"))] == on_disk
            for name in on_disk:
                data = (area / "ready" / name).read_bytes()
                fd = os.open(area / "ready" / name, os.O_RDONLY)
                try:
                    header = read_header(fd, len(data))
                finally:
                    os.close(fd)
                index = int(header.record.sop_instance_uid.rsplit(".", 1)[1])
                assert header.record.destination == destination
                assert data[header.dataset_offset:] == pattern(index, header.record.size), name
                present.add(name)
    missing = expected - present
    assert not missing, f"committed entries lost: {[(n, [x for x in lines if n in x]) for n in sorted(missing)[:3]]}"
    assert not gone & present, "a delivered entry came back after a process crash"
    unreported = present - expected - delivering
    assert len(unreported) <= 1, unreported  # committed, killed before it said so
    return present, report


def test_sigkill_at_random_moments_loses_no_committed_entry(tmp_path: Path) -> None:
    root, errors = tmp_path / "spool", tmp_path / "writer.stderr"
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    expected: set[str] = set()
    gone: set[str] = set()
    print(f"seed {seed}")
    kills, committed, torn, duplicates = 0, 0, 0, 0
    deadline = time.monotonic() + KILL_DEADLINE
    while kills < KILLS and time.monotonic() < deadline:
        with open(errors, "ab") as err:
            proc = subprocess.Popen([sys.executable, str(HELPER), str(root), "--first", str(kills * 10**6),
                                     "--seed", str(rng.randrange(2**32))], stdout=subprocess.PIPE, stderr=err)
        try:
            # A random moment: after a random number of the child's lines (so it made progress however
            # slow the disk), and a random fraction of an entry later.
            out = _read_lines(proc, rng.randint(2, 40), timeout=30.0)
            time.sleep(rng.uniform(0.0, 0.02))
            proc.send_signal(signal.SIGKILL)
            assert proc.stdout is not None
            out += proc.stdout.read()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            if proc.stdout is not None:
                proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL, \
            f"the writer died on its own (seed {seed}): {errors.read_text()[-2000:]}"
        kills += 1
        lines = out.decode().split("\n")[:-1]  # the last piece has no newline: dropped
        assert lines[0] == "open 0 0", lines[0]  # our own replay left nothing to replay
        committed += sum(1 for line in lines if line.startswith("C "))
        expected, report = _check_after_kill(root, lines, expected, gone)
        torn += report.removed_incoming
        duplicates += report.possible_duplicates
    print(f"{kills} kills, {committed} entries reported committed, {len(gone)} delivered, {torn} killed while "
          f"being written, {duplicates} possible duplicates replayed")
    assert kills >= 20, f"only {kills} kills in {KILL_DEADLINE} s"
    assert committed >= kills, f"the writer committed only {committed} entries in {kills} runs"
    # The kills must have hit the moments that matter: most of a writer's time is inside an entry
    # (writing, fsyncing), and some claimed entries are left in sending/.
    assert torn >= 1 and duplicates >= 1, (torn, duplicates)
    shutil.rmtree(root)
