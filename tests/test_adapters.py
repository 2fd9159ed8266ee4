"""Saved adapters: reading them without their tensors, converting them to plain LoRA, merging them.

Adapters are built with PEFT on a tiny random Llama (tests/conftest.py) and "trained" by adding noise to every
trainable tensor, so each has an update to convert or merge. Errors are measured against PEFT's own forward pass.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from peftpick.adapters import convert_adapter, merge_adapter, read_adapter, read_adapter_config
from peftpick.errors import PeftpickError

PROMPT = [[5, 17, 42, 99, 3, 250, 8, 61]]


def save_adapter(base: Path, config, folder: Path, seed: int = 0, noise: float = 0.05) -> Path:
    """PEFT adapter of `config` on the model at `base`, its trainable tensors moved off their init, saved."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * noise)
    model.save_pretrained(folder)
    return folder


def peft_logits(base: Path, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits


def model_logits(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder)(torch.tensor(PROMPT)).logits


def lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kwargs})


# ------------------------------------------------------------------------------------------ reading


def test_reads_config_and_tensor_header(tiny_llama: Path, tmp_path: Path):
    adapter = read_adapter(save_adapter(tiny_llama, lora(r=8), tmp_path / "lora"))
    assert adapter.peft_type == "LORA" and adapter.config_class == "LoraConfig"
    ranks = adapter.lora_ranks()
    assert ranks == {f"model.layers.{i}.self_attn.{p}": 8 for i in range(2) for p in ("q_proj", "v_proj")}
    shapes = {t.name: t.shape for t in adapter.tensors}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (8, 64)
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] == (32, 8)  # 2 kv heads x 16
    assert adapter.tensor_kinds().keys() == {"lora_A", "lora_B"}
    assert adapter.saved_bytes == (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size


@pytest.fixture
def good_adapter(tiny_llama: Path, tmp_path_factory) -> Path:
    return save_adapter(tiny_llama, lora(), tmp_path_factory.mktemp("good") / "lora")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c.update(r="sixteen"), "r is \"sixteen\", expected a whole number"),
    (lambda c: c.update(r=-4), "r is -4, expected a positive number"),
    (lambda c: c.update(r=10**30), "r is 1000000000000000000000000000000, expected a whole number"),
    (lambda c: c.update(target_modules=5), "target_modules is 5, expected a string or a list of strings"),
    (lambda c: c.update(use_rslora="yes"), "use_rslora is \"yes\", expected true or false"),
    (lambda c: c.update(init_lora_weights="sideways"), "init_lora_weights is \"sideways\""),
    (lambda c: c.update(peft_type="NOT_A_METHOD"), "peft_type 'NOT_A_METHOD' is not a PEFT method"),
    (lambda c: c.pop("peft_type"), "has no peft_type"),
])
def test_bad_config_values_name_the_field(good_adapter: Path, edit, message: str):
    file = good_adapter / "adapter_config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))
    with pytest.raises(PeftpickError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        read_adapter(good_adapter)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("content", "message"), [
    ('{"peft_type": "LORA", "r": 8', "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ("", "is not valid JSON"),
])
def test_malformed_config_files(good_adapter: Path, content: str, message: str):
    (good_adapter / "adapter_config.json").write_text(content)
    with pytest.raises(PeftpickError, match=message):
        read_adapter(good_adapter)


def test_missing_and_damaged_files(good_adapter: Path, tmp_path: Path):
    with pytest.raises(PeftpickError, match="no adapter folder at"):
        read_adapter(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(PeftpickError, match="is a file, not an adapter folder"):
        read_adapter(tmp_path / "file.txt")
    weights = good_adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100])  # header cut off
    with pytest.raises(PeftpickError, match="truncated|damaged"):
        read_adapter(good_adapter)
    weights.write_bytes(struct.pack("<Q", 10**12) + b"{}")  # a length field past the end of the file
    with pytest.raises(PeftpickError, match="is not a safetensors file"):
        read_adapter(good_adapter)
    header = json.dumps({"x.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 99999]}}).encode()
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(PeftpickError, match="points past the end"):
        read_adapter(good_adapter)
    weights.unlink()
    with pytest.raises(PeftpickError, match="has no adapter weights"):
        read_adapter(good_adapter)


def test_config_reader_builds_the_peft_config(good_adapter: Path):
    raw, config = read_adapter_config(good_adapter / "adapter_config.json")
    assert raw["r"] == 4 and type(config).__name__ == "LoraConfig" and config.lora_alpha == 8


# ------------------------------------------------------------------------------------------ conversion


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_initial_model_conversion_is_exact_at_twice_the_rank(tiny_llama: Path, tmp_path: Path, init: str):
    source = save_adapter(tiny_llama, lora(init_lora_weights=init), tmp_path / init)
    result = convert_adapter(source, tmp_path / "converted", base=str(tiny_llama))
    assert result.route == "initial-model" and result.exact and result.rank == 8
    assert result.overall_error < 1e-5 and len(result.layers) == 4
    written = read_adapter(tmp_path / "converted")
    assert written.config["init_lora_weights"] is True and written.config["r"] == 8
    # the converted adapter on the ORIGINAL base computes what the trained adapter computes
    original, converted = peft_logits(tiny_llama, source), peft_logits(tiny_llama, tmp_path / "converted")
    assert (original - converted).abs().max().item() < 1e-4


def test_rslora_rescale_is_exact_without_the_base(tiny_llama: Path, tmp_path: Path):
    source = save_adapter(tiny_llama, lora(r=16, lora_alpha=16, use_rslora=True), tmp_path / "rslora")
    result = convert_adapter(source, tmp_path / "plain")
    assert result.route == "rescale" and result.exact and result.overall_error < 1e-6
    config = read_adapter(tmp_path / "plain").config
    assert config["use_rslora"] is False and config["lora_alpha"] == config["r"] == 16
    assert (peft_logits(tiny_llama, source) - peft_logits(tiny_llama, tmp_path / "plain")).abs().max().item() < 1e-5


def test_svd_conversion_error_falls_with_rank(tiny_llama: Path, tmp_path: Path):
    from peft import LoHaConfig

    source = save_adapter(tiny_llama, LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "loha")
    errors = []
    for rank in (2, 8, 32):
        result = convert_adapter(source, tmp_path / f"r{rank}", rank=rank, base=str(tiny_llama))
        assert result.route == "svd" and not result.exact and result.rank == rank
        assert {layer.rank for layer in result.layers} == {rank}
        errors.append(result.overall_error)
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-4  # LoHa of rank 4 has an update of rank <= 16
    # the measured error is what PEFT's forward pass sees: rank 32 reproduces the LoHa model
    assert (peft_logits(tiny_llama, source) - peft_logits(tiny_llama, tmp_path / "r32")).abs().max().item() < 1e-3


def test_energy_picks_a_rank_per_layer(tiny_llama: Path, tmp_path: Path):
    from peft import LoKrConfig

    source = save_adapter(tiny_llama, LoKrConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), tmp_path / "lokr")
    result = convert_adapter(source, tmp_path / "e", energy=0.9, base=str(tiny_llama))
    for layer in result.layers:  # keeping 90 % of the squared singular values leaves at most sqrt(0.1) of the norm
        assert layer.relative_error <= math.sqrt(0.1) + 1e-6
    assert read_adapter(tmp_path / "e").config["rank_pattern"]


def test_dora_is_converted_from_its_merged_update(tiny_llama: Path, tmp_path: Path):
    """PEFT's convert_to_lora drops DoRA's magnitude; peftpick measures that and converts the merged update."""
    source = save_adapter(tiny_llama, lora(use_dora=True, target_modules=["q_proj"]), tmp_path / "dora")
    result = convert_adapter(source, tmp_path / "dora-lora", rank=64, base=str(tiny_llama))
    assert any("merged weight minus the base weight" in note for note in result.notes)
    assert result.overall_error < 1e-4  # rank 64 is the full rank of the 64 x 64 q_proj: exact
    assert (peft_logits(tiny_llama, source) - peft_logits(tiny_llama, tmp_path / "dora-lora")).abs().max() < 1e-3


@pytest.mark.parametrize(("config", "message"), [
    ("ia3", "IA3 adapters cannot be converted to LoRA"),
    ("prompt", "learns virtual tokens"),
])
def test_methods_without_a_conversion_are_refused_with_alternatives(tiny_llama: Path, tmp_path: Path, config: str,
                                                                    message: str):
    from peft import IA3Config, PromptTuningConfig

    peft_config = (IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
                   if config == "ia3" else PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    source = save_adapter(tiny_llama, peft_config, tmp_path / config)
    with pytest.raises(PeftpickError, match=message) as error:
        convert_adapter(source, tmp_path / "out", rank=8, base=str(tiny_llama))
    assert "retrain as LoRA" in str(error.value)
    assert ("peftpick merge" in str(error.value)) == (config == "ia3")


def test_conversion_input_errors(tiny_llama: Path, tmp_path: Path):
    from peft import LoHaConfig

    source = save_adapter(tiny_llama, LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]), tmp_path / "loha")
    with pytest.raises(PeftpickError, match="needs a target rank"):
        convert_adapter(source, tmp_path / "a", base=str(tiny_llama))
    assert read_adapter(source).base_model == str(tiny_llama)  # PEFT records the base folder: no --base needed
    file = source / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "base_model_name_or_path": "org/elsewhere"}))
    with pytest.raises(PeftpickError, match="needs the base model's weights.*'org/elsewhere', which is not a folder"):
        convert_adapter(source, tmp_path / "b", rank=4)
    with pytest.raises(PeftpickError, match="--rank or --energy, not both"):
        convert_adapter(source, tmp_path / "c", rank=4, energy=0.9)
    with pytest.raises(PeftpickError, match="--energy must be a share"):
        convert_adapter(source, tmp_path / "d", energy=1.5)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(PeftpickError, match="already exists and is not empty"):
        convert_adapter(source, tmp_path / "taken", rank=4, base=str(tiny_llama))
    plain = save_adapter(tiny_llama, lora(), tmp_path / "plain")
    with pytest.raises(PeftpickError, match="already a plain LoRA adapter"):
        convert_adapter(plain, tmp_path / "e")


def test_an_adapter_for_another_model_is_refused(tiny_llama: Path, tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "wider"
    LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=256)).save_pretrained(other)
    from peft import LoHaConfig

    source = save_adapter(tiny_llama, LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]), tmp_path / "loha")
    with pytest.raises(PeftpickError, match="another architecture"):
        convert_adapter(source, tmp_path / "out", rank=4, base=str(other))


# ------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("kind", ["lora", "pissa", "ia3"])
def test_merge_gives_the_adapted_model(tiny_llama: Path, tmp_path: Path, kind: str):
    from peft import IA3Config

    config = {"lora": lora(), "pissa": lora(init_lora_weights="pissa"),
              "ia3": IA3Config(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])}[kind]
    source = save_adapter(tiny_llama, config, tmp_path / kind)
    result = merge_adapter(source, str(tiny_llama), tmp_path / "merged")
    assert result.layers_merged == (6 if kind == "ia3" else 4)
    assert (tmp_path / "merged" / "config.json").is_file() and result.output_bytes > 0
    assert (peft_logits(tiny_llama, source) - model_logits(tmp_path / "merged")).abs().max().item() < 1e-4


def test_prompt_tuning_cannot_be_merged(tiny_llama: Path, tmp_path: Path):
    from peft import PromptTuningConfig

    source = save_adapter(tiny_llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path / "p")
    with pytest.raises(PeftpickError, match="cannot be merged into the base"):
        merge_adapter(source, str(tiny_llama), tmp_path / "merged")


# ------------------------------------------------------------------------------------------ check


def test_check_native_adapter_with_launch_flags(tiny_llama: Path, tmp_path: Path):
    from peftpick.adapters.check import check_adapter

    result = check_adapter(save_adapter(tiny_llama, lora(r=48), tmp_path / "lora"), "vllm", run_engine=False)
    assert result.loads_as_is and result.verdict.route == "native" and result.rank == 48
    assert result.verdict.launch == (f"vllm serve {tiny_llama} --enable-lora --max-lora-rank 64 --lora-modules "
                                     f"lora={tmp_path / 'lora'}",)
    assert result.agreement == "engine not run" and not result.fix


def test_check_pissa_says_convert_with_the_doubled_rank(tiny_llama: Path, tmp_path: Path):
    from peftpick.adapters.check import check_adapter

    source = save_adapter(tiny_llama, lora(r=16, init_lora_weights="pissa"), tmp_path / "pissa")
    result = check_adapter(source, "vllm", run_engine=False)
    assert not result.loads_as_is and result.verdict.conversion == "initial-model"
    assert result.fix[0] == f"peftpick convert {source} --to lora --base {tiny_llama} -o {source}-lora"
    assert "--max-lora-rank 32" in result.fix[1] and f"={source}-lora" in result.fix[1]


def test_check_rescale_and_merge_fixes(tiny_llama: Path, tmp_path: Path):
    from peft import LoHaConfig

    from peftpick.adapters.check import check_adapter

    rslora = save_adapter(tiny_llama, lora(use_rslora=True), tmp_path / "rslora")
    on_sglang = check_adapter(rslora, "sglang", run_engine=False)
    assert on_sglang.fix[0] == f"peftpick convert {rslora} --to lora -o {rslora}-lora"
    assert check_adapter(rslora, "vllm", run_engine=False).loads_as_is
    loha = save_adapter(tiny_llama, LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]), tmp_path / "loha")
    merged = check_adapter(loha, "vllm", run_engine=False)
    assert merged.fix == (f"peftpick merge {loha} --base {tiny_llama} -o {loha}-merged", f"vllm serve {loha}-merged")


def test_check_refuses_an_adapter_for_another_model(tiny_llama: Path, tmp_path: Path):
    from peftpick.adapters.check import check_adapter

    source = save_adapter(tiny_llama, lora(), tmp_path / "lora")
    with pytest.raises(PeftpickError, match="another architecture than smollm2-135m.*q_proj takes 576 inputs"):
        check_adapter(source, "vllm", base="smollm2-135m", run_engine=False)


def test_check_refuses_a_config_that_does_not_match_the_tensors(tiny_llama: Path, tmp_path: Path):
    from peftpick.adapters.check import check_adapter

    source = save_adapter(tiny_llama, lora(r=8), tmp_path / "lora")
    file = source / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), "r": 16}))
    with pytest.raises(PeftpickError, match="gives model.layers.0.self_attn.q_proj rank 16, but its lora_A tensor has "
                                            "rank 8"):
        check_adapter(source, "vllm", run_engine=False)


# ------------------------------------------------------------------------------------------ command line


def _run(*args: str):
    from typer.testing import CliRunner

    from peftpick.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_check_exit_codes(tiny_llama: Path, tmp_path: Path):
    native = save_adapter(tiny_llama, lora(), tmp_path / "lora")
    dora = save_adapter(tiny_llama, lora(use_dora=True), tmp_path / "dora")
    ok = _run("check", str(native), "--serve", "vllm", "--no-engine")
    assert ok.exit_code == 0 and "loads as it is" in ok.stdout and "--enable-lora" in ok.stdout
    refused = _run("check", str(dora), "--serve", "vllm", "--json", "--no-engine")
    assert refused.exit_code == 1
    report = json.loads(refused.stdout)
    assert report["route"] == "merge" and report["fix"][0].startswith("peftpick merge") and not report["loads_as_is"]
    for args, message in [((str(tmp_path / "missing"),), "no adapter folder at"),
                          ((str(native), "--serve", "triton"), "unknown --serve value 'triton'"),
                          ((str(native), "--serve", "none"), "--serve none names no stack")]:
        bad = _run("check", *args)
        assert bad.exit_code == 2 and message in bad.stderr and "Traceback" not in bad.output, (args, bad.output)
        assert len(bad.stderr.strip().splitlines()) == 1


def test_cli_convert_prints_errors_and_launch_flags(tiny_llama: Path, tmp_path: Path):
    source = save_adapter(tiny_llama, lora(r=8, init_lora_weights="olora"), tmp_path / "olora")
    done = _run("convert", str(source), "--to", "lora", "--base", str(tiny_llama), "-o", str(tmp_path / "out"))
    assert done.exit_code == 0, done.output
    assert "plain LoRA, rank 16 (initial-model, exact)" in done.stdout and "overall" in done.stdout
    assert "--max-lora-rank 16" in done.stdout
    again = _run("convert", str(source), "--to", "lora", "--base", str(tiny_llama), "-o", str(tmp_path / "out"))
    assert again.exit_code == 2 and "already exists and is not empty" in again.stderr
    assert _run("convert", str(source), "--to", "kohya", "-o", str(tmp_path / "k")).exit_code == 2
    from peft import PromptTuningConfig

    prompt = save_adapter(tiny_llama, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), tmp_path / "p")
    refused = _run("convert", str(prompt), "--to", "lora", "--rank", "4", "-o", str(tmp_path / "p2"))
    assert refused.exit_code == 2 and "cannot be converted to LoRA" in refused.stderr


def test_cli_merge(tiny_llama: Path, tmp_path: Path):
    source = save_adapter(tiny_llama, lora(), tmp_path / "lora")
    done = _run("merge", str(source), "--base", str(tiny_llama), "-o", str(tmp_path / "merged"), "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["layers_merged"] == 4 and report["launch"] == [f"vllm serve {tmp_path / 'merged'}"]
    bad = _run("merge", str(source), "--base", str(tiny_llama), "-o", str(tmp_path / "m2"), "--dtype", "int8")
    assert bad.exit_code == 2 and "unknown --dtype" in bad.stderr


def test_adapter_targets_keep_the_module_list_index_of_diffusers_layers(tmp_path):
    """A diffusers attention's output projection is `to_out.0` (a Linear inside a ModuleList): the checked
    adapter names it so, as PEFT's target_modules does, not as a bare "0"."""
    import torch
    from peft import LoraConfig, get_peft_model

    from peftpick.adapters.check import adapter_candidate

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(8, 8)
            self.to_out = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Dropout(0.0)])

    model = torch.nn.Sequential(Attention())
    get_peft_model(model, LoraConfig(r=2, target_modules=["to_q", "to_out.0"])).save_pretrained(tmp_path / "a")
    candidate = adapter_candidate(read_adapter(tmp_path / "a"))
    assert candidate.peft_kwargs["target_modules"] == ["to_out.0", "to_q"]
