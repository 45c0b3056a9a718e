"""The persistent job queue: SQLite (WAL) under the data dir, outputs as files beside it.

Layout of a data dir::

    jobs.sqlite3            one row per video job (the only source of truth for its status)
    jobs/<folder>/          inputs (input.png, source.mp4) and outputs (video.mp4, video.json,
                            thumbnail.webp, spritesheet.jpg) of one job
    staging/                outputs being written; moved into jobs/<folder>/ before the row
                            says "completed", so a completed row always has its files

``folder`` is a random name made by the server, separate from the public id: ids are only
ever SQL parameters, never paths. A job survives a kill at any moment: on start,
:meth:`Store.recover` puts running jobs back in the queue (they re-run from their seed, which
gives the same video), purges rows deleted mid-run, and clears staging.

One :class:`Worker` thread per device runs one generation at a time and reports progress to
the row every step; the HTTP loop never waits on it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger("kinema.serve")

MAX_ATTEMPTS = 3  # a job that was running during this many crashes is marked failed
VIDEO_FILE = "video.mp4"

SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    folder TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at REAL,
    completed_at INTEGER,
    expires_at INTEGER,
    model TEXT NOT NULL,
    prompt TEXT,
    seconds TEXT NOT NULL,
    size TEXT NOT NULL,
    remixed_from TEXT,
    error_code TEXT,
    error_message TEXT,
    spec TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS videos_status ON videos (status, deleted, seq);
CREATE TABLE IF NOT EXISTS gone (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL
);
"""
GONE_KEPT_S = 7 * 24 * 3600  # a deleted or expired id still serves as a list cursor this long


class QueueFull(Exception):
    """The queue holds ``pending`` jobs, its limit."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"{pending} jobs are queued or running, the limit")
        self.pending = pending


class Cancelled(Exception):
    """The running job was deleted."""


class Interrupted(Exception):
    """The server is shutting down; the running job goes back to the queue."""


@dataclass(frozen=True)
class JobSpec:
    """What to make. ``settings`` are :class:`~kinema.pipeline.Request` fields (width, frames,
    seed, ...); ``inputs`` maps Request fields to files in the job folder (``{"image":
    "input.png"}``)."""

    kind: str  # "generate" | "edit" | "remix" | "extend"
    prompt: str
    settings: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the pipeline warned at submission


@dataclass(frozen=True)
class Job:
    """One row of the queue."""

    seq: int
    id: str
    folder: str
    status: str  # "queued" | "in_progress" | "completed" | "failed"
    progress: int  # 0-100
    created_at: int
    completed_at: int | None
    expires_at: int | None
    model: str
    prompt: str | None
    seconds: str
    size: str
    remixed_from: str | None
    error_code: str | None
    error_message: str | None
    spec: JobSpec
    attempts: int = 0
    started_at: float | None = None


def new_id() -> str:
    """An opaque public id: ``video_`` + 32 hex digits."""
    return f"video_{secrets.token_hex(16)}"


def new_folder() -> str:
    return secrets.token_hex(12)


def _forget(db: sqlite3.Connection, video_id: str, seq: int) -> None:
    """Delete a row, keeping its place in creation order (:meth:`Store.position`)."""
    db.execute("DELETE FROM videos WHERE seq = ?", (seq,))
    db.execute("INSERT OR REPLACE INTO gone VALUES (?, ?, ?)", (video_id, seq, int(time.time())))


def _job(row: sqlite3.Row) -> Job:
    spec = JobSpec(**json.loads(row["spec"]))
    names = {f for f in Job.__dataclass_fields__ if f not in ("spec", "remixed_from")}
    return Job(spec=spec, remixed_from=row["remixed_from"], **{k: row[k] for k in names})


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class DataDirLock:
    """One server per data dir: an exclusive ``flock`` on ``server.lock`` there, held while
    the server lives (the kernel lets it go when the process ends, however it ends). A second
    server would requeue the first one's running job and clear its staging on start-up."""

    def __init__(self, data_dir: Path) -> None:
        import fcntl

        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / "server.lock"
        self.file = open(path, "a+")  # noqa: SIM115 -- held open: the lock lives with it
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            pid = self.file.read().strip() or "?"
            self.file.close()
            raise ValueError(
                f"data dir {data_dir} is in use by another kinema serve (pid {pid}); stop it, "
                "or give this one another --data-dir"
            ) from None
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        self.file.close()


# A row clients see: not deleted and not expired (the parameter: now, in epoch seconds).
LIVE = "deleted = 0 AND (expires_at IS NULL OR expires_at > ?)"


class Store:
    """The job table. Thread-safe: one connection, every call under one lock."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        for sub in ("jobs", "staging"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(
            self.data_dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None
        )
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL
        self.db.executescript(SCHEMA)
        self.lock = threading.Lock()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One immediate transaction under the lock."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def folder(self, job: Job) -> Path:
        return self.data_dir / "jobs" / job.folder

    def close(self) -> None:
        with self.lock:
            self.db.close()

    # -- submitting and reading ---------------------------------------------------------------

    def add(self, job: Job, max_pending: int) -> Job:
        """Insert a queued job; QueueFull when ``max_pending`` jobs already wait or run."""
        with self.tx() as db:
            pending = self._pending(db)
            if pending >= max_pending:
                raise QueueFull(pending)
            row = {k: v for k, v in asdict(job).items() if k != "seq"}
            row["spec"] = json.dumps(asdict(job.spec))
            cols = ", ".join(row)
            cur = db.execute(
                f"INSERT INTO videos ({cols}) VALUES ({', '.join('?' * len(row))})",
                list(row.values()),
            )
        return replace(job, seq=cur.lastrowid)

    def get(self, video_id: str) -> Job | None:
        """The video, or None once deleted or past its ``expires_at`` (the sweeper removes its
        files within a sweep; until then it is already gone to clients)."""
        with self.lock:
            row = self.db.execute(
                f"SELECT * FROM videos WHERE id = ? AND {LIVE}", (video_id, int(time.time()))
            ).fetchone()
        return _job(row) if row else None

    def position(self, video_id: str) -> int | None:
        """Where a video stands in creation order, also after it was deleted or expired (a
        client paging through the list may delete what it has seen, its cursor included);
        None for an id never seen (or gone longer than :data:`GONE_KEPT_S`)."""
        with self.lock:
            row = self.db.execute(
                "SELECT seq FROM videos WHERE id = ? UNION SELECT seq FROM gone WHERE id = ?",
                (video_id, video_id),
            ).fetchone()
        return row[0] if row else None

    def page(self, after: int | None, limit: int, order: str) -> tuple[list[Job], bool]:
        """Up to ``limit`` jobs after the :meth:`position` ``after`` in creation order (``asc``
        or ``desc``)."""
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        bound = after if after is not None else (0 if order == "asc" else 2**62)
        with self.lock:
            rows = self.db.execute(
                f"SELECT * FROM videos WHERE {LIVE} AND seq {op} ? "
                f"ORDER BY seq {direction} LIMIT ?",
                (int(time.time()), bound, limit + 1),
            ).fetchall()
        return [_job(r) for r in rows[:limit]], len(rows) > limit

    def pending(self) -> int:
        with self.lock:
            return self._pending(self.db)

    @staticmethod
    def _pending(db: sqlite3.Connection) -> int:
        return db.execute(
            "SELECT COUNT(*) FROM videos WHERE deleted = 0 AND status IN ('queued', 'in_progress')"
        ).fetchone()[0]

    def mean_seconds(self, default: float = 10.0) -> float:
        """Mean run time of the last 10 completed jobs (for Retry-After)."""
        with self.lock:
            rows = self.db.execute(
                "SELECT completed_at - started_at FROM videos WHERE status = 'completed' "
                "AND started_at IS NOT NULL ORDER BY seq DESC LIMIT 10"
            ).fetchall()
        times = [max(0.0, r[0]) for r in rows]
        return sum(times) / len(times) if times else default

    # -- the worker's side ----------------------------------------------------------------------

    def claim(self) -> Job | None:
        """The oldest queued job, now marked in_progress (attempts counted)."""
        with self.tx() as db:
            row = db.execute(
                "SELECT * FROM videos WHERE status = 'queued' AND deleted = 0 ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE videos SET status = 'in_progress', progress = 0, started_at = ?, "
                "attempts = attempts + 1 WHERE seq = ?",
                (time.time(), row["seq"]),
            )
        return replace(_job(row), status="in_progress", progress=0, attempts=row["attempts"] + 1)

    def set_progress(self, job: Job, percent: int) -> bool:
        """Record progress; False when the job has been deleted meanwhile."""
        with self.tx() as db:
            cur = db.execute(
                "UPDATE videos SET progress = ? WHERE seq = ? AND deleted = 0", (percent, job.seq)
            )
        return cur.rowcount == 1

    def finish(self, job: Job, status: str, expires_at: int, error: tuple[str, str] | None) -> bool:
        """Mark completed or failed; False when the job has been deleted meanwhile."""
        code, message = error or (None, None)
        with self.tx() as db:
            cur = db.execute(
                "UPDATE videos SET status = ?, progress = ?, completed_at = ?, expires_at = ?, "
                "error_code = ?, error_message = ? WHERE seq = ? AND deleted = 0",
                (status, 100 if status == "completed" else job.progress, int(time.time()),
                 expires_at, code, message, job.seq),
            )  # fmt: skip
        return cur.rowcount == 1

    def requeue(self, job: Job) -> None:
        """Put an interrupted job back in the queue (its attempt does not count)."""
        with self.tx() as db:
            db.execute(
                "UPDATE videos SET status = 'queued', progress = 0, attempts = attempts - 1 "
                "WHERE seq = ? AND status = 'in_progress'",
                (job.seq,),
            )

    # -- deleting, expiring, recovering -------------------------------------------------------

    def delete(self, video_id: str) -> Job | None:
        """Delete a job: a running one is marked (the worker stops it and removes it), any
        other row goes at once. Returns the job, or None if unknown."""
        with self.tx() as db:
            row = db.execute(
                "SELECT * FROM videos WHERE id = ? AND deleted = 0", (video_id,)
            ).fetchone()
            if row is None:
                return None
            if row["status"] == "in_progress":
                db.execute("UPDATE videos SET deleted = 1 WHERE seq = ?", (row["seq"],))
            else:
                _forget(db, row["id"], row["seq"])
        return _job(row)

    def purge(self, job: Job) -> None:
        """Remove the row and the job's folder."""
        with self.tx() as db:
            _forget(db, job.id, job.seq)
        remove_folder(self.folder(job))

    def expired(self, now: float) -> list[Job]:
        with self.lock:
            rows = self.db.execute(
                "SELECT * FROM videos WHERE expires_at IS NOT NULL AND expires_at <= ? "
                "AND status IN ('completed', 'failed')",
                (int(now),),
            ).fetchall()
        return [_job(r) for r in rows]

    def recover(self, max_attempts: int = MAX_ATTEMPTS, retention_s: int = 7 * 24 * 3600) -> None:
        """After a crash: requeue running jobs (or fail them after ``max_attempts`` runs, to
        expire after ``retention_s`` as any finished job does), purge rows deleted mid-run,
        clear staging, remove folders no row owns."""
        with self.tx() as db:
            gone = db.execute("SELECT id, seq, folder FROM videos WHERE deleted = 1").fetchall()
            for r in gone:
                _forget(db, r["id"], r["seq"])
            db.execute("DELETE FROM gone WHERE at < ?", (int(time.time()) - GONE_KEPT_S,))
            db.execute(
                "UPDATE videos SET status = 'failed', error_code = 'server_crashed', "
                "error_message = 'the server stopped while running this job ' || attempts || "
                "' times', completed_at = ?, expires_at = ? "
                "WHERE status = 'in_progress' AND attempts >= ?",
                (int(time.time()), int(time.time()) + retention_s, max_attempts),
            )
            db.execute(
                "UPDATE videos SET status = 'queued', progress = 0 WHERE status = 'in_progress'"
            )
            owned = {r[0] for r in db.execute("SELECT folder FROM videos").fetchall()}
        for r in gone:
            remove_folder(self.data_dir / "jobs" / r["folder"])
        self._sweep(owned)

    def _sweep(self, owned: set[str]) -> None:
        shutil.rmtree(self.data_dir / "staging", ignore_errors=True)
        (self.data_dir / "staging").mkdir(exist_ok=True)
        for path in (self.data_dir / "jobs").iterdir():
            if path.name not in owned:
                remove_folder(path)


def remove_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


def build_request(spec: JobSpec, folder: Path) -> Any:
    """The pipeline :class:`~kinema.pipeline.Request` of a job; input files by full path."""
    from kinema.pipeline import Request

    files = {name: str(folder / file) for name, file in spec.inputs.items()}
    return Request(prompt=spec.prompt, **spec.settings, **files)


class Worker:
    """Runs queued jobs one at a time on ``pipe`` in a background thread."""

    def __init__(self, store: Store, pipe: Any, retention_s: int, sweep_every_s: float = 30.0):
        self.store, self.pipe, self.retention_s = store, pipe, retention_s
        self.sweep_every_s = sweep_every_s
        self.wakeup, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.loop, name="kinema-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current step; the running job goes back to the queue."""
        self.stopping.set()
        self.wakeup.set()
        self.thread.join(timeout)

    def wake(self) -> None:
        self.wakeup.set()

    def loop(self) -> None:
        last_sweep = 0.0
        while not self.stopping.is_set():
            try:
                if time.monotonic() - last_sweep > self.sweep_every_s:
                    self.sweep()
                    last_sweep = time.monotonic()
                job = self.store.claim()
                if job is None:
                    self.wakeup.wait(1.0)
                    self.wakeup.clear()
                    continue
                self.run(job)
            except Exception:  # the worker never dies: log and go on
                log.exception("worker error")
                time.sleep(0.5)

    def run(self, job: Job) -> None:
        """Generate one job and record the outcome."""
        log.info("running %s (%s) attempt %d", job.id, job.spec.kind, job.attempts)
        try:
            stream = self.pipe.stream(
                build_request(job.spec, self.store.folder(job)),
                progress=lambda step, total: self.report(job, step, total),
            )
            self.publish(job, stream)
        except Cancelled:
            self.store.purge(job)
        except Interrupted:
            self.store.requeue(job)
        except Exception as err:
            log.warning("job %s failed: %s", job.id, err)
            message = str(err).replace(f"{self.store.folder(job)}{os.sep}", "")[:1000]
            if not self.store.finish(job, "failed", self.expiry(), ("generation_failed", message)):
                self.store.purge(job)  # deleted while it ran: its row and files go now

    def report(self, job: Job, step: int, total: int) -> None:
        """The pipeline's progress callback: record the step, stop if deleted or stopping."""
        if self.stopping.is_set():
            raise Interrupted
        if not self.store.set_progress(job, min(99, int(100 * step / max(total, 1)))):
            raise Cancelled

    def publish(self, job: Job, stream: Any) -> None:
        """Write the video into staging as it is made (with its previews' frames kept on the
        way), move the outputs into the job folder, then mark the job completed."""
        from kinema.serve.media import Previews

        staging = self.store.data_dir / "staging" / f"{job.folder}-{job.attempts}"
        remove_folder(staging)
        staging.mkdir(parents=True)
        try:
            previews = Previews(stream.total)
            stream.save(staging / VIDEO_FILE, tap=previews.keep)
            previews.save(staging)
            folder = self.store.folder(job)
            folder.mkdir(parents=True, exist_ok=True)
            for path in sorted(staging.iterdir(), key=lambda p: p.name == VIDEO_FILE):
                os.replace(path, folder / path.name)  # the video last
        finally:
            remove_folder(staging)
        if not self.store.finish(job, "completed", self.expiry(), None):
            self.store.purge(job)  # deleted while decoding

    def expiry(self) -> int:
        return int(time.time()) + self.retention_s

    def sweep(self) -> None:
        """Remove expired jobs and their files."""
        for job in self.store.expired(time.time()):
            log.info("expired %s", job.id)
            self.store.purge(job)
