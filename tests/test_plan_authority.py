"""The Plan decides: one planning call for every caller, a runtime that obeys it, recovery that respects
what the user set, and one registry entry that everything reads (issue 11)."""

import json
from dataclasses import replace

import pytest
import torch

from tests.helpers.hardware import emulated
from tests.helpers.tiny_model_dir import save_demo_official_layout
from wanfit.attention import backends as attention_backends
from wanfit.attention.backends import AttentionBackend
from wanfit.cli import main
from wanfit.commands import common
from wanfit.errors import PlanError
from wanfit.pipeline import WanPipeline
from wanfit.plan import planner
from wanfit.plan.estimates import attention_workspace
from wanfit.plan.planning import Constraints, model_request, plan_for

GIB = 1024**3
TINY = dict(height=32, width=48, num_frames=5, num_inference_steps=2, progress=False)


@pytest.fixture
def fixed_hosts(monkeypatch):
    """`--emulate CARD` gives that card on a machine with 64 GiB of free RAM, whatever runs the tests."""
    monkeypatch.setattr(common, "hardware_from_args", lambda args: emulated(args.emulate or "cpu", 64))


def plan_json(capsys, *argv) -> dict:
    assert main(["plan", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_dtype_and_attention_reach_the_plan(fixed_hosts, capsys):
    assert plan_json(capsys, "--emulate", "t4", "--dtype", "fp32")["settings"]["compute_dtype"] == "float32"
    assert plan_json(capsys, "--emulate", "v100")["settings"]["compute_dtype"] == "float16"
    settings = plan_json(capsys, "--emulate", "t4", "--attention", "chunked")["settings"]
    assert settings["attention"] == "chunked" and settings["self_attention"] == "chunked"
    out = plan_json(capsys, "--emulate", "t4", "--dtype", "fp32", "--set", "cfg_batch=false")
    assert set(out["user_set"]) == {"compute_dtype", "cfg_batch"}


def test_plan_text_names_every_value(fixed_hosts, capsys):
    assert main(["plan", "--emulate", "t4"]) == 0
    text = capsys.readouterr().out
    assert ": None" not in text and "self_attention: sdpa_efficient" in text
    assert "attention: auto" in text and "vae_tile: untiled" in text


def test_cpu_plan_gives_its_real_host_need(fixed_hosts, capsys):
    out = plan_json(capsys, "--emulate", "cpu", "--size", "320x192", "--frames", "17")
    # On a CPU the device is the host: its need is the largest phase's peak.
    assert out["host_bytes"] == out["peak_bytes"] > GIB


def counting_backend(name="counting", **fields):
    """A test-only backend that runs PyTorch's math kernel and counts its calls."""
    math_run = attention_backends.default_registry()["sdpa_math"].run
    calls = []

    def run(q, k, v, *, scale=None, attn_mask=None):
        calls.append(q.shape)
        return math_run(q, k, v, scale=scale, attn_mask=attn_mask)

    defaults = dict(devices=("cpu",), dtypes=(torch.float32,), supports_mask=True, default_ms=1e9)
    return AttentionBackend(name, run, "counts its calls", **{**defaults, **fields}), calls


@pytest.fixture
def registry(monkeypatch):
    reg = attention_backends.default_registry().copy()
    monkeypatch.setattr(attention_backends, "_DEFAULT_REGISTRY", reg)
    return reg


def test_a_forced_backend_serves_every_call_and_the_record_says_so(registry):
    backend, calls = counting_backend()
    registry.register(backend)
    from wanfit.demo import tiny_pipeline

    request = model_request(None, width=48, height=32, frames=5)
    result = plan_for(request, Constraints(attention="counting"), emulated("cpu"))
    pipe = tiny_pipeline(plan=result)
    pipe("a fox", **TINY)
    served = pipe.run_record()["attention"]
    assert served["denoise"]["self"]["served"].keys() == {"counting"}
    assert served["denoise"]["cross"]["served"].keys() == {"counting"}
    assert served["vae_decode"]["vae"]["served"].keys() == {"counting"}
    total = sum(n for phase in served.values() for kind in phase.values() for n in kind["served"].values())
    smoke_tests = len(calls) - total  # each dispatcher smoke-tests the backend once
    assert total > 0 and 0 <= smoke_tests <= 6


def test_a_backend_added_to_the_registry_alone_is_seen_by_planner_probe_and_doctor(registry):
    fused, _ = counting_backend("test_fused", default_ms=0.0)  # ranked first; linear memory
    registry.register(fused)
    registry.register(
        AttentionBackend(
            "test_quadratic",
            fused.run,
            "needs a package that is not installed",
            package="wanfit_test_only_kernels",
            pip_name="wanfit-test-only-kernels",
            devices=("cpu",),
            dtypes=(torch.float32,),
            memory="quadratic",
        )
    )
    from wanfit.commands.doctor import report
    from wanfit.hardware.probe import find_kernel_packages

    hw = emulated("cpu")
    assert "wanfit_test_only_kernels" in {p.module for p in find_kernel_packages()}
    doctor = report(hw)
    names = {c["name"]: c for c in doctor["attention"]["candidates"]}
    assert "not installed" in names["test_quadratic"]["reason"] and names["test_fused"]["available"]
    assert doctor["planned_attention"]["self"] == "test_fused"
    result = plan_for(model_request("1.3B"), hardware=hw)
    assert result.plan.self_attention == "test_fused"
    args = (1, 12, 32760, 32760, 128, 4)
    assert attention_workspace("test_fused", *args) == attention_workspace("sdpa_flash", *args)
    assert attention_workspace("test_quadratic", *args) == attention_workspace("sdpa_math", *args)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return save_demo_official_layout(tmp_path_factory.mktemp("demo"))


def test_from_pretrained_plans_as_wanfit_plan_does(demo_folder, capsys):
    budget = ["--emulate", "cpu", "--vram", "64MiB", "--size", "48x32", "--frames", "5"]
    printed = plan_json(capsys, "--model", str(demo_folder), *budget)["settings"]
    pipe = WanPipeline.from_pretrained(
        demo_folder,
        hardware="cpu",
        constraints=Constraints(vram=64 * 1024**2),
        height=32,
        width=48,
        num_frames=5,
        progress=False,
    )
    assert pipe.plan.to_dict() == printed


def test_one_pipeline_three_prompts_with_a_plan_that_frees_the_text_encoder(demo_folder):
    constraints = Constraints.from_options(settings=["free_text_encoder=true"])
    pipe = WanPipeline.from_pretrained(demo_folder, hardware="cpu", constraints=constraints, progress=False)
    assert pipe.plan.free_text_encoder
    videos = [pipe(prompt, **TINY) for prompt in ("a red fox", "two dogs play", "a quiet harbour")]
    assert all(v.shape == (5, 32, 48, 3) for v in videos)
    assert not (videos[0] == videos[1]).all()  # each prompt was really encoded


def test_oom_never_undoes_a_user_setting(demo_folder, monkeypatch):
    """An OOM under a frozen cfg_batch gives up something else; when only cfg_batch could give, one
    sentence names it."""
    constraints = Constraints.from_options(settings=["cfg_batch=true"])
    pipe = WanPipeline.from_pretrained(demo_folder, hardware="cpu", constraints=constraints, progress=False)
    assert "cfg_batch" in pipe.planning.frozen
    request = pipe._planner_request(32, 48, 5, True)
    assert planner.step_down(pipe.plan, request, "denoise", frozen={"cfg_batch"}).cfg_batch
    leanest = planner._leanest(request, pipe.plan, "sdpa_math", frozenset({"cfg_batch"}))
    assert leanest.cfg_batch and planner.step_down(leanest, request, "denoise", frozen={"cfg_batch"}) is None
    pipe.apply_plan(leanest)
    real_forward = type(pipe.dit).forward

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(type(pipe.dit), "forward", out_of_memory)
    with pytest.raises(PlanError, match=r"only a setting you fixed could give: cfg_batch=True"):
        pipe("a fox", **TINY)
    assert pipe.plan.cfg_batch
    monkeypatch.setattr(type(pipe.dit), "forward", real_forward)


def test_oom_under_a_user_setting_through_the_cli_leaves_no_output(tmp_path, capsys, monkeypatch):
    from wanfit.models.dit import WanDiT

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(WanDiT, "forward", out_of_memory)
    out = tmp_path / "v.mp4"
    argv = ["generate", "--size", "48x32", "--frames", "5", "--steps", "2", "--no-progress"]
    code = main([*argv, "--set", "cfg_batch=true", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("wanfit: error: Out of memory during denoise") and "cfg_batch=True" in last
    assert "stepping the plan down" in err  # it gave up the other things first
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_step_down_plans_with_the_plans_own_backend():
    """Recovery uses the attention workspace of the plan's own backend, not a default."""
    request = model_request("1.3B")
    base = planner.fastest_plan(planner.budget_from_probe(emulated("h100")), request)
    frozen = {f for knob in planner.KNOBS if knob.name != "attention_chunking" for f in knob.fields}
    # Quadratic math: chunking the queries lowers the denoise peak, so it is the next notch.
    quadratic = planner.step_down(
        replace(base, self_attention="sdpa_math"), request, "denoise", frozen=frozen
    )
    assert quadratic is not None and quadratic.attention_chunk is not None
    # A fused kernel's workspace is linear: chunking lowers nothing, so nothing is left to give.
    assert (
        planner.step_down(replace(base, self_attention="sdpa_flash"), request, "denoise", frozen=frozen)
        is None
    )
