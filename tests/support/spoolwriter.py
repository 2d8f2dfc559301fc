"""A process that writes into a spool in a loop: the victim of the spool's kill test, and a rate meter.

Run as a script (it imports only ``tunnel_agent.spool``, so it starts fast)::

    python tests/support/spoolwriter.py ROOT --first N --seed S
        Open the spool at ROOT (replaying it), print ``open <possible_duplicates> <removed_incoming>``, then
        loop forever: commit an entry whose dataset is pattern(i, size) and print ``C <dest> <name> <i>``;
        now and then claim the oldest ready entry (``K``), and deliver it (``D?`` before, ``D`` after),
        retry it (``R?`` before, ``R`` after) or leave it claimed. Every line is flushed as soon as the call
        returned, so a parent that SIGKILLs this process knows a lower bound of what was done.

    python tests/support/spoolwriter.py DIR --rate [--count 400] [--size 524288] [--chunk 65536] [--threads 1]
        Commit COUNT instances of SIZE bytes (written in CHUNK-byte writes, fsyncs included) into a fresh
        spool under DIR, print the rate, and remove the spool.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from tunnel_agent.spool import Spool, SpoolEntry, SpoolRecord

DESTINATIONS = ("dest-a", "dest-b")
CHUNK = 16 * 1024


def pattern(i: int, size: int) -> bytes:
    """The dataset of entry ``i``: deterministic, different for every ``i``, checkable byte for byte."""
    block = hashlib.sha256(str(i).encode()).digest() * 512  # 16 KiB
    return (block * (size // len(block) + 1))[:size]


def record_for(i: int, destination: str) -> SpoolRecord:
    return SpoolRecord(destination=destination, calling_ae="MODALITY", called_ae="CLOUD",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.2", sop_instance_uid=f"2.25.{i}",
                       transfer_syntax="1.2.840.10008.1.2.1", study_key=f"study-{i % 7}", received=float(i))


def _say(*words: object) -> None:
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()


def _forward_one(spool: Spool, rng: random.Random) -> None:
    candidates = [e for d in DESTINATIONS for e in spool.ready(d, 1, float("inf"))]
    if not candidates:
        return
    entry: SpoolEntry = min(candidates, key=lambda e: e.record.received)
    if not spool.claim(entry):
        return
    _say("K", entry.destination, entry.name)
    choice = rng.random()
    if choice < 0.7:
        with spool.open_dataset(entry) as f:
            f.read()
        _say("D?", entry.destination, entry.name)
        spool.delivered(entry)
        _say("D", entry.destination, entry.name)
    elif choice < 0.85:
        _say("R?", entry.destination, entry.name)
        spool.retry(entry, 0.0, "test retry")
        _say("R", entry.destination, entry.name)
    # else: left claimed; after the kill it is in sending/, a possible duplicate


def run_victim(root: Path, first: int, seed: int) -> None:
    rng = random.Random(seed)
    spool = Spool(root, max_bytes=0, min_free_bytes=0)
    report = spool.open().total
    _say("open", report.possible_duplicates, report.removed_incoming)
    i = first
    while True:
        size = rng.choice([0, rng.randrange(1, CHUNK), rng.randrange(CHUNK, 160 * 1024)])
        data = pattern(i, size)
        with spool.begin(record_for(i, rng.choice(DESTINATIONS))) as writer:
            for start in range(0, size, CHUNK):
                writer.write(data[start:start + CHUNK])
            entry = writer.commit()
        _say("C", entry.destination, entry.name, i)
        i += 1
        if rng.random() < 0.7:
            _forward_one(spool, rng)


def run_rate(parent: Path, count: int, size: int, chunk: int, threads: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="spool-rate-", dir=parent))
    data = memoryview(os.urandom(size))
    try:
        with Spool(root / "spool", max_bytes=0, min_free_bytes=0) as spool:
            def work(n: int, k: int) -> None:
                for j in range(n):
                    with spool.begin(record_for(k * n + j, "rate")) as writer:
                        for start in range(0, size, chunk):
                            writer.write(data[start:start + chunk])
                        writer.commit()

            per_thread = count // threads
            workers = [threading.Thread(target=work, args=(per_thread, k)) for k in range(threads)]
            started = time.perf_counter()
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            elapsed = time.perf_counter() - started
            done = per_thread * threads
            assert spool.stats("rate").instances == done
        print(f"{done} instances of {size} bytes in {chunk}-byte writes, {threads} thread(s): {elapsed:.2f} s, "
              f"{done * size / elapsed / 1e6:.0f} MB/s, {done / elapsed:.0f} instances/s")
    finally:
        shutil.rmtree(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", action="store_true")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--size", type=int, default=512 * 1024)
    parser.add_argument("--chunk", type=int, default=64 * 1024)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.rate:
        run_rate(args.root, args.count, args.size, args.chunk, args.threads)
    else:
        run_victim(args.root, args.first, args.seed)


if __name__ == "__main__":
    main()
