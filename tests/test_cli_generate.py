"""`wanfit generate` run in-process on the built-in model: output, metadata, progress, bad input,
output safety, Ctrl-C and resume, and a kernel that fails mid-run (issue 5 §3/§5, issue 7 §1/§3-5)."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch

import wanfit.attention as wa
from wanfit import checkpointing
from wanfit.attention import AttentionBackend, AttentionFallbackWarning
from wanfit.attention import backends as attention_backends
from wanfit.builtin import SAMPLING
from wanfit.cli import main
from wanfit.pipeline import DenoiseState, WanPipeline
from wanfit.video import read_mp4_comment, read_video

STEPS = 4
# Small enough for a loaded 2-core machine: 48x32, 5 frames (2 latent frames), 4 steps.
RUN = ["generate", "--size", "48x32", "--frames", "5", "--steps", str(STEPS), "--seed", "3", "--prompt", "a red fox"]  # fmt: skip


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    for var in ("WANFIT_EMULATE", "WANFIT_ATTENTION"):
        monkeypatch.delenv(var, raising=False)
    torch.manual_seed(0)
    yield
    wa.reset()


def generate(capsys, *argv):
    """(exit code, stdout, stderr) of `wanfit generate ...`."""
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_in(folder):
    """Every entry under `folder`, hidden ones included, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def one_error_line(err: str) -> str:
    """The stderr of a refused run: exactly one line, one sentence, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("wanfit: error: ") and lines[0].endswith("."), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run to PNG frames (lossless): what every other run is compared with."""
    out = tmp_path_factory.mktemp("reference") / "frames"
    assert main([*RUN, "--out", str(out), "--no-progress"]) == 0
    return read_video(out)


class CountingDiT:
    """Wraps WanPipeline.predict_noise: counts DiT steps and runs `at(n)` before the n-th (1-based)."""

    def __init__(self, monkeypatch, at=None):
        self.calls, self.at = 0, at
        original = WanPipeline.predict_noise

        def predict_noise(pipe, *args, **kwargs):
            self.calls += 1
            if self.at is not None:
                self.at(self.calls)
            return original(pipe, *args, **kwargs)

        monkeypatch.setattr(WanPipeline, "predict_noise", predict_noise)


# --- issue 5: the CLI's output ----------------------------------------------------------------------


def test_mp4_named_from_the_prompt_with_metadata_and_a_progress_bar(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompt = "../A fox; runs/through snow?"
    code, out, err = generate(capsys, "generate", "--size", "64x48", "--frames", "9", "--steps", "2",
                              "--seed", "7", "--prompt", prompt)  # fmt: skip
    assert code == 0
    video = tmp_path / "A_fox_runs_through_snow_7.mp4"  # sanitised: no folders, no punctuation
    assert files_in(tmp_path) == ["A_fox_runs_through_snow_7.json", video.name]
    frames = read_video(video)
    assert frames.shape == (9, 48, 64, 3) and frames.dtype == np.uint8
    comment = read_mp4_comment(video)
    sidecar = json.loads((tmp_path / "A_fox_runs_through_snow_7.json").read_text())
    for meta in (comment, sidecar):
        assert meta["prompt"] == prompt and meta["seed"] == 7
        assert meta["size"] == "64x48" and meta["frames"] == 9 and meta["steps"] == 2
        assert meta["guidance"] == SAMPLING.guidance_scale and meta["shift"] == SAMPLING.shift
        assert meta["negative_prompt"] == SAMPLING.negative_prompt  # the built-in model's defaults
        assert meta["plan"]["device"] == "cpu" and meta["plan"]["compute_dtype"] == "float32"
    assert f"wrote {video.name}" in out
    assert "denoising" in err and "2/2" in err and "step/s" in err  # tqdm, on stderr
    assert "encoding prompts" in err and "decoding" in err
    # One line before the work: the plan's gist and a time estimate that says what it rests on.
    plan_line = next(line for line in err.splitlines() if line.startswith("wanfit: Wan2.1"))
    assert "64x48, 9 frames, guidance on, 2 steps on cpu (float32, attention " in plan_line
    assert "this CPU's matmul speed, timed just now; a rough guess)" in plan_line
    # Files get the usual permissions, not a temporary's private 0600.
    umask = os.umask(0)
    os.umask(umask)
    assert video.stat().st_mode & 0o777 == 0o666 & ~umask


def test_same_seed_same_frames_other_seed_other_frames(capsys, tmp_path, reference):
    code, _, err = generate(capsys, *RUN, "--out", str(tmp_path / "same"), "--no-progress")
    assert code == 0 and "denoising" not in err  # --no-progress: no bar
    assert np.array_equal(read_video(tmp_path / "same"), reference)
    other = [a if a != "3" else "4" for a in RUN]
    assert generate(capsys, *other, "--out", str(tmp_path / "other"), "--no-progress")[0] == 0
    moved = np.abs(read_video(tmp_path / "other").astype(int) - reference).mean()
    assert moved > 1.0


# --- issue 7 §1: bad input: one sentence, exit 2, nothing written -------------------------------------


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--size", "50x48"], "multiples of 16, got 50x48"),
        (["--size", "64by48"], "--size must look like WIDTHxHEIGHT"),
        (["--size", "64x48x2"], "--size must look like WIDTHxHEIGHT"),
        (["--frames", "6"], "frame count must be 4k+1"),
        (["--steps", "0"], "number of steps must be at least 1, got 0"),
        (["--guidance", "-1"], "guidance scale must not be negative"),
        (["--guidance", "nan"], "--guidance must be a finite number"),
        (["--shift", "0"], "flow shift must be positive"),
        (["--seed", "-1"], "The seed must be a whole number from 0 to 2**63-1, got -1"),
        (["--checkpoint-every", "-2"], "--checkpoint-every must be 0"),
        (["--attention", "flashy"], "Unknown attention backend 'flashy'"),
        (["--attention", "flash_attn2"], "attention backend flash_attn2 was asked for but"),
        (["--emulate", "k80"], "Unknown card to emulate 'k80'"),
        (["--emulate", "t4"], "describes a Tesla T4, which this machine does not have"),
        (["--device", "cuda"], "this machine has no usable CUDA device"),
        (["--device", "tpu9"], "Unknown --device 'tpu9'"),
        (["--dtype", "int3"], "Unknown dtype 'int3'"),
    ],
)
def test_bad_settings_are_one_sentence_and_exit_2(capsys, tmp_path, monkeypatch, flags, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, on any host
    out = tmp_path / "out" / "v.mp4"
    code, stdout, err = generate(capsys, *RUN, "--out", str(out), *flags)
    assert code == 2
    assert expected in one_error_line(err)
    assert stdout == "" and files_in(tmp_path) == []  # not even the output folder


def test_unwritable_or_existing_outputs_are_refused_before_any_work(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    existing = tmp_path / "done.mp4"
    existing.write_bytes(b"an earlier video")
    folder = tmp_path / "folder.mp4"
    folder.mkdir()
    cases = [
        (["--out", str(blocker / "sub" / "v.mp4")], f"Cannot create the output folder {blocker / 'sub'}"),
        (["--out", str(existing)], "done.mp4 already exists; pass --overwrite to replace it"),
        (
            ["--out", str(folder), "--overwrite"],
            "folder.mp4 is a folder, but the output would be an mp4 file",
        ),
    ]
    before = files_in(tmp_path)
    for flags, expected in cases:
        code, stdout, err = generate(capsys, *RUN, *flags)
        assert code == 2 and expected in one_error_line(err) and stdout == ""
    assert files_in(tmp_path) == before and existing.read_bytes() == b"an earlier video"


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*RUN, "--frames", "five"])
    assert exit_info.value.code == 2
    assert "argument --frames: invalid int value: 'five'" in capsys.readouterr().err


def test_an_empty_prompt_runs_with_a_warning(capsys, tmp_path):
    code, _, err = generate(capsys, *RUN, "--prompt", "  ", "--out", str(tmp_path / "v"), "--no-progress")
    assert code == 0 and (tmp_path / "v" / "frame_0004.png").is_file()
    assert "wanfit: warning: the prompt is empty" in err


def test_emulate_cpu_and_a_forced_backend_run_and_are_recorded(capsys, tmp_path):
    out = tmp_path / "v"
    code, _, _ = generate(capsys, *RUN, "--emulate", "cpu", "--attention", "chunked", "--out", str(out),
                          "--no-progress")  # fmt: skip
    assert code == 0
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["emulated"] == "cpu" and meta["plan"]["attention"] == "chunked"
    assert "attention" in meta["user_set"]
    # The pipeline's own dispatchers ran the forced backend for every kind, and nothing else.
    for phase, kinds in (("denoise", ("self", "cross")), ("vae_decode", ("vae",))):
        for kind in kinds:
            record = meta["attention"][phase][kind]
            assert record["planned"] == "chunked" and set(record["served"]) == {"chunked"}
            assert record["served"]["chunked"] > 0 and record["switches"] == []


# --- issue 7 §3: a crash while writing leaves no finished-looking file ----------------------------------


def failing_mp4_writer(monkeypatch, error: BaseException, after_frames: int = 2):
    """imageio-ffmpeg's writer, failing with `error` once `after_frames` frames went to ffmpeg."""
    import imageio_ffmpeg

    real = imageio_ffmpeg.write_frames

    def write_frames(path, *args, **kwargs):
        inner = real(path, *args, **kwargs)
        frame = yield inner.send(None)
        try:
            for _ in range(after_frames):
                inner.send(frame)
                frame = yield
            raise error
        finally:
            inner.close()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", write_frames)


def failing_png_writer(monkeypatch, error: BaseException, after_frames: int = 2):
    import imageio.v2 as imageio

    real, written = imageio.imwrite, []

    def imwrite(path, frame, *args, **kwargs):
        if len(written) == after_frames:
            raise error
        written.append(path)
        return real(path, frame, *args, **kwargs)

    monkeypatch.setattr(imageio, "imwrite", imwrite)


def test_disk_full_while_writing_the_mp4_leaves_nothing(capsys, tmp_path, monkeypatch):
    failing_mp4_writer(monkeypatch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    code, stdout, err = generate(capsys, *RUN, "--out", str(tmp_path / "v.mp4"), "--no-progress")
    assert code == 2
    assert f"Could not write {tmp_path / 'v.mp4'}: No space left on device" in one_error_line(err)
    assert files_in(tmp_path) == [] and "wrote" not in stdout  # no video, no sidecar, no temporary


def test_ctrl_c_while_writing_the_mp4_leaves_nothing(capsys, tmp_path, monkeypatch):
    failing_mp4_writer(monkeypatch, KeyboardInterrupt())
    code, _, err = generate(capsys, *RUN, "--out", str(tmp_path / "v.mp4"), "--no-progress")
    assert code == 130
    assert err.strip() == (
        "wanfit: interrupted while decoding or writing; nothing was saved "
        "(--checkpoint-every N keeps a resume file)."
    )
    assert files_in(tmp_path) == []


def test_a_failed_write_keeps_the_denoised_latents_for_resume(capsys, tmp_path, monkeypatch, reference):
    out = tmp_path / "frames"
    with monkeypatch.context() as patch:
        failing_png_writer(patch, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        code, _, err = generate(capsys, *RUN, "--out", str(out), "--checkpoint-every", "3", "--no-progress")
    assert code == 2 and "No space left on device; progress is saved" in one_error_line(err)
    assert files_in(tmp_path) == ["frames.ckpt"]  # the half-written PNG folder is gone
    dit = CountingDiT(monkeypatch)
    assert generate(capsys, "generate", "--resume", str(tmp_path / "frames.ckpt"), "--no-progress")[0] == 0
    assert dit.calls == 0  # every step was saved: only the decode and the write ran again
    assert np.array_equal(read_video(out), reference)
    assert files_in(tmp_path) == [
        "frames",
        "frames.json",
        "frames/.wanfit",  # the marker: a folder --overwrite may replace
        *sorted(f"frames/frame_{i:04d}.png" for i in range(5)),
    ]


# --- issue 7 §4: Ctrl-C between steps, --checkpoint-every, --resume -------------------------------------


def test_ctrl_c_without_checkpoints_stops_cleanly(capsys, tmp_path, monkeypatch):
    def interrupt(n):
        if n == 3:
            raise KeyboardInterrupt

    CountingDiT(monkeypatch, at=interrupt)
    code, stdout, err = generate(capsys, *RUN, "--out", str(tmp_path / "v.mp4"), "--no-progress")
    assert code == 130
    assert err.strip() == (
        "wanfit: interrupted after step 2 of 4; nothing was saved (--checkpoint-every N keeps a resume file)."
    )
    assert files_in(tmp_path) == [] and stdout == ""


def test_ctrl_c_keeps_the_checkpoint_and_resume_gives_the_uninterrupted_frames(
    capsys, tmp_path, monkeypatch, reference
):
    out, ckpt = tmp_path / "frames", tmp_path / "frames.ckpt"
    snapshot = tmp_path / "saved" / "periodic.ckpt"

    def interrupt(n):
        if n == 4:  # steps 1-3 are done; the resume file holds step 2 (every 2 steps)
            snapshot.parent.mkdir()
            shutil.copy(ckpt, snapshot)  # what a hard kill (no handler) would leave behind
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        CountingDiT(patch, at=interrupt)
        code, stdout, err = generate(
            capsys, *RUN, "--out", str(out), "--checkpoint-every", "2", "--no-progress"
        )
    assert code == 130 and stdout == ""
    assert err.strip() == (
        f"wanfit: interrupted after step 3 of 4; progress is saved: continue with `wanfit generate --resume {ckpt}`."
    )
    assert not out.exists() and files_in(tmp_path) == ["frames.ckpt", "saved", "saved/periodic.ckpt"]
    state, request = checkpointing.load(ckpt)
    assert state.step == 3  # on Ctrl-C the last finished step is saved, not only every N
    assert checkpointing.load(snapshot)[0].step == 2
    assert request["seed"] == 3 and request["size"] == "48x32" and request["frames"] == 5
    assert request["steps"] == STEPS and request["guidance"] == SAMPLING.guidance_scale
    assert request["shift"] == SAMPLING.shift and request["negative_prompt"] == SAMPLING.negative_prompt
    assert request["model"] is None and request["out"] == str(out.resolve())
    assert request["prompt"] == "a red fox"

    dit = CountingDiT(monkeypatch)
    code, _, _ = generate(capsys, "generate", "--resume", str(ckpt), "--no-progress")
    assert code == 0 and dit.calls == 1  # only step 4 ran
    assert np.array_equal(read_video(out), reference)
    assert not ckpt.exists()  # finished: the run's own resume file is gone

    # The periodic save alone (step 2) finishes with the same frames too.
    other = tmp_path / "from_periodic"
    code, _, _ = generate(capsys, "generate", "--resume", str(snapshot), "--out", str(other), "--no-progress")
    assert code == 0 and dit.calls == 3
    assert np.array_equal(read_video(other), reference)
    assert snapshot.exists()  # a resume file elsewhere is the user's: kept


def test_resume_state_moves_every_scheduler_tensor_to_the_run_device(tmp_path):
    latents = torch.randn(1, 16, 2, 4, 6)
    scheduler = {
        "model_outputs": [None, torch.randn(1, 16, 2, 4, 6)],
        "timestep_list": [None, torch.tensor(999)],
        "last_sample": torch.randn(1, 16, 2, 4, 6),
        "lower_order_nums": 1,
        "_step_index": 1,
        "this_order": 1,
    }
    request = dict.fromkeys(checkpointing.REQUEST_KEYS, None) | {"steps": 4}
    checkpointing.save(tmp_path / "r.ckpt", DenoiseState(latents, 1, scheduler), request)
    state, saved = checkpointing.load(tmp_path / "r.ckpt")
    assert saved == request and state.step == 1 and torch.equal(state.latents, latents)
    assert torch.equal(state.scheduler_state["model_outputs"][1], scheduler["model_outputs"][1])
    assert state.scheduler_state["model_outputs"][0] is None and state.scheduler_state["this_order"] == 1
    moved = checkpointing.to_device(state, "meta")  # stands in for a CUDA run's device
    tensors = [
        moved.latents,
        moved.scheduler_state["last_sample"],
        *moved.scheduler_state["model_outputs"][1:],
    ]
    tensors.append(moved.scheduler_state["timestep_list"][1])
    assert all(t.device.type == "meta" for t in tensors)
    assert moved.scheduler_state["lower_order_nums"] == 1


class RunsCode:
    """Unpickling this runs code (writes a marker file): what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_bad_resume_files_are_refused(capsys, tmp_path):
    marker = tmp_path / "code_ran"
    torch.save(
        {"format": checkpointing.FORMAT, "latents": torch.zeros(1), "x": RunsCode(marker)},
        tmp_path / "evil.ckpt",
    )
    (tmp_path / "noise.ckpt").write_bytes(os.urandom(2048))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.ckpt")
    torch.save({"format": checkpointing.FORMAT, "step": 1}, tmp_path / "partial.ckpt")
    cases = {
        "missing.ckpt": "Resume file not found",
        "noise.ckpt": "is not a readable wanfit resume file (truncated or corrupt?)",
        "foreign.ckpt": "is not a wanfit resume file",
        "partial.ckpt": "is an incomplete wanfit resume file",
        "evil.ckpt": "holds code or objects other than tensors (builtins.exec) and was not loaded",
    }
    for name, expected in cases.items():
        code, stdout, err = generate(capsys, "generate", "--resume", str(tmp_path / name))
        assert code == 2 and expected in one_error_line(err) and stdout == ""
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # the payload is live: loading it unsafely runs it
    assert marker.read_text() == "ran"


def test_resume_refuses_changed_settings_another_shape_and_a_clobbered_checkpoint(capsys, tmp_path):
    out = tmp_path / "v"
    state = DenoiseState(torch.randn(1, 16, 2, 4, 6), 2, {"_step_index": 2})
    request = {"prompt": "a fox", "negative_prompt": "", "size": "48x32", "frames": 5, "steps": 4,
               "guidance": 6.0, "shift": 8.0, "seed": 3, "model": None, "out": str(out)}  # fmt: skip
    ckpt = tmp_path / "v.ckpt"
    checkpointing.save(ckpt, state, request)
    code, _, err = generate(capsys, "generate", "--resume", str(ckpt), "--steps", "10")
    assert code == 2 and "continues the saved run, whose steps is 4, not 10" in one_error_line(err)
    code, _, err = generate(capsys, *RUN, "--out", str(out), "--checkpoint-every", "1")
    assert code == 2 and f"{ckpt} holds an unfinished run; continue it with --resume" in one_error_line(err)
    checkpointing.save(ckpt, state, {**request, "size": "64x32"})
    code, _, err = generate(capsys, "generate", "--resume", str(ckpt), "--no-progress")
    assert code == 2 and "holds latents of shape [1, 16, 2, 4, 6], but this model at 64x32" in one_error_line(
        err
    )
    assert files_in(tmp_path) == ["v.ckpt"]


# --- issue 7 §5: an attention kernel that raises mid-run -------------------------------------------------


def test_a_kernel_failing_mid_run_falls_back_and_the_frames_are_unchanged(
    capsys, tmp_path, monkeypatch, reference
):
    math_run = attention_backends.default_registry()["sdpa_math"].run
    served = []

    def flaky(q, k, v, *, scale=None, attn_mask=None):
        if len(served) == 6:  # the smoke test and the first few calls of the run pass
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        served.append(q.shape)
        return math_run(q, k, v, scale=scale, attn_mask=attn_mask)

    registry = attention_backends.default_registry().copy()
    registry.register(
        AttentionBackend(
            "flaky",
            flaky,
            "a kernel that breaks mid-run",
            devices=("cpu",),
            dtypes=(torch.float32,),
            supports_mask=True,
            default_ms=0.0,
        )  # fmt: skip
    )
    monkeypatch.setattr(attention_backends, "_DEFAULT_REGISTRY", registry)
    with pytest.warns(AttentionFallbackWarning, match="flaky failed"):
        code, _, _ = generate(capsys, *RUN, "--out", str(tmp_path / "v"), "--no-progress")
    assert code == 0
    meta = json.loads((tmp_path / "v.json").read_text())
    assert meta["plan"]["self_attention"] == "flaky"  # the planner ranked it first
    self_attention = meta["attention"]["denoise"]["self"]
    # It served part of the run, broke, and the registry's next backend took over: recorded.
    assert self_attention["served"].get("sdpa_math", 0) > 0
    assert [s["planned"] for s in self_attention["switches"]] == ["flaky"]
    assert "failed at run time" in self_attention["switches"][0]["reason"]
    assert len(served) == 6
    assert np.array_equal(read_video(tmp_path / "v"), reference)
