"""The app's database: raters, pair assignments, plays, votes and ratings in one SQLite file.

Durability and concurrency come from SQLite itself:

- WAL journal with ``synchronous=FULL``: a transaction is on disk when ``COMMIT`` returns, so a vote that was
  answered with 200 survives ``kill -9`` of the server (and a power cut). Readers never block the writer.
- Every write runs in ``BEGIN IMMEDIATE``: the write lock is taken before anything is read, so "is there already a
  vote on this pair?" and "store the vote" are one atomic step even with many raters voting at once.
- Every request opens its own connection (cheap for SQLite), so no connection is shared between threads.
- Uniqueness is in the schema, not only in the code: one vote per assignment (``votes.pair_id`` is the primary key),
  one vote per rater and unordered clip pair, one Idempotency-Key per rater.

Idempotent retries: a client that sends a vote and loses the answer (timeout, server killed) cannot know whether the
vote was stored. It resends the same request with the same ``Idempotency-Key`` header; the store then answers with
the stored vote (``replayed: true``) instead of 409, and nothing is stored twice. The same key with a different vote
is an error (422), as in the IETF Idempotency-Key draft. Without a key, a second vote on a pair is a 409.

Tokens are 256-bit random strings; only their SHA-256 is stored (a slow password hash buys nothing against
guessing 256 random bits), and they are shown once, by ``musicrl-app add-rater``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import random
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .pool import Pool

__all__ = ["AppError", "Rater", "Store", "RATING_CRITERIA", "CHOICES", "SIDES", "MODES"]

CHOICES = ("a", "b", "tie")
SIDES = ("a", "b")
MODES = ("collect", "evaluate")
RATING_CRITERIA = ("text_adherence", "acoustic_quality", "overall_appeal")
RATER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.@-]{0,63}$")
IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS raters (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL
);
-- One row per pair shown to a rater: which clip is A and which is B, and when each was played to the end.
CREATE TABLE IF NOT EXISTS assignments (
    pair_id TEXT PRIMARY KEY,
    rater_id INTEGER NOT NULL REFERENCES raters(id),
    mode TEXT NOT NULL,
    prompt TEXT NOT NULL,
    clip_a TEXT NOT NULL,
    clip_b TEXT NOT NULL,
    system_a TEXT NOT NULL,
    system_b TEXT NOT NULL,
    clip_lo TEXT NOT NULL,  -- the pair unordered: min and max of (clip_a, clip_b)
    clip_hi TEXT NOT NULL,
    issued_at REAL NOT NULL,
    played_a REAL,
    played_b REAL,
    UNIQUE (rater_id, clip_lo, clip_hi)
);
CREATE INDEX IF NOT EXISTS assignments_by_rater ON assignments (rater_id);
CREATE TABLE IF NOT EXISTS votes (
    pair_id TEXT PRIMARY KEY REFERENCES assignments(pair_id),
    rater_id INTEGER NOT NULL REFERENCES raters(id),
    clip_lo TEXT NOT NULL,
    clip_hi TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('a', 'b', 'tie')),
    reason TEXT,
    idempotency_key TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (rater_id, clip_lo, clip_hi),
    UNIQUE (rater_id, idempotency_key)
);
CREATE INDEX IF NOT EXISTS votes_by_clips ON votes (clip_lo, clip_hi);
CREATE TABLE IF NOT EXISTS ratings (
    pair_id TEXT NOT NULL REFERENCES assignments(pair_id),
    side TEXT NOT NULL CHECK (side IN ('a', 'b')),
    rater_id INTEGER NOT NULL REFERENCES raters(id),
    clip_id TEXT NOT NULL,
    text_adherence INTEGER NOT NULL CHECK (text_adherence BETWEEN 1 AND 5),
    acoustic_quality INTEGER NOT NULL CHECK (acoustic_quality BETWEEN 1 AND 5),
    overall_appeal INTEGER NOT NULL CHECK (overall_appeal BETWEEN 1 AND 5),
    idempotency_key TEXT,
    created_at TEXT NOT NULL,
    PRIMARY KEY (pair_id, side),
    UNIQUE (rater_id, idempotency_key)
);
"""


class AppError(Exception):
    """A request the app refuses: HTTP status, a short machine-readable code and a sentence for people."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def to_json(self) -> dict[str, str]:
        return {"error": self.code, "detail": self.detail}


@dataclass(frozen=True)
class Rater:
    id: int
    name: str
    is_admin: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """All reads and writes of the app's SQLite database. Safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike, busy_timeout_s: float = 30.0):
        self.path = os.fspath(path)
        self.busy_timeout_s = busy_timeout_s
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(
                f"the database folder {directory!r} does not exist: create it or pick another --db."
            )
        with self.connect() as connection:
            connection.executescript(SCHEMA)
            connection.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('url_secret', ?)", (secrets.token_hex(32),)
            )
        self._url_secret = self._meta("url_secret").encode()

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.execute("PRAGMA foreign_keys=ON")
            yield connection
        finally:
            connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction holding SQLite's write lock from the start; committed before the caller answers."""
        with self.connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def _meta(self, key: str) -> str:
        with self.connect() as connection:
            return connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()["value"]

    # ---- raters ----------------------------------------------------------------------------------------------------

    def add_rater(self, name: str, admin: bool = False) -> str:
        """Create a rater and return their token (only its hash is stored)."""
        if not isinstance(name, str) or not RATER_NAME.match(name):
            raise ValueError(
                f"rater name {name!r} is not valid: use 1-64 letters, digits, spaces or '_.@-', starting with a "
                "letter or digit."
            )
        token = secrets.token_urlsafe(32)
        try:
            with self.transaction() as connection:
                connection.execute(
                    "INSERT INTO raters (name, token_sha256, is_admin, created_at) VALUES (?, ?, ?, ?)",
                    (name, hash_token(token), int(admin), utc_now()),
                )
        except sqlite3.IntegrityError:
            raise ValueError(f"a rater named {name!r} already exists in {self.path}: pick another name.") from None
        return token

    def authenticate(self, token: str | None) -> Rater | None:
        if not token:
            return None
        with self.connect() as connection:
            row = connection.execute(
                "SELECT id, name, is_admin FROM raters WHERE token_sha256 = ?", (hash_token(token),)
            ).fetchone()
        return None if row is None else Rater(row["id"], row["name"], bool(row["is_admin"]))

    # ---- clip URLs -------------------------------------------------------------------------------------------------

    def clip_signature(self, rater_id: int, clip_id: str) -> str:
        """Signs clip URLs handed to a rater: an <audio> element cannot send an Authorization header."""
        message = f"{rater_id}:{clip_id}".encode()
        return hmac.new(self._url_secret, message, hashlib.sha256).hexdigest()[:32]

    def check_clip_signature(self, rater_id: int, clip_id: str, signature: str) -> bool:
        return hmac.compare_digest(self.clip_signature(rater_id, clip_id), signature)

    def rater_exists(self, rater_id: int) -> bool:
        with self.connect() as connection:
            return connection.execute("SELECT 1 FROM raters WHERE id = ?", (rater_id,)).fetchone() is not None

    # ---- pairs -----------------------------------------------------------------------------------------------------

    def next_pair(self, rater: Rater, pool: Pool, mode: str) -> dict[str, Any]:
        """The rater's open pair if they have one (a retried or reloaded request resumes it), else a new one.

        New pairs are drawn among the pool's pairs this rater has never been given, preferring pairs with the fewest
        votes so far (even coverage), A/B order at random. Raises 404 ``no_pairs_left`` when the rater has seen all.
        """
        with self.transaction() as connection:
            open_pairs = connection.execute(
                "SELECT a.* FROM assignments a LEFT JOIN votes v ON v.pair_id = a.pair_id "
                "WHERE a.rater_id = ? AND a.mode = ? AND v.pair_id IS NULL ORDER BY a.issued_at",
                (rater.id, mode),
            ).fetchall()
            for row in open_pairs:  # pairs left open on other pools sharing this database stay open for those
                if row["clip_a"] in pool.clips and row["clip_b"] in pool.clips:
                    return dict(row)
            seen = {
                (r["clip_lo"], r["clip_hi"])
                for r in connection.execute(
                    "SELECT clip_lo, clip_hi FROM assignments WHERE rater_id = ?", (rater.id,)
                ).fetchall()
            }
            candidates = [pair for pair in pool.pairs(mode) if pair not in seen]
            if not candidates:
                raise AppError(404, "no_pairs_left", f"rater {rater.name!r} has rated every pair of this pool.")
            counts = {
                (r["clip_lo"], r["clip_hi"]): r["n"]
                for r in connection.execute("SELECT clip_lo, clip_hi, COUNT(*) AS n FROM votes GROUP BY 1, 2")
            }
            fewest = min(counts.get(pair, 0) for pair in candidates)
            clip_lo, clip_hi = random.choice([pair for pair in candidates if counts.get(pair, 0) == fewest])
            clip_a, clip_b = (clip_lo, clip_hi) if random.random() < 0.5 else (clip_hi, clip_lo)
            assignment = {
                "pair_id": secrets.token_hex(12),
                "rater_id": rater.id,
                "mode": mode,
                "prompt": pool.clips[clip_a].prompt,
                "clip_a": clip_a,
                "clip_b": clip_b,
                "system_a": pool.clips[clip_a].system,
                "system_b": pool.clips[clip_b].system,
                "clip_lo": clip_lo,
                "clip_hi": clip_hi,
                "issued_at": time.time(),
                "played_a": None,
                "played_b": None,
            }
            connection.execute(
                f"INSERT INTO assignments ({', '.join(assignment)}) VALUES ({', '.join('?' * len(assignment))})",
                tuple(assignment.values()),
            )
            return assignment

    def _assignment(self, connection: sqlite3.Connection, rater: Rater, pair_id: str) -> sqlite3.Row:
        row = connection.execute("SELECT * FROM assignments WHERE pair_id = ?", (pair_id,)).fetchone()
        if row is None or row["rater_id"] != rater.id:
            # Someone else's pair is reported like an unknown one: pair ids are not an oracle.
            raise AppError(404, "unknown_pair", f"pair {pair_id!r} was not given to you: get one from GET /api/pair.")
        return row

    def mark_played(
        self, rater: Rater, pair_id: str, side: str, pool: Pool, min_listen_fraction: float = 0.0
    ) -> dict[str, Any]:
        """Record that the rater played clip ``side`` of the pair to the end (repeating it is harmless).

        With ``min_listen_fraction > 0`` the report is refused (409) unless the pair was given out at least that
        fraction of the clip's duration ago: a script that skips listening then has to wait as long as a listener.
        """
        with self.transaction() as connection:
            row = self._assignment(connection, rater, pair_id)
            clip = pool.clips.get(row[f"clip_{side}"])
            duration = clip.duration_s if clip is not None else 0.0
            listened = time.time() - row["issued_at"]
            if listened < min_listen_fraction * duration:
                raise AppError(
                    409,
                    "not_played",
                    f"clip {side.upper()} lasts {duration:.2f} s but the pair was given out {listened:.2f} s ago: "
                    "it cannot have been played to the end yet.",
                )
            if row[f"played_{side}"] is None:
                connection.execute(
                    f"UPDATE assignments SET played_{side} = ? WHERE pair_id = ?", (time.time(), pair_id)
                )
        return {"pair_id": pair_id, "side": side, "played": True}

    @staticmethod
    def _check_played(row: sqlite3.Row, sides: tuple[str, ...], action: str) -> None:
        """409 ``not_played`` unless every clip of ``sides`` was played to the end; ``action`` ends the message."""
        missing = [side.upper() for side in sides if row[f"played_{side}"] is None]
        if missing:
            raise AppError(
                409,
                "not_played",
                f"play clip{'s' if len(missing) > 1 else ''} {' and '.join(missing)} to the end before {action}.",
            )

    def vote(
        self,
        rater: Rater,
        pair_id: str,
        choice: str,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Store the rater's vote on a pair, once. Committed before this returns."""
        with self.transaction() as connection:
            if idempotency_key is not None:
                previous = connection.execute(
                    "SELECT * FROM votes WHERE rater_id = ? AND idempotency_key = ?", (rater.id, idempotency_key)
                ).fetchone()
                if previous is not None:
                    if previous["pair_id"] != pair_id or previous["choice"] != choice:
                        raise AppError(
                            422,
                            "idempotency_key_reused",
                            "this Idempotency-Key was already used for a different vote: use a new key per vote.",
                        )
                    return self._vote_json(previous, replayed=True)
            row = self._assignment(connection, rater, pair_id)
            existing = connection.execute("SELECT * FROM votes WHERE pair_id = ?", (pair_id,)).fetchone()
            if existing is not None:
                raise AppError(
                    409,
                    "already_voted",
                    f"you already voted {existing['choice']!r} on pair {pair_id!r} at {existing['created_at']}; "
                    "a vote is stored once.",
                )
            self._check_played(row, SIDES, "voting")
            created_at = utc_now()
            connection.execute(
                "INSERT INTO votes (pair_id, rater_id, clip_lo, clip_hi, choice, reason, idempotency_key, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (pair_id, rater.id, row["clip_lo"], row["clip_hi"], choice, reason, idempotency_key, created_at),
            )
            stored = connection.execute("SELECT * FROM votes WHERE pair_id = ?", (pair_id,)).fetchone()
            return self._vote_json(stored, replayed=False)

    @staticmethod
    def _vote_json(row: sqlite3.Row, replayed: bool) -> dict[str, Any]:
        return {
            "pair_id": row["pair_id"],
            "choice": row["choice"],
            "created_at": row["created_at"],
            "stored": True,
            "replayed": replayed,
        }

    def rate(
        self,
        rater: Rater,
        pair_id: str,
        side: str,
        scores: dict[str, int],
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Store the rater's 1-5 scores of one clip of a pair (evaluation mode), once."""
        with self.transaction() as connection:
            if idempotency_key is not None:
                previous = connection.execute(
                    "SELECT * FROM ratings WHERE rater_id = ? AND idempotency_key = ?", (rater.id, idempotency_key)
                ).fetchone()
                if previous is not None:
                    same = previous["pair_id"] == pair_id and previous["side"] == side
                    if not same or any(previous[name] != scores[name] for name in RATING_CRITERIA):
                        raise AppError(
                            422,
                            "idempotency_key_reused",
                            "this Idempotency-Key was already used for different scores: use a new key per request.",
                        )
                    return self._rating_json(previous, replayed=True)
            row = self._assignment(connection, rater, pair_id)
            if row["mode"] != "evaluate":
                raise AppError(409, "wrong_mode", "this pair was given out for collection, not for evaluation.")
            if connection.execute("SELECT 1 FROM ratings WHERE pair_id = ? AND side = ?", (pair_id, side)).fetchone():
                raise AppError(409, "already_rated", f"you already rated clip {side.upper()} of pair {pair_id!r}.")
            self._check_played(row, (side,), "rating it")
            connection.execute(
                "INSERT INTO ratings (pair_id, side, rater_id, clip_id, text_adherence, acoustic_quality, "
                "overall_appeal, idempotency_key, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    pair_id,
                    side,
                    rater.id,
                    row[f"clip_{side}"],
                    *(scores[name] for name in RATING_CRITERIA),
                    idempotency_key,
                    utc_now(),
                ),
            )
            stored = connection.execute(
                "SELECT * FROM ratings WHERE pair_id = ? AND side = ?", (pair_id, side)
            ).fetchone()
            return self._rating_json(stored, replayed=False)

    @staticmethod
    def _rating_json(row: sqlite3.Row, replayed: bool) -> dict[str, Any]:
        return {
            "pair_id": row["pair_id"],
            "side": row["side"],
            **{name: row[name] for name in RATING_CRITERIA},
            "stored": True,
            "replayed": replayed,
        }

    # ---- reading it all back ---------------------------------------------------------------------------------------

    def votes(self) -> list[dict[str, Any]]:
        """Every vote with its pair, clips, systems and rater name, oldest first."""
        with self.connect() as connection:
            rows = connection.execute(
                "SELECT v.pair_id, v.choice, v.reason, v.created_at, r.name AS rater, a.mode, a.prompt, a.clip_a, "
                "a.clip_b, a.system_a, a.system_b FROM votes v JOIN assignments a ON a.pair_id = v.pair_id "
                "JOIN raters r ON r.id = v.rater_id ORDER BY v.created_at, v.pair_id"
            ).fetchall()
        return [dict(row) for row in rows]

    def ratings(self) -> list[dict[str, Any]]:
        """Every 1-5 rating with its pair, clip, system and rater name."""
        with self.connect() as connection:
            rows = connection.execute(
                "SELECT t.*, r.name AS rater, a.prompt, a.system_a, a.system_b FROM ratings t "
                "JOIN assignments a ON a.pair_id = t.pair_id JOIN raters r ON r.id = t.rater_id "
                "ORDER BY t.created_at, t.pair_id, t.side"
            ).fetchall()
        result = []
        for row in rows:
            entry = {key: row[key] for key in row.keys() if key not in ("system_a", "system_b", "idempotency_key")}
            entry["system"] = row["system_a"] if row["side"] == "a" else row["system_b"]
            result.append(entry)
        return result

    def vote_count(self, rater: Rater) -> int:
        with self.connect() as connection:
            return connection.execute("SELECT COUNT(*) FROM votes WHERE rater_id = ?", (rater.id,)).fetchone()[0]

    def counts(self) -> dict[str, int]:
        with self.connect() as connection:
            return {
                table: connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("raters", "assignments", "votes", "ratings")
            }
