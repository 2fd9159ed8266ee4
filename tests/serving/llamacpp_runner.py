"""Runs llama.cpp's own tools for test_llamacpp_engine.py, in a child process of the test.

    python llamacpp_runner.py convert SPEC.json OUT.json
    python llamacpp_runner.py serve SPEC.json OUT.json

convert: SPEC {"converter": ".../convert_lora_to_gguf.py", "base": HF_DIR, "jobs": [{"name", "adapter", "outfile"}]}.
Runs llama.cpp's convert_lora_to_gguf.py once per job, in place (so that it imports the gguf-py and conversion/
that sit next to it), as `python convert_lora_to_gguf.py ADAPTER --base HF_DIR --outfile OUTFILE` would: same
argv, run as __main__. All jobs share this one process so that torch and transformers are imported once; nothing
imports gguf before the first job, so every job gets the vendored gguf-py (the files are byte-identical to those
of the command line; checked by hand). Per job: the exit status (`sys.exit`'s code, 0 when the script ends normally,
1 for an uncaught exception), what it logged, and whether it wrote its file.

serve: SPEC {"model": GGUF, "runs": [{"name", "loras": [[GGUF, SCALE], ...], "prefixes": [[ids], ...]}], "top": K,
"threads": N}.
Per run: start xllamacpp's llama-server (`Server(CommonParams)`, the adapters as `--lora-scaled FILE:SCALE` puts
them in `lora_adapters`), and for each prefix ask one greedy token with the top K log-probabilities of the next
token (pre-sampling: a softmax of the logits). The server is dropped before the next run starts; OUT.json is
rewritten after each run, so that what finished survives a crash of the extension.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import runpy
import sys
import time
import traceback


def convert(spec: dict) -> dict:
    script = spec["converter"]
    folder = os.path.dirname(os.path.abspath(script))
    sys.path.insert(0, folder)  # `from conversion import ...`, as when the script runs from its own folder
    results = {}
    for job in spec["jobs"]:
        argv = [script, job["adapter"], "--base", spec["base"], "--outfile", job["outfile"]]
        captured = io.StringIO()
        root = logging.getLogger()
        for handler in list(root.handlers):  # the script's logging.basicConfig then logs to `captured`
            root.removeHandler(handler)
        started = time.time()
        code = 0
        saved_argv = sys.argv
        sys.argv = argv
        try:
            with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(captured):
                runpy.run_path(script, run_name="__main__")
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:  # what Python prints for an uncaught exception, and its exit status
            captured.write(traceback.format_exc())
            code = 1
        finally:
            sys.argv = saved_argv
        results[job["name"]] = {"exit_code": code, "log": captured.getvalue(),
                                "written": os.path.isfile(job["outfile"]), "seconds": round(time.time() - started, 1)}
    import gguf  # the module the jobs used

    return {"jobs": results, "gguf_module": os.path.abspath(gguf.__file__)}


def serve(spec: dict, out_path: str) -> dict:
    import xllamacpp

    results = {}
    done = {"runs": results, "xllamacpp": _version("xllamacpp"), "build_info": dict(xllamacpp.BUILD_INFO)}
    for run in spec["runs"]:
        params = xllamacpp.CommonParams()
        params.model.path = spec["model"]
        params.n_ctx = 256
        threads = int(spec.get("threads") or 1)
        for cpu in (params.cpuparams, params.cpuparams_batch):  # a few threads that do not spin-wait
            cpu.n_threads = threads
            cpu.poll = 0
        adapters = []
        for path, scale in run["loras"]:
            info = xllamacpp.CommonAdapterLoraInfo()
            info.path = path
            info.scale = float(scale)
            adapters.append(info)
        params.lora_adapters = adapters
        started = time.time()
        server = xllamacpp.Server(params)
        steps = []
        for prefix in run["prefixes"]:
            reply = server.handle_completions({"prompt": prefix, "max_tokens": 1, "temperature": 0,
                                               "logprobs": spec["top"], "cache_prompt": True})
            step = reply["choices"][0]["logprobs"]["content"][0]
            steps.append({"id": step["id"],
                          "top": [[entry["id"], entry["logprob"]] for entry in step["top_logprobs"]]})
        del server
        results[run["name"]] = {"steps": steps, "seconds": round(time.time() - started, 2)}
        with open(out_path, "w") as handle:  # what finished survives a later crash
            json.dump(done, handle)
    return done


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(mode: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    result = convert(spec) if mode == "convert" else serve(spec, out_path)
    with open(out_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(*sys.argv[1:4])
