"""Memory estimates on disk, so that asking again costs no trace (and no torch import).

One sqlite file beside the probe cache (peftpick.disk_cache: a damaged or foreign file is moved aside with a
warning, never read), with two tables: `estimates`, and `architectures`, which the knowledge stage uses to resolve a
bundled name or a local config.json without transformers (resolve_model's `cache`). An estimate's row is keyed by
everything it depends on:
- the architecture: its config and figures (not where it was read from: the same config in another folder is the
  same model), the workload's denoiser figures;
- the method's memory signature (PEFT config class, the settings that change a tensor's size, the optimizer);
- the training shape (micro-batch, sequence length or resolution, checkpointing, dtype, quantized base, loss, loop);
- the versions of every library the trace runs (torch, transformers, PEFT, diffusers, bitsandbytes, Liger, TRL)
  and a digest of peftpick's own code, so that an upgrade or an edit traces again.
A failed estimate (a method the tracer cannot run on the model) is kept too: it fails the same way next time.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftpick.disk_cache import JsonTable, cache_folder, code_digest, library_versions, open_checked
from peftpick.errors import PeftpickError
from peftpick.types import Architecture, MemoryEstimate, TrainingShape

CACHE_FILE_NAME = "estimates.sqlite"
LAYOUT_VERSION = 1
# the stored outcome's own format; a row of another format is dropped and traced again
OUTCOME_FORMAT = 2  # 2: estimates carry their parameter layout (multi-GPU plans)

Warn = Callable[[str], None]
Outcome = MemoryEstimate | PeftpickError


class EstimateWarning(UserWarning):
    """Something the estimate cache recovered from: a damaged file replaced, an unreadable row dropped."""


def default_estimate_cache_path() -> Path:
    """$PEFTPICK_CACHE_DIR/estimates.sqlite, else ~/.cache/peftpick/estimates.sqlite (beside the probes)."""
    return cache_folder() / CACHE_FILE_NAME


def architecture_identity(arch: Architecture) -> dict[str, Any]:
    """What of an architecture an estimate depends on: everything but where it was read from (and the facts
    derived from the rest)."""
    return {field.name: getattr(arch, field.name) for field in dataclasses.fields(arch)
            if field.name not in ("source", "hub_id", "local_path", "facts")}


class EstimateCache:
    """Open with `EstimateCache.open(path, warn)`; `key(...)`, `get(key)`, `put(key, outcome, parts, model)`;
    `architectures` is the table resolve_model reads and writes. Close when done."""

    def __init__(self, path: Path, connection, warn: Warn):
        self.path = path
        self._connection = connection
        self._warn = warn
        self.context = {"versions": library_versions(), "code": code_digest()}
        self._estimates = JsonTable(connection, "estimates", path, warn, self.context)
        self.architectures = JsonTable(connection, "architectures", path, warn, self.context)

    @classmethod
    def open(cls, path: Path | None = None, warn: Warn | None = None) -> EstimateCache:
        path = Path(path) if path is not None else default_estimate_cache_path()
        warn = warn or _warn
        connection = open_checked(path, {"estimates": JsonTable.COLUMNS, "architectures": JsonTable.COLUMNS},
                                  LAYOUT_VERSION, "estimate", "earlier estimates will be traced again", warn)
        return cls(path, connection, warn)

    def key(self, arch: Architecture, signature: Any, shape: TrainingShape) -> tuple[str, dict[str, Any]]:
        """The row key for an estimate of `signature` (the planner's memory signature) at `shape`, and its parts."""
        return self._estimates.key({"arch": architecture_identity(arch), "method": signature,
                                    "shape": dataclasses.asdict(dataclasses.replace(shape, gradient_accumulation=1))})

    def get(self, key: str) -> Outcome | None:
        """The stored outcome for `key`; None when absent or unreadable (an unreadable row is dropped)."""
        value = self._estimates.get(key)
        if value is None:
            return None
        try:
            return outcome_from_dict(value)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self._warn(f"a cached estimate in {self.path} is unreadable ({error}); dropped it and tracing again")
            self._estimates.drop(key)
            return None

    def put(self, key: str, outcome: Outcome, parts: dict[str, Any], model: str) -> None:
        """Store `outcome` under `key` in one transaction (`parts`: what the key was made of, for people)."""
        self._estimates.put(key, outcome_to_dict(outcome), parts, model)

    def __len__(self) -> int:
        return len(self._estimates)

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> EstimateCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def outcome_to_dict(outcome: Outcome) -> dict[str, Any]:
    if isinstance(outcome, PeftpickError):
        return {"format": OUTCOME_FORMAT, "error": {"problem": outcome.problem, "fix": outcome.fix}}
    return {"format": OUTCOME_FORMAT, "estimate": dataclasses.asdict(outcome)}


def outcome_from_dict(data: dict[str, Any]) -> Outcome:
    if data.get("format") != OUTCOME_FORMAT:
        raise ValueError(f"format {data.get('format')!r}, expected {OUTCOME_FORMAT}")
    if "error" in data:
        return PeftpickError(str(data["error"]["problem"]), str(data["error"]["fix"]))
    fields = dict(data["estimate"])
    fields["shape"] = TrainingShape(**fields["shape"])
    fields["assumptions"] = tuple(fields.get("assumptions", ()))
    fields["breakdown"] = {str(k): int(v) for k, v in fields["breakdown"].items()}
    return MemoryEstimate(**fields)


def _warn(message: str) -> None:
    warnings.warn(message, EstimateWarning, stacklevel=3)
