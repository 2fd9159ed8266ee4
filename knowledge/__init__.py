"""peftpick's knowledge base: benchmark results, method capabilities and serving support, each with its source.

`KnowledgeBase.load()` reads the tables bundled in `knowledge/data/` (or another folder); nothing is cached at
module level, so two loads never share state. The tables are derived by `peftpick.knowledge.extract` (benchmark
runs, capabilities) or written by hand with sources (serving.json).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.knowledge.architectures import Registry, load_registry
from peftpick.knowledge.benchmarks import LORA_REFERENCE, BenchmarkTable
from peftpick.knowledge.capabilities import MethodCapabilities, load_capabilities
from peftpick.knowledge.image_tools import ImageTool, image_tool_verdict, load_image_tools
from peftpick.knowledge.image_tools import LaunchArgs as ImageLaunchArgs
from peftpick.knowledge.serving import NO_STACK, LaunchArgs, ServingStack, installed_version, load_serving, serving_verdict
from peftpick.types import Candidate, Serve, ServingVerdict


@dataclass(frozen=True)
class KnowledgeBase:
    """The loaded tables. Build it with `KnowledgeBase.load()`."""

    benchmarks: BenchmarkTable
    capabilities: Mapping[str, MethodCapabilities]
    serving: Mapping[str, ServingStack]
    architectures: Registry
    image_tools: Mapping[str, ImageTool] = field(default_factory=dict)

    @classmethod
    def load(cls, data_dir: Path | None = None) -> KnowledgeBase:
        """Read every table from `data_dir` (default: the bundled `peftpick.knowledge/data`)."""
        return cls(
            benchmarks=BenchmarkTable.load(data_dir),
            capabilities=load_capabilities(data_dir),
            serving=load_serving(data_dir),
            architectures=load_registry(data_dir),
            image_tools=load_image_tools(data_dir),
        )

    def capabilities_of(self, peft_type: str) -> MethodCapabilities:
        try:
            return self.capabilities[peft_type.upper()]
        except KeyError:
            raise PeftpickError(
                f"no capability data for PEFT type {peft_type!r}",
                f"use one of {', '.join(sorted(self.capabilities))}",
            ) from None

    def stack(self, serve: Serve | str | None) -> ServingStack | ImageTool | None:
        """The serving stack (or image tool) for a `Serve` value or name; None for no stack ("none")."""
        name = serve.value if isinstance(serve, Serve) else serve
        if name is None or name.lower() == NO_STACK:
            return None
        name = name.lower()
        if name in self.serving:
            return self.serving[name]
        if name in self.image_tools:
            return self.image_tools[name]
        raise PeftpickError(
            f"unknown serving stack {name!r}",
            f"use one of {', '.join([*sorted(self.serving), *sorted(self.image_tools), NO_STACK])}",
        )

    def serving_verdict(self, serve: Serve | str | None, candidate: Candidate, multi_adapter: bool,
                        installed: str | None = None, launch_args: Any = None,
                        unmergeable: str | None = None, family: str | None = None) -> ServingVerdict:
        """The route of `candidate` on `serve`, with the stack and the candidate's capabilities looked up here:
        `serving.serving_verdict` for language-model engines, `image_tools.image_tool_verdict` for image tools
        (which need the denoiser's `family`). `launch_args`: the stack kind's LaunchArgs (defaults when None)."""
        caps = self.capabilities_of(candidate.peft_type) if candidate.peft_type is not None else None
        stack = self.stack(serve)
        if isinstance(stack, ImageTool):
            if family is None:
                raise PeftpickError(f"{stack.display_name} is an image tool, and the model is not a diffusion denoiser",
                                    "use a language-model stack (vllm, sglang, tgi, llamacpp, ollama)")
            return image_tool_verdict(stack, candidate, caps, family, multi_adapter, installed,
                                      launch_args or ImageLaunchArgs())
        return serving_verdict(stack, candidate, caps, multi_adapter, installed, launch_args or LaunchArgs(),
                               unmergeable)


__all__ = [
    "LORA_REFERENCE",
    "BenchmarkTable",
    "ImageLaunchArgs",
    "ImageTool",
    "KnowledgeBase",
    "MethodCapabilities",
    "Registry",
    "LaunchArgs",
    "ServingStack",
    "installed_version",
    "serving_verdict",
]
