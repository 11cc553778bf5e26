"""Train the built-in model: the VAE first (reconstruction), then the DiT and the text encoder together
(flow matching with Wan's shifted timesteps; captions dropped for classifier-free guidance).

    python -m training.tokenizer runs/tok                      # once, on any machine
    python -m training.train --tokenizer runs/tok --out runs/builtin --device cuda --budget 400
    python -m training.train --resume runs/builtin/checkpoint --out runs/builtin2 --dit-steps 20000
    python -m training.export runs/builtin/checkpoint src/wanfit/builtin/model

Everything is drawn from --seed and the step number (data, noise, caption dropout), so a run is
reproducible on one device and a resumed run sees the data the uninterrupted one would have.
`--vae-steps auto` / `--dit-steps auto` size a phase to its share of --budget seconds after timing
its first steps (the number chosen is logged). Logs: OUT/log.jsonl; checkpoint: OUT/checkpoint.NNN.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from training import checkpoint as ckpt
from training.data import batch_rng, render, sample_batch, sample_scenes
from wanfit.builtin import BUILTIN_DIT, BUILTIN_TEXT, BUILTIN_VAE
from wanfit.builtin.language import Scene, paraphrase
from wanfit.models.dit import WanDiT
from wanfit.models.vae import CausalConv3d, Resample, WanVAE

# (height, width, frames), share of the steps, batch as a fraction of --*-batch.
VAE_BUCKETS = (((64, 64, 9), 1.0, 1.0),)
DIT_BUCKETS = (((64, 64, 9), 0.6, 1.0), ((64, 64, 17), 0.4, 1.0))
# The VAE, then the DiT with the text encoder, then (--decoder-steps) the VAE's decoder alone: the
# encoder, and so the latents the DiT learned, stay as they are while the pictures get sharper.
PHASES = ("vae", "dit", "decoder", "done")
# Shares of --budget: the VAE phase, then the DiT phase; the rest is left for the final sample grid.
BUDGET_SHARES = {"vae": 0.2, "dit": 0.7}


@dataclass
class Hyper:
    """Training hyper-parameters (stored in the checkpoint; a resumed run keeps them)."""

    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 3e-5
    dit_steps: int = 5000
    dit_batch: int = 256
    dit_lr: float = 3e-4
    warmup: int = 200
    train_shift: float = 3.0  # sigma = s*u / (1 + (s-1)*u), u uniform: Wan's shifted timesteps
    caption_dropout: float = 0.1
    ema: float = 0.999
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    vae_buckets: tuple = VAE_BUCKETS
    dit_buckets: tuple = DIT_BUCKETS
    vae_crop: int | None = None  # train the VAE on square crops of this size (a quarter of the work at 32)
    vae_image_steps: int = 1500  # the VAE's first steps train on single frames (see init_vae)
    vae_image_batch: int = 16
    decoder_steps: int = 600
    decoder_lr: float = 3e-4


INITIAL_LOGVAR = -6.0

# After the VAE phase: batches of 16 clips its latent statistics are measured on; clips the detector checks.
STATS_BATCHES = 8
CHECK_CLIPS = 32
# --smoke: one small clip shape for both phases (a CPU checks the whole run in seconds).
SMOKE_BUCKETS = (((32, 32, 5), 1.0, 1.0),)


# -- the models --------------------------------------------------------------------------------


def build_models(seed: int, vocab_size: int):
    """Fresh VAE, DiT and umT5 encoder (real wanfit / transformers classes, the built-in configs)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    vae = WanVAE(BUILTIN_VAE)
    init_vae(vae)
    dit = WanDiT(BUILTIN_DIT)
    init_dit(dit)
    text = UMT5EncoderModel(UMT5Config(**{**BUILTIN_TEXT, "vocab_size": vocab_size}))
    return vae, dit, text


@torch.no_grad()
def init_vae(vae: WanVAE) -> None:
    """Start as an image autoencoder run frame by frame, with little sampling noise.

    Every causal convolution sees only its current frame (its past taps are zero); the encoder's
    temporal downsampling averages the frames it merges, the decoder's upsampling repeats each
    frame. Single frames (--vae-image-steps) then train everything spatial cheaply, and clips
    teach the temporal taps after (as video VAEs are grown from image ones). The log-variance
    starts at -6 (std 0.05): at unit variance the noise drowns the colours.
    """
    time_convs = set()
    for module in vae.modules():
        if isinstance(module, Resample) and hasattr(module, "time_conv"):
            conv = module.time_conv
            time_convs.add(conv)
            conv.weight.zero_()
            conv.bias.zero_()
            eye = torch.eye(conv.weight.shape[1])
            if module.mode == "upsample3d":  # 2c output channels: the two frames each input becomes
                conv.weight[: eye.shape[0], :, -1, 0, 0] = eye
                conv.weight[eye.shape[0] :, :, -1, 0, 0] = eye
            else:
                conv.weight[:, :, :, 0, 0] = eye[:, :, None] / conv.weight.shape[2]
    for module in vae.modules():
        if isinstance(module, CausalConv3d) and module not in time_convs and module.kernel_size[0] > 1:
            module.weight[:, :, :-1] = 0
    z_dim = vae.config.z_dim
    vae.conv1.weight[z_dim:].zero_()
    vae.conv1.bias[z_dim:].fill_(INITIAL_LOGVAR)


def init_dit(dit: WanDiT) -> None:
    """The official model's initialisation: Xavier linears, small embeddings, a zero head (outputs 0)."""
    for module in dit.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            torch.nn.init.zeros_(module.bias)
    torch.nn.init.xavier_uniform_(dit.patch_embedding.weight.flatten(1))
    for embedding in (dit.text_embedding, dit.time_embedding):
        for module in embedding.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=0.02)
    torch.nn.init.zeros_(dit.head.head.weight)


def vae_forward(vae: WanVAE, video: torch.Tensor, noise: torch.Generator | None):
    """(reconstruction, mean, log-variance) through WanVAE's own streaming modules, with gradients.

    The same chunks as WanVAE.encode (first frame alone, then 4 at a time) and the same one-frame
    steps as WanVAE.decode, so what is trained is exactly what runs.
    """
    cache: dict = {}
    z_dim, stride = vae.config.z_dim, vae.config.temporal_stride
    moments = []
    for t in range(vae.config.latent_frames(video.shape[2])):
        first, stop = (0, 1) if t == 0 else (1 + stride * (t - 1), 1 + stride * t)
        moments.append(vae.conv1(vae.encoder(video[:, :, first:stop], cache)))
    mean, logvar = torch.cat(moments, dim=2).split(z_dim, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    z = mean if noise is None else mean + (0.5 * logvar).exp() * _randn(mean, noise)
    cache, frames = {}, []
    tile = vae.plan_tiles(tuple(z.shape[3:]), None)[0]
    for t in range(z.shape[2]):
        stem = vae.decoder.stem(vae.conv2(z[:, :, t : t + 1]), cache)
        vae.decoder.tail(stem, cache, tile, frames.append)
    return torch.cat(frames, dim=2), mean, logvar


def encode_captions(text_model, tokenizer, captions: list[str], text_len: int, device) -> torch.Tensor:
    """Context [B, text_len, dim] with gradients: what WanTextEncoder.encode computes (a test checks)."""
    batch = tokenizer(
        captions, padding="max_length", max_length=text_len, truncation=True, return_tensors="pt"
    )
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    hidden = text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden * mask.unsqueeze(-1).to(hidden.dtype)  # rows past each caption are zero


def shape_crops(video: torch.Tensor, layouts, size: int, rng: random.Random) -> torch.Tensor:
    """A size x size crop of each clip around its shape's path (jittered by up to a quarter of the crop).

    The VAE is convolutional: a crop teaches the same edges and colours as the whole frame for a
    quarter of the work at 32 of 64, and centring it on the shape keeps the batch from being mostly
    background (which the VAE learns first and the shapes only much later).
    """
    height, width, frames = video.shape[3], video.shape[4], video.shape[2]
    crops = []
    for clip, (_, x0, y0, vx, vy) in zip(video, layouts):
        jitter = size // 4
        cx = x0 + vx * (frames - 1) / 2 + rng.randint(-jitter, jitter)
        cy = y0 + vy * (frames - 1) / 2 + rng.randint(-jitter, jitter)
        left = min(max(round(cx - size / 2), 0), width - size)
        top = min(max(round(cy - size / 2), 0), height - size)
        crops.append(clip[..., top : top + size, left : left + size])
    return torch.stack(crops)


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift, the one the sampler applies to its sigmas."""
    return shift * u / (1 + (shift - 1) * u)


def flow_matching_loss(dit, x0, context, shift: float, gen: torch.Generator) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise; the DiT predicts the velocity noise - x0 at t = 1000 sigma."""
    b = x0.shape[0]
    sigma = shifted_sigmas(torch.rand(b, generator=gen, device=gen.device), shift).to(x0.device)
    noise = _randn(x0, gen)
    s = sigma.view(b, 1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    velocity = dit(x_t, sigma * 1000, context)
    return F.mse_loss(velocity, noise - x0)


def _randn(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=gen, device=gen.device, dtype=torch.float32).to(like)


def step_generator(seed: int, step: int, device) -> torch.Generator:
    generator = torch.Generator(device=torch.device(device))
    return generator.manual_seed(seed * 1_000_003 + step)


def bucket(seed: int, step: int, buckets, batch: int) -> tuple[int, tuple[int, int, int], int]:
    """(index, clip shape, batch size) of one step's bucket."""
    rng = batch_rng(seed, step, "bucket")
    index = rng.choices(range(len(buckets)), weights=[b[1] for b in buckets])[0]
    shape, _, scale = buckets[index]
    return index, shape, max(1, round(batch * scale))


def learning_rate(step: int, steps: int, base: float, warmup: int) -> float:
    """Linear warm-up, constant, then a linear decay to a tenth over the last fifth of the steps."""
    decay_start = 0.8 * steps
    decay = 1.0 if step < decay_start else 1.0 - 0.9 * (step - decay_start) / max(steps - decay_start, 1)
    return base * min(1.0, (step + 1) / warmup) * decay


class EMA:
    """Exponential moving average of parameters (decay ramps up over the first steps)."""

    def __init__(self, params: list[torch.Tensor], decay: float, state: list[torch.Tensor] | None = None):
        self.params, self.decay = params, decay
        self.shadow = (
            [p.detach().clone() for p in params] if state is None else [s.to(params[0]) for s in state]
        )

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)


class LatentCache:
    """Clips encoded once for the DiT phase, `per_bucket` of each clip shape (--latent-cache).

    On a CPU the VAE encode costs several times the DiT step; a cache of a few thousand clips
    (each seen with fresh noise, timestep and caption every time) makes the phase affordable. The
    clips come from (seed, 'cache', i), so a resumed run rebuilds the same cache (or reads `path`).
    """

    def __init__(self, vae: WanVAE, seed: int, buckets, per_bucket: int, device, path: Path | None = None):
        if path is not None and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["per_bucket"] == per_bucket and saved["buckets"] == [list(b[0]) for b in buckets]:
                self.latents = saved["latents"]
                self.scenes = [[Scene(*s) for s in bucket] for bucket in saved["scenes"]]
                return
        self.latents, self.scenes = [], []
        chunk = 32
        for index, (shape, _, _) in enumerate(buckets):
            latents, scenes = [], []
            for start in range(0, per_bucket, chunk):
                rng = batch_rng(seed, index * 1_000_000 + start, "cache")
                batch_scenes, layouts = sample_scenes(rng, min(chunk, per_bucket - start), *shape)
                video = render(batch_scenes, layouts, *shape, device=device)
                with torch.no_grad():
                    latents.append(vae.normalize(vae.encode(video)).to("cpu", torch.float16))
                scenes += batch_scenes
            self.latents.append(torch.cat(latents))
            self.scenes.append(scenes)
            print(f"latent cache: {per_bucket} clips of {shape[1]}x{shape[0]}x{shape[2]}", flush=True)
        if path is not None:
            torch.save({"per_bucket": per_bucket, "buckets": [list(b[0]) for b in buckets],
                        "latents": self.latents, "scenes": [[astuple(s) for s in b] for b in self.scenes]},
                       path)  # fmt: skip

    def sample(
        self, bucket_index: int, rng: random.Random, batch: int, device
    ) -> tuple[torch.Tensor, list[Scene]]:
        picks = [rng.randrange(len(self.scenes[bucket_index])) for _ in range(batch)]
        x0 = self.latents[bucket_index][picks].to(device=device, dtype=torch.float32)
        return x0, [self.scenes[bucket_index][i] for i in picks]


# -- the run -----------------------------------------------------------------------------------


class Run:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(args.device)
        self.started = self.last_save = time.perf_counter()
        self.log_file = (self.out / "log.jsonl").open("a")
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # a few clip shapes, each seen thousands of times
        from transformers import AutoTokenizer

        if args.resume:
            state = ckpt.load(args.resume)
            self.hyper = Hyper(**{k: _tuples(v) for k, v in state["hyper"].items()})
            self.tokenizer_files = state["tokenizer_files"]
        else:
            state = None
            self.hyper = Hyper(seed=args.seed)
            if args.smoke:
                self.hyper.vae_buckets = self.hyper.dit_buckets = SMOKE_BUCKETS
            folder = Path(args.tokenizer)
            self.tokenizer_files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
        for name in ("vae_steps", "dit_steps", "vae_batch", "dit_batch", "dit_lr", "vae_crop", "vae_image_steps",
                     "decoder_steps"):  # fmt: skip
            value = getattr(args, name)
            if value is not None and value != "auto":
                setattr(self.hyper, name, float(value) if name == "dit_lr" else int(value))
        self.auto = {phase: getattr(args, f"{phase}_steps") == "auto" for phase in ("vae", "dit")}
        with tempfile.TemporaryDirectory() as tok_dir:  # not in OUT: what a lent GPU hands back is counted
            for name, data in self.tokenizer_files.items():
                (Path(tok_dir) / name).write_bytes(data)
            self.tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)

        vae, dit, text = build_models(self.hyper.seed, len(self.tokenizer))
        self.vae, self.dit, self.text = vae.to(self.device), dit.to(self.device), text.to(self.device)
        self.phase, self.step = "vae", 0
        self.steps_done = {"vae": 0, "dit": 0, "decoder": 0}
        self.ema: EMA | None = None
        self.optimizer, self.optimizer_phase = None, None
        self.cache: LatentCache | None = None
        if state is not None:
            self.phase, self.steps_done = self._resumed_phase(state)
            self.step = self.steps_done.get(self.phase, 0)
            legacy = "dit" if state["phase"] == "done" else state["phase"]  # before decoder phases
            if state.get("optimizer_phase", legacy) != self.phase:
                state = {**state, "optimizer": None}  # a later phase: its own optimizer
            self.vae.load_state_dict(state["vae"])
            self.dit.load_state_dict(state["dit"])
            self.text.load_state_dict(state["text"])
        self._start_phase(state)

    # -- phases --

    def _resumed_phase(self, state: dict) -> tuple[str, dict]:
        """Where a checkpoint continues: its phase, or the next one that was given (more) steps."""
        steps = dict(state.get("steps") or {})
        if not steps:  # written before phases kept their own counts
            steps = {"vae": state["step"]} if state["phase"] == "vae" else {"vae": self.hyper.vae_steps,
                                                                            "dit": state["step"]}  # fmt: skip
        steps = {"vae": 0, "dit": 0, "decoder": 0, **steps}
        phase = state["phase"]
        if phase in ("decoder", "done") and steps["dit"] < self.hyper.dit_steps:
            phase = "dit"  # a run past its DiT phase given more DiT steps (the decoder's do not affect it)
        elif phase in ("dit", "done") and steps["dit"] >= self.hyper.dit_steps:
            phase = "decoder" if steps["decoder"] < self.hyper.decoder_steps else "done"
        return phase, steps

    def _trainable(self) -> list[torch.nn.Parameter]:
        if self.phase == "vae":
            return list(self.vae.parameters())
        if self.phase == "decoder":
            return list(self.vae.decoder.parameters()) + list(self.vae.conv2.parameters())
        return list(self.dit.parameters()) + list(self.text.parameters())

    def _start_phase(self, state: dict | None = None) -> None:
        if self.phase == "done":
            return
        for model in (self.vae, self.dit, self.text):
            model.requires_grad_(False).eval()
        params = self._trainable()
        for p in params:
            p.requires_grad_(True)
        lr = {"vae": self.hyper.vae_lr, "dit": self.hyper.dit_lr, "decoder": self.hyper.decoder_lr}[
            self.phase
        ]
        self.optimizer_phase = self.phase
        self.optimizer = torch.optim.AdamW(
            params,
            lr=lr,
            weight_decay=self.hyper.weight_decay,
            betas=(0.9, 0.99),
            fused=self.device.type == "cuda",
        )
        if state is not None and state.get("ema") is not None or self.phase == "dit" and self.ema is None:
            dit_params = list(self.dit.parameters()) + list(self.text.parameters())
            self.ema = EMA(dit_params, self.hyper.ema, state.get("ema") if state else None)
        if self.phase == "dit":
            (self.dit.train(), self.text.train())
            if self.args.latent_cache:
                self.cache = LatentCache(self.vae, self.hyper.seed, self.hyper.dit_buckets, self.args.latent_cache,
                                         self.device, self.out / "latent_cache.pt")  # fmt: skip
        else:
            self.vae.train()
        if state is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(ckpt.expand_optimizer(state["optimizer"]))
        self.phase_first_step = self.step

    def log(self, **record) -> None:
        record = {"phase": self.phase, "step": self.step, "time": round(time.perf_counter() - self.started, 2),
                  **record}  # fmt: skip
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()

    def save(self) -> None:
        state = {
            "hyper": asdict(self.hyper),
            "phase": self.phase,
            "step": self.step,
            "steps": {**self.steps_done, **({self.phase: self.step} if self.phase != "done" else {})},
            "vae": self.vae.state_dict(),
            "dit": self.dit.state_dict(),
            "text": self.text.state_dict(),
            "ema": None if self.ema is None else self.ema.shadow,
            "optimizer": None
            if self.optimizer is None
            else ckpt.compact_optimizer(self.optimizer.state_dict()),
            "optimizer_phase": self.optimizer_phase,
            "tokenizer_files": self.tokenizer_files,
        }
        ckpt.save(state, self.out / "checkpoint")
        self.last_save = time.perf_counter()

    def out_of_time(self) -> bool:
        return self.args.budget is not None and time.perf_counter() - self.started > self.args.budget

    def run(self) -> None:
        while self.phase != "done":
            finished = self._train_phase()
            if not finished:
                self.save()
                print(f"stopped by --budget in the {self.phase} phase at step {self.step}; "
                      f"continue with --resume {self.out / 'checkpoint'}", flush=True)  # fmt: skip
                return
            self.steps_done[self.phase] = self.step
            if self.phase == "vae":
                self._finish_vae()
                self.phase = "dit"
            elif self.phase == "dit" and self.hyper.decoder_steps > self.steps_done["decoder"]:
                self.phase = "decoder"
            else:
                self.phase = "done"  # the optimizer stays in the checkpoint: more steps can extend the run
            if self.phase != "done":
                self.step = self.steps_done[self.phase]
                self._start_phase()
            self.save()
        print(f"done in {time.perf_counter() - self.started:.0f} s", flush=True)

    def _phase_steps(self) -> int:
        return {
            "vae": self.hyper.vae_steps,
            "dit": self.hyper.dit_steps,
            "decoder": self.hyper.decoder_steps,
        }[self.phase]

    def _size_phase(self) -> None:
        """--*-steps auto: fit the phase into its share of --budget, from the time of the steps so far."""
        if not (self.auto.get(self.phase) and self.args.budget):  # the decoder phase is never auto
            return
        first, started = self.timed_from
        per_step = (time.perf_counter() - started) / (self.step - first)
        shares = list(BUDGET_SHARES.values())
        end = self.args.budget * sum(shares[: list(BUDGET_SHARES).index(self.phase) + 1])
        left = end - (time.perf_counter() - self.started)
        steps = max(self.step + 1, self.step + int(left / per_step))
        setattr(self.hyper, f"{self.phase}_steps", steps)
        self.auto[self.phase] = False
        print(f"{self.phase}: {per_step * 1000:.1f} ms a step, {steps} steps fit the budget", flush=True)
        self.log(event="steps", steps=steps, ms_per_step=round(per_step * 1000, 2))

    def _train_phase(self) -> bool:
        h = self.hyper
        while self.step < self._phase_steps():
            if self.step - self.phase_first_step == 40:
                self._size_phase()
            steps = self._phase_steps()
            base, batch = {"vae": (h.vae_lr, h.vae_batch), "dit": (h.dit_lr, h.dit_batch),
                           "decoder": (h.decoder_lr, h.vae_batch)}[self.phase]  # fmt: skip
            lr = learning_rate(self.step, steps, base, h.warmup)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            metrics = self._dit_step(batch) if self.phase == "dit" else self._vae_step(batch)
            self.step += 1
            if self.step - self.phase_first_step == 10:
                self.timed_from = (self.step, time.perf_counter())  # after warm-up and autotuning
            if self.step % self.args.log_every == 0 or self.step == steps:
                metrics = {k: v.item() for k, v in metrics.items()}  # the only sync with the GPU
                if "l2" in metrics:
                    metrics["psnr"] = 10 * math.log10(4 / max(metrics["l2"], 1e-12))  # range [-1, 1]
                self.log(lr=lr, **metrics)
                shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                print(f"{self.phase} {self.step}/{steps} {shown} lr {lr:.2e} "
                      f"{time.perf_counter() - self.started:.0f}s", flush=True)  # fmt: skip
            if self.out_of_time():
                return False
            if time.perf_counter() - self.last_save > self.args.save_every:
                self.save()
        return True

    def _vae_step(self, batch: int) -> dict:
        h = self.hyper
        _, (height, width, frames), b = bucket(h.seed, self.step, h.vae_buckets, batch)
        images = self.phase == "vae" and self.step < h.vae_image_steps
        if images:
            frames, b = 1, h.vae_image_batch
        rng = batch_rng(h.seed, self.step, "data" if self.phase == "vae" else self.phase)
        scenes, layouts = sample_scenes(rng, b, height, width, frames)
        video = render(scenes, layouts, height, width, frames, self.device)
        if h.vae_crop and not images:
            video = shape_crops(video, layouts, h.vae_crop, rng)
        salt = 0 if self.phase == "vae" else 1 << 40  # the decoder phase draws other noise
        recon, mean, logvar = vae_forward(
            self.vae, video, step_generator(h.seed, self.step + salt, self.device)
        )
        l1 = (recon - video).abs().mean()
        l2 = (recon - video).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        loss = l1 + l2 + h.kl_weight * kl
        self._backward(loss)
        return {"loss": loss, "l1": l1, "l2": l2, "kl": kl}

    def _dit_step(self, batch: int) -> dict:
        h = self.hyper
        index, (height, width, frames), b = bucket(h.seed, self.step, h.dit_buckets, batch)
        if self.cache is not None:
            rng = batch_rng(h.seed, self.step, "cached")
            x0, scenes = self.cache.sample(index, rng, b, self.device)
            captions = [paraphrase(scene, rng) for scene in scenes]
        else:
            video, captions, _ = sample_batch(h.seed, self.step, b, height, width, frames, self.device)
            with torch.no_grad():
                x0 = self.vae.normalize(self.vae.encode(video)).float()
        rng = batch_rng(h.seed, self.step, "dropout")
        captions = ["" if rng.random() < h.caption_dropout else c for c in captions]
        context = encode_captions(self.text, self.tokenizer, captions, BUILTIN_DIT.text_len, self.device)
        loss = flow_matching_loss(
            self.dit, x0, context, h.train_shift, step_generator(h.seed, self.step, self.device)
        )
        self._backward(loss)
        self.ema.update(self.step)
        return {"loss": loss}

    def _backward(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self._trainable(), self.hyper.grad_clip)
        self.optimizer.step()

    @torch.no_grad()
    def _finish_vae(self) -> None:
        """Give the VAE the release's latent statistics (see training.export.fold_latent_stats)."""
        from training.export import fold_latent_stats

        self.vae.eval()
        latents = []
        for i in range(STATS_BATCHES):
            for shape, _, scale in self.hyper.vae_buckets:
                b = max(1, round(16 * scale))
                video, _, _ = sample_batch(self.hyper.seed + 1, i, b, *shape, device=self.device)
                latents.append(self.vae.encode(video).float().transpose(0, 1).flatten(1))
        z = torch.cat(latents, dim=1)
        mean, std = z.mean(dim=1), z.std(dim=1)
        fold_latent_stats(self.vae, mean, std)
        self.log(event="latent_stats", mean=mean.tolist(), std=std.tolist())
        # Reconstructions through the exact decode path, and the detector on them.
        from wanfit.pipeline import frames_to_uint8
        from wanfit.quality import detect

        shape = max(s for s, _, _ in self.hyper.dit_buckets)
        video, _, scenes = sample_batch(self.hyper.seed + 2, 0, CHECK_CLIPS, *shape, device=self.device)
        hits = 0
        for i in range(len(scenes)):
            recon = self.vae.decode(self.vae.encode(video[i : i + 1]))
            hits += all(detect(frames_to_uint8(recon)).matches(scenes[i]).values())
        print(f"vae: the detector reads {hits}/{len(scenes)} reconstructions right", flush=True)
        self.log(event="vae_check", detector_right=hits, of=len(scenes))


def _tuples(value):
    """Lists back to tuples (the checkpoint stores the buckets as nested lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder for the checkpoint and the logs")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder (training.tokenizer); not with --resume")
    p.add_argument("--resume", type=Path, help="a checkpoint (OUT/checkpoint, without the .NNN)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--vae-steps", default=None, help="a number, or auto (needs --budget)")
    p.add_argument("--dit-steps", default=None, help="a number, or auto (needs --budget)")
    p.add_argument("--vae-batch", type=int, default=None)
    p.add_argument("--dit-batch", type=int, default=None)
    p.add_argument("--dit-lr", type=float, default=None, help="e.g. lower, to extend a finished run")
    p.add_argument("--vae-crop", type=int, default=None, help="train the VAE on crops of this size")
    p.add_argument("--vae-image-steps", type=int, default=None, help="first VAE steps on single frames")
    p.add_argument("--decoder-steps", type=int, default=None, help="then fine-tune the VAE decoder alone")
    p.add_argument("--budget", type=float, default=None, help="seconds; save and stop when spent")
    p.add_argument("--save-every", type=float, default=120.0, help="seconds between checkpoints")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument(
        "--sample-grid", action="store_true", help="at the end, generate and score the attribute grid"
    )
    p.add_argument("--smoke", action="store_true", help="tiny clips only: check the whole run on a CPU")
    p.add_argument("--latent-cache", type=int, default=0, metavar="N",
                   help="encode N clips of each shape once for the DiT phase (for CPUs), kept in OUT")  # fmt: skip
    args = p.parse_args(argv)
    if (args.tokenizer is None) == (args.resume is None):
        p.error("give --tokenizer for a new run or --resume for a continued one")
    if "auto" in (args.vae_steps, args.dit_steps) and args.budget is None:
        p.error("auto steps need --budget")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run = Run(args)
    run.run()
    if args.sample_grid and run.phase == "done":
        from training.report import sample_grid

        sample_grid(run.out, device=args.device)


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    sys.exit(main())
