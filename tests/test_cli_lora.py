"""`wanfit generate --lora / --preset / --sampler` on the built-in model: metadata, resume, and
every user error in one sentence with nothing written."""

import json

import pytest
import torch

from tests.helpers import tiny_lora
from tests.test_cli_generate import _isolated, files_in, generate, one_error_line  # noqa: F401
from wanfit.builtin import BUILTIN_DIT
from wanfit.models.configs import WAN_T2V_14B
from wanfit.video import read_video

RUN = ["generate", "--size", "48x32", "--frames", "5", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    factors = tiny_lora.random_factors(BUILTIN_DIT.num_layers, BUILTIN_DIT.dim, BUILTIN_DIT.ffn_dim, seed=3, size=0.5)
    return tiny_lora.save(
        tiny_lora.comfy(factors, alpha=2.0), tmp_path_factory.mktemp("loras") / "style.safetensors"
    )


def sidecar(out):
    return json.loads(out.with_suffix(".json").read_text())


def test_preset_and_lora_run_and_are_recorded(tmp_path, capsys, lora_file):
    out = tmp_path / "fast.mp4"
    code, stdout, err = generate(
        capsys, *RUN, "--preset", "lightx2v-4step", "--lora", f"{lora_file}:0.8", "--out", str(out)
    )
    assert code == 0, err
    meta = sidecar(out)
    assert (meta["steps"], meta["guidance"], meta["shift"], meta["sampler"]) == (4, 1.0, 5.0, "distilled")
    assert meta["preset"] == "lightx2v-4step" and meta["lora_mode"] == "merge"
    (record,) = meta["loras"]
    assert record["name"] == "style.safetensors" and record["strength"] == 0.8 and len(record["sha256"]) == 64
    assert meta["plan"]["cfg_batch"] is not None and meta["timings"]["denoise_s"] > 0

    # A flag wins over the preset; the LoRA moves the frames.
    plain = tmp_path / "plain"
    code, _, err = generate(capsys, *RUN, "--preset", "lightx2v-4step", "--steps", "2", "--out", str(plain))
    assert code == 0, err
    assert sidecar(plain)["steps"] == 2 and sidecar(plain)["loras"] == []
    with_lora = tmp_path / "lora"
    code, _, err = generate(capsys, *RUN, "--preset", "lightx2v-4step", "--steps", "2", "--lora", str(lora_file),
                            "--out", str(with_lora))  # fmt: skip
    assert code == 0, err
    assert sidecar(with_lora)["loras"][0]["strength"] == 1.0  # the preset's strength
    a, b = read_video(plain).astype(float), read_video(with_lora).astype(float)
    assert abs(a - b).mean() > 1.0


def test_resume_takes_the_saved_loras_and_refuses_others(tmp_path, capsys, lora_file, monkeypatch):
    from wanfit.pipeline import WanPipeline

    reference = tmp_path / "reference"
    args = [*RUN, "--sampler", "distilled", "--steps", "4", "--guidance", "1", "--lora", f"{lora_file}:0.6"]
    assert generate(capsys, *args, "--out", str(reference))[0] == 0

    out = tmp_path / "interrupted"
    original, calls = WanPipeline.predict_noise, [0]

    def stop_at_third(pipe, *a, **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return original(pipe, *a, **kw)

    monkeypatch.setattr(WanPipeline, "predict_noise", stop_at_third)
    code, _, err = generate(capsys, *args, "--out", str(out), "--checkpoint-every", "1")
    assert code == 130, err
    monkeypatch.setattr(WanPipeline, "predict_noise", original)
    ckpt = tmp_path / "interrupted.ckpt"
    assert ckpt.is_file()

    before = files_in(tmp_path)
    code, _, err = generate(
        capsys, "generate", "--resume", str(ckpt), "--lora", f"{lora_file}:0.9", "--no-progress"
    )
    assert code == 2 and files_in(tmp_path) == before
    assert "style.safetensors:0.6, not LoRAs style.safetensors:0.9" in one_error_line(err)

    code, _, err = generate(capsys, "generate", "--resume", str(ckpt), "--no-progress")  # the saved LoRA
    assert code == 0, err
    assert (read_video(out) == read_video(reference)).all()
    assert sidecar(out)["loras"] == sidecar(reference)["loras"]


def refused(capsys, tmp_path, *argv) -> str:
    """Run a command that must fail: exit 2, one sentence, and nothing written in tmp_path."""
    before = files_in(tmp_path)
    code, _, err = generate(capsys, *RUN, "--out", str(tmp_path / "never.mp4"), *argv)
    assert code == 2, err
    assert files_in(tmp_path) == before
    return one_error_line(err)


def test_every_user_error_is_one_sentence_and_writes_nothing(tmp_path, capsys, lora_file):
    assert "LoRA file not found" in refused(capsys, tmp_path, "--lora", str(tmp_path / "nope.safetensors"))
    assert "Unknown preset 'turbo'" in refused(capsys, tmp_path, "--preset", "turbo")
    assert "Unknown --sampler 'ddim'" in refused(capsys, tmp_path, "--sampler", "ddim")
    assert "at most 9 steps" in refused(capsys, tmp_path, "--sampler", "causvid", "--steps", "12")
    assert "finite number" in refused(capsys, tmp_path, "--lora", f"{lora_file}:nan")

    big = tiny_lora.random_factors(1, WAN_T2V_14B.dim, WAN_T2V_14B.ffn_dim, rank=1)
    big_file = tiny_lora.save(tiny_lora.comfy(big), tmp_path / "loras" / "big.safetensors")
    assert "was made for another model" in refused(capsys, tmp_path, "--lora", str(big_file))

    state = tiny_lora.comfy(tiny_lora.random_factors(BUILTIN_DIT.num_layers, BUILTIN_DIT.dim, BUILTIN_DIT.ffn_dim))
    state["diffusion_model.vace_blocks.0.proj.lora_down.weight"] = torch.zeros(4, 64)
    odd_file = tiny_lora.save(state, tmp_path / "loras" / "odd.safetensors")
    message = refused(capsys, tmp_path, "--lora", str(odd_file))
    assert "vace_blocks.0.proj.lora_down.weight" in message and "--lora-skip-unknown" in message
    out = tmp_path / "skipped"
    code, _, err = generate(
        capsys, *RUN, "--steps", "2", "--lora", str(odd_file), "--lora-skip-unknown", "--out", str(out)
    )
    assert code == 0 and "wanfit: note: odd.safetensors: skipped 1 unknown keys" in err


def test_plan_shows_the_preset_and_plans_one_pass_per_step(capsys):
    from wanfit.cli import main

    assert main(["plan", "--json", "--emulate", "t4", "--preset", "lightx2v-4step"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["preset"]["sampler"] == "distilled" and shown["preset"]["steps"] == 4
    assert shown["request"]["guidance"] is False  # guidance 1: no unconditional pass
    assert main(["plan", "--json", "--emulate", "t4", "--preset", "lightx2v-4step", "--guidance", "5"]) == 0
    assert json.loads(capsys.readouterr().out)["request"]["guidance"] is True  # a flag wins
    assert main(["plan", "--emulate", "t4", "--preset", "causvid"]) == 0
    assert "preset causvid: sampler causvid, 8 steps" in capsys.readouterr().out


def test_several_loras_merge_once_and_a_cli_run_keeps_no_base_copy(tmp_path, capsys, lora_file, monkeypatch):
    from wanfit.runtime.lora import DiTLoras

    applied = []
    real_apply = DiTLoras.apply

    def counting_apply(self, loras, mode, base_copy=None, fused_ffn=None):
        applied.append((len(loras), mode, base_copy))
        return real_apply(self, loras, mode, base_copy, fused_ffn)

    monkeypatch.setattr(DiTLoras, "apply", counting_apply)
    out = tmp_path / "two.mp4"
    code, _, err = generate(capsys, *RUN, "--steps", "2", "--lora", f"{lora_file}:0.5", "--lora", f"{lora_file}:0.3",
                            "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert applied == [(2, "merge", "none")]  # both in one merge, no copy of the base kept
    meta = sidecar(out)
    assert meta["plan"]["lora_base_copy"] == "none" and [r["strength"] for r in meta["loras"]] == [0.5, 0.3]
    # The same frames as one LoRA at the summed strength (the deltas add).
    single = tmp_path / "one.mp4"
    code, _, err = generate(capsys, *RUN, "--steps", "2", "--lora", f"{lora_file}:0.8", "--out", str(single))
    assert code == 0, err
    plain = tmp_path / "plain.mp4"
    code, _, err = generate(capsys, *RUN, "--steps", "2", "--out", str(plain))
    assert code == 0, err
    two, one, none = (read_video(path).astype(float) for path in (out, single, plain))
    assert abs(two - one).mean() < abs(one - none).mean() / 3


def test_a_batch_of_two_sizes_keeps_the_base_weights_to_switch_plans(tmp_path, capsys, lora_file, monkeypatch):
    from wanfit.runtime.lora import DiTLoras

    copies = []
    real_apply = DiTLoras.apply

    def recording_apply(self, loras, mode, base_copy=None, fused_ffn=None):
        copies.append(base_copy)
        return real_apply(self, loras, mode, base_copy, fused_ffn)

    monkeypatch.setattr(DiTLoras, "apply", recording_apply)
    prompts = tmp_path / "p.txt"
    prompts.write_text('a cat\n{"prompt": "two dogs", "size": "32x32"}\n')
    code, _, err = generate(capsys, *RUN, "--steps", "2", "--lora", str(lora_file), "--prompts", str(prompts),
                            "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 0, err
    assert copies[0] in ("device", "host")  # the CPU run: the host
    one = tmp_path / "p1.txt"
    one.write_text("a cat\ntwo dogs\n")
    copies.clear()
    code, _, err = generate(capsys, *RUN, "--steps", "2", "--lora", str(lora_file), "--prompts", str(one),
                            "--out", str(tmp_path / "out1"))  # fmt: skip
    assert code == 0, err
    assert copies == ["none"]
