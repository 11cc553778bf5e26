"""The built-in model's training code (training/): its data, its detector, and the conventions it shares
with the sampler, so that what is trained is what the pipeline runs (issue 16)."""

import json
import random

import numpy as np
import pytest
import torch

from training import checkpoint
from training.data import sample_batch
from training.export import fold_latent_stats
from training.train import build_models, encode_captions, flow_matching_loss, shifted_sigmas
from wanfit.builtin import BUILTIN_DIT, BUILTIN_TEXT, BUILTIN_VAE
from wanfit.builtin.language import COLOURS, DIRECTIONS, SHAPES, Scene, all_scenes, paraphrase, prompt
from wanfit.pipeline import frames_to_uint8
from wanfit.quality import detect


def as_frames(video: torch.Tensor) -> list[np.ndarray]:
    return [frames_to_uint8(v[None]) for v in video]


def test_clips_are_a_function_of_seed_and_step():
    a, captions_a, scenes_a = sample_batch(3, 7, 4, 64, 64, 9)
    b, captions_b, scenes_b = sample_batch(3, 7, 4, 64, 64, 9)
    c, _, _ = sample_batch(3, 8, 4, 64, 64, 9)
    assert torch.equal(a, b) and captions_a == captions_b and scenes_a == scenes_b
    assert not torch.equal(a, c)
    assert a.shape == (4, 3, 9, 64, 64) and a.min() >= -1 and a.max() <= 1


@pytest.mark.parametrize("size", [(64, 64, 9), (64, 64, 17), (96, 160, 17)])
def test_the_detector_reads_every_rendered_clip(size):
    height, width, frames = size
    video, _, scenes = sample_batch(11, 0, 90, height, width, frames)
    misses = [(s, d) for s, d in zip(scenes, map(detect, as_frames(video))) if not all(d.matches(s).values())]
    assert misses == []


def test_the_detector_finds_nothing_in_a_blank_video():
    found = detect(np.full((9, 64, 64, 3), 128, np.uint8))
    assert (found.colour, found.shape, found.direction) == (None, None, None)
    assert not any(found.matches(Scene("circle", "red", "left")).values())


def test_captions_name_the_scene_and_need_no_cleaning():
    from wanfit.models.text_encoder import clean_prompt

    rng = random.Random(0)
    scene = Scene("circle", "red", "still", "gray")
    assert prompt(scene) == "a red circle standing still on a gray background"
    captions = {paraphrase(s, rng) for s in all_scenes() for _ in range(20)}
    assert len(captions) > 1500  # paraphrases, not one template
    for caption in captions:
        assert clean_prompt(caption) == caption  # training skips the cleaning the encoder does
    assert {s.shape for s in all_scenes()} == set(SHAPES) and len(all_scenes()) == 3 * 5 * 5 * 2
    assert set(DIRECTIONS) == {"left", "right", "up", "down", "still"} and len(COLOURS) == 5


@pytest.fixture(scope="module")
def models():
    return build_models(0, BUILTIN_TEXT["vocab_size"])


def test_training_encodes_captions_as_the_text_encoder_does(models):
    from wanfit.builtin import MODEL_DIR
    from wanfit.models.text_encoder import WanTextEncoder
    from wanfit.weights.file_names import OFFICIAL_TOKENIZER
    from wanfit.weights.text_encoder_loader import _load_tokenizer

    _, _, text = models
    tokenizer, _ = _load_tokenizer(MODEL_DIR / OFFICIAL_TOKENIZER, [])
    captions = ["a red circle moving left on a black background", "", "blue box falling, on grey"]
    trained = encode_captions(text, tokenizer, captions, BUILTIN_DIT.text_len, "cpu")
    encoded = WanTextEncoder(text, tokenizer).encode(captions, max_length=BUILTIN_DIT.text_len)
    torch.testing.assert_close(trained, encoded, rtol=1e-5, atol=1e-5)
    assert trained[1, 1:].abs().max() == 0  # the empty caption: '</s>' and zeros


def test_folding_the_latent_statistics_changes_only_the_latents(models):
    vae = build_models(1, BUILTIN_TEXT["vocab_size"])[0].eval()
    video, _, _ = sample_batch(0, 0, 2, 32, 32, 5)
    with torch.no_grad():
        z = vae.encode(video)
        before = vae.decode(z)
        flat = z.transpose(0, 1).flatten(1)
        mean, std = flat.mean(1), flat.std(1)
        fold_latent_stats(vae, mean, std)
        folded = vae.encode(video)
        standard = (z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
        torch.testing.assert_close(vae.normalize(folded), standard, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vae.decode(folded), before, rtol=1e-4, atol=1e-4)
    assert vae.config == BUILTIN_VAE  # the release's statistics, which the loaders assume


class OracleDiT(torch.nn.Module):
    """Knows the clean latent: returns the exact velocity (x_t - x0) / sigma at t = 1000 sigma."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = x0
        self.config = BUILTIN_DIT

    def forward(self, x, t, context):
        sigma = (t.float() / 1000).clamp_min(1e-4).view(-1, 1, 1, 1, 1)
        return (x.float() - self.x0) / sigma


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_the_training_target_is_what_the_sampler_integrates(scheduler):
    """The oracle of the training target has zero loss, and the pipeline's sampler takes it to x0."""
    from wanfit.pipeline import DenoiseState, WanPipeline
    from wanfit.sampling import schedulers

    x0 = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    oracle = OracleDiT(x0)
    gen = torch.Generator().manual_seed(1)
    assert flow_matching_loss(oracle, x0, None, 3.0, gen) < 1e-8
    sigma = shifted_sigmas(torch.tensor([0.0, 0.5, 1.0]), 3.0)
    torch.testing.assert_close(sigma, torch.tensor([0.0, 0.75, 1.0]))

    pipe = WanPipeline(oracle, None, None)
    sched = schedulers.make_scheduler(scheduler, shift=3.0)
    steps = schedulers.set_timesteps(sched, 8, official=True)
    noise = torch.randn(x0.shape, generator=gen)
    out = pipe.denoise(DenoiseState(noise, 0), sched, steps, torch.zeros(1), None, 1.0, progress=False)
    # Not exact: the official timesteps are int64(1000 sigma), so the oracle's sigma is off by < 1e-3.
    assert (out - x0).norm() / x0.norm() < 1e-2
    assert (noise - x0).norm() / x0.norm() > 1  # the sampler did the work


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
@pytest.mark.parametrize("bug", ["shift (timesteps)", "velocity sign"])
def test_the_oracle_catches_a_broken_sampler_that_the_grid_may_not(bug, scheduler):
    """Absolute, not relative to the default path: with the sampler broken, the oracle of the training
    target no longer lands on x0. This is where a wrong shift shows: the trained model's prompt
    accuracy barely moves under it (docs/builtin_model.md)."""
    from wanfit.pipeline import DenoiseState, WanPipeline
    from wanfit.quality import broken_samplers
    from wanfit.sampling import schedulers

    x0 = torch.randn(2, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    pipe = WanPipeline(OracleDiT(x0), None, None)
    broken_samplers(3.0)[bug].patch(pipe)
    sched = schedulers.make_scheduler(scheduler, shift=3.0)
    steps = schedulers.set_timesteps(sched, 8, official=True)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    out = pipe.denoise(DenoiseState(noise, 0), sched, steps, torch.zeros(1), None, 1.0, progress=False)
    assert (out - x0).norm() / x0.norm() > 0.1  # ten times the correct sampler's bound


def test_checkpoints_split_into_parts_and_join_back(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "PART_BYTES", 1000)
    state = {"weights": torch.arange(1000.0), "step": 3, "text": "x"}
    parts = checkpoint.save(state, tmp_path / "ckpt")
    assert len(parts) > 3 and all(p.stat().st_size <= 1000 for p in parts)
    loaded = checkpoint.load(tmp_path / "ckpt")
    assert torch.equal(loaded["weights"], state["weights"]) and loaded["step"] == 3
    checkpoint.save({"step": 4}, tmp_path / "ckpt")  # smaller: stale parts go
    assert checkpoint.load(tmp_path / "ckpt") == {"step": 4}
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))])
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    compact = checkpoint.compact_optimizer(opt.state_dict())
    assert compact["state"][0]["exp_avg"].dtype == torch.bfloat16
    opt.load_state_dict(checkpoint.expand_optimizer(compact))
    assert opt.state_dict()["state"][0]["exp_avg_sq"].dtype == torch.float32


def smoke_args(tmp_path, name: str, *more: str) -> list[str]:
    from wanfit.builtin import MODEL_DIR
    from wanfit.weights.file_names import OFFICIAL_TOKENIZER

    return ["--tokenizer", str(MODEL_DIR / OFFICIAL_TOKENIZER), "--out", str(tmp_path / name), "--smoke",
            "--device", "cpu", "--vae-batch", "1", "--dit-batch", "2", "--log-every", "1", "--vae-image-steps", "0",
            "--decoder-steps", "0", *more]  # fmt: skip


def test_one_seed_gives_one_run(tmp_path):
    from training import train

    runs = [train.Run(train.parse_args(smoke_args(tmp_path, n, "--vae-steps", "2"))) for n in "ab"]
    other = train.Run(train.parse_args(smoke_args(tmp_path, "c", "--vae-steps", "2", "--seed", "1")))
    for run in (*runs, other):
        run._train_phase()
    a, b, c = (run.vae.state_dict() for run in (*runs, other))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_a_finished_run_given_more_steps_continues(tmp_path, monkeypatch):
    """The DiT from where it stopped, then the decoder alone (the encoder, so the DiT's latents, unchanged)."""
    from training import train

    monkeypatch.setattr(train, "STATS_BATCHES", 1)
    monkeypatch.setattr(train, "CHECK_CLIPS", 2)
    train.main(smoke_args(tmp_path, "a", "--vae-steps", "2", "--dit-steps", "2"))
    a = checkpoint.load(tmp_path / "a" / "checkpoint")
    assert a["phase"] == "done" and a["steps"] == {"vae": 2, "dit": 2, "decoder": 0}
    more = ["--dit-steps", "3", "--decoder-steps", "1", "--log-every", "1"]
    train.main(["--resume", str(tmp_path / "a" / "checkpoint"), "--out", str(tmp_path / "a"), *more])
    c = checkpoint.load(tmp_path / "a" / "checkpoint")
    assert c["phase"] == "done" and c["steps"] == {"vae": 2, "dit": 3, "decoder": 1}
    changed = {n for n in a["vae"] if not torch.equal(a["vae"][n], c["vae"][n])}
    assert changed and all(n.startswith(("decoder.", "conv2.")) for n in changed)
    assert any(not torch.equal(c["dit"][n], a["dit"][n]) for n in a["dit"])
    phases = [json.loads(line)["phase"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert phases == sorted(phases, key=["vae", "dit", "decoder"].index) and "decoder" in phases


def test_a_run_past_its_decoder_phase_given_more_dit_steps_trains_the_dit_again(tmp_path, monkeypatch):
    """How the shipped model was extended: DiT, decoder, then more DiT steps (the decoder's stay)."""
    from training import train

    monkeypatch.setattr(train, "STATS_BATCHES", 1)
    monkeypatch.setattr(train, "CHECK_CLIPS", 2)
    # 41 decoder steps: the 40th used to look the decoder phase up among the auto-sized ones.
    train.main(smoke_args(tmp_path, "a", "--vae-steps", "2", "--dit-steps", "2", "--decoder-steps", "41"))
    a = checkpoint.load(tmp_path / "a" / "checkpoint")
    assert a["phase"] == "done" and a["steps"] == {"vae": 2, "dit": 2, "decoder": 41}
    train.main(["--resume", str(tmp_path / "a" / "checkpoint"), "--out", str(tmp_path / "a"), "--dit-steps", "3"])
    c = checkpoint.load(tmp_path / "a" / "checkpoint")
    assert c["phase"] == "done" and c["steps"] == {"vae": 2, "dit": 3, "decoder": 41}
    assert all(torch.equal(a["vae"][n], c["vae"][n]) for n in a["vae"])
    assert any(not torch.equal(c["dit"][n], a["dit"][n]) for n in a["dit"])
