"""One rank of the FSDP2 check in tests/test_sharding.py, started by torchrun on the CPU with gloo.

Builds the tiny model of config.json (argv[1]) with the adapter named in argv[2] ("lora" or "full"), wraps each
decoder layer and the root with fully_shard, trains two AdamW steps and writes what this rank holds to
argv[3]/rank-<r>.json: the bytes of its parameter shards (frozen, trainable; as seen through the DTensor and
as stored, padded), of its gradient shards and of its optimizer state.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM


def local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def main(config_path: str, adapter: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_path), dtype=torch.bfloat16)
    if adapter == "full":
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
    for _ in range(2):
        x = torch.randint(0, model.config.vocab_size, (2, 16))
        model(input_ids=x, labels=x).loss.backward()
        grads = sum(local(p.grad).numel() * local(p.grad).element_size() for p in trainable if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    record = {"grads": grads, "optimizer_moments": 0, "optimizer_other": 0}
    for kind in (False, True):
        params = [p for p in model.parameters() if p.requires_grad == kind]
        name = "trainable" if kind else "frozen"
        record[name] = sum(local(p).numel() * local(p).element_size() for p in params)
        record[name + "_stored"] = sum(local(p).untyped_storage().nbytes() for p in params)
    for state in optimizer.state.values():
        for key, value in state.items():
            value = local(value)
            record["optimizer_moments" if key.startswith("exp_avg") else "optimizer_other"] += (
                value.numel() * value.element_size())
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as handle:
        json.dump(record, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
