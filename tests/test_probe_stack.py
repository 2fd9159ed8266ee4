"""Probes run the stack their setting names (probes.stack): the optimizer class the estimator models, a
bitsandbytes-quantized base, the loss kernel and the trainer, and say which they ran.

Most tests run the worker's probe in this process on a tiny random Llama (hidden 64, 2 layers, 32 tokens), two
optimizer steps each, and look at what trained: the optimizer's state, the base's layers, the forward the loss
came from. bitsandbytes' 4-bit and 8-bit layers and its 8-bit optimizers run on the CPU. One test goes through
`peftpick probe` with a real worker process; parent-side checks (refusals, fallbacks, comparisons with an
estimate) start no worker or only the protocol stand-in. Liger's kernel needs CUDA: its test is marked gpu.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import peftpick
from peftpick.cli import app
from peftpick.errors import PeftpickError
from peftpick.probes import ProbeOptions, StackMismatch, probe_stack, probe_to_estimate, stack_mismatch
from peftpick.probes import runner as probe_runner
from peftpick.probes import stack as stacks
from peftpick.probes.job import FAULTS_ENV, ProbeJob
from peftpick.probes.worker import _Probe, run_job
from peftpick.types import MemoryEstimate, ProbeResult, TrainingPlan, TrainingShape

bnb = pytest.importorskip("bitsandbytes")

SMALL = {"seq_len": 32, "batch_size": 2, "steps": 2, "random_weights": True, "device": "cpu", "progress": False}


@pytest.fixture(autouse=True)
def no_faults(monkeypatch):
    monkeypatch.delenv(FAULTS_ENV, raising=False)


@pytest.fixture(scope="module")
def arch(tiny_llama: Path):
    from peftpick.knowledge.architectures import resolve_model

    return resolve_model(str(tiny_llama))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("stack-tokens") / "tokens.pt"
    torch.manual_seed(1)
    torch.save(torch.randint(0, 256, (16, 32)), path)
    return str(path)


def candidate(arch, method: str = "lora", **kwargs):
    from peftpick.methods import build_candidate, get_method

    built = build_candidate(get_method(method, arch.workload), arch)
    return built.with_kwargs(**kwargs) if kwargs else built


def job(arch, tokens: str, cand=None, weights: str | None = None, dtype: str = "float32", steps: int = 2,
        **stack) -> ProbeJob:
    shape = TrainingShape(batch_size=2, seq_len=32, dtype=dtype, **stack)
    return ProbeJob(candidate=cand or candidate(arch), architecture=arch, shape=shape, weights=weights, device="cpu",
                    steps=steps, warmup_steps=0, learning_rate=1e-3, tokens_path=tokens)


def probed(the_job: ProbeJob) -> _Probe:
    """The probe of `the_job`, run in this process; it must succeed."""
    probe = _Probe(the_job, lambda **_event: None)
    probe.run()
    assert len(probe.record["losses"]) == the_job.total_steps
    return probe


def state_values(optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)]


# ------------------------------------------------------------------------------------------- optimizers


def test_adamw_8bit_holds_bitsandbytes_8bit_state(arch, tokens):
    # rank 64 on a 64-wide model: lora_A is 64 x 64 = 4096 elements, where bitsandbytes starts keeping 8-bit state
    probe = probed(job(arch, tokens, candidate(arch, r=64, lora_alpha=64), optimizer="adamw-8bit"))
    assert type(probe.optimizer) is bnb.optim.AdamW8bit
    dtypes = {value.dtype for value in state_values(probe.optimizer)}
    assert torch.uint8 in dtypes  # the moments of the large tensors
    big = next(p for p in probe.optimizer.state if p.numel() >= 4096)
    assert probe.optimizer.state[big]["state1"].dtype == torch.uint8
    assert probe.optimizer.state[big]["absmax1"].dtype == torch.float32
    record = probe.record["stack"]
    assert record["optimizer"] == "adamw-8bit"
    assert record["optimizer_class"] == "bitsandbytes.optim.adamw.AdamW8bit"
    assert json.loads(record["details"]["optimizer_state_bytes"])["uint8"] > 0
    assert "bitsandbytes" in probe.record["versions"]


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_paged_adamw_8bit_runs_bitsandbytes_paged_class_and_says_the_cpu_keeps_it_unpaged(arch, tokens):
    probe = probed(job(arch, tokens, optimizer="paged-adamw-8bit"))
    assert type(probe.optimizer) is bnb.optim.PagedAdamW8bit and probe.optimizer.is_paged
    assert any("unpaged on the CPU" in note for note in probe.record["stack"]["notes"])


@pytest.mark.parametrize("name, cls, state_keys", [
    ("adamw", torch.optim.AdamW, {"step", "exp_avg", "exp_avg_sq"}),
    ("sgd", torch.optim.SGD, {"momentum_buffer"}),  # momentum 0.9, as the estimator models it: one buffer each
    ("adafactor", None, {"step", "RMS", "exp_avg_sq_row", "exp_avg_sq_col"}),  # factored second moment
])
def test_each_optimizer_is_the_estimators_class_with_its_state(arch, tokens, name, cls, state_keys):
    from transformers.optimization import Adafactor

    probe = probed(job(arch, tokens, optimizer=name))
    assert type(probe.optimizer) is (cls or Adafactor)
    trainable = [p for p in probe.model.parameters() if p.requires_grad]
    assert len(probe.optimizer.state) == len(trainable)
    for state in probe.optimizer.state.values():
        assert set(state) == state_keys
    if name == "sgd":
        assert probe.optimizer.defaults["momentum"] == stacks.SGD_MOMENTUM
    if name == "adamw":
        assert probe.optimizer.defaults["foreach"] is True  # multi-tensor, as traced
    assert probe.record["stack"]["optimizer_class"] == stacks.qualified_name(probe.optimizer)


def test_lora_fa_is_the_candidates_own_optimizer_where_the_setting_says_adamw(arch):
    lora_fa = candidate(arch, "lora-fa")
    assert lora_fa.optimizer == "lora-fa"
    settled = stacks.settled(TrainingShape(optimizer="adamw"), lora_fa.optimizer)
    assert settled.optimizer == "lora-fa"
    assert stacks.settled(TrainingShape(optimizer="sgd"), "adamw").optimizer == "sgd"  # a plan's own stands


# ------------------------------------------------------------------------------------------- quantized base


@pytest.mark.parametrize("quant, nested", [("4bit", True), ("4bit-no-dq", False)])
def test_4bit_base_layers_are_params4bit_and_the_head_is_kept(arch, tokens, quant, nested):
    probe = probed(job(arch, tokens, quant=quant))
    base = probe.model.get_base_model()
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit)
    assert isinstance(q_proj.base_layer.weight, bnb.nn.Params4bit) and q_proj.base_layer.weight.dtype == torch.uint8
    assert q_proj.base_layer.weight.quant_state.quant_type == "nf4"
    assert bool(q_proj.base_layer.weight.quant_state.nested) is nested  # double quantization
    assert isinstance(base.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert type(base.lm_head) is torch.nn.Linear  # from_pretrained keeps the output head
    assert base.is_loaded_in_4bit
    details = probe.record["stack"]["details"]
    assert "Linear4bit" in details["quant"] and "prepare_model_for_kbit_training" in details["kbit_preparation"]


def test_pretrained_weights_load_quantized_through_from_pretrained_and_get_prepared(arch, tokens, tiny_llama):
    # bfloat16 weights: prepare_model_for_kbit_training casts what is not quantized to float32
    probe = probed(job(arch, tokens, weights=str(tiny_llama), dtype="bfloat16", quant="4bit"))
    base = probe.model.get_base_model()
    assert isinstance(base.model.layers[1].self_attn.v_proj.base_layer.weight, bnb.nn.Params4bit)
    assert base.hf_quantizer is not None  # from_pretrained(quantization_config=...) made it
    assert base.model.embed_tokens.weight.dtype == torch.float32
    assert base.model.norm.weight.dtype == torch.float32


def test_8bit_base_is_llm_int8(arch, tokens):
    probe = probed(job(arch, tokens, quant="8bit"))
    layer = probe.model.get_base_model().model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    assert isinstance(layer.weight, bnb.nn.Int8Params) and layer.weight.dtype == torch.int8
    assert "Linear8bitLt" in probe.record["stack"]["details"]["quant"]


# ------------------------------------------------------------------------------------------- loss kernels


def test_chunked_loss_is_trls_fused_head_and_gives_the_stock_loss(arch, tokens):
    stock = run_job(job(arch, tokens, steps=1), lambda **_e: None)
    probe = probed(job(arch, tokens, steps=1, loss="chunked"))
    base = probe.model.get_base_model()
    assert "fused_lm_head" in base.forward.__code__.co_varnames  # TRL's add_fused_lm_head replaced the forward
    out, loss = probe.program.forward(probe.model, torch.load(tokens)[:2])
    assert getattr(out, "logits", None) is None and out.log_probs.shape == (2, 31)  # no full logits
    assert probe.record["losses"][0] == pytest.approx(stock["losses"][0], rel=1e-4)  # the same loss, computed in tiles
    assert "add_fused_lm_head" in probe.record["stack"]["details"]["loss"]


def test_liger_on_the_cpu_becomes_the_stock_loss_with_a_note_never_silently(tiny_model_folder, monkeypatch):
    monkeypatch.setattr(probe_runner, "WORKER_COMMAND",
                        (str(Path(__file__).with_name("probe_stand_in_worker.py")),))
    (lora,) = peftpick.probe(tiny_model_folder, ["lora"], loss="liger", **SMALL)
    assert lora.status == "ok"
    assert lora.shape.loss == "stock" and lora.requested_shape.loss == "liger"
    assert stacks.LIGER_NEEDS_CUDA in lora.notes
    assert stack_mismatch(lora, lora.requested_shape) == ["loss: stock, not liger"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("trainer", ["plain", "hf"])
def test_liger_on_cuda_runs_ligers_fused_linear_cross_entropy(arch, tokens, trainer):
    pytest.importorskip("liger_kernel")
    the_job = dataclasses.replace(job(arch, tokens, dtype="bfloat16", loss="liger", trainer=trainer), device="cuda")
    probe = probed(the_job)
    assert probe.record["stack"]["loss"] == "liger"
    assert "liger" in probe.model.get_base_model().forward.__module__
    assert "fused_linear_cross_entropy=True" in probe.record["stack"]["details"]["loss"]
    assert torch.cuda.max_memory_allocated(probe.device) > 0 and probe.record["breakdown"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_stack_on_cuda_measures_its_peaks(arch, tokens):
    the_job = dataclasses.replace(job(arch, tokens, dtype="bfloat16", quant="4bit", optimizer="paged-adamw-8bit",
                                      trainer="trl", loss="chunked"), device="cuda")
    probe = probed(the_job)
    weight = probe.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert isinstance(weight, bnb.nn.Params4bit) and weight.device.type == "cuda"
    assert type(probe.optimizer) is bnb.optim.PagedAdamW8bit
    assert probe.record["stack"]["trainer_run"] == "trl.SFTTrainer"
    assert torch.cuda.max_memory_allocated(probe.device) > 0 and "optimizer" in probe.record["breakdown"]


# ------------------------------------------------------------------------------------------- trainers


def test_hf_trainer_runs_the_steps_with_the_probes_optimizer(arch, tokens):
    probe = probed(job(arch, tokens, trainer="hf", optimizer="adamw-8bit", quant="4bit"))
    record = probe.record["stack"]
    assert record["trainer_run"] == "transformers.Trainer" and record["trainer"] == "hf"
    assert type(probe.optimizer) is bnb.optim.AdamW8bit
    steps = {int(state["step"]) for state in probe.optimizer.state.values()}
    assert steps == {2}  # Trainer stepped it max_steps times
    lora = next(p for n, p in probe.model.named_parameters() if "lora_A" in n)
    assert lora.dtype == torch.float32  # PEFT's float32 adapter: only TRL casts it


def test_trl_trainer_runs_sft_trainer_without_kbit_preparation(arch, tokens, monkeypatch):
    import peft

    prepared = []
    real = peft.prepare_model_for_kbit_training
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda *a, **k: prepared.append(1) or real(*a, **k))
    probe = probed(job(arch, tokens, trainer="trl", loss="chunked", quant="4bit"))
    record = probe.record["stack"]
    assert record["trainer_run"] == "trl.SFTTrainer" and record["loss"] == "chunked"
    assert not prepared and "not called" in record["details"]["kbit_preparation"]
    lora = next(p for n, p in probe.model.named_parameters() if "lora_A" in n)
    assert lora.dtype == torch.bfloat16  # SFTTrainer casts a quantized model's adapter to bf16
    assert "fused_lm_head" in probe.model.get_base_model().forward.__code__.co_varnames


def test_under_torchrun_the_trainers_are_modelled_and_the_record_says_so(arch, tokens):
    # the torchrun ranks hand run_job a wrapper (FSDP2); here one that changes nothing
    probe = _Probe(job(arch, tokens, trainer="hf"), lambda **_e: None, wrap=lambda model: model)
    probe.run()
    record = probe.record["stack"]
    assert record["trainer"] == "hf" and record["trainer_run"] == "modelled"
    assert any("not run under torchrun" in note for note in record["notes"])


def test_a_fault_inside_the_trainer_is_an_out_of_memory_result(arch, tokens, monkeypatch):
    monkeypatch.setenv(FAULTS_ENV, json.dumps({"lora": {"kind": "oom", "step": 2}}))
    record = run_job(job(arch, tokens, trainer="hf"), lambda **_e: None)
    assert record["status"] == "oom" and len(record["losses"]) == 1


# ------------------------------------------------------------------------------------------- the parent's side


def test_a_plans_whole_stack_reaches_the_job(arch):
    shape = TrainingShape(batch_size=2, seq_len=32, optimizer="adamw-8bit", quant="4bit", loss="chunked",
                          trainer="hf")
    estimate = MemoryEstimate(peak_allocated_bytes=1, peak_reserved_bytes=1, breakdown={}, trainable_params=1,
                              total_params=1, shape=shape)
    plan = TrainingPlan(2, 1, False, estimate, "fits", loss="chunked")
    program = probe_runner.probe_program(arch.workload)
    (setting,) = probe_runner._first_settings([candidate(arch)], plan, ProbeOptions(), arch, "cpu", program)
    assert setting == dataclasses.replace(shape, dtype="float32")  # CPU probes train in float32; the stack is kept
    trl = TrainingShape(trainer="trl")
    (setting,) = probe_runner._first_settings([candidate(arch)], trl, ProbeOptions(), arch, "cpu", program)
    assert setting.loss == "chunked"  # SFTTrainer's own head, as the estimator completes it
    with pytest.raises(PeftpickError, match="refuses Liger"):
        probe_runner._first_settings([candidate(arch)], TrainingShape(trainer="trl", loss="liger"), ProbeOptions(),
                                     arch, "cpu", program)
    with pytest.raises(PeftpickError, match="unknown quant"):
        ProbeOptions(quant="3bit")


def test_stacks_that_cannot_run_are_refused_before_a_worker_starts(arch, tiny_model_folder, monkeypatch):
    def no_worker(*_args, **_kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(probe_runner, "_Worker", no_worker)
    (full,) = peftpick.probe(tiny_model_folder, ["full"], quant="4bit", **SMALL)
    assert full.status == "error" and full.error.startswith("not run: full fine-tuning cannot train a 4bit")
    assert full.shape.quant == "4bit" and any(n.startswith("stack: ") and "(not run)" in n for n in full.notes)
    lora = candidate(arch)
    refuse = stacks.causal_lm_refusal
    assert "do not patch 'gpt2'" in refuse(SimpleNamespace(model_type="gpt2"), lora, TrainingShape(loss="liger"), "cpu")
    assert "CUDA_VISIBLE_DEVICES=1" in refuse(arch, lora, TrainingShape(trainer="hf"), "cuda:1")
    assert "FSDP2" in refuse(arch, lora, TrainingShape(quant="4bit"), "cuda", world_size=2)
    assert "not a LoRA adapter" in refuse(arch, candidate(arch, "ia3"), TrainingShape(optimizer="lora-fa"), "cpu")
    assert refuse(arch, lora, TrainingShape(quant="4bit", optimizer="adamw-8bit", trainer="trl", loss="chunked"),
                  "cpu") is None
    assert "not probed" in stacks.plain_only_refusal(TrainingShape(quant="4bit"), "denoiser")
    assert stacks.plain_only_refusal(TrainingShape(optimizer="sgd"), "denoiser") is None


def test_a_probe_of_another_stack_is_never_put_in_an_estimates_place():
    shape = TrainingShape(batch_size=2, seq_len=32, optimizer="adamw-8bit", quant="4bit")
    estimate = MemoryEstimate(peak_allocated_bytes=10, peak_reserved_bytes=12, breakdown={}, trainable_params=1,
                              total_params=1, shape=shape, assumptions=("estimated",))
    result = ProbeResult(method="lora", status="ok", shape=shape, device="NVIDIA H100", peak_allocated_bytes=20,
                         peak_reserved_bytes=24, losses=(3.0, 2.0),
                         notes=("stack: optimizer adamw-8bit (bitsandbytes.optim.adamw.AdamW8bit), base 4bit, "
                                "loss stock, trainer hf (transformers.Trainer)",))
    measured = probe_to_estimate(result, estimate=estimate)
    assert any("probe stack: optimizer adamw-8bit, quant 4bit" in line for line in measured.assumptions)
    assert probe_stack(result)["optimizer_class"] == "bitsandbytes.optim.adamw.AdamW8bit"
    assert probe_stack(result)["trainer_run"] == "transformers.Trainer"
    bf16_adamw = dataclasses.replace(result, shape=dataclasses.replace(shape, optimizer="adamw", quant="none"))
    with pytest.raises(StackMismatch, match="optimizer: adamw, not adamw-8bit; quant: none, not 4bit"):
        probe_to_estimate(bf16_adamw, estimate=estimate)


def test_cli_probe_runs_and_reports_the_stack(tiny_model_folder):
    runner = CliRunner()
    outcome = runner.invoke(app, ["probe", "--model", str(tiny_model_folder), "--methods", "lora", "--random-weights",
                                  "--device", "cpu", "--seq-len", "32", "--batch-size", "2", "--steps", "2",
                                  "--quant", "4bit", "--optimizer", "adamw-8bit", "--trainer", "hf", "--json",
                                  "--no-cache"])
    assert outcome.exit_code == 0, outcome.output
    (result,) = json.loads(outcome.stdout)["results"]
    assert result["status"] == "ok", result["error"]
    assert {key: result["shape"][key] for key in stacks.STACK_FIELDS} == {
        "optimizer": "adamw-8bit", "quant": "4bit", "loss": "stock", "trainer": "hf"}
    (note,) = [n for n in result["notes"] if n.startswith("stack: ")]
    assert "bitsandbytes.optim.adamw.AdamW8bit" in note and "transformers.Trainer" in note and "Linear4bit" in note
    assert "bitsandbytes" in result["versions"] and "accelerate" in result["versions"]
    bad = runner.invoke(app, ["probe", "--model", str(tiny_model_folder), "--random-weights", "--loss", "fused"])
    assert bad.exit_code == 2 and "unknown loss 'fused'" in bad.output


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory) -> Path:
    """A config-only tiny Llama folder, the way a user passes a model for --random-weights."""
    from peftpick.knowledge.architectures import build_config, resolve_model, tiny_overrides

    arch = resolve_model("llama-3.2-1b")
    folder = tmp_path_factory.mktemp("tiny-llama-config")
    build_config(arch, **tiny_overrides(arch)).save_pretrained(folder)
    return folder
