"""The cache folder and its sqlite files, shared by the probe cache and the estimate cache.

A file sqlite cannot read, that fails its quick integrity check, or that has another layout is moved aside (kept
for a look, never read again) and a new one started: a cache only saves time, so nothing in a damaged file is
trusted. Every write is one transaction, so an interrupted run leaves whole rows or none.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

CACHE_DIR_ENV = "PEFTPICK_CACHE_DIR"

Warn = Callable[[str], None]


def cache_folder() -> Path:
    """$PEFTPICK_CACHE_DIR, else $XDG_CACHE_HOME/peftpick, else ~/.cache/peftpick."""
    folder = os.environ.get(CACHE_DIR_ENV)
    if folder:
        return Path(folder).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "peftpick"


def cache_key(parts: Mapping[str, Any]) -> str:
    """A stable digest of `parts` (canonical JSON; values JSON cannot hold are written with repr)."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


# distributions whose code decides a derived result (absent ones are keyed as absent: installing one recomputes)
TRACED_LIBRARIES = ("torch", "transformers", "peft", "diffusers", "bitsandbytes", "liger-kernel", "trl", "accelerate")
# peftpick's packages whose code decides an estimate or a resolved architecture
_CODE_PACKAGES = ("peftpick", "peftpick.estimator", "peftpick.methods", "peftpick.knowledge")


def library_versions() -> dict[str, str | None]:
    """Installed versions of peftpick and the traced libraries, read from their metadata (nothing is imported)."""
    versions = {}
    for name in ("peftpick", *TRACED_LIBRARIES):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def code_digest() -> str:
    """sha256 of peftpick's deciding code (its .py files and bundled tables), so that an edited checkout never
    reads a result an older version of the code made."""
    digest = hashlib.sha256()
    for package in _CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for path in sorted(Path(folder).rglob("*")):
                if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                    digest.update(str(path.relative_to(folder)).encode())
                    digest.update(path.read_bytes())
    return digest.hexdigest()


class WrongLayout(sqlite3.DatabaseError):
    """The file is a sqlite database, but not one of this cache's layout."""


def open_checked(path: Path, tables: Mapping[str, str], layout: int, what: str, lost: str,
                 warn: Warn) -> sqlite3.Connection:
    """A connection to the cache file `path` holding `tables` (name -> its CREATE TABLE column list) at layout
    version `layout`. A damaged or foreign file is moved aside with one warning: the `what` cache, and what that
    costs (`lost`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _connect(path, tables, layout)
    except sqlite3.DatabaseError as error:
        aside = move_aside(path)
        warn(f"the {what} cache {path} is damaged or not peftpick's ({error}); moved it to {aside.name} and "
             f"started a new one, so {lost}")
        return _connect(path, tables, layout)


def _connect(path: Path, tables: Mapping[str, str], layout: int) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=30)
    try:
        verdict = connection.execute("PRAGMA quick_check").fetchone()
        if verdict is None or verdict[0] != "ok":
            raise sqlite3.DatabaseError(f"integrity check: {verdict[0] if verdict else 'no answer'}")
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        present = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if present and (version != layout or not set(tables) <= present):
            raise WrongLayout(f"layout {version}, tables {', '.join(sorted(present))}")
        with connection:
            for table, columns in tables.items():
                connection.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
            connection.execute(f"PRAGMA user_version = {layout}")
    except BaseException:
        connection.close()
        raise
    return connection


class JsonTable:
    """Rows of one table of an open cache file: key -> a JSON value, with what the key was made of (`parts`) and
    a label, for people who look inside. Reads that fail are misses; writes that fail cost only the cache."""

    COLUMNS = "key TEXT PRIMARY KEY, created REAL NOT NULL, label TEXT NOT NULL, parts TEXT NOT NULL, value TEXT NOT NULL"

    def __init__(self, connection: sqlite3.Connection, table: str, path: Path, warn: Warn,
                 context: Mapping[str, Any] | None = None):
        """`context`: what every key of this table also depends on (library versions, the code's digest)."""
        self._connection, self._table, self.path, self._warn = connection, table, path, warn
        self.context = dict(context or {})

    def key(self, parts: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """The row key for `parts` with the table's context, and the parts it was made of."""
        full = {**parts, **self.context}
        return cache_key(full), full

    def get(self, key: str) -> Any | None:
        try:
            row = self._connection.execute(f"SELECT value FROM {self._table} WHERE key = ?", (key,)).fetchone()
            return None if row is None else json.loads(row[0])
        except (sqlite3.DatabaseError, ValueError) as error:
            self._warn(f"cannot read the cache {self.path} ({error}); working it out again")
            return None

    def drop(self, key: str) -> None:
        with self._connection:
            self._connection.execute(f"DELETE FROM {self._table} WHERE key = ?", (key,))

    def put(self, key: str, value: Any, parts: Mapping[str, Any], label: str) -> None:
        payload = json.dumps(value, allow_nan=False)
        described = json.dumps(parts, sort_keys=True, default=repr)
        try:
            with self._connection:  # commits on success, rolls back on any exception (Ctrl-C included)
                self._connection.execute(
                    f"INSERT OR REPLACE INTO {self._table} (key, created, label, parts, value) VALUES (?, ?, ?, ?, ?)",
                    (key, time.time(), label, described, payload))
        except sqlite3.DatabaseError as error:  # a full disk or a read-only folder
            self._warn(f"cannot write the cache {self.path} ({error}); this result is not kept")

    def __len__(self) -> int:
        return int(self._connection.execute(f"SELECT COUNT(*) FROM {self._table}").fetchone()[0])


def move_aside(path: Path) -> Path:
    """Rename a damaged cache file (and sqlite's side files) to <name>.damaged-<time>; returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    counter = 1
    while aside.exists():
        counter += 1
        aside = path.with_name(f"{path.name}.damaged-{stamp}-{counter}")
    os.replace(path, aside)
    for suffix in ("-journal", "-wal", "-shm"):  # sqlite's side files belong to the damaged database
        side = path.with_name(path.name + suffix)
        if side.exists():
            os.replace(side, aside.with_name(aside.name + suffix))
    return aside
