"""Runs vLLM on the CPU for the `serving` tests: one engine per model folder, adapters tried one by one.

    python engine_runner.py        (JSON lines in on stdin, JSON lines out on stdout)

First line out: {"vllm_version": ...}. Then per line in, {"model": DIR, "adapters": [{"name", "path"}],
"base_after": bool, "prompt_ids": [...], "max_lora_rank": 64}, one line out with that model's results. The test
sends models one at a time, so it can delete a merged model once it is scored (the serving tests would otherwise
hold a dozen 270 MB models on disk at once). Anything vLLM prints goes to stderr, so stdout carries only results.

For each model: start the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so that an adapter vLLM
refuses raises here and leaves the engine running), score the prompt without an adapter, then for each adapter
call `add_lora` (vLLM's own loading: PEFTHelper validation, then the tensors against the model's modules) and, when
it is accepted, score the prompt with it. Scores are the prompt tokens' log-probabilities and 4 greedy tokens.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def score(llm, prompt_ids, lora_request=None):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": prompt_ids}], params, lora_request=lora_request, use_tqdm=False)[0]
    logprobs = [float(step[token].logprob) for token, step in zip(prompt_ids[1:], out.prompt_logprobs[1:])]
    return {"prompt_logprobs": logprobs, "generated": list(out.outputs[0].token_ids)}


def run_model(entry):
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    adapters = entry.get("adapters") or []
    started = time.time()
    # On the CPU backend the fraction is of the node's memory for the KV cache; vLLM's default (0.92) asks more than
    # a shared 24 GiB machine has free.
    kwargs = dict(model=entry["model"], max_model_len=256, dtype="bfloat16", enforce_eager=True, seed=0,
                  gpu_memory_utilization=float(os.environ.get("PEFTPICK_VLLM_MEMORY", "0.2")))
    if adapters:
        kwargs.update(enable_lora=True, max_lora_rank=entry["max_lora_rank"], max_loras=1,
                      max_cpu_loras=len(adapters) + 1)
    llm = LLM(**kwargs)
    prompt_ids = entry["prompt_ids"]
    result = {"start_s": round(time.time() - started, 1), "base": score(llm, prompt_ids), "adapters": {}}
    for number, adapter in enumerate(adapters, start=1):
        request = LoRARequest(adapter["name"], number, adapter["path"])
        try:
            llm.llm_engine.add_lora(request)
        except Exception as error:  # vLLM's refusal, in its own words
            result["adapters"][adapter["name"]] = {"accepted": False, "message": " ".join(str(error).split())}
            continue
        result["adapters"][adapter["name"]] = {"accepted": True, **score(llm, prompt_ids, request)}
    if entry.get("base_after"):  # the base model again, after the last adapter
        result["base_after"] = score(llm, prompt_ids)
    del llm
    gc.collect()
    return result


def main():
    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever vLLM or torch prints goes to stderr
    sys.stdout = sys.stderr
    import vllm

    results.write(json.dumps({"vllm_version": vllm.__version__}) + "\n")
    results.flush()
    for line in sys.stdin:
        if line.strip():
            results.write(json.dumps(run_model(json.loads(line))) + "\n")
            results.flush()


if __name__ == "__main__":
    main()
