"""`wanfit generate` / `wanfit plan` on several processes (issue 17): the same frames as one process,
rank 0 alone writes, the sidecar and resume file record the processes, and one failing process ends
the run with one message."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.ranks import run_ranks
from wanfit import checkpointing
from wanfit.cli import main
from wanfit.pipeline import DenoiseState, WanPipeline
from wanfit.runtime.parallel import EXIT_PEER_FAILED
from wanfit.video import read_video

STEPS = 4
RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", str(STEPS), "--seed", "3", "--no-progress", "--prompt", "a red fox"]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_process_env")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, cond and uncond one after the other: the arithmetic CFG-parallel does."""
    out = tmp_path_factory.mktemp("reference") / "frames"
    assert main([*RUN, "--set", "cfg_batch=false", "--out", str(out)]) == 0
    return read_video(out)


def _generate(rank, argv, fail_rank=None):
    """`wanfit generate` in one process of a run; fail_rank runs out of memory at its second step."""
    if rank == fail_rank:
        original, calls = WanPipeline.predict_noise, []

        def predict_noise(pipe, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return original(pipe, *args, **kwargs)

        WanPipeline.predict_noise = predict_noise
    raise SystemExit(main(argv))


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("wanfit: error:")]


@pytest.mark.parametrize("degrees", ["cfg2,ulysses2", "cfg2"])
def test_generate_on_several_processes_gives_the_same_frames(tmp_path, capfd, reference, degrees):
    capfd.readouterr()
    out = tmp_path / "frames"
    argv = [*RUN, "--parallel", degrees, "--device", "cpu", "--out", str(out)]
    world = 4 if "ulysses2" in degrees else 2
    results = run_ranks(_generate, world, argv, in_session=False, timeout=120)
    assert [r.exitcode for r in results] == [0] * world, results
    frames = read_video(out)
    if world == 2:  # CFG-parallel: each rank runs the reference's own GEMMs, so the same bits
        np.testing.assert_array_equal(frames, reference)
    else:  # Ulysses shards the tokens: GEMMs over fewer rows may round their last bits differently
        diff = np.abs(frames.astype(np.int16) - reference.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-2, (diff.max(), (diff > 0).mean())
    # Rank 0 alone wrote: the frames and one sidecar, nothing else (no temporaries, no resume file).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames", "frames.json"]
    meta = json.loads((tmp_path / "frames.json").read_text())
    cfg, ulysses = (2, 2) if world == 4 else (2, 1)
    assert meta["world_size"] == world and meta["parallel"] == f"cfg{cfg},ulysses{ulysses}"
    assert (meta["plan"]["cfg_parallel"], meta["plan"]["ulysses"]) == (cfg, ulysses)
    assert meta["distributed_backend"] == "gloo"
    assert capfd.readouterr().out.count("wrote ") == 1


def _generate_counting_text_encoders(rank, argv, counts):
    """`wanfit generate` in one process of a run, writing how many text encoders it built and how
    many VAE decodes it ran."""
    from wanfit.models.text_encoder import WanTextEncoder
    from wanfit.models.vae import WanVAE

    init, decode, built, decoded = WanTextEncoder.__init__, WanVAE.decode, [], []

    def counted_init(encoder, *args, **kwargs):
        built.append(1)
        init(encoder, *args, **kwargs)

    def counted_decode(vae, *args, **kwargs):
        decoded.append(1)
        return decode(vae, *args, **kwargs)

    WanTextEncoder.__init__, WanVAE.decode = counted_init, counted_decode
    try:
        code = main(argv)
    finally:
        (counts / str(rank)).write_text(f"{len(built)} {len(decoded)}")
    raise SystemExit(code)


@pytest.mark.parametrize("setting, builders", [([], [1, 0]), (["--set", "text_encoder_rank=1"], [0, 1])])
def test_one_rank_encodes_the_prompts_for_all(tmp_path, reference, setting, builders):
    """umT5 is built on the text encoder rank alone (rank 0 unless set); the embeddings it broadcasts
    give the one-process frames; the VAE decodes on rank 0 alone."""
    out, counts = tmp_path / "frames", tmp_path / "counts"
    counts.mkdir()
    argv = [*RUN, "--parallel", "cfg2", "--device", "cpu", "--out", str(out), *setting]
    results = run_ranks(_generate_counting_text_encoders, 2, argv, counts, in_session=False, timeout=120)
    assert [r.exitcode for r in results] == [0, 0], results
    built, decoded = zip(*((counts / str(rank)).read_text().split() for rank in (0, 1)))
    assert list(map(int, built)) == builders
    assert list(map(int, decoded)) == [1, 0]  # rank 0 alone decodes, whichever rank encoded
    np.testing.assert_array_equal(read_video(out), reference)
    meta = json.loads((tmp_path / "frames.json").read_text())
    assert meta["plan"]["text_encoder_rank"] == builders.index(1)


def test_generate_with_the_dit_sharded_gives_the_same_frames(tmp_path, reference):
    """--set dit_sharding=fsdp: each process keeps half of every block (FSDP2 on gloo), rank 0 decodes."""
    out = tmp_path / "frames"
    argv = [*RUN, "--parallel", "cfg2", "--device", "cpu", "--out", str(out), "--set", "dit_sharding=fsdp"]
    results = run_ranks(_generate, 2, argv, in_session=False, timeout=120)
    assert [r.exitcode for r in results] == [0, 0], results
    np.testing.assert_array_equal(read_video(out), reference)
    meta = json.loads((tmp_path / "frames.json").read_text())
    assert meta["plan"]["dit_sharding"] == "fsdp"


def test_a_text_encoder_rank_outside_the_run_is_refused(tmp_path, capsys):
    argv = [*RUN, "--set", "text_encoder_rank=1", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "text_encoder_rank 1 is not a process of this run of 1" in err and "\n" not in err


def test_an_out_of_memory_rank_ends_the_run_with_one_message_and_a_resume_file(tmp_path, capfd, reference):
    capfd.readouterr()
    out = tmp_path / "frames"
    argv = [*RUN, "--parallel", "cfg2", "--device", "cpu", "--out", str(out), "--checkpoint-every", "1"]
    started = time.monotonic()
    rank0, rank1 = run_ranks(_generate, 2, argv, 1, in_session=False, timeout=60)
    assert time.monotonic() - started < 40
    assert rank1.exitcode == 2 and rank0.exitcode == EXIT_PEER_FAILED
    lines = error_lines(capfd.readouterr().err)
    assert len(lines) == 1 and "Out of memory during denoise on rank 1" in lines[0], lines
    assert not out.exists() and not (tmp_path / "frames.json").exists()
    # Rank 0 kept the last finished step (1 of 4); resumed on two processes, the frames are the same.
    ckpt = checkpointing.checkpoint_path(out)
    state, saved = checkpointing.load(ckpt)
    assert state.step == 1 and saved["world_size"] == 2 and saved["parallel"] == "cfg2,ulysses1"
    results = run_ranks(_generate, 2, ["generate", "--resume", str(ckpt), "--no-progress"], in_session=False)
    assert [r.exitcode for r in results] == [0, 0], results
    np.testing.assert_array_equal(read_video(out), reference)
    assert not ckpt.exists()


def test_a_resume_file_needs_the_same_number_of_processes(tmp_path, capsys):
    out = tmp_path / "frames"
    ckpt = checkpointing.checkpoint_path(out)
    request = {
        "prompt": "a fox", "negative_prompt": "", "size": "48x32", "frames": 5, "steps": STEPS,
        "guidance": 6.0, "shift": 3.0, "seed": 3, "model": None, "out": str(out), "checkpoint_every": 1,
        "world_size": 2, "parallel": "cfg2,ulysses1",
    }  # fmt: skip
    checkpointing.save(ckpt, DenoiseState(torch.zeros(1, 16, 2, 4, 6), 1), request)
    assert main(["generate", "--resume", str(ckpt), "--gpus", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wanfit: error: ") and "written by a run of 2 process(es)" in err
    assert "\n" not in err and ckpt.exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--parallel", "ulysses4"], "Ulysses 4 does not divide the 6 attention heads of Wan2.1 builtin"),
        (["--parallel", "cfg2", "--guidance", "1"], "guidance is off"),
        (["--gpus", "2"], "needs 2 GPUs and this machine has 0"),
        (["--set", "ulysses=2"], "with --parallel"),
    ],
)
def test_impossible_parallel_settings_stop_before_anything_starts(tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*RUN, *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wanfit: error: ") and words in err and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_plan_shows_the_parallel_plan_per_gpu(capsys):
    assert main(["plan", "--emulate", "h100", "--gpus", "8", "--model-size", "14B", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["settings"]["cfg_parallel"], result["settings"]["ulysses"]) == (2, 4)
    assert any("8,190 of the 32,760 tokens and 10 of the 40 heads" in note for note in result["notes"])
    assert main(["plan", "--emulate", "h100", "--gpus", "1", "--model-size", "14B", "--json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["phases"]["denoise"]["activations"] > 4 * result["phases"]["denoise"]["activations"]


def _launcher_env(tmp_path: Path, fail_rank: int | None) -> dict:
    """The test's environment for real worker processes; fail_rank's DiT raises at its second step
    (through a sitecustomize, so the product has no test hook)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    if fail_rank is not None:
        (hooks / "sitecustomize.py").write_text(
            "import os\n"
            f"if os.environ.get('RANK') == '{fail_rank}':\n"
            "    from wanfit.errors import ConfigError\n"
            "    from wanfit.pipeline import WanPipeline\n"
            "    original, calls = WanPipeline.predict_noise, []\n"
            "    def predict_noise(pipe, *args, **kwargs):\n"
            "        calls.append(1)\n"
            "        if len(calls) == 2:\n"
            "            raise ConfigError('Injected failure on rank 1.')\n"
            "        return original(pipe, *args, **kwargs)\n"
            "    WanPipeline.predict_noise = predict_noise\n"
        )
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env["WANFIT_CACHE_DIR"] = str(tmp_path / "cache")
    return env


def test_torchrun_generate_gives_the_same_frames(tmp_path, reference):
    """`torchrun --nproc-per-node 2 -m wanfit generate` on the CPU: one process's frames, rank 0 writes."""
    out = tmp_path / "frames"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    argv = [*torchrun, "-m", "wanfit", *RUN, "--device", "cpu", "--out", str(out)]
    env = {**_launcher_env(tmp_path, None), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(read_video(out), reference)  # 2 processes: cfg2 chosen
    assert {p.name for p in tmp_path.iterdir()} - {"hooks", "cache"} == {"frames", "frames.json"}
    assert json.loads((tmp_path / "frames.json").read_text())["parallel"] == "cfg2,ulysses1"
    assert done.stdout.count("wrote ") == 1 and done.stderr == ""


def test_gpus_starts_the_processes_and_one_error_is_one_message(tmp_path):
    """`wanfit generate --gpus 2` (through torch.distributed.run) with rank 1 failing at its second
    step: every process ends, the launcher adds nothing to rank 1's message."""
    out = tmp_path / "frames"
    argv = [sys.executable, "-m", "wanfit", *RUN, "--gpus", "2", "--device", "cpu", "--out", str(out)]
    started = time.monotonic()
    done = subprocess.run(argv, env=_launcher_env(tmp_path, 1), capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["wanfit: error: Injected failure on rank 1."], done.stderr
    assert not out.exists()
    assert time.monotonic() - started < 120
