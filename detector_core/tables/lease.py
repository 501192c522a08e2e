"""A lease on a scan output: one writer at a time, and a dead writer's claim expires.

Iceberg appends do not conflict with each other, so two scans started into the same
output would both do all the work and both commit it. A scan therefore holds a lease on
the output for as long as it writes. The lease is a chain of small JSON records
``ROOT/_lease/<generation>.json``; the newest generation is the lease's state (holder,
scan id, expiry, or released). Every change of state is the *exclusive creation* of
the next generation, which exactly one writer can win: ``If-None-Match: *`` on S3 (and
S3-compatible stores that honour it) through fsspec's ``pipe_file(mode="create")``, and on
local disks a hard link of a complete temporary file (``link`` fails on an existing name).
So taking, renewing, taking over an expired lease and releasing all race safely without a
lock service. The holder renews well before the expiry (``start_renewing``); a holder that died (``kill -9``, a lost node) stops renewing
and its lease expires after ``ttl_s``. Expiry compares UTC wall clocks of the machines
involved: keep them NTP-synchronised, and ``ttl_s`` far above their skew.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid

from fsspec import AbstractFileSystem

__all__ = ["Lease", "LeaseHeldError", "LeaseLostError"]

LEASE_DIR = "_lease"


class LeaseHeldError(RuntimeError):
    """Another writer holds the output's lease."""

    def __init__(self, root: str, holder: dict):
        self.holder = holder
        super().__init__(
            f"{root} is being written by scan {holder.get('scan_id')} (owner {holder.get('owner')}, lease until "
            f"{holder.get('expires_at')}); wait for it (--wait), or if that scan is dead its lease expires by then")


class LeaseLostError(RuntimeError):
    """The lease expired or was taken over while this writer still needed it."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Lease:
    """The write lease of the output at ``root`` on ``fs`` (resolved once by the caller)."""

    def __init__(self, fs: AbstractFileSystem, root: str, scan_id: str, ttl_s: float = 300.0):
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl_s}")
        self.fs = fs
        self.dir = f"{root.rstrip('/')}/{LEASE_DIR}"
        self.root = root
        self.scan_id = scan_id
        self.ttl_s = float(ttl_s)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.generation: int | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # renew() (renewal thread) and check() (before each commit) must not interleave: between
        # creating the next generation and recording it, the lease would look taken over.
        self._lock = threading.Lock()

    # -- state ---------------------------------------------------------------------------
    def _generations(self) -> list[int]:
        try:
            names = self.fs.ls(self.dir, detail=False)
        except FileNotFoundError:
            return []
        gens = []
        for n in names:
            stem = n.rstrip("/").rsplit("/", 1)[-1].removesuffix(".json")  # skips *.tmp files
            if stem.isdigit():
                gens.append(int(stem))
        return sorted(gens)

    def current(self) -> tuple[int, dict | None]:
        """(newest generation, its record); (0, None) when the output never had a lease."""
        self.fs.invalidate_cache(self.dir)
        gens = self._generations()
        if not gens:
            return 0, None
        gen = gens[-1]
        try:
            return gen, json.loads(self.fs.cat_file(f"{self.dir}/{gen:012d}.json"))
        except FileNotFoundError:  # cleaned up under us: read again
            return self.current()

    @staticmethod
    def is_live(record: dict | None) -> bool:
        return bool(record) and record.get("state") == "held" and dt.datetime.fromisoformat(record["expires_at"]) > _now()

    def _create(self, gen: int, state: str) -> bool:
        record = {"state": state, "owner": self.owner, "scan_id": self.scan_id, "generation": gen,
                  "written_at": _now().isoformat(), "expires_at": (_now() + dt.timedelta(seconds=self.ttl_s)).isoformat()}
        self.fs.makedirs(self.dir, exist_ok=True)
        path, data = f"{self.dir}/{gen:012d}.json", json.dumps(record).encode()
        try:
            if getattr(self.fs, "local_file", False):
                # O_EXCL alone would let a reader see the new file before its bytes: write a
                # temporary file, then hard-link it into place (fails if the name exists). The
                # temporary file goes whatever happens (a full disk fails the write itself).
                tmp = f"{path}.{uuid.uuid4().hex}.tmp"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.link(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            else:
                self.fs.pipe_file(path, data, mode="create")  # S3: If-None-Match: *
        except FileExistsError:
            return False
        return True

    # -- transitions -----------------------------------------------------------------------
    def acquire(self, wait: bool = False, poll_s: float = 5.0, timeout_s: float | None = None) -> None:
        """Take the lease, or raise ``LeaseHeldError`` naming the holder (``wait``: poll until it is free)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            gen, record = self.current()
            if not self.is_live(record) or record.get("owner") == self.owner:
                if self._create(gen + 1, "held"):
                    self.generation = gen + 1
                    self._cleanup(gen + 1)
                    return
                continue  # somebody else won that generation: look again
            if not wait or (deadline is not None and time.monotonic() > deadline):
                raise LeaseHeldError(self.root, record)
            time.sleep(poll_s)

    def renew(self) -> None:
        """Extend the lease; raises ``LeaseLostError`` when it is no longer this writer's."""
        with self._lock:
            self._renew()

    def _renew(self) -> None:
        gen, record = self.current()
        if gen != self.generation or (record or {}).get("owner") != self.owner:
            self.lost = f"lease of {self.root} was taken over by scan {(record or {}).get('scan_id')} ({(record or {}).get('owner')})"
            raise LeaseLostError(self.lost)
        if not self._create(gen + 1, "held"):
            self.lost = f"lease of {self.root} was taken over while renewing"
            raise LeaseLostError(self.lost)
        self.generation = gen + 1
        self._cleanup(gen + 1)

    def check(self) -> None:
        """Raise ``LeaseLostError`` unless this writer still holds a live lease (call before each commit)."""
        if self.lost:
            raise LeaseLostError(self.lost)
        with self._lock:
            gen, record = self.current()
            if gen != self.generation or not self.is_live(record):
                self.lost = f"lease of {self.root} expired or was taken over (newest: {record})"
                raise LeaseLostError(self.lost)

    def release(self) -> None:
        """Give the lease up. Where no record can be written (a full disk), this writer's own
        records are deleted instead, newest first, which frees the output just as well: the
        newest record left is then the previous holder's, released or expired."""
        self.stop_renewing()
        with self._lock:
            gen, record = self.current()
            if gen != self.generation or (record or {}).get("owner") != self.owner:
                return
            try:
                self._create(gen + 1, "released")
            except OSError as exc:
                print(f"warning: could not write the release of {self.dir} ({type(exc).__name__}: {exc}); deleting this "
                      "writer's lease records instead", flush=True)
                self._delete_own()

    def _delete_own(self) -> None:
        for g in reversed(self._generations()):
            path = f"{self.dir}/{g:012d}.json"
            try:
                if json.loads(self.fs.cat_file(path)).get("owner") != self.owner:
                    return  # an older holder's record: the chain below is not ours
                self.fs.rm_file(path)
            except FileNotFoundError:
                continue

    def _cleanup(self, newest: int) -> None:
        for g in self._generations():
            if g < newest - 2:
                try:
                    self.fs.rm_file(f"{self.dir}/{g:012d}.json")
                except FileNotFoundError:
                    pass

    # -- renewal ---------------------------------------------------------------------------
    def start_renewing(self, every_s: float | None = None) -> None:
        """Renew in a daemon thread every ``every_s`` (default a third of the ttl)."""
        every = every_s or self.ttl_s / 3

        def loop():
            while not self._stop.wait(every):
                try:
                    self.renew()
                except LeaseLostError:
                    return
                except Exception as exc:  # noqa: BLE001 - a transient store error: try again next round
                    print(f"warning: lease renewal failed ({type(exc).__name__}: {exc}); retrying", flush=True)

        self._thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        self._thread.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
