"""The plan inside the user's own training script: TrainingArguments and SFTConfig built by their libraries,
TRL's SFTTrainer training with them, the emitted TRL script running two steps on the CPU, and recommend()
given a loaded model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import peftpick  # noqa: E402
import peftpick.report.trainer_config  # noqa: E402
from peftpick.cli import app  # noqa: E402
from peftpick.errors import PeftpickError  # noqa: E402

from conftest import TINY_WORDS as WORDS  # noqa: E402

TEXTS = [f"question {a} plus {b} answer {c}" for a, b, c in zip(WORDS[2:12], WORDS[3:13], WORDS[4:14])] * 2


@pytest.fixture(scope="module")
def model_folder(word_llama):
    return word_llama


@pytest.fixture(scope="module")
def rec(model_folder):
    return peftpick.recommend(str(model_folder), vram_gb=8, serve="none", methods=["lora"], seq_len=32,
                              batch_size=4, workers=1, probe=False)


def test_training_arguments_carry_the_plan(rec, tmp_path):
    plan, candidate = rec.best.plan, rec.best.candidate
    assert rec.best.trainer_optimizers(None) == (None, None)  # the Trainer builds the optimizer `optim` names
    args = rec.best.training_arguments(str(tmp_path), use_cpu=True, bf16=False)
    assert type(args).__name__ == "TrainingArguments"
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.gradient_checkpointing) == (
        plan.micro_batch, plan.gradient_accumulation, plan.gradient_checkpointing)
    assert args.learning_rate == candidate.learning_rate and str(args.optim.value) == "adamw_torch"


def test_sft_config_is_accepted_by_sft_trainer(rec, model_folder, tmp_path):
    config = rec.best.sft_config(str(tmp_path), use_cpu=True, bf16=False, max_steps=2, report_to="none",
                                 save_strategy="no", logging_steps=1)
    assert isinstance(config, trl.SFTConfig)
    assert (config.per_device_train_batch_size, config.max_length) == (rec.best.plan.micro_batch, 32)
    model = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_folder)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": TEXTS}),
                             processing_class=tokenizer, peft_config=rec.best.peft_config())
    result = trainer.train()
    assert result.global_step == 2


def test_emitted_trl_script_trains_two_steps_on_the_cpu(model_folder, tmp_path):
    script = tmp_path / "train.py"
    result = CliRunner().invoke(app, ["--model", str(model_folder), "--vram", "8", "--serve", "none",
                                      "--methods", "lora", "--seq-len", "32", "--batch-size", "4", "--no-probe",
                                      "--emit", str(script)])
    assert result.exit_code == 0, result.output
    text = script.read_text()
    assert "SFTTrainer" in text and "LoraConfig(" in text and "per_device_train_batch_size=" in text
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    out = tmp_path / "adapter"
    run = subprocess.run([sys.executable, str(script), "--data", str(data), "--cpu", "--max-steps", "2",
                          "--output-dir", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_emit_into_a_missing_folder_fails_first(model_folder, tmp_path):
    result = CliRunner().invoke(app, ["--model", str(model_folder), "--vram", "8", "--emit",
                                      str(tmp_path / "no" / "such" / "train.py")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output


def test_recommend_takes_a_loaded_model(model_folder):
    model = AutoModelForCausalLM.from_pretrained(model_folder)
    rec = peftpick.recommend(model, vram_gb=8, serve="none", methods=["lora"], seq_len=32, batch_size=4,
                             workers=1, probe=False)
    assert rec.architecture.hidden_size == 64 and rec.architecture.num_layers == 2
    assert rec.best is not None and rec.request.model == str(model_folder)
    if not torch.cuda.is_available():  # a model on the CPU: the VRAM must be given, said in one line
        with pytest.raises(PeftpickError, match="no GPU found"):
            peftpick.recommend(model, serve="none", methods=["lora"], workers=1, probe=False)


@pytest.fixture(scope="module")
def lora_fa_rec(model_folder):
    return peftpick.recommend(str(model_folder), vram_gb=8, serve="none", methods=["lora-fa"], seq_len=32,
                              batch_size=4, workers=1, probe=False)


def test_lora_fa_trains_with_its_own_optimizer_in_the_trainer(lora_fa_rec, model_folder, tmp_path):
    """LoRA-FA's optimizer is not a TrainingArguments name: the config leaves `optim` alone and the trainer gets
    PEFT's create_lorafa_optimizer, which keeps A frozen (plain AdamW would train it)."""
    best = lora_fa_rec.best
    assert best.candidate.method == "lora-fa" and "optim" not in peftpick.report.trainer_config.plan_arguments(best)
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32), best.peft_config())
    optimizers = best.trainer_optimizers(model)
    assert type(optimizers[0]).__name__ == "LoraFAOptimizer" and optimizers[1] is None
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    config = best.sft_config(str(tmp_path), use_cpu=True, bf16=False, max_steps=2, report_to="none",
                             save_strategy="no", logging_steps=1)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": TEXTS}),
                             processing_class=PreTrainedTokenizerFast.from_pretrained(model_folder),
                             optimizers=optimizers)
    assert trainer.train().global_step == 2
    after = dict(model.named_parameters())
    moved = {name: not torch.equal(before[name], after[name].detach()) for name in before}
    assert not any(moved[name] for name in moved if "lora_A" in name)
    assert all(moved[name] for name in moved if "lora_B" in name)



def test_emitted_lora_fa_script_builds_its_optimizer(model_folder, tmp_path):
    script = tmp_path / "train.py"
    result = CliRunner().invoke(app, ["--model", str(model_folder), "--vram", "8", "--serve", "none",
                                      "--methods", "lora-fa", "--seq-len", "32", "--batch-size", "4", "--no-probe",
                                      "--emit", str(script)])
    assert result.exit_code == 0, result.output
    text = script.read_text()
    assert "create_lorafa_optimizer(model=model" in text and "optimizers=(optimizer, None)" in text
    assert "peft_config=peft_config)" not in text and "optim=" not in text
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run = subprocess.run([sys.executable, str(script), "--data", str(data), "--cpu", "--max-steps", "2",
                          "--output-dir", str(tmp_path / "adapter")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
