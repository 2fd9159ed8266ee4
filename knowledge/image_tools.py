"""What the image tools (diffusers, ComfyUI, Forge, InvokeAI) load, and how a fine-tuned denoiser gets used in one.

`data/image_tools.json` holds one entry per tool, in the style of `serving.json`: every fact names the repository,
path and commit it was read from and the version(s) it holds for. diffusers' facts were run here against
diffusers 0.42.1 (`tests/test_diffusers_client.py`); ComfyUI's, Forge's and InvokeAI's were read from source
(`"checked": "source"`). Per PEFT adapter type (LORA, DORA, LOHA, LOKR, OFT, BOFT, IA3) a fact maps each model
family ("flux2", "flux", "sdxl", ..., "*" = any other) to the file format the tool loads it in:

- "peft": the folder PEFT's save_pretrained wrote, as is (diffusers' FLUX.2 loader; it reads no
  adapter_config.json and assumes lora_alpha = r, so only adapters whose every scale is 1 load correctly);
- "diffusers": `pytorch_lora_weights.safetensors` written by the pipeline's own save_lora_weights with the
  PEFT config as metadata (`peftpick.adapters.formats.to_diffusers_format`);
- "kohya": kohya / LyCORIS keys with a `.alpha` tensor per module (`to_kohya_format`);
- "diffusers-scale1": diffusers PEFT keys that the tool reads at scale 1 (InvokeAI's FLUX.2, Wan, Qwen-Image
  loaders): lora_alpha / r must be 1, which PEFT's-scale rescale (`peftpick convert --to lora`) gives exactly;
- false / "unverified": not loaded / not settled by the sources (peftpick does not count on it).

`image_tool_verdict` turns these into one `ServingVerdict` with the routes of `serving_verdict`:

- "native": the saved folder loads as it is (or a full fine-tune, which every tool loads as a model);
- "convert": something must be written first. A lossless key / format rewrite is still a step the user runs,
  so it is a "convert" with an exact `conversion`: "diffusers", "kohya", "diffusers-scale1"; steps before the
  rewrite are joined with "+": "rescale+..." (scale baked into lora_B, exact), "initial-model+..." (PiSSA /
  OLoRA / CorDA saved as plain LoRA on the original base, exact), "svd+..." (PEFT's convert_to_lora of a method
  the tool cannot load, approximate);
- "merge": fold the adapter into the denoiser (`peftpick merge`) and load the full checkpoint;
- "cannot": none of these (also every route that does not end in an adapter when several must share a base);
- "not needed": no tool named.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftpick.errors import PeftpickError
from peftpick.knowledge.capabilities import MethodCapabilities
from peftpick.knowledge.datafiles import read_json
from peftpick.knowledge.serving import (
    NO_STACK,
    Fact,
    StackVersions,
    fact_from_json,
    rewriting_init,
    stack_versions_from_json,
    versions_note,
)
from peftpick.types import Candidate, ServingVerdict

IMAGE_TOOLS_FILE = "image_tools.json"
TOOLS = ("diffusers", "comfyui", "forge", "invokeai")
ADAPTER_KINDS = ("LORA", "DORA", "LOHA", "LOKR", "OFT", "BOFT", "IA3")
FORMATS = ("peft", "diffusers", "kohya", "diffusers-scale1")
_REQUIRED = ("families", *ADAPTER_KINDS, "multi_adapter", "launch")
_FIX = "fix knowledge/data/image_tools.json"
_MERGE_SOURCE = "peftpick knowledge/data/method_capabilities.json (PEFT generate_method_capabilities.py)"
_INITIAL_MODEL_SOURCE = ("huggingface/peft src/peft/peft_model.py@v0.21.2 (save_pretrained, "
                         "path_initial_model_for_weight_conversion)")
_INIT_NAMES = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "loftq": "LoftQ"}
_KIND_NAMES = {"LORA": "LoRA", "DORA": "DoRA", "LOHA": "LoHa", "LOKR": "LoKr", "OFT": "OFT", "BOFT": "BOFT",
               "IA3": "IA3"}
_FAMILY_NAMES = {"flux2": "FLUX.2", "flux": "FLUX.1", "sd3": "SD3", "sdxl": "SDXL", "sd15": "SD1.x", "wan": "Wan",
                 "qwen-image": "Qwen-Image", "z-image": "Z-Image"}
_FORMAT_WORDS = {
    "peft": "the folder PEFT saved",
    "diffusers": "diffusers' LoRA format (save_lora_weights with the PEFT config as metadata)",
    "kohya": "kohya / LyCORIS keys with .alpha tensors",
    "diffusers-scale1": "diffusers PEFT keys read at scale 1",
}
# What peftpick runs for each format (the writers in peftpick.adapters.formats).
_WRITE_STEP = {
    "diffusers": "write it with `to_diffusers_format` (peftpick.adapters.formats: the pipeline's save_lora_weights "
                 "with the PEFT config as metadata, so alpha travels)",
    "kohya": "write it with `to_kohya_format` (peftpick.adapters.formats: kohya / LyCORIS keys with each module's "
             ".alpha = PEFT's scale x rank)",
    "diffusers-scale1": "rescale it to lora_alpha = r (`peftpick convert --to lora`, exact), then write it with "
                        "`to_diffusers_format`",
}
# Options whose tensors no image-tool format carries.
_UNCARRIED = (("modules_to_save", "modules_to_save (full module copies)"),
              ("trainable_token_indices", "trainable_token_indices"),
              ("lora_bias", "LoRA bias"), ("use_bdlora", "BD-LoRA's packed factors"),
              ("use_qalora", "QALoRA"), ("alora_invocation_tokens", "aLoRA"), ("layer_replication", "layer_replication"))


def family_name(family: str) -> str:
    return _FAMILY_NAMES.get(family, family)


@dataclass(frozen=True)
class ImageTool:
    """One image tool's loading facts. `support(kind, family)` reads the per-family format table."""

    name: str
    display_name: str
    versions: StackVersions
    facts: Mapping[str, Fact] = field(default_factory=dict, repr=False)

    def cite(self, *fact_names: str) -> str:
        seen: dict[str, None] = {}
        for name in fact_names:
            if name in self.facts:
                for source in self.facts[name].sources:
                    seen.setdefault(source.cite(), None)
        return "; ".join(seen)

    def support(self, kind: str, family: str) -> str | bool:
        """The format the tool loads `kind` adapters in for `family`: a FORMATS value, False or "unverified"."""
        table = self.facts[kind].value
        return table.get(family, table.get("*", "unverified"))

    def runs(self, family: str) -> bool | str:
        table = self.facts["families"].value
        return table.get(family, table.get("*", "unverified"))

    @property
    def multi_adapter(self) -> bool:
        return self.facts["multi_adapter"].value is True

    @property
    def launch(self) -> Mapping[str, str]:
        return self.facts["launch"].value


# ---------------------------------------------------------------------------------------------- loading


def _check_table(fact: Fact, where: str, values: Iterable[Any]) -> None:
    allowed = set(values)
    if not isinstance(fact.value, Mapping) or not fact.value:
        raise PeftpickError(f"{where} must map families to values", _FIX)
    for family, value in fact.value.items():
        if value not in allowed or isinstance(value, (int, float)) and not isinstance(value, bool):
            raise PeftpickError(f"{where}[{family!r}] is {value!r}; expected one of {sorted(map(str, allowed))}", _FIX)


def tool_from_json(name: str, raw: Mapping[str, Any], where: str = IMAGE_TOOLS_FILE) -> ImageTool:
    raw_facts = raw.get("facts") or {}
    missing = [f for f in _REQUIRED if f not in raw_facts]
    if missing:
        raise PeftpickError(f"{where}: tool {name} lacks fact(s) {', '.join(missing)}", _FIX)
    facts = {key: fact_from_json(value, f"{where}: {name}.{key}") for key, value in raw_facts.items()}
    _check_table(facts["families"], f"{where}: {name}.families", (True, False, "unverified"))
    for kind in ADAPTER_KINDS:
        _check_table(facts[kind], f"{where}: {name}.{kind}", (*FORMATS, False, "unverified"))
    launch = facts["launch"].value
    if not isinstance(launch, Mapping) or "model" not in launch:
        raise PeftpickError(f"{where}: {name}.launch needs a \"model\" step and one per format it loads", _FIX)
    for kind in ADAPTER_KINDS:
        for fmt in facts[kind].value.values():
            if fmt in FORMATS and fmt not in launch:
                raise PeftpickError(f"{where}: {name}.{kind} uses format {fmt!r}, which {name}.launch lacks", _FIX)
    versions = stack_versions_from_json(raw.get("versions"), f"{where}: {name}")
    return ImageTool(name, str(raw.get("display_name", name)), versions, facts)


def image_tools_from_json(data: Mapping[str, Any], where: str = IMAGE_TOOLS_FILE) -> dict[str, ImageTool]:
    tools = data.get("tools") if isinstance(data, Mapping) else None
    if not isinstance(tools, Mapping) or not tools:
        raise PeftpickError(f"{where} has no 'tools' object", "restore knowledge/data/image_tools.json from git")
    return {name: tool_from_json(name, raw, where) for name, raw in tools.items()}


def load_image_tools(data_dir: Path | None = None) -> dict[str, ImageTool]:
    """Tool name -> ImageTool from `data_dir` (default: the bundled knowledge/data)."""
    return image_tools_from_json(read_json(data_dir, IMAGE_TOOLS_FILE), IMAGE_TOOLS_FILE)


# ---------------------------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class LaunchArgs:
    """What fills a tool's launch templates; capitals stand where peftpick cannot know."""

    base: str = "BASE_MODEL"
    adapter: str = "ADAPTER_DIR"
    converted: str = "CONVERTED_DIR"
    file: str = "ADAPTER.safetensors"
    name: str = "adapter"
    model: str = "MERGED_DENOISER_DIR"
    pipeline: str = "PIPELINE"
    component: str = "transformer"
    denoiser_class: str = "DENOISER_CLASS"


def adapter_kind(candidate: Candidate) -> str | None:
    """"DORA" for LoRA with use_dora, else the PEFT type; None for full fine-tuning."""
    if candidate.peft_type is None:
        return None
    peft_type = candidate.peft_type.upper()
    if peft_type == "LORA" and candidate.peft_kwargs.get("use_dora"):
        return "DORA"
    return peft_type


def _scale_is_one(kwargs: Mapping[str, Any]) -> bool:
    """Every module's PEFT scale is 1 (what a loader that assumes lora_alpha = r applies)."""
    r = kwargs.get("r", 8)
    alpha = kwargs.get("lora_alpha", 8)
    if kwargs.get("rank_pattern") or kwargs.get("alpha_pattern"):
        return False
    if kwargs.get("use_rslora"):
        return isinstance(r, (int, float)) and math.isclose(alpha, math.sqrt(r))
    return alpha == r


def _fill(template: str, args: LaunchArgs) -> str:
    return template.format(base=args.base, adapter=args.adapter, converted=args.converted, file=args.file,
                           name=args.name, model=args.model, pipeline=args.pipeline, component=args.component,
                           denoiser_class=args.denoiser_class)


def _launch(tool: ImageTool, fmt: str, multi_adapter: bool, args: LaunchArgs) -> tuple[str, ...]:
    steps = []
    if "prepare" in tool.launch:
        steps.append(_fill(tool.launch["prepare"], args))
    key = "diffusers" if fmt == "diffusers-scale1" and "diffusers-scale1" not in tool.launch else fmt
    steps.append(_fill(tool.launch[key], args))
    if multi_adapter and "multi" in tool.launch:
        steps.append(_fill(tool.launch["multi"], args))
    return tuple(steps)


def _model_launch(tool: ImageTool, args: LaunchArgs) -> tuple[str, ...]:
    return (_fill(tool.launch["model"], args),)


def image_tool_verdict(tool: ImageTool | str | None, candidate: Candidate, caps: MethodCapabilities | None,
                       family: str, multi_adapter: bool = False, installed: str | None = None,
                       launch_args: LaunchArgs = LaunchArgs(), tools: Mapping[str, ImageTool] | None = None
                       ) -> ServingVerdict:
    """How `candidate`, trained on a `family` denoiser ("flux2", "flux", "sdxl" ...), gets used in `tool`.

    `tool`: an ImageTool, a tool name (looked up in `tools`, default the bundled table), or None / "none".
    `caps`: the capabilities of the candidate's PEFT type (None for full fine-tuning). With `multi_adapter`
    only routes that end in an adapter the tool loads are acceptable.
    """
    if caps is not None and candidate.peft_type is not None and caps.peft_type != candidate.peft_type.upper():
        raise ValueError(f"capabilities of {caps.peft_type} given for a {candidate.peft_type} candidate")
    if candidate.peft_type is not None and caps is None:
        raise ValueError(f"capabilities of {candidate.peft_type} are needed to judge the image tool route")
    label = candidate.display_name
    if tool is None or (isinstance(tool, str) and tool.lower() == NO_STACK):
        if multi_adapter and candidate.peft_type is None:
            return ServingVerdict("cannot", f"{label}: multi-adapter use needs adapters over one shared base; full "
                                            "fine-tuning gives a whole model per task")
        return ServingVerdict("not needed", f"{label}: no image tool named; use the model with PEFT directly")
    if isinstance(tool, str):
        table = tools if tools is not None else load_image_tools()
        if tool.lower() not in table:
            raise PeftpickError(f"unknown image tool {tool!r}", f"choose one of {', '.join(table)}")
        tool = table[tool.lower()]
    fam = family_name(family)
    name = tool.display_name

    def verdict(route, reason, facts: Iterable[str] = (), extra: str = "", launch: tuple[str, ...] = (),
                conversion: str | None = None, rank_after: int | None = None) -> ServingVerdict:
        facts = list(dict.fromkeys(facts))
        source = "; ".join(p for p in (tool.cite(*facts), extra) if p)
        return ServingVerdict(route, reason, source, launch, conversion, rank_after,
                              versions_note(tool, facts or ["families"], installed))  # type: ignore[arg-type]

    runs = tool.runs(family)
    if runs is not True:
        words = "does not run" if runs is False else "is not verified to run"
        return verdict("cannot", f"{label}: {name} {words} {fam} models ({tool.facts['families'].detail})",
                       ["families"])

    kind = adapter_kind(candidate)
    if kind is None:
        if multi_adapter:
            return verdict("cannot", f"{label}: multi-adapter use needs adapters over one shared base; full "
                                     "fine-tuning gives a whole model per task", ["families"])
        return verdict("native", f"{label}: a full model, no adapter; {name} loads the fine-tuned {fam} denoiser "
                                 "as a model", ["families", "launch"], launch=_model_launch(tool, launch_args))
    assert caps is not None
    kwargs = candidate.peft_kwargs
    kind_name = _KIND_NAMES.get(kind, kind.title())

    # What no format carries, and inits whose factors only fit a rewritten base.
    uncarried = [words for key, words in _UNCARRIED
                 if kwargs.get(key) and not (key == "lora_bias" and kwargs.get(key) in (None, False))]
    if kwargs.get("bias", "none") not in (None, "none"):
        uncarried.append("trained biases")
    init = rewriting_init(kwargs)
    first_step = ""
    init_words = ""
    if init is not None:
        init_words = (f"{_INIT_NAMES[init]} init rewrites the base weights, so its saved factors only fit that "
                      "rewritten base")
        if init == "loftq":
            uncarried.append(f"{init_words} (LoftQ has no exact conversion)")
        else:
            first_step = "initial-model"

    support = tool.support(kind, family) if kind in ADAPTER_KINDS else False
    facts = [kind, "launch"] if kind in ADAPTER_KINDS else ["launch"]
    loads = support in FORMATS

    if loads and not uncarried:
        multi = ""
        if multi_adapter:
            if not tool.multi_adapter:
                return verdict("cannot", f"{label}: {name} cannot combine several adapters "
                                         f"({tool.facts['multi_adapter'].detail})", [kind, "multi_adapter"])
            multi = f"; several adapters share the base ({tool.facts['multi_adapter'].detail})"
            facts.append("multi_adapter")
        detail = tool.facts[kind].detail
        if support == "peft" and _scale_is_one(kwargs) and not first_step:
            return verdict("native", f"{label}: {name} loads the folder PEFT saved as it is for {fam} ({detail}); "
                                     f"every module's scale is 1, which is what it assumes{multi}",
                           facts, launch=_launch(tool, "peft", multi_adapter, launch_args))
        fmt = "diffusers" if support == "peft" else support
        why = ""
        if support == "peft":
            why = (f"{name} reads PEFT's folder but not its adapter_config.json and assumes lora_alpha = r, so "
                   "this adapter's scale would be lost; ")
        scale_one = fmt == "diffusers-scale1" and _scale_is_one(kwargs)  # already 1: no rescale needed
        steps = [s for s in (first_step, fmt) if s]
        conversion = "+".join(("diffusers" if scale_one else "rescale+diffusers") if s == "diffusers-scale1" else s
                              for s in steps)
        rank = candidate.rank
        rank_after = 2 * rank if first_step == "initial-model" and rank else rank
        pre = (f"{init_words}: save it as a plain LoRA on the original base first (PEFT's "
               "path_initial_model_for_weight_conversion via `peftpick convert`, exact, rank doubles); then "
               if first_step else "")
        reason = (f"{label}: {why}{pre}{name} loads {kind_name} adapters for {fam} as {_FORMAT_WORDS[fmt]}: "
                  f"{_WRITE_STEP['diffusers'] if scale_one else _WRITE_STEP[fmt]}; exact ({detail}){multi}")
        extra = _INITIAL_MODEL_SOURCE if first_step else ""
        converted_args = launch_args
        return verdict("convert", reason, facts, extra, launch=_launch(tool, fmt, multi_adapter, converted_args),
                       conversion=conversion, rank_after=rank_after)

    # The tool does not load it (or the adapter carries what no format does).
    if uncarried:
        problem = f"{', '.join(uncarried)}: no {name} format carries it"
    elif support == "unverified":
        problem = (f"whether {name} loads {kind_name} adapters for {fam} is not verified "
                   f"({tool.facts[kind].detail})") if kind in ADAPTER_KINDS else ""
    elif kind in ADAPTER_KINDS:
        problem = f"{name} does not load {kind_name} adapters for {fam} ({tool.facts[kind].detail})"
    else:
        problem = f"{name} loads no {candidate.peft_type} adapters (no image tool reads them)"
    lora_fmt = tool.support("LORA", family)
    lora_loads = lora_fmt in FORMATS
    svd_fmt = "diffusers" if lora_fmt == "peft" else lora_fmt
    svd_conversion = f"svd+{'rescale+diffusers' if svd_fmt == 'diffusers-scale1' else svd_fmt}"
    svd_words = (f"convert it to LoRA (`peftpick convert --to lora --rank R`, PEFT's convert_to_lora: approximate, "
                 f"evaluate it), then {_WRITE_STEP.get(svd_fmt, '')}")

    if multi_adapter:
        if caps.lora_conversion and lora_loads and not uncarried and kind != "LORA":
            if not tool.multi_adapter:
                return verdict("cannot", f"{label}: {problem}; and {name} cannot combine several adapters",
                               [*facts, "multi_adapter"])
            return verdict("convert", f"{label}: {problem}; merging bakes one adapter into the base, so for several "
                                      f"adapters {svd_words}", [*facts, "LORA", "multi_adapter"], _MERGE_SOURCE,
                           launch=_launch(tool, svd_fmt, True, launch_args), conversion=svd_conversion)
        return verdict("cannot", f"{label}: {problem}; multi-adapter use needs adapters {name} loads, and merging "
                                 "bakes one adapter into the base", facts)
    if caps.merging:
        alt = ""
        if kind == "DORA" and lora_loads:
            alt = f"; or train plain LoRA, which {name} loads for {fam}"
        elif caps.lora_conversion and lora_loads and kind != "LORA":
            alt = f"; or {svd_words}"
        return verdict("merge", f"{label}: {problem}; merge it into the {fam} denoiser (`peftpick merge`, PEFT's "
                                f"merge_and_unload: exact) and load the full model{alt}", facts, _MERGE_SOURCE,
                       launch=_model_launch(tool, launch_args))
    if caps.lora_conversion and lora_loads and not uncarried:
        return verdict("convert", f"{label}: {problem}; it cannot be merged, so {svd_words}", [*facts, "LORA"],
                       _MERGE_SOURCE, launch=_launch(tool, svd_fmt, False, launch_args), conversion=svd_conversion)
    why_not = "cannot be merged" if caps.wraps_layers else "learns virtual tokens / prompts, which cannot be merged"
    return verdict("cannot", f"{label}: {problem}; and it {why_not} or converted to a LoRA {name} loads", facts,
                   _MERGE_SOURCE)
