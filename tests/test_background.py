"""The quality models built and asked in a forked child (recommender.background): the same answers as built here, the
errors the object raises, a dead child replaced by the object built here, no fork once torch is imported, and a
command-line process that never imports scikit-learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import peftpick
from peftpick.recommender.background import ForkedService


def _run(script: str, env: dict[str, str] | None = None) -> dict:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_forked_service_answers_in_the_child_and_raises_what_the_object_raises():
    # a fresh interpreter: this test process has imported torch, so it would not fork
    out = _run("""
        import json, os, signal
        from peftpick.recommender.background import ForkedService

        class Sums:
            def __init__(self, base):
                self.base = base
            def add(self, value):
                return self.base + value
            def pid(self):
                return os.getpid()
            def fail(self):
                raise KeyError("no such benchmark")

        with ForkedService(Sums, 40) as service:
            forked, answer, child = service.forked, service.call("add", 2), service.call("pid")
            try:
                service.call("fail")
                raised = None
            except KeyError as error:
                raised = str(error)
            os.kill(child, signal.SIGKILL)  # a dead child: the object is built here and answers the same
            os.waitpid(child, 0)
            after, here = service.call("add", 2), service.call("pid")
        service = ForkedService(Sums, 1)
        service.call("add", 1)
        process = service._process
        service.close()  # the child leaves on its own when the parent closes its end: not terminated after a wait
        print(json.dumps({"forked": forked, "answer": answer, "child": child, "parent": os.getpid(),
                          "raised": raised, "after": after, "here": here, "exitcode": process.exitcode}))
    """)
    assert out["forked"] and out["answer"] == 42 == out["after"]
    assert out["child"] != out["parent"] and out["here"] == out["parent"]
    assert out["raised"] == "'no such benchmark'"
    assert out["exitcode"] == 0


def test_no_fork_once_torch_is_imported():
    import torch  # noqa: F401 - what makes forking unsafe: torch's OpenMP pool may be running

    with ForkedService(dict, fork=True) as service:
        assert not service.forked and service.call("get", "x", 7) == 7


def test_the_command_line_never_imports_scikit_learn_gives_the_same_figures_and_no_library_noise(tmp_path: Path,
                                                                                                monkeypatch):
    methods = ["lora", "rslora", "dora", "vera", "ia3"]
    env = {"PEFTPICK_CACHE_DIR": str(tmp_path / "cache")}
    argv = ["peftpick", "--model", "smollm2-135m", "--vram", "8", "--serve", "vllm", "--methods", ",".join(methods),
            "--seq-len", "256", "--no-probe", "--json"]
    # main() leaves with os._exit after the exit handlers: the figures are printed by one
    script = f"""
        import atexit, json, sys
        from peftpick.cli import main
        sys.argv = {argv!r}
        atexit.register(lambda: print(json.dumps({{"sklearn": "sklearn" in sys.modules,
                                                  "torch": "torch" in sys.modules}})))
        main()
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    *document, last = done.stdout.strip().splitlines()
    out = json.loads(last)
    assert out["torch"] and not out["sklearn"]  # the planning traced here; the quality models lived in the child
    assert "Failed to load" not in done.stderr and "kernels-community" not in done.stderr, done.stderr
    monkeypatch.setenv("PEFTPICK_CACHE_DIR", env["PEFTPICK_CACHE_DIR"])
    here = peftpick.recommend("smollm2-135m", 8, "vllm", methods=methods, seq_len=256, probe=False, workers=1)
    figures = {r["method"]: r["quality"] for r in json.loads("\n".join(document))["ranked"]}
    assert figures == {r.method: {"relative_to_lora": r.quality.relative, "low": r.quality.low,
                                  "high": r.quality.high, "level": r.quality.level, "source": r.quality.source,
                                  "used_probe": False, "non_learning": None, "basis": r.quality.basis}
                       for r in here.ranked}
    assert len(figures) == 5


def test_quality_figures_take_the_callers_layer_listing_so_the_child_never_builds_a_denoiser(monkeypatch):
    """A denoiser's layer listing is built from its diffusers class: the child, forked before torch, would import
    torch and diffusers for it (about 7 s). The recommender hands the listing over; the figures are the same."""
    import peftpick.knowledge.denoiser_targets as targets
    from peftpick.knowledge import KnowledgeBase
    from peftpick.recommender.quality import QualityModels
    from peftpick.workloads import workload_of

    rec = peftpick.recommend("flux.2-klein-4b", 12, "comfyui", probe=False, methods=["lora", "oft", "lokr"], workers=1)
    arch = rec.architecture
    listed = tuple(workload_of(arch).hook("layer_modules")(arch))
    models = QualityModels(KnowledgeBase.load(), ["image-gen"])
    rows = [(r.candidate, arch, r.estimate.trainable_params or None, r.estimate.total_params or None)
            for r in rec.ranked]
    built_here = [models.assess("image-gen", *row) for row in rows]

    def refuse(*_args, **_kwargs):
        raise AssertionError("the denoiser was built again")

    monkeypatch.setattr(targets, "denoiser_layer_modules", refuse)
    handed = [models.assess("image-gen", *row, None, None, listed) for row in rows]
    assert handed == built_here and len(handed) == 3
    assert [r.quality for r in rec.ranked] == handed
