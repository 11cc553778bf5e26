"""`wanfit plan`: JSON keys, exit codes, model folders; the generated hardware doc."""

import json

import pytest

from tests.helpers.hardware import emulated
from wanfit.cli import main
from wanfit.commands import common
from wanfit.plan import hardware_doc

GIB = 1024**3
FAKE_H100 = emulated("h100", host_gib=200)


@pytest.fixture(autouse=True)
def fake_device(monkeypatch):
    monkeypatch.setattr(common, "hardware_from_args", lambda args: FAKE_H100)


def test_plan_json(capsys):
    assert main(["plan", "--json", "--vram", "6GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["feasible"] is True
    assert set(out["phases"]) == {"text_encoder", "denoise", "vae_decode"}
    assert out["peak_bytes"] == max(p["peak"] for p in out["phases"].values()) <= 6 * GIB
    assert out["settings"]["compute_dtype"] == "bfloat16" and out["budget_bytes"] == 6 * GIB
    assert out["request"]["tokens"] == 32760 and out["request"]["model"] == "1.3B"


def test_plan_text_and_14b(capsys):
    assert main(["plan", "--model-size", "14B", "--size", "1280x720"]) == 0
    text = capsys.readouterr().out
    assert "Wan2.1 14B, 1280x720, 81 frames" in text and "predicted peak" in text and "denoise" in text


def test_impossible_budget_exits_2_with_the_smallest_budget(capsys):
    assert main(["plan", "--vram", "1GiB", "--json"]) == 2
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["feasible"] is False and out["min_budget_bytes"] > GIB
    assert "smallest plan needs a budget of" in captured.err and captured.err.startswith("wanfit: error:")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--vram", "lots"], "--vram must be a size"),
        (["plan", "--size", "833x480"], "multiples of 16"),
        (["plan", "--frames", "80"], "4k+1"),
        (["plan", "--set", "bogus=1"], "--set takes NAME=VALUE"),
    ],
)
def test_bad_input_is_one_sentence(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_model_folder_config(tmp_path, capsys):
    (tmp_path / "transformer").mkdir()
    config = {
        "num_attention_heads": 40,
        "attention_head_dim": 128,
        "ffn_dim": 13824,
        "num_layers": 40,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "patch_size": [1, 2, 2],
        "_class_name": "WanTransformer3DModel",
    }
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    assert main(["plan", "--model", str(tmp_path), "--json", "--set", "cfg_batch=false"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["request"]["model"] == "14B" and out["settings"]["cfg_batch"] is False


def test_plan_is_registered_after_generate():
    from wanfit.cli import COMMANDS

    assert COMMANDS.index("plan") == COMMANDS.index("generate") + 1


def test_hardware_doc_lists_every_card(tmp_path):
    out = tmp_path / "hardware.md"
    assert hardware_doc.main(["--out", str(out)]) == 0
    text = out.read_text()
    from wanfit.hardware.profiles import PROFILES

    for key, profile in PROFILES.items():
        assert f"(`{key}`" in text and profile.name in text
    assert "flash-attn" in text and "CUDA 12" in text and "float16" in text and "bfloat16" in text
    assert "Wan2.1 1.3B, 832x480x81" in text and "Wan2.1 14B, 1280x720x81" in text
    assert text.count("peak ") >= len(PROFILES)
    # The attention column comes from the registry: no flash or cuDNN on a T4, cuDNN on an H100.
    t4_row = next(line for line in text.splitlines() if "(`t4`" in line)
    h100_row = next(line for line in text.splitlines() if "(`h100`" in line)
    assert "sdpa_efficient" in t4_row and "sdpa_cudnn" in h100_row
