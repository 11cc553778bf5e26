"""Step caches (issue 14) on the built-in tiny model: each policy's decisions against a re-implementation
of its published rule (written here, after the authors' code) on the recorded inputs of a run; skipped
outputs; threshold 0; batched vs sequential CFG; resume; and diffusers' own cache hooks."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from tests.helpers.tiny_dit import make_tiny_diffusers_dit, official_config, official_state_dict, tiny_inputs
from wanfit import checkpointing
from wanfit.demo import tiny_pipeline
from wanfit.errors import CheckpointError, ConfigError
from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B, WAN_TINY, DiTConfig
from wanfit.models.dit import WanDiT
from wanfit.pipeline import DenoiseState, initial_noise, latent_shape
from wanfit.plan.estimates import Request, estimate_denoise
from wanfit.plan.plan import Plan
from wanfit.sampling import schedulers
from wanfit.sampling.step_cache import (
    POLICIES,
    StepCacheState,
    build,
    calibrator,
    canonical_spec,
    held_bytes,
    parse_spec,
)
from wanfit.sampling.step_cache.tables import (
    PUBLISHED_MAG_RATIOS,
    TEACACHE_COEFFICIENTS,
    MagRatios,
    load_ratios,
    nearest_interp,
    save_ratios,
)

STEPS, GUIDANCE = 20, 5.0
HEIGHT, WIDTH, FRAMES = 48, 64, 9
# Thresholds that give the tiny model a mix of skipped and computed steps. Its time embedding moves
# far more per step than the real models' (freq_dim 32), hence the large TeaCache thresholds.
SPECS = {
    "teacache": "teacache:1.5,coefficients=none",
    "teacache-1.3B": "teacache:1000,coefficients=1.3B",
    "teacache-ret": "teacache:1,coefficients=none,ret=true",
    "magcache": "magcache:0.03,K=3,ratios=1.3B,retention=0.25",
    "easycache": "easycache:0.5",
    "firstblock": "firstblock:0.08",
}
# Each policy at threshold 0 (with the options it needs on the tiny model).
ZERO = {
    "teacache": "teacache:0,coefficients=1.3B,ret=true",
    "magcache": "magcache:0,ratios=1.3B",
    "easycache": "easycache:0",
    "firstblock": "firstblock:0",
}
REQUEST = {k: 0 for k in checkpointing.REQUEST_KEYS} | {"steps": STEPS}


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline(device="cpu")
    pipe.embeds = pipe.encode_prompts("a red fox in fresh snow", "", with_negative=True)
    return pipe


def sample(pipe, spec=None, *, cfg_batch=True, state=None, cache=None, on_step=None):
    """Latents after STEPS steps from seed 1 (or from `state`), and the run's step-cache report."""
    pipe.plan = replace(pipe.plan, cache=spec, cfg_batch=cfg_batch)
    scheduler = pipe.make_scheduler(None)
    timesteps = schedulers.set_timesteps(scheduler, STEPS, official=True)
    if state is None:
        state = DenoiseState(initial_noise(latent_shape(1, 16, HEIGHT, WIDTH, FRAMES), 1), 0)
    else:
        schedulers.restore_scheduler_state(scheduler, state.scheduler_state)
    cond, uncond = pipe.embeds
    latents = pipe.denoise(
        state, scheduler, timesteps, cond, uncond, GUIDANCE, progress=False, on_step=on_step, step_cache=cache
    )
    return latents, pipe.step_cache_report


class Recorder:
    """Wraps a StepCache's forward: keeps each stream's inputs, its state before the call, the output."""

    def __init__(self, cache):
        self.calls = []  # (step, stream, x, t, context, tensors before, output), cond before uncond
        forward = cache.forward

        def record(dit, x, t, context, names):
            before = {n: dict(cache.current(n).tensors) for n in names}
            out = forward(dit, x, t, context, names)
            for b, name in enumerate(names):
                rows = slice(b, b + 1)
                self.calls.append(
                    (cache.step, name, x[rows], t[rows], context[rows], before[name], out[rows])
                )
            return out

        cache.forward = record


def recorded_run(pipe, spec, cfg_batch=False):
    """(recorded calls, skipped steps per stream) of a sequential-CFG run of `spec`."""
    cache = build(spec, pipe.dit.config, STEPS)
    recorder = Recorder(cache)
    _, report = sample(pipe, cfg_batch=cfg_batch, cache=cache)
    return recorder.calls, report["skipped"]


def check_mixed(skipped: dict) -> None:
    """The test means something only if the run both skipped and computed steps."""
    assert all(0 < len(steps) < STEPS - 1 for steps in skipped.values()), skipped


# --- the published rules, re-implemented after the authors' code (one DiT call per stream, cond first) ---


def teacache_rule(dit, calls, thresh, coefficients, use_ret_steps):
    """TeaCache4Wan2.1's teacache_forward: a call counter, even = cond, odd = uncond."""
    num_steps = STEPS * 2
    ret_steps, cutoff_steps = (5 * 2, num_steps) if use_ret_steps else (1 * 2, num_steps - 2)
    rescale = np.poly1d(coefficients)
    accumulated, previous, skipped = [0.0, 0.0], [None, None], {"cond": [], "uncond": []}
    for cnt, (step, stream, x, t, context, *_) in enumerate(calls):
        with torch.no_grad():
            inputs = dit.embed(x, t, context)
        modulated = inputs.e if use_ret_steps else inputs.t_emb
        p = cnt % 2
        if cnt < ret_steps or cnt >= cutoff_steps:
            calc, accumulated[p] = True, 0
        else:
            accumulated[p] += rescale(
                ((modulated - previous[p]).abs().mean() / previous[p].abs().mean()).item()
            )
            calc = not accumulated[p] < thresh
            if calc:
                accumulated[p] = 0
        previous[p] = modulated.clone()
        if not calc:
            skipped[stream].append(step)
    return skipped


def interleave(ratios: MagRatios) -> list[float]:
    """magcache_generate.py's layout: [1.0]*2 + cond and uncond ratios interleaved, from step 1."""
    return [1.0, 1.0] + [v for pair in zip(ratios.cond[1:], ratios.uncond[1:]) for v in pair]


def nearest(src: np.ndarray, n: int) -> np.ndarray:
    scale = (len(src) - 1) / (n - 1)
    return src[np.round(np.arange(n) * scale).astype(int)]


def magcache_rule(calls, mag_ratios, thresh, K, retention_ratio):
    """MagCache4Wan2.1's magcache_forward decision (interpolating the ratios as its main() does)."""
    mag_ratios = np.array(mag_ratios)
    if len(mag_ratios) != STEPS * 2:
        cond, uncond = nearest(mag_ratios[0::2], STEPS), nearest(mag_ratios[1::2], STEPS)
        mag_ratios = np.concatenate([cond.reshape(-1, 1), uncond.reshape(-1, 1)], axis=1).reshape(-1)
    num_steps = STEPS * 2
    ratio, err, count = [1.0, 1.0], [0.0, 0.0], [0, 0]
    skipped = {"cond": [], "uncond": []}
    for cnt, (step, stream, *_) in enumerate(calls):
        p = cnt % 2
        if cnt >= int(num_steps * retention_ratio):
            ratio[p] *= mag_ratios[cnt]
            count[p] += 1
            err[p] += np.abs(1 - ratio[p])
            if err[p] < thresh and count[p] <= K:
                skipped[stream].append(step)
            else:
                err[p], count[p], ratio[p] = 0, 0, 1.0
    return skipped


def easycache_rule(dit, calls, thresh, ret=10):
    """EasyCache4Wan2.1's easycache_forward: cond decides for the pair; k from the computed cond steps."""
    num_steps, ret_steps = STEPS * 2, ret * 2
    cutoff_steps = num_steps - 2
    k = prev_in = prev_prev_in = prev_out_even = prev_out_odd = None
    acc, calc = 0.0, True
    skipped = {"cond": [], "uncond": []}
    for cnt, (step, stream, x, t, context, *_) in enumerate(calls):
        raw = x.float()
        even = cnt % 2 == 0
        if even:
            if cnt < ret_steps or cnt >= cutoff_steps:
                calc, acc = True, 0
            elif prev_in is not None and prev_out_even is not None:
                change = (raw - prev_in).abs().mean()
                if k is not None:
                    acc += k * (change / prev_out_even.abs().mean())
                    calc = not acc < thresh
                    if calc:
                        acc = 0
                else:
                    calc = True
            else:
                calc = True
            prev_in = raw.clone()
        if not calc and (prev_out_even if even else prev_out_odd) is not None:
            skipped[stream].append(step)
            continue
        with torch.no_grad():
            out = dit(x, t, context)
        if even:
            if prev_out_even is not None and prev_prev_in is not None:
                k = (out - prev_out_even).abs().mean() / (prev_in - prev_prev_in).abs().mean()
            prev_prev_in, prev_out_even = prev_in, out
        else:
            prev_out_odd = out
    return skipped


def firstblock_rule(dit, calls, threshold):
    """diffusers' FirstBlockCache: block 0's residual vs the last computed step's, per cache context."""
    head_residual, skipped = {}, {"cond": [], "uncond": []}
    for step, stream, x, t, context, *_ in calls:
        with torch.no_grad():
            inputs = dit.embed(x, t, context)
            # A copy: placed blocks write over their input (Plan.residual_in_place).
            residual = dit.blocks[0](inputs.tokens.clone(), inputs.e, inputs.context, inputs.rope) - inputs.tokens
        previous = head_residual.get(stream)
        compute = (
            previous is None
            or ((residual - previous).abs().mean() / previous.abs().mean()).item() > threshold
        )
        if compute:
            head_residual[stream] = residual
        else:
            skipped[stream].append(step)
    return skipped


# --- decisions equal the published rules -------------------------------------------------------------


@pytest.mark.parametrize("case", ["teacache", "teacache-1.3B", "teacache-ret"])
def test_teacache_decides_as_its_published_rule(pipe, case):
    spec = parse_spec(SPECS[case])
    options = dict(spec.options)
    calls, skipped = recorded_run(pipe, SPECS[case])
    check_mixed(skipped)
    ret = options.get("ret", False)
    coefficients = (1.0, 0.0) if options["coefficients"] == "none" else TEACACHE_COEFFICIENTS[("1.3B", ret)]
    assert skipped == teacache_rule(pipe.dit, calls, spec.threshold, coefficients, ret)
    # First step (and without ret steps, the last one) always computed; with ret steps the first five.
    assert all(0 < s < STEPS - 1 for s in skipped["cond"]) if not ret else min(skipped["cond"]) >= 5


def test_magcache_decides_as_its_published_rule(pipe):
    calls, skipped = recorded_run(pipe, SPECS["magcache"])
    check_mixed(skipped)
    assert skipped == magcache_rule(calls, interleave(PUBLISHED_MAG_RATIOS["1.3B"]), 0.03, 3, 0.25)
    runs = np.split(np.array(skipped["cond"]), np.where(np.diff(skipped["cond"]) != 1)[0] + 1)
    assert max(len(r) for r in runs) <= 3 and min(skipped["cond"]) >= 5  # K=3; 25% of 20 steps retained


def test_magcache_published_defaults_on_a_real_model_shape():
    policy = build("magcache", WAN_T2V_1_3B, 50).policy
    assert (policy.threshold, policy.K, policy.retention) == (0.12, 4, 0.2)  # README: E012K4R02
    assert policy.ratios is PUBLISHED_MAG_RATIOS["1.3B"]
    big = build("magcache:0.3,K=2", WAN_T2V_14B, 30).policy
    assert (big.threshold, big.K, big.retention) == (0.3, 2, 0.2)  # given settings win over E024K6R02
    assert big.ratios.steps == 30 and big.ratios.cond == tuple(
        nearest(np.array(PUBLISHED_MAG_RATIOS["14B"].cond), 30)
    )


def test_easycache_decides_as_its_published_rule(pipe):
    calls, skipped = recorded_run(pipe, SPECS["easycache"])
    check_mixed(skipped)
    assert skipped == easycache_rule(pipe.dit, calls, 0.5)
    assert (
        skipped["cond"] == skipped["uncond"]
        and min(skipped["cond"]) >= 10
        and max(skipped["cond"]) < STEPS - 1
    )


def test_firstblock_decides_as_diffusers_rule(pipe):
    calls, skipped = recorded_run(pipe, SPECS["firstblock"])
    check_mixed(skipped)
    assert skipped == firstblock_rule(pipe.dit, calls, 0.08)
    assert skipped["cond"] != skipped["uncond"]  # each stream decides for itself


# --- skipped output = base + cached residual, exactly -------------------------------------------------


@pytest.mark.parametrize("case", ["teacache", "magcache", "easycache", "firstblock"])
def test_a_skipped_step_is_the_base_plus_the_cached_residual(pipe, case):
    calls, skipped = recorded_run(pipe, SPECS[case])
    dit, checked = pipe.dit, 0
    with torch.no_grad():
        for step, stream, x, t, context, before, out in calls:
            if case == "easycache":
                base, expected = x.float(), None
            else:
                inputs = dit.embed(x, t, context)
                base = dit.run_blocks(inputs, end=1) if case == "firstblock" else inputs.tokens
            key = {"firstblock": "rest_residual", "easycache": "residual"}.get(case, "residual")
            if step in skipped[stream]:
                added = base + before[key]
                expected = added if case == "easycache" else dit.unembed(added, inputs)
                assert torch.equal(out, expected)
                checked += 1
            else:  # a computed step: the full forward, bit for bit
                assert torch.equal(out, dit(x, t, context))
    assert checked == len(skipped["cond"]) + len(skipped["uncond"]) > 0


# --- threshold 0 skips nothing and is the uncached run, bit for bit -----------------------------------


@pytest.mark.parametrize("cfg_batch", [True, False])
@pytest.mark.parametrize("case", list(ZERO))
def test_threshold_zero_skips_nothing_and_matches_the_uncached_run(pipe, case, cfg_batch):
    uncached, _ = sample(pipe, cfg_batch=cfg_batch)
    cached, report = sample(pipe, ZERO[case], cfg_batch=cfg_batch)
    assert report["skipped"] == {"cond": [], "uncond": []}
    assert torch.equal(cached, uncached)


def test_teacache_published_rule_would_skip_at_zero_where_wanfit_does_not(pipe):
    # ret-steps 1.3B polynomial on this model: negative rescaled changes, so `acc < 0` holds.
    calls, skipped = recorded_run(pipe, ZERO["teacache"])
    assert skipped == {"cond": [], "uncond": []}
    published = teacache_rule(pipe.dit, calls, 0.0, TEACACHE_COEFFICIENTS[("1.3B", True)], True)
    assert published["cond"]  # which is why wanfit reads threshold 0 as "never skip"


# --- batched and sequential CFG ------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(SPECS))
def test_batched_and_sequential_cfg_make_the_same_decisions(pipe, case):
    batched, report_b = sample(pipe, SPECS[case], cfg_batch=True)
    sequential, report_s = sample(pipe, SPECS[case], cfg_batch=False)
    check_mixed(report_b["skipped"])
    assert report_b["skipped"] == report_s["skipped"]
    assert torch.allclose(batched, sequential, atol=1e-5, rtol=1e-5)


# --- resume -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["teacache", "magcache", "easycache", "firstblock"])
def test_resume_from_a_file_equals_the_uninterrupted_run(pipe, case, tmp_path):
    snapshots = {}
    full, report = sample(pipe, SPECS[case], on_step=lambda s: snapshots.__setitem__(s.step, s))
    check_mixed(report["skipped"])
    path = tmp_path / "run.ckpt"
    checkpointing.save(path, snapshots[12], REQUEST)
    state, _ = checkpointing.load(path)
    assert isinstance(state.step_cache, StepCacheState) and state.step_cache.spec == canonical_spec(
        SPECS[case]
    )
    resumed, resumed_report = sample(pipe, SPECS[case], state=state)
    assert torch.equal(resumed, full)
    assert resumed_report == report


@pytest.mark.parametrize("case", ["magcache", "firstblock", "easycache"])
def test_interrupted_mid_step_after_releasing_a_residual_resumes_exactly(pipe, case, tmp_path, monkeypatch):
    """A stream about to recompute drops its old residual from the committed state too (memory stays
    flat); a resume from that state recomputes the stream, as the first run did."""
    full, report = sample(pipe, SPECS[case])
    cond = report["skipped"]["cond"]
    stop = next(s for s in range(cond[0] + 1, STEPS) if s not in cond)  # computed after a skip
    snapshots = {}
    original = type(pipe.dit).unembed

    def interrupted(dit, tokens, inputs):
        if len(snapshots) == stop:
            raise KeyboardInterrupt
        return original(dit, tokens, inputs)

    monkeypatch.setattr(type(pipe.dit), "unembed", interrupted)  # the DiT's last stage, also in forward()
    with pytest.raises(KeyboardInterrupt):
        sample(pipe, SPECS[case], on_step=lambda s: snapshots.__setitem__(s.step, s))
    monkeypatch.undo()
    last = snapshots[stop]
    key = "rest_residual" if case == "firstblock" else "residual"
    assert last.step_cache.streams["cond"].tensors[key] is None  # released at step `stop`
    path = tmp_path / "run.ckpt"
    checkpointing.save(path, last, REQUEST)
    resumed, resumed_report = sample(pipe, SPECS[case], state=checkpointing.load(path)[0])
    assert torch.equal(resumed, full) and resumed_report == report


def test_resuming_with_another_cache_is_refused(pipe):
    snapshots = {}
    sample(pipe, SPECS["magcache"], on_step=lambda s: snapshots.__setitem__(s.step, s))
    with pytest.raises(CheckpointError, match="same --cache"):
        sample(pipe, SPECS["easycache"], state=snapshots[5])
    with pytest.raises(ConfigError, match="same --cache"):
        sample(pipe, None, state=snapshots[5])


def test_a_damaged_cache_state_in_a_resume_file_is_refused(tmp_path):
    path = tmp_path / "bad.ckpt"
    state = DenoiseState(torch.zeros(1, 16, 2, 4, 6), 1, {}, StepCacheState("magcache", {}))
    checkpointing.save(path, state, REQUEST)
    payload = torch.load(path, weights_only=True)
    payload["step_cache"]["streams"] = {"sideways": {"tensors": {}, "values": {}, "skipped": []}}
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="damaged step-cache state"):
        checkpointing.load(path)


# --- diffusers' own hooks on the same weights --------------------------------------------------------


def diffusers_and_wanfit():
    reference = make_tiny_diffusers_dit("small")
    dit = WanDiT(DiTConfig(**official_config("small"), text_len=512)).eval()
    dit.load_state_dict(official_state_dict(reference))
    return reference, dit


def trajectory(steps: int):
    """A denoising-like input sequence: x drifts from noise, t falls from 999."""
    x, _, context = tiny_inputs("small", batch=1)
    drift = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    for i, t in enumerate(np.linspace(999, 20, steps)):
        yield x + 0.15 * i * drift, torch.tensor([t], dtype=torch.float32), context


def lockstep(cache, dit, reference, watched) -> list[int]:
    """The trajectory through our cache and through diffusers' hooked model, outputs compared at each
    step; returns the steps where diffusers did not run `watched` (a block's attention): its skips."""
    calls, skipped = [], []
    hook = watched.register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        for i, (x, t, context) in enumerate(trajectory(STEPS)):
            cache.begin_step(i)
            ours = cache.forward(dit, x, t, context, ("cond",))
            cache.end_step()
            before = len(calls)
            with reference.cache_context("cond"):
                out = reference(
                    hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False
                )[0]
            if len(calls) == before:
                skipped.append(i)
            assert torch.allclose(ours, out, atol=1e-4, rtol=1e-4)
    hook.remove()
    return skipped


def test_firstblock_skips_what_diffusers_first_block_cache_skips():
    from diffusers.hooks import FirstBlockCacheConfig

    reference, dit = diffusers_and_wanfit()
    reference.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    cache = build("firstblock:0.2", dit.config, STEPS)
    theirs = lockstep(cache, dit, reference, reference.blocks[1].attn1)  # block 1 runs unless skipped
    assert cache.skipped()["cond"] == theirs and 0 < len(theirs) < STEPS - 1


def test_magcache_skips_what_diffusers_mag_cache_skips():
    """Same rule on the cond stream: retention 25% of 20 steps is step 5 in both roundings."""
    from diffusers.hooks import MagCacheConfig

    reference, dit = diffusers_and_wanfit()
    published = PUBLISHED_MAG_RATIOS["1.3B"]
    reference.enable_cache(
        MagCacheConfig(
            threshold=0.05,
            max_skip_steps=2,
            retention_ratio=0.25,
            num_inference_steps=STEPS,
            mag_ratios=list(published.cond),
        )  # fmt: skip
    )
    cache = build("magcache:0.05,K=2,retention=0.25,ratios=1.3B", dit.config, STEPS)
    theirs = lockstep(cache, dit, reference, reference.blocks[0].attn1)  # MagCache skips every block
    assert cache.skipped()["cond"] == theirs and 0 < len(theirs) < STEPS - 1


def test_calibration_measures_what_diffusers_mag_cache_calibration_measures(capsys):
    from diffusers.hooks import MagCacheConfig

    reference, dit = diffusers_and_wanfit()
    reference.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=STEPS))
    cache = calibrator(STEPS)
    with torch.no_grad():
        for i, (x, t, context) in enumerate(trajectory(STEPS)):
            cache.begin_step(i)
            cache.forward(dit, x, t, context, ("cond",))
            cache.end_step()
            with reference.cache_context("cond"):
                reference(hidden_states=x, timestep=t, encoder_hidden_states=context, return_dict=False)
    printed = capsys.readouterr().out
    theirs = [float(v) for v in printed[printed.rindex("[") + 1 : printed.rindex("]")].split(",")]
    ours = cache.policy.measured(cache)
    assert ours.uncond is None and len(ours.cond) == len(theirs) == STEPS
    assert np.allclose(ours.cond, theirs, atol=2e-5)  # ours rounded to 5 decimals, as MagCache's
    assert np.ptp(ours.cond[1:]) > 1e-3  # the ratios vary: a real measurement


# --- calibration files, tables, specs, refusals, memory -----------------------------------------------


def test_calibrated_ratios_are_found_for_that_model_and_interpolated(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("WANFIT_CACHE_DIR", str(tmp_path))  # this test's own calibration store
    cache = calibrator(STEPS)
    sample(pipe, cache=cache)
    measured = cache.policy.measured(cache)
    assert len(measured.cond) == len(measured.uncond) == STEPS and measured.cond[0] == 1.0
    path = save_ratios(pipe.model_key, measured, {"note": "test"})
    assert load_ratios(path).cond == measured.cond
    policy = build("magcache", WAN_TINY, STEPS, model_key=pipe.model_key).policy
    assert policy.ratios.cond == measured.cond and policy.ratios.source == str(path)
    assert (policy.threshold, policy.K, policy.retention) == (0.12, 2, 0.2)  # magcache_generate.py's defaults
    other = build("magcache", WAN_TINY, 30, model_key=pipe.model_key).policy
    assert other.ratios.cond == tuple(nearest(np.array(measured.cond), 30))
    with pytest.raises(ConfigError, match="calibrate-cache"):
        build("magcache", WAN_TINY, STEPS, model_key="another-model")


def test_published_tables_are_the_authors_numbers():
    for ratios in PUBLISHED_MAG_RATIOS.values():
        assert ratios.steps == len(ratios.uncond) == 50 and ratios.cond[0] == ratios.uncond[0] == 1.0
    small = interleave(PUBLISHED_MAG_RATIOS["1.3B"])
    assert small[2:6] == [1.0124, 1.02213, 1.00166, 1.0041] and small[-2:] == [0.81838, 0.81939]
    big = interleave(PUBLISHED_MAG_RATIOS["14B"])
    assert big[2:4] == [1.02504, 1.03017] and big[-2:] == [0.86111, 0.86189]
    assert TEACACHE_COEFFICIENTS[("1.3B", False)][0] == 2.39676752e03
    assert TEACACHE_COEFFICIENTS[("14B", True)][-1] == -3.15583525e-01
    values = tuple(float(v) for v in range(50))
    for n in (7, 20, 49, 50, 80):
        assert nearest_interp(values, n) == tuple(nearest(np.array(values), n))
    assert nearest_interp(values, 1) == (49.0,)  # MagCache: one step takes the last ratio


def test_spec_parsing_and_the_plan_field():
    assert str(parse_spec(" MagCache : 0.20 , retention=0.3, K=3")) == "magcache:0.2,K=3,retention=0.3"
    assert canonical_spec("teacache") == "teacache" and canonical_spec("none") is None
    assert canonical_spec("teacache:0.1,ret=yes") == "teacache:0.1,ret=true"
    assert Plan(cache="FirstBlock:0.05").cache == "firstblock:0.05"
    assert Plan.from_dict(Plan(cache="easycache:0.1,ret=4").to_dict()).cache == "easycache:0.1,ret=4"
    assert set(POLICIES) == {"teacache", "magcache", "easycache", "firstblock"}
    for bad, message in [
        ("fastcache", "Unknown step cache"),
        ("teacache:-1", "at least 0"),
        ("teacache:abc", "at least 0"),
        ("magcache:nan", "at least 0"),
        ("magcache,L=2", "takes the options K=, retention=, ratios="),
        ("magcache,K=two", "whole number"),
        ("teacache,ret=maybe", "true or false"),
        ("firstblock,x=1", "options none"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Plan(cache=bad)


def test_settings_without_anything_to_skip_are_refused():
    with pytest.raises(ConfigError, match="at least 10 steps"):
        build("magcache", WAN_T2V_1_3B, 4)
    with pytest.raises(ConfigError, match="can skip no step"):
        build("easycache", WAN_TINY, 11)
    build("easycache", WAN_TINY, 12)
    with pytest.raises(ConfigError, match="coefficients=1.3B"):
        build("teacache", WAN_TINY, 20)
    with pytest.raises(ConfigError, match="at least 2 blocks"):
        build("firstblock", WAN_TINY.with_overrides(num_layers=1), 20)
    with pytest.raises(ConfigError, match="K="):
        build("magcache,K=0,ratios=1.3B", WAN_TINY, 20)
    with pytest.raises(ConfigError, match="retention="):
        build("magcache,retention=1,ratios=1.3B", WAN_TINY, 20)
    assert build("teacache", WAN_T2V_14B, 50).policy.fit == "14B"
    with pytest.raises(ConfigError, match="runs on one GPU for now"):
        build("magcache", WAN_T2V_1_3B, 50, world_size=2)


def test_the_denoise_estimate_counts_the_residuals_a_cache_keeps():
    request = Request(WAN_T2V_1_3B)
    plain = estimate_denoise(request, Plan(), "sdpa_flash")
    residual = request.tokens * WAN_T2V_1_3B.dim * 4  # [tokens, dim] fp32
    for spec, per_stream in [("teacache", 1), ("magcache", 1), ("firstblock", 2)]:
        cached = estimate_denoise(request, Plan(cache=spec), "sdpa_flash")
        assert cached.cache - plain.cache == 2 * per_stream * residual == cached.detail["step_cache"]
    no_cfg = replace(request, guidance=False)
    single = estimate_denoise(no_cfg, Plan(cache="magcache"), "sdpa_flash").detail["step_cache"]
    assert single == residual
    latent = 16 * request.latent_frames * request.latent_hw[0] * request.latent_hw[1] * 4
    assert (
        held_bytes("easycache", tokens=request.tokens, dim=1536, latent_elements=latent // 4, streams=2)
        == 8 * latent
    )


def test_the_cache_runs_the_blocks_as_placed(pipe):
    """Compiled blocks are callables beside the model: the cache must run those, not the eager ones."""
    placement = pipe.placement.dit
    placement.place(pipe.plan)
    assert all(b.residual_in_place for b in pipe.dit.blocks)  # the caches' tests run on blocks in place
    used = []

    def counted(index, block):
        return lambda *args: (used.append(index), block(*args))[1]

    from wanfit.runtime.compile import CompiledBlocks

    placement.compiled_blocks = CompiledBlocks([counted(i, b) for i, b in enumerate(pipe.dit.blocks)])
    try:
        cache = build("firstblock:0", pipe.dit.config, STEPS)
        x, context = torch.randn(1, 16, 3, 6, 8), pipe.embeds[0]
        with torch.no_grad():
            cache.begin_step(0)
            out = cache.forward(placement, x, torch.tensor([900.0]), context, ("cond",))
        assert used == list(range(len(pipe.dit.blocks)))  # block 0, then the rest: all through the placement
        assert torch.equal(out, pipe.dit(x, torch.tensor([900.0]), context))
    finally:
        placement.compiled_blocks = None
