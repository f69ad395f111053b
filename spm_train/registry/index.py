"""The registry's index: one SQLite file (WAL mode) holding versions, aliases and an event log.

Writers take the database lock up front (``BEGIN IMMEDIATE``) so two registrations of one concept
cannot both read "the next version is v3"; readers never block writers in WAL mode. A version row
is immutable: triggers refuse to change or delete it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
import uuid
from typing import Any, Iterator

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    concept    TEXT NOT NULL,
    version    INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    size       INTEGER NOT NULL,
    created    REAL NOT NULL,
    status     TEXT NOT NULL,
    validation TEXT NOT NULL,
    lineage    TEXT NOT NULL,
    metrics    TEXT NOT NULL,
    metadata   TEXT NOT NULL,
    PRIMARY KEY (concept, version),
    UNIQUE (concept, sha256)
);
CREATE TABLE IF NOT EXISTS aliases (
    concept TEXT NOT NULL,
    alias   TEXT NOT NULL,
    version INTEGER NOT NULL,
    updated REAL NOT NULL,
    forced  INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (concept, alias),
    FOREIGN KEY (concept, version) REFERENCES versions (concept, version)
);
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ts      REAL NOT NULL,
    concept TEXT NOT NULL,
    version INTEGER,
    action  TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS versions_immutable BEFORE UPDATE ON versions
BEGIN SELECT RAISE(ABORT, 'registry versions are immutable'); END;
CREATE TRIGGER IF NOT EXISTS versions_undeletable BEFORE DELETE ON versions
BEGIN SELECT RAISE(ABORT, 'registry versions cannot be deleted'); END;
"""

JSON_COLUMNS = ("validation", "lineage", "metrics", "metadata")


class Index:
    def __init__(self, path: str, create: bool = True):
        """Open the index at ``path``; ``create`` makes the schema (a write), otherwise the index must
        exist and opening takes no lock, so reads go on while another process writes."""
        self.path = os.path.abspath(path)
        if create and not os.path.exists(self.path):
            _create_file(self.path)
        if not os.path.isfile(self.path):
            raise sqlite3.DatabaseError("there is no index file")
        if os.path.getsize(self.path) == 0:
            # SQLite would take an empty file for a new database, and the registry's history would vanish
            raise sqlite3.DatabaseError("the index file is empty (0 bytes)")
        self.conn = self._connect(self.path)
        if self.get_meta("schema_version") is None:
            self.conn.close()
            raise sqlite3.DatabaseError("the index has no schema version")
        if create:
            self.conn.execute("PRAGMA synchronous = NORMAL")

    @staticmethod
    def _connect(path: str) -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn


    def close(self) -> None:
        self.conn.close()

    # -- transactions ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction holding the database's write lock from its first statement."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # -- meta ------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row["value"]

    def set_meta_default(self, key: str, value: str) -> str:
        """Store ``value`` under ``key`` unless one is there already; return what is stored."""
        with self.write() as conn:
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
        return self.get_meta(key)

    # -- rows --------------------------------------------------------------------------------------
    @staticmethod
    def decode(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        data = dict(row)
        for key in JSON_COLUMNS:
            if key in data:
                data[key] = json.loads(data[key])
        return data

    def versions(self, concept: str | None = None) -> list[dict[str, Any]]:
        if concept is None:
            rows = self.conn.execute("SELECT * FROM versions ORDER BY concept, version").fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM versions WHERE concept = ? ORDER BY version",
                                     (concept,)).fetchall()
        return [self.decode(r) for r in rows]

    def version(self, concept: str, version: int) -> dict[str, Any] | None:
        return self.decode(self.conn.execute("SELECT * FROM versions WHERE concept = ? AND version = ?",
                                             (concept, version)).fetchone())

    def aliases(self, concept: str | None = None) -> list[dict[str, Any]]:
        if concept is None:
            rows = self.conn.execute("SELECT * FROM aliases ORDER BY concept, alias").fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM aliases WHERE concept = ? ORDER BY alias", (concept,)).fetchall()
        return [dict(r) for r in rows]

    def alias(self, concept: str, alias: str) -> int | None:
        row = self.conn.execute("SELECT version FROM aliases WHERE concept = ? AND alias = ?",
                                (concept, alias)).fetchone()
        return None if row is None else int(row["version"])

    def events(self, concept: str | None = None) -> list[dict[str, Any]]:
        if concept is None:
            rows = self.conn.execute("SELECT * FROM events ORDER BY id").fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM events WHERE concept = ? ORDER BY id", (concept,)).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["detail"] = json.loads(d["detail"])
            out.append(d)
        return out

    def integrity_check(self) -> list[str]:
        """SQLite's own consistency check plus foreign keys; empty when the file is sound."""
        problems = [r[0] for r in self.conn.execute("PRAGMA integrity_check").fetchall() if r[0] != "ok"]
        problems += [f"alias row {tuple(r)} points to a missing version"
                     for r in self.conn.execute("PRAGMA foreign_key_check").fetchall()]
        return problems


def _create_file(path: str) -> None:
    """Make a new index under a temporary name and link it into place, so that no process ever sees
    an index without its schema (an empty file at ``path`` is refused, never taken for a new registry).
    Of several processes creating one registry at once, the first link wins and the others use it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")  # persists in the file
            conn.execute("BEGIN IMMEDIATE")
            for statement in _split(_SCHEMA):
                conn.execute(statement)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        finally:
            conn.close()
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError:  # a filesystem without hard links: a rename, unless another process was first
            if not os.path.exists(path):
                os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)


def _split(script: str) -> list[str]:
    """Statements of the schema script (triggers keep their inner ``;``)."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        joined = "\n".join(current).strip()
        if joined.endswith(";") and (not joined.startswith("CREATE TRIGGER") or joined.endswith("END;")):
            statements.append(joined)
            current = []
    return statements


def log_event(conn: sqlite3.Connection, concept: str, version: int | None, action: str, **detail: Any) -> None:
    conn.execute("INSERT INTO events (ts, concept, version, action, detail) VALUES (?, ?, ?, ?, ?)",
                 (time.time(), concept, version, action, json.dumps(detail, sort_keys=True, default=str)))
