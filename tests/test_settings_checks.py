"""Every setting is checked before any work: one sentence naming it and what it accepts, exit 2, nothing
written (issue 10 §3)."""

import pytest
import torch

from wanfit.cli import main

RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", "1", "--no-progress", "--prompt", "a fox"]


def run(capsys, tmp_path, *flags):
    code = main([*RUN, "--out", str(tmp_path / "v.mp4"), *flags])
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize(
    "setting, expected",
    [
        (
            "compute_dtype=int8",
            "Plan setting compute_dtype takes one of bfloat16, float16, float32, got 'int8'.",
        ),
        (
            "storage_dtype=foo",
            "Plan setting storage_dtype takes one of bfloat16, float16, float32, float8_e4m3fn",
        ),
        (
            "text_encoder_device=gpu",
            "Plan setting text_encoder_device takes cpu, cuda, cuda:N or mps, got 'gpu'.",
        ),
        ("attention=flashy", "Plan setting attention takes auto or one of sdpa_cudnn"),
        ("vae_tile=0", "Plan setting vae_tile takes a size like 32x32 (each at least 4) or none, got '0'."),
        ("attention_chunk=0", "Plan setting attention_chunk takes a whole number of at least 16 or none"),
        ("ffn_chunk=0", "Plan setting ffn_chunk takes a whole number of at least 16 or none"),
        ("cfg_batch=maybe", "Plan setting cfg_batch takes true or false, got 'maybe'."),
        ("device=cuda", "--set device=cuda was asked for, but this machine has no usable CUDA device."),
        ("text_encoder_device=cuda", "Plan setting text_encoder_device takes cpu or this run's device (cpu)"),
    ],
)
def test_each_plan_setting_is_checked_by_its_declaration(capsys, tmp_path, monkeypatch, setting, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run(capsys, tmp_path, "--set", setting)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wanfit: error: ") and expected in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_model_size_with_model_is_refused(capsys, tmp_path):
    assert main(["plan", "--model", str(tmp_path), "--model-size", "14B"]) == 2
    assert "the folder's files decide the model size, so drop --model-size" in capsys.readouterr().err


def test_a_prompt_longer_than_the_model_reads_is_warned_with_its_token_count(capsys, tmp_path):
    from wanfit.cli import _format_warning
    from wanfit.errors import WanfitWarning

    long_prompt = "a red fox runs through the snow " * 3  # the built-in model reads 32 tokens
    with pytest.warns(WanfitWarning, match=r"is \d+ tokens long; the model reads the first 32 ") as caught:
        code = main([*RUN[:-2], "--prompt", long_prompt, "--out", str(tmp_path / "v.mp4")])
    assert code == 0
    assert (
        len([w for w in caught if issubclass(w.category, WanfitWarning)]) == 1
    )  # the prompt, not the default negative
    w = caught[0]
    import re

    assert int(re.search(r"is (\d+) tokens long", str(w.message)).group(1)) > 16
    line = _format_warning(w.message, w.category, w.filename, w.lineno)
    assert line.startswith("wanfit: warning: the prompt 'a red fox runs") and line.count("\n") == 1


def test_fp16_on_a_cpu_says_it_is_slower(capsys, tmp_path):
    code, err = run(capsys, tmp_path, "--dtype", "fp16", "--frames", "1")
    assert code == 0
    assert "wanfit: note: Compute in float16 on a CPU is slower than fp32 on most CPUs." in err
