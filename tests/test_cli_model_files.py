"""Broken model folders through `wanfit generate --model ...` (issue 7 §2): each is named in one sentence,
exit 2, no traceback, no output; and a pickled file never runs code.

The folder is the built-in tiny model saved in the official release layout; each test breaks a copy.
"""

import json
import os
import pickle
import shlex
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import wanfit.attention as wa
from tests.helpers.tiny_model_dir import DIT_FILE, save_demo_official_layout
from wanfit.cli import main
from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B
from wanfit.weights.io import load_error_detail
from wanfit.weights.model_dir import OFFICIAL_T5, OFFICIAL_VAE

RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for var in ("WANFIT_EMULATE", "WANFIT_ATTENTION"):
        monkeypatch.delenv(var, raising=False)
    yield
    wa.reset()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_demo_official_layout(tmp_path_factory.mktemp("model") / "official")


@pytest.fixture
def broken(model_dir, tmp_path):
    """A fresh copy of the model folder to break."""
    return shutil.copytree(model_dir, tmp_path / "model")


def refused(capsys, model, tmp_path) -> str:
    """Run generate on `model`; check it is refused cleanly and return the error line."""
    out = tmp_path / "out" / "v.mp4"
    code = main([*RUN, "--model", str(model), "--out", str(out)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("wanfit: error: ") and lines[0].endswith("."), captured.err
    assert "Traceback" not in captured.err and "wrote" not in captured.out
    assert not (tmp_path / "out").exists()
    return lines[0]


def test_the_intact_folder_generates(capsys, model_dir, tmp_path):
    out = tmp_path / "v.mp4"
    assert main([*RUN, "--model", str(model_dir), "--out", str(out)]) == 0
    assert out.is_file() and json.loads(out.with_suffix(".json").read_text())["model"] == str(model_dir)


def test_missing_folder_file_and_unknown_layout(capsys, broken, tmp_path):
    assert f"Model folder not found: {tmp_path / 'nowhere'}" in refused(
        capsys, tmp_path / "nowhere", tmp_path
    )
    assert "must be a model folder, but" in refused(capsys, broken / "config.json", tmp_path)
    (broken / OFFICIAL_VAE).unlink()
    assert f"The official-layout folder {broken} lacks Wan2.1_VAE.pth" in refused(capsys, broken, tmp_path)
    shutil.rmtree(broken / "google")
    assert "lacks Wan2.1_VAE.pth (or Wan2.1_VAE.safetensors), google/umt5-xxl/" in refused(capsys, broken, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "weights.bin").write_bytes(b"\0" * 64)
    line = refused(capsys, other, tmp_path)
    assert (
        f"{other} is neither an official Wan2.1 release folder" in line
        and "a diffusers-layout" in line
        and "nor a ComfyUI models/ folder" in line
    )


def truncate(path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_and_corrupt_safetensors(capsys, broken, tmp_path):
    dit = broken / DIT_FILE
    original = dit.read_bytes()
    truncate(dit)
    assert f"{dit} is not a readable safetensors file (truncated or corrupt?)" in refused(
        capsys, broken, tmp_path
    )
    dit.write_bytes(b"\xff" * 8 + original[8:])  # a header length past the end of the file
    assert f"{dit} is not a readable safetensors file" in refused(capsys, broken, tmp_path)


def test_truncated_and_corrupt_pth(capsys, broken, tmp_path):
    vae = broken / OFFICIAL_VAE
    truncate(vae, 0.7)
    assert f"{vae} is not a readable PyTorch checkpoint (truncated or corrupt?)" in refused(
        capsys, broken, tmp_path
    )
    vae.write_bytes(os.urandom(4096))
    assert f"{vae} is not a readable PyTorch checkpoint" in refused(capsys, broken, tmp_path)


def test_a_truncated_text_encoder_is_named_too(capsys, broken, tmp_path):
    t5 = broken / OFFICIAL_T5
    truncate(t5)
    assert f"{t5} is not a readable PyTorch checkpoint" in refused(capsys, broken, tmp_path)


def resave_dit(folder, change):
    path = folder / DIT_FILE
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def test_a_tensor_of_the_wrong_shape(capsys, broken, tmp_path):
    resave_dit(broken, lambda s: s.update({"head.head.weight": torch.zeros(65, 64)}))
    line = refused(capsys, broken, tmp_path)
    assert (
        "does not fit the configured DiT" in line and "1 wrong shape: head.head.weight (file [65, 64]" in line
    )


def test_a_tensor_of_the_wrong_dtype(capsys, model_dir, broken, tmp_path):
    resave_dit(
        broken, lambda s: s.update({"blocks.0.ffn.0.weight": s["blocks.0.ffn.0.weight"].to(torch.int8)})
    )
    line = refused(capsys, broken, tmp_path)
    assert "tensor 'blocks.0.ffn.0.weight' is stored as I8" in line and "not integer-quantised ones" in line
    shutil.copy(model_dir / DIT_FILE, broken / DIT_FILE)
    vae = broken / OFFICIAL_VAE
    state = torch.load(vae, weights_only=True)
    torch.save({**state, "conv2.weight": state["conv2.weight"].to(torch.int32)}, vae)
    assert "tensor 'conv2.weight' is stored as int32" in refused(capsys, broken, tmp_path)


def test_an_image_to_video_checkpoint(capsys, broken, tmp_path):
    resave_dit(broken, lambda s: s.update({"img_emb.proj.1.weight": torch.zeros(64, 32)}))
    assert "holds a Wan image-to-video (I2V/FLF2V) DiT, not a text-to-video one" in refused(
        capsys, broken, tmp_path
    )


def test_14b_weights_with_a_1_3b_config(capsys, broken, tmp_path):
    """A few tensors of the 14B model's shapes (enough to tell its size) next to the 1.3B config.json."""
    big = WAN_T2V_14B
    state = {
        "patch_embedding.weight": torch.zeros(big.dim, big.in_dim, 1, 2, 2, dtype=torch.bfloat16),
        "patch_embedding.bias": torch.zeros(big.dim, dtype=torch.bfloat16),
        "time_embedding.0.weight": torch.zeros(big.dim, big.freq_dim, dtype=torch.bfloat16),
        "blocks.0.norm3.weight": torch.zeros(big.dim, dtype=torch.bfloat16),
        "blocks.0.self_attn.norm_q.weight": torch.zeros(big.dim, dtype=torch.bfloat16),
        f"blocks.{big.num_layers - 1}.ffn.0.bias": torch.zeros(big.ffn_dim, dtype=torch.bfloat16),
        "head.head.weight": torch.zeros(64, big.dim, dtype=torch.bfloat16),
    }
    save_file(state, str(broken / DIT_FILE))
    config = {"_class_name": "WanModel", "model_type": "t2v", **WAN_T2V_1_3B.to_dict()}
    (broken / "config.json").write_text(json.dumps(config))
    line = refused(capsys, broken, tmp_path)
    assert "does not fit the configured DiT, Wan2.1 T2V-1.3B (dim=1536, 30 layers)" in line
    assert "its weights are of another model, Wan2.1 T2V-14B (dim=5120, 40 layers)" in line


def test_an_i2v_config_json(capsys, broken, tmp_path):
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "i2v"}))
    assert "describes a Wan i2v model; wanfit runs text-to-video (t2v) models" in refused(
        capsys, broken, tmp_path
    )


class RunsCode:
    """Unpickling this runs code (writes a marker file): what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_pth_that_would_run_code_is_refused_and_the_code_never_runs(capsys, broken, tmp_path):
    marker = tmp_path / "code_ran"
    vae = broken / OFFICIAL_VAE
    state = torch.load(vae, weights_only=True)
    torch.save({**state, "payload": RunsCode(marker)}, vae)
    line = refused(capsys, broken, tmp_path)
    assert f"{vae} holds code or objects other than tensors (builtins.exec) and was not loaded" in line
    assert not marker.exists()
    torch.load(vae, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.read_text() == "ran"


class CallsSystem:
    """Unpickling this calls os.system (touches a marker file): the issue's malicious .pth."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.mark.parametrize("name", [OFFICIAL_VAE, OFFICIAL_T5])
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_a_pth_that_would_call_os_system_says_so_and_never_runs(capsys, broken, tmp_path, name, how):
    marker = tmp_path / "system_ran"
    path = broken / name
    state = torch.load(path, weights_only=True)
    if how == "torch.save":  # a zip archive, as torch saves today
        torch.save({**state, "payload": CallsSystem(marker)}, path)
    else:  # a bare pickle (protocol 4 and its FRAME opcode, which weights_only also refuses)
        with open(path, "wb") as f:
            pickle.dump({"payload": CallsSystem(marker)}, f)
    line = refused(capsys, broken, tmp_path)
    system = f"{os.system.__module__}.system"  # posix.system on Linux and macOS
    assert line == (
        f"wanfit: error: {path} holds code or objects other than tensors ({system}) and was not loaded: "
        "wanfit reads only tensors from a checkpoint and never runs code in it."
    )
    assert "truncated or corrupt" not in line
    assert not marker.exists()
    with open(path, "rb") as f:  # the payload is live: an unsafe load runs the command
        torch.load(f, weights_only=False) if how == "torch.save" else pickle.load(f)
    assert marker.exists()


def test_a_truncated_pth_is_named_in_a_whole_sentence(capsys, broken, tmp_path):
    vae = broken / OFFICIAL_VAE
    truncate(vae, 0.05)  # the zip's central directory is gone: torch's long "...likely corrupted..." message
    line = refused(capsys, broken, tmp_path)
    assert line.startswith(
        f"wanfit: error: {vae} is not a readable PyTorch checkpoint (truncated or corrupt?)"
    )
    assert "failed finding central directory." in line and not line.endswith("checkpoint file is.")


def test_error_details_are_cut_at_a_sentence_never_inside_one():
    long = (
        "PytorchStreamReader failed reading zip archive: failed finding central directory. This is an internal "
        "miniz error. If you are seeing this error, there is a high likelihood that your checkpoint file is "
        "corrupted. This can happen if the checkpoint was not saved properly."
    )
    assert load_error_detail(RuntimeError(long)) == (
        ": PytorchStreamReader failed reading zip archive: failed finding central directory"
    )
    assert load_error_detail(RuntimeError("x" * 300)) == ""  # no sentence short enough to quote
    assert load_error_detail(OSError(22, "Invalid argument")) == ": Invalid argument"
    assert load_error_detail(RuntimeError("Weights only load failed. Re-running with ...")) == ""
