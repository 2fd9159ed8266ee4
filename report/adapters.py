"""What `peftpick check`, `convert` and `merge` print: terminal text and JSON documents (schema_version 1)."""

from __future__ import annotations

from typing import Any

from peftpick.report.formatting import binary_size, count
from peftpick.report.schema import json_safe

SCHEMA_VERSION = 1


def _rank_words(check: Any) -> str:
    if check.rank is None:
        return ""
    targets = ", ".join(check.target_modules) if check.target_modules else "?"
    return f", rank {check.rank} on {targets}"


def check_lines(check: Any) -> list[str]:
    """Plain-text lines of an AdapterCheck, verdict first."""
    adapter = check.adapter
    params = sum(t.numel for t in adapter.tensors)
    dtypes = ", ".join(sorted({t.dtype for t in adapter.tensors}))
    installed = (f"{check.stack} {check.installed} installed here" if check.installed
                 else f"{check.stack} not installed here")
    lines = [
        f"{adapter.path}: {check.method} ({adapter.peft_type}){_rank_words(check)}; {count(params)} parameters in "
        f"{len(adapter.tensors)} tensors ({dtypes}), {binary_size(adapter.saved_bytes)}",
        f"Serving with {check.stack} ({installed}): "
        + ("loads as it is." if check.loads_as_is else "does NOT load as it is."),
        f"Why: {check.verdict.reason}",
    ]
    if check.loads_as_is and check.verdict.launch:
        lines.append("Launch:")
        lines += [f"  {command}" for command in check.verdict.launch]
    if check.fix:
        route = check.verdict.route
        if route == "convert" and "--format" in check.fix[0]:
            route = "format"
        lines.append({"convert": "Fix (convert to plain LoRA, then serve):",
                      "format": "Fix (write it in the file format the tool reads, then load it):",
                      "merge": "Fix (merge into the base, then serve the merged model):"}.get(route, "Fix:"))
        lines += [f"  {command}" for command in check.fix]
    elif not check.loads_as_is:
        lines.append("Fix: none that keeps this adapter; train a method the stack loads (peftpick --serve "
                     f"{check.stack.lower()} ranks them)")
    if check.engine is not None:
        engine = check.engine
        said = "accepts it" if engine.accepts else f"refuses it: {engine.message}"
        lines.append(f"{engine.engine}'s own validation ({engine.checked}): {said}")
        lines.append("peftpick and the engine agree." if check.agreement == "agree"
                     else "peftpick and the engine DISAGREE: the engine's verdict is the one above.")
    else:
        why = ("peftpick runs no loader of it" if check.installed else "the engine is not importable here")
        lines.append(f"{check.stack}'s own validation: not run ({why}); the verdict is from peftpick's facts")
    lines.append(f"Facts for: {check.verdict.versions}")
    lines += [f"Note: {note}" for note in check.notes]
    if check.verdict.source:
        lines.append(f"Sources: {check.verdict.source}")
    return lines


def check_to_dict(check: Any) -> dict[str, Any]:
    adapter = check.adapter
    verdict = check.verdict
    engine = check.engine
    return json_safe({
        "schema_version": SCHEMA_VERSION,
        "adapter": {"path": str(adapter.path), "method": check.method, "peft_type": adapter.peft_type,
                    "rank": check.rank, "target_modules": list(check.target_modules),
                    "base_model": adapter.base_model, "tensors": len(adapter.tensors),
                    "parameters": sum(t.numel for t in adapter.tensors), "bytes": adapter.saved_bytes},
        "stack": {"name": check.stack, "installed_version": check.installed, "facts_for": verdict.versions},
        "loads_as_is": check.loads_as_is,
        "route": verdict.route,
        "reason": verdict.reason,
        "conversion": verdict.conversion,
        "rank_after": verdict.rank_after,
        "launch": list(verdict.launch) if check.loads_as_is else [],
        "fix": list(check.fix),
        "engine": None if engine is None else {"engine": engine.engine, "accepts": engine.accepts,
                                               "message": engine.message, "checked": engine.checked},
        "agreement": check.agreement,
        "notes": list(check.notes),
        "source": verdict.source,
    })


def conversion_lines(result: Any, launch: tuple[str, ...] = ()) -> list[str]:
    exact = "exact" if result.exact else "approximate"
    lines = [f"{result.source} ({result.from_method}) -> {result.output}: plain LoRA, rank {result.rank} "
             f"({result.route}, {exact})"]
    lines += [f"  {note}" for note in result.notes]
    lines.append(f"Relative error of the weight update, ||dW - dW'||_F / ||dW||_F: overall "
                 f"{result.overall_error:.3g}" + (f", worst layer {result.worst_layer.module} "
                                                   f"{result.worst_layer.relative_error:.3g}" if result.worst_layer else ""))
    lines.append(f"{'Layer':<60} {'rank':>5} {'rel. error':>11}")
    for layer in result.layers:
        lines.append(f"{layer.module:<60} {layer.rank:>5} {layer.relative_error:>11.3g}")
    if launch:
        lines.append("Launch:")
        lines += [f"  {command}" for command in launch]
    return lines


def conversion_to_dict(result: Any, launch: tuple[str, ...] = ()) -> dict[str, Any]:
    return json_safe({
        "schema_version": SCHEMA_VERSION, "source": str(result.source), "output": str(result.output),
        "from_method": result.from_method, "route": result.route, "exact": result.exact, "rank": result.rank,
        "overall_relative_error": result.overall_error,
        "layers": [{"module": layer.module, "rank": layer.rank, "relative_error": layer.relative_error}
                   for layer in result.layers],
        "notes": list(result.notes), "launch": list(launch),
    })


def merge_lines(result: Any, launch: tuple[str, ...] = ()) -> list[str]:
    lines = [f"{result.source} ({result.from_method}) merged into {result.base}: {result.layers_merged} layers, "
             f"{binary_size(result.output_bytes)} of safetensors in {result.output}"]
    if result.copied_files:
        lines.append(f"  tokenizer files copied: {', '.join(result.copied_files)}")
    lines += [f"  {note}" for note in result.notes]
    if launch:
        lines.append("Launch:")
        lines += [f"  {command}" for command in launch]
    return lines


def merge_to_dict(result: Any, launch: tuple[str, ...] = ()) -> dict[str, Any]:
    return json_safe({
        "schema_version": SCHEMA_VERSION, "source": str(result.source), "output": str(result.output),
        "base": result.base, "from_method": result.from_method, "layers_merged": result.layers_merged,
        "output_bytes": result.output_bytes, "copied_files": list(result.copied_files), "notes": list(result.notes),
        "launch": list(launch),
    })


def export_lines(conversion: Any, written: Any) -> list[str]:
    lines = conversion_lines(conversion) if conversion is not None else []
    lines.append(f"{written.path}: {written.format} format, {written.peft_type}, {written.tensors} tensors over "
                 f"{written.modules} modules, keys prefixed {written.prefix!r}")
    lines += [f"  {note}" for note in written.notes]
    return lines


def export_to_dict(conversion: Any, written: Any) -> dict[str, Any]:
    return json_safe({
        "schema_version": SCHEMA_VERSION,
        "conversion": conversion_to_dict(conversion) if conversion is not None else None,
        "written": {"path": str(written.path), "format": written.format, "peft_type": written.peft_type,
                    "tensors": written.tensors, "modules": written.modules, "prefix": written.prefix,
                    "notes": list(written.notes)},
    })
