"""Video generation jobs: records in SQLite, outputs as files, surviving restarts.

Layout under the store's root: `jobs.sqlite3` (one row per job) and
`videos/<id>/` holding `video.mp4`, `thumbnail.webp` and `codes.npy` (the
frames' VQGAN codes, which an extension continues from). Outputs are written
to a temporary name and renamed into place before the job is marked
completed, so a completed job always has its files.

A job that was queued or running when the server stopped cannot continue (its
engine state is gone): opening the store marks it failed with an error saying
so. Ids are opaque (`video_` + random hex) and matched against a pattern before
any path is built from them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

JobStatus = Literal["queued", "in_progress", "completed", "failed"]
_ID = re.compile(r"^video_[0-9a-f]{24}$")
RESTART_ERROR = ("the server restarted while this video was being generated; its progress is lost — "
                 "create the video again")
OUTPUTS = ("video.mp4", "thumbnail.webp", "codes.npy")


class JobNotFound(LookupError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"No such video: {job_id!r}")


@dataclass
class VideoJob:
    """One job's record (the wire object is built from it by the handler)."""

    id: str
    prompt: str
    size: str
    seconds: str
    n_frames: int           # frames of the finished video (extensions: the stitched total)
    model: str
    status: JobStatus = "queued"
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    error: dict[str, Any] | None = None
    remixed_from: str | None = None  # the video an extension continues
    params: dict[str, Any] = field(default_factory=dict)  # the settings it was drawn with


_SCHEMA = """
CREATE TABLE IF NOT EXISTS videos (
    id TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    record TEXT NOT NULL
)
"""


class JobStore:
    """Thread-safe store of VideoJobs under `root`."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.videos = self.root / "videos"
        self.videos.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False)
        with self._db:
            self._db.execute(_SCHEMA)
        self._fail_interrupted()

    def close(self) -> None:
        self._db.close()

    def _fail_interrupted(self) -> None:
        for job in self.list(order="asc"):
            if job.status in ("queued", "in_progress"):
                job.status, job.completed_at = "failed", int(time.time())
                job.error = {"code": "server_restarted", "message": RESTART_ERROR}
                self.save(job)
                self._remove_outputs(job.id)
                logger.info("video %s was %s when the server stopped: marked failed", job.id, "interrupted")
        for tmp in self.videos.glob("*/.*.part"):
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ records

    @staticmethod
    def new_id() -> str:
        return "video_" + secrets.token_hex(12)

    def save(self, job: VideoJob) -> None:
        with self._lock, self._db:
            # An upsert keeps the row's rowid: the creation order that listings follow
            # (created_at has one-second resolution).
            self._db.execute("INSERT INTO videos (id, created_at, record) VALUES (?, ?, ?) "
                             "ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                             (job.id, job.created_at, json.dumps(asdict(job))))

    def get(self, job_id: str) -> VideoJob:
        if not _ID.match(job_id or ""):
            raise JobNotFound(job_id)
        with self._lock:
            row = self._db.execute("SELECT record FROM videos WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return VideoJob(**json.loads(row[0]))

    def list(self, *, order: Literal["asc", "desc"] = "desc", after: str | None = None,
             limit: int | None = None) -> list[VideoJob]:
        """Jobs in creation order (`order`), starting after the job `after` (cursor)."""
        direction = "ASC" if order == "asc" else "DESC"
        query, args = "SELECT record FROM videos", []
        if after is not None:
            self.get(after)
            op = ">" if order == "asc" else "<"
            query += f" WHERE rowid {op} (SELECT rowid FROM videos WHERE id = ?)"
            args.append(after)
        query += f" ORDER BY rowid {direction}"
        if limit is not None:
            query += " LIMIT ?"
            args.append(limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [VideoJob(**json.loads(r[0])) for r in rows]

    def delete(self, job_id: str) -> None:
        self.get(job_id)
        with self._lock, self._db:
            self._db.execute("DELETE FROM videos WHERE id = ?", (job_id,))
        shutil.rmtree(self.videos / job_id, ignore_errors=True)

    # ------------------------------------------------------------------ files

    def output(self, job_id: str, name: str) -> Path:
        if not _ID.match(job_id) or name not in OUTPUTS:
            raise JobNotFound(job_id)
        return self.videos / job_id / name

    def write_output(self, job_id: str, name: str, data: bytes) -> None:
        """Atomically (temp file + rename) writes one output file of a job."""
        path = self.output(job_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{name}.part"
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _remove_outputs(self, job_id: str) -> None:
        shutil.rmtree(self.videos / job_id, ignore_errors=True)

    def remove_outputs(self, job_id: str) -> None:
        """Drops a job's files (a failed job keeps none)."""
        if _ID.match(job_id):
            self._remove_outputs(job_id)
