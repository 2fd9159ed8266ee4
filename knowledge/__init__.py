"""peftpick's knowledge base: benchmark results, method capabilities and serving support, each with its source.

`KnowledgeBase.load()` reads the tables bundled in `knowledge/data/` (or another folder); nothing is cached at
module level, so two loads never share state. The tables are derived by `peftpick.knowledge.extract` (benchmark
runs, capabilities) or written by hand with sources (serving.json).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from peftpick.errors import PeftpickError
from peftpick.knowledge.architectures import Registry, load_registry
from peftpick.knowledge.benchmarks import LORA_REFERENCE, BenchmarkTable
from peftpick.knowledge.capabilities import MethodCapabilities, load_capabilities
from peftpick.knowledge.serving import NO_STACK, LaunchArgs, ServingStack, installed_version, load_serving, serving_verdict
from peftpick.types import Candidate, Serve, ServingVerdict


@dataclass(frozen=True)
class KnowledgeBase:
    """The loaded tables. Build it with `KnowledgeBase.load()`."""

    benchmarks: BenchmarkTable
    capabilities: Mapping[str, MethodCapabilities]
    serving: Mapping[str, ServingStack]
    architectures: Registry

    @classmethod
    def load(cls, data_dir: Path | None = None) -> KnowledgeBase:
        """Read every table from `data_dir` (default: the bundled `peftpick.knowledge/data`)."""
        return cls(
            benchmarks=BenchmarkTable.load(data_dir),
            capabilities=load_capabilities(data_dir),
            serving=load_serving(data_dir),
            architectures=load_registry(data_dir),
        )

    def capabilities_of(self, peft_type: str) -> MethodCapabilities:
        try:
            return self.capabilities[peft_type.upper()]
        except KeyError:
            raise PeftpickError(
                f"no capability data for PEFT type {peft_type!r}",
                f"use one of {', '.join(sorted(self.capabilities))}",
            ) from None

    def stack(self, serve: Serve | str | None) -> ServingStack | None:
        """The serving stack for a `Serve` value or name; None for no stack ("none")."""
        name = serve.value if isinstance(serve, Serve) else serve
        if name is None or name.lower() == NO_STACK:
            return None
        try:
            return self.serving[name.lower()]
        except KeyError:
            raise PeftpickError(
                f"unknown serving stack {name!r}",
                f"use one of {', '.join([*sorted(self.serving), NO_STACK])}",
            ) from None

    def serving_verdict(self, serve: Serve | str | None, candidate: Candidate, multi_adapter: bool,
                        installed: str | None = None, launch_args: LaunchArgs = LaunchArgs(),
                        unmergeable: str | None = None) -> ServingVerdict:
        """`serving.serving_verdict` with the stack and the candidate's capabilities looked up here."""
        caps = self.capabilities_of(candidate.peft_type) if candidate.peft_type is not None else None
        return serving_verdict(self.stack(serve), candidate, caps, multi_adapter, installed, launch_args, unmergeable)


__all__ = [
    "LORA_REFERENCE",
    "BenchmarkTable",
    "KnowledgeBase",
    "MethodCapabilities",
    "Registry",
    "LaunchArgs",
    "ServingStack",
    "installed_version",
    "serving_verdict",
]
