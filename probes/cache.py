"""Probe results on disk: one sqlite file under the user's cache folder (peftpick.disk_cache).

A row is keyed by everything that can change a measurement: the model's identity (where it comes from and a hash
of its config), the method's configuration, the training setting, the data, the number of steps, the device
(GPU name) and the library versions. A file that sqlite cannot read, or that fails its integrity check or has
another layout, is moved aside with a warning and a new one started: cached figures are never read from a
damaged file. Every write is one transaction, so an interrupted run leaves whole rows or none.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from peftpick.disk_cache import cache_folder, cache_key, open_checked
from peftpick.probes.results import RESULT_SCHEMA_VERSION, result_from_dict, result_to_dict
from peftpick.types import ProbeResult

__all__ = ["CACHE_FILE_NAME", "ProbeCache", "ProbeWarning", "cache_key", "default_cache_path"]

CACHE_FILE_NAME = "probes.sqlite"
# sqlite's user_version: a file with another layout is moved aside rather than migrated (it only holds a cache).
LAYOUT_VERSION = 1
_COLUMNS = ("key TEXT PRIMARY KEY, created REAL NOT NULL, method TEXT NOT NULL, device TEXT NOT NULL, "
            "parts TEXT NOT NULL, result TEXT NOT NULL")

Warn = Callable[[str], None]


def default_cache_path() -> Path:
    """$PEFTPICK_CACHE_DIR/probes.sqlite, else $XDG_CACHE_HOME/peftpick/..., else ~/.cache/peftpick/..."""
    return cache_folder() / CACHE_FILE_NAME


class ProbeCache:
    """Open with `ProbeCache.open(path, warn)`; `get(key)` / `put(key, result, parts)`; close when done."""

    def __init__(self, path: Path, connection: sqlite3.Connection, warn: Warn):
        self.path = path
        self._connection = connection
        self._warn = warn

    @classmethod
    def open(cls, path: Path | None = None, warn: Warn | None = None) -> ProbeCache:
        """Open (or create) the cache at `path`; a damaged file is moved aside and replaced."""
        path = Path(path) if path is not None else default_cache_path()
        warn = warn or _warn
        connection = open_checked(path, {"probes": _COLUMNS}, LAYOUT_VERSION, "probe",
                                  "earlier probes will run again", warn)
        return cls(path, connection, warn)

    def get(self, key: str) -> ProbeResult | None:
        """The cached result for `key`, marked from_cache; None when absent or unreadable (the row is dropped)."""
        try:
            row = self._connection.execute("SELECT result FROM probes WHERE key = ?", (key,)).fetchone()
        except sqlite3.DatabaseError as error:
            self._warn(f"cannot read the probe cache {self.path} ({error}); probing again")
            return None
        if row is None:
            return None
        try:
            data = json.loads(row[0])
            if data.get("schema_version") != RESULT_SCHEMA_VERSION:
                raise ValueError(f"schema version {data.get('schema_version')}")
            result = result_from_dict(data["result"])
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self._warn(f"a cached probe in {self.path} is unreadable ({error}); dropped it and probing again")
            with self._connection:
                self._connection.execute("DELETE FROM probes WHERE key = ?", (key,))
            return None
        return dataclasses.replace(result, from_cache=True)

    def put(self, key: str, result: ProbeResult, parts: Mapping[str, Any]) -> None:
        """Store `result` under `key` in one transaction (`parts`: what the key was made of, for people)."""
        payload = json.dumps({"schema_version": RESULT_SCHEMA_VERSION, "result": result_to_dict(result)},
                             allow_nan=False)
        described = json.dumps(parts, sort_keys=True, default=repr)
        with self._connection:  # commits on success, rolls back on any exception (Ctrl-C included)
            self._connection.execute(
                "INSERT OR REPLACE INTO probes (key, created, method, device, parts, result) VALUES (?, ?, ?, ?, ?, ?)",
                (key, time.time(), result.method, result.device, described, payload),
            )

    def __len__(self) -> int:
        return int(self._connection.execute("SELECT COUNT(*) FROM probes").fetchone()[0])

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> ProbeCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ProbeWarning(UserWarning):
    """Something a probe run recovered from: a damaged cache replaced, an unreadable cached row dropped."""


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, ProbeWarning, stacklevel=3)
