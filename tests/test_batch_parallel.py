"""`generate --prompts FILE` on several processes: every video on both processes with its own
degrees (cfg2 guided, ulysses2 unguided) gives the one-process batch's frames, rank 0 alone writes;
a bad line, a size no plan fits, an existing output and a failed write are each their video's error
while the rest are written; a failure in a video's shared work ends every process (no hang) with
one message and the summary so far, and --resume-batch on two processes makes the rest."""

import json

import numpy as np
import pytest

from tests.helpers.ranks import run_ranks
from tests.test_cli_parallel import error_lines
from wanfit.cli import main
from wanfit.plan.parallel import batch_world_size
from wanfit.plan.planning import model_request
from wanfit.runtime.parallel import EXIT_PEER_FAILED
from wanfit.video import read_video

RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", "2", "--seed", "3", "--no-progress"]
ONE_AT_A_TIME = ["--set", "cfg_batch=false", "--set", "prompts_per_pass=1"]  # the arithmetic cfg2 does
LINES = ["a red fox", '{"prompt": "two dogs", "guidance": 1}', "a blue square"]
NAMES = ["001_a_red_fox_3.mp4", "002_two_dogs_3.mp4", "003_a_blue_square_3.mp4"]


pytestmark = pytest.mark.usefixtures("one_process_env")


def _prompts(folder, lines=LINES):
    path = folder / "p.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The batch on one process, one video at a time."""
    folder = tmp_path_factory.mktemp("reference")
    out = folder / "out"
    assert main([*RUN, *ONE_AT_A_TIME, "--prompts", str(_prompts(folder)), "--out", str(out)]) == 0
    return {name: read_video(out / name) for name in NAMES}


def _batch(rank, argv, fail_rank=None, fail_write=None):
    """`wanfit generate` in one process of a run. fail_rank: its DiT raises at the first step of the
    second video; fail_write: rank 0 cannot write the output of that name."""
    from wanfit import video
    from wanfit.errors import ConfigError
    from wanfit.pipeline import WanPipeline

    if rank == fail_rank:
        original, calls = WanPipeline.predict_noise, []

        def predict_noise(pipe, *args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # 2 steps a video
                raise ConfigError(f"Injected failure on rank {rank}.")
            return original(pipe, *args, **kwargs)

        WanPipeline.predict_noise = predict_noise
    if fail_write is not None:
        write = video.write_video

        def write_video(frames, out, **kwargs):
            if out.name == fail_write:
                raise OSError(28, "No space left on device")
            return write(frames, out, **kwargs)

        video.write_video = write_video
    raise SystemExit(main(argv))


def _summary(out: str) -> list[dict]:
    return json.loads(out.strip().splitlines()[-1])["batch"]


def test_a_batch_on_two_processes_gives_the_one_process_frames(tmp_path, capfd, reference):
    capfd.readouterr()
    out = tmp_path / "out"
    argv = [*RUN, "--prompts", str(_prompts(tmp_path)), "--gpus", "2", "--device", "cpu", "--out", str(out)]
    results = run_ranks(_batch, 2, argv, in_session=False, timeout=120)
    assert [r.exitcode for r in results] == [0, 0], results
    for name in NAMES:
        np.testing.assert_array_equal(read_video(out / name), reference[name])
    # Rank 0 alone wrote: each video and its sidecar, nothing else.
    assert sorted(p.name for p in out.iterdir()) == sorted([*NAMES, *(n[:-4] + ".json" for n in NAMES)])
    degrees = [json.loads((out / (n[:-4] + ".json")).read_text()) for n in NAMES]
    assert [m["parallel"] for m in degrees] == ["cfg2,ulysses1", "cfg1,ulysses2", "cfg2,ulysses1"]
    assert all(m["world_size"] == 2 and m["distributed_backend"] == "gloo" for m in degrees)
    captured = capfd.readouterr()
    assert captured.out.count("wrote ") == 6  # three lines as each is written, three in the summary
    assert captured.out.count('{"batch"') == 1 and "batch: 3 of 3 videos written" in captured.out


def test_each_failure_is_its_videos_and_the_rest_are_written(tmp_path, capfd):
    capfd.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    (out / "005_a_cat_3.mp4").write_bytes(b"someone else's video")
    lines = ["a red fox", "{oops", '{"prompt": "huge", "size": "1280x720"}', "two dogs", "a cat", "rain"]
    argv = [*RUN, "--prompts", str(_prompts(tmp_path, lines)), "--gpus", "2", "--device", "cpu"]
    argv += ["--out", str(out), "--vram", "80MiB"]
    results = run_ranks(_batch, 2, argv, None, "004_two_dogs_3.mp4", in_session=False, timeout=120)
    assert [r.exitcode for r in results] == [2, 0], results  # rank 0 speaks for the run; none hung
    captured = capfd.readouterr()
    errors = {r["line"]: r["error"] for r in _summary(captured.out) if r["error"]}
    assert set(errors) == {2, 3, 4, 5}
    assert "not valid JSON" in errors[2] and "No plan fits" in errors[3]
    assert "No space left on device" in errors[4] and "already exists" in errors[5]
    assert sorted(p.name for p in out.glob("*.mp4")) == ["001_a_red_fox_3.mp4", "005_a_cat_3.mp4", "006_rain_3.mp4"]  # fmt: skip
    assert (out / "005_a_cat_3.mp4").read_bytes() == b"someone else's video"
    assert "batch: 2 of 6 videos written" in captured.out and captured.out.count('{"batch"') == 1
    assert error_lines(captured.err) == [f"wanfit: error: line 4: {errors[4]}"]  # said once


def test_a_failure_in_shared_work_ends_the_run_and_resume_batch_makes_the_rest(tmp_path, capfd, reference):
    capfd.readouterr()
    out = tmp_path / "out"
    argv = [*RUN, "--prompts", str(_prompts(tmp_path)), "--gpus", "2", "--device", "cpu", "--out", str(out)]
    rank0, rank1 = run_ranks(_batch, 2, argv, 1, in_session=False, timeout=60)
    assert rank1.exitcode == 2 and rank0.exitcode == EXIT_PEER_FAILED  # nobody hung
    err = capfd.readouterr().err
    assert error_lines(err) == ["wanfit: error: Injected failure on rank 1."]
    assert f"line 1: wrote {out / NAMES[0]}" in err and "--resume-batch makes the rest" in err
    assert sorted(p.name for p in out.glob("*.mp4")) == [NAMES[0]]
    first = out / NAMES[0]
    before = (first.read_bytes(), first.stat().st_mtime_ns)

    results = run_ranks(_batch, 2, [*argv, "--resume-batch"], in_session=False, timeout=120)
    assert [r.exitcode for r in results] == [0, 0], results
    stdout = capfd.readouterr().out
    assert "batch: 2 of 3 videos written, 1 skipped as done before" in stdout
    assert [r["skipped"] for r in _summary(stdout)] == [True, False, False]
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # untouched
    for name in NAMES:
        np.testing.assert_array_equal(read_video(out / name), reference[name])


def test_the_batch_uses_the_most_gpus_every_video_can_share():
    """12 heads, 8 GPUs: guided videos alone use 8 (cfg2,ulysses4); with an unguided one (ulysses
    divides 12: 6), 6 (cfg2,ulysses3 and ulysses6)."""
    guided = model_request("1.3B", width=832, height=480, frames=81)
    unguided = model_request("1.3B", width=832, height=480, frames=81, guidance=False)
    assert batch_world_size([guided], gpus=8) == 8
    assert batch_world_size([guided, unguided], gpus=8) == 6
    assert batch_world_size([guided, unguided], gpus=1) == 1
    assert batch_world_size([unguided], spec="ulysses4", gpus=8) == 4


def test_gpus_starts_the_batchs_processes(tmp_path, reference):
    """`wanfit generate --prompts ... --gpus 2` through torch.distributed.run: the same videos."""
    import subprocess
    import sys

    from tests.test_cli_parallel import _launcher_env

    out = tmp_path / "out"
    argv = [sys.executable, "-m", "wanfit", *RUN, "--prompts", str(_prompts(tmp_path)), "--gpus", "2"]
    argv += ["--device", "cpu", "--out", str(out)]
    env = {**_launcher_env(tmp_path, None), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    for name in NAMES:
        np.testing.assert_array_equal(read_video(out / name), reference[name])
    assert "batch: 3 of 3 videos written" in done.stdout
    # Several prompts a pass stay off on several processes (Plan.batching_blocker), said once.
    assert done.stderr.splitlines() == [
        "wanfit: note: one prompt per DiT pass: the run is on several processes."
    ]
