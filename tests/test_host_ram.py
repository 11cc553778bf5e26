"""Host RAM as a budget: the cgroup limit read from (fake) /proc and /sys files, --ram, the host
estimates of each placement, and the planner's choice between pinned copies and the mapped file."""

import json
from dataclasses import replace

import pytest

from tests.helpers.hardware import emulated
from wanfit.cli import main
from wanfit.commands import common
from wanfit.errors import ConfigError
from wanfit.hardware.probe import cgroup_memory, host_memory, process_rss
from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B
from wanfit.plan import host_estimates as H
from wanfit.plan.estimates import Request, dit_block_params, text_encoder_bytes
from wanfit.plan.plan import Plan
from wanfit.plan.planner import NoPlanError, fmt_bytes
from wanfit.plan.planning import Constraints, plan_for

GIB = 1024**3
REQ = Request(WAN_T2V_1_3B)


def fake_proc(tmp_path, cgroup_lines, mounts):
    """A /proc with self/cgroup and self/mountinfo; mounts: (fstype, super options, mount point)."""
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
    info = [
        f"{30 + i} 23 0:{40 + i} / {point} rw,relatime - {fstype} {fstype} {options}"
        for i, (fstype, options, point) in enumerate(mounts)
    ]
    (proc / "mountinfo").write_text("\n".join(info) + "\n")
    return tmp_path / "proc"


def group(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)
    return folder


def test_cgroup_v2_limit_minus_use_and_the_tightest_ancestor(tmp_path):
    root = tmp_path / "cg2"
    group(root / "outer", memory_max="20000000000\n", memory_current="1000000000\n")
    group(
        root / "outer" / "job",
        memory_max="12700000000\n",
        memory_current="3000000000\n",
        memory_stat="anon 1000000000\ninactive_file 1500000000\nactive_file 500000000\n",
    )
    proc = fake_proc(tmp_path, ["0::/outer/job"], [("cgroup2", "rw", root)])
    found = cgroup_memory(proc)
    assert (found.version, found.limit, found.path) == (2, 12_700_000_000, str(root / "outer" / "job"))
    # The inactive page cache is dropped before anything is killed: it does not count as used.
    assert found.available == 12_700_000_000 - (3_000_000_000 - 1_500_000_000)
    # A tighter parent wins.
    (root / "outer" / "memory.max").write_text("10000000000\n")
    assert cgroup_memory(proc).path == str(root / "outer") and cgroup_memory(proc).available == 9_000_000_000
    # "max" everywhere: no limit.
    for folder in (root / "outer", root / "outer" / "job"):
        (folder / "memory.max").write_text("max\n")
    assert cgroup_memory(proc) is None


def test_cgroup_v1_and_a_group_path_hidden_by_the_container(tmp_path):
    mount = tmp_path / "memory"
    group(mount, memory_limit_in_bytes="8589934592\n", memory_usage_in_bytes="2147483648\n",
          memory_stat="total_inactive_file 1073741824\n")  # fmt: skip
    # Inside a container /proc/self/cgroup names the host's path, which the mount does not show.
    proc = fake_proc(
        tmp_path,
        ["4:memory:/docker/abc123", "0::/"],
        [("cgroup", "rw,memory", mount), ("cgroup", "rw,cpu", tmp_path / "cpu")],
    )
    found = cgroup_memory(proc)
    assert (found.version, found.limit, found.available) == (1, 8 * GIB, 7 * GIB)
    (mount / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert cgroup_memory(proc) is None
    assert cgroup_memory(tmp_path / "nowhere") is None


def test_host_memory_takes_the_smaller_of_meminfo_and_the_cgroup(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 64000000 kB\nMemAvailable: 50000000 kB\n")
    root = tmp_path / "cg2"
    group(root, memory_max="12700000000\n", memory_current="700000000\n")
    proc = fake_proc(tmp_path, ["0::/"], [("cgroup2", "rw", root)])
    host = host_memory(str(meminfo), proc)
    assert host.available == 12_000_000_000 and host.limit == 12_700_000_000 and host.total == 12_700_000_000
    assert "memory.max" in host.source and "11.83 GiB" in host.source
    (root / "memory.max").write_text("100000000000\n")  # a loose limit: MemAvailable binds
    assert host_memory(str(meminfo), proc).source == "MemAvailable"
    assert host_memory(str(meminfo), proc).available == 50_000_000 * 1024


def test_process_rss_reads_its_own_anonymous_memory(tmp_path):
    status = tmp_path / "status"
    status.write_text("VmRSS:\t 900 kB\nRssAnon:\t 600 kB\nRssFile:\t 300 kB\n")
    assert process_rss(str(status)) == 600 * 1024
    assert process_rss(str(tmp_path / "missing")) is None
    assert process_rss() > 0


@pytest.mark.parametrize("text", ["0", "abc", "3 apples", "512KiB"])
def test_bad_ram_is_one_sentence(text, capsys):
    with pytest.raises(ConfigError, match="--ram"):
        Constraints.from_options(ram=text)
    assert main(["plan", "--ram", text]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wanfit: error: --ram") and len(err.strip().splitlines()) == 1


def test_ram_reaches_the_plan_and_a_limit_below_any_plan_names_the_smallest_ram(monkeypatch, capsys):
    monkeypatch.setattr(common, "hardware_from_args", lambda args: emulated(args.emulate or "cpu", 64))
    assert main(["plan", "--json", "--emulate", "t4", "--ram", "10GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["host_budget_bytes"] == 10 * GIB and out["host_budget_source"] == "--ram 10.00 GiB"
    assert out["settings"]["text_encoder_stream_source"] == "mmap" and out["host_bytes"] <= 10 * GIB
    assert set(out["host_phases"]) == set(H.HOST_PHASES)
    assert main(["plan", "--emulate", "t4", "--ram", "1GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wanfit: error: No plan fits") and len(err.splitlines()) == 1
    assert "of free RAM" in err and "host RAM" in err


def test_a_small_cgroup_limit_streams_from_the_files_and_one_below_any_plan_is_refused():
    colab = emulated("t4", 11.0)  # what a Colab T4 machine leaves the process
    result = plan_for(REQ, hardware=colab)
    assert result.plan.text_encoder_stream_source == "mmap"
    assert result.host_bytes <= result.budget.host_bytes
    tiny = emulated("t4", 3.0)
    with pytest.raises(NoPlanError) as err:
        plan_for(REQ, hardware=tiny)
    need = err.value.host_bytes_needed
    assert need > 2 * GIB and fmt_bytes(need) in str(err.value)
    # The smallest RAM the message names does work.
    smallest = float(str(err.value).split("at least ")[1].split(" GiB")[0])
    assert plan_for(REQ, hardware=emulated("t4", smallest + 0.01)).host_bytes <= (smallest + 0.01) * GIB


def _plan(**fields):
    base = dict(
        device="cuda", compute_dtype="bfloat16", text_encoder_device="cuda", text_encoder_dtype="bfloat16"
    )
    return Plan(**{**base, **fields})


def test_host_estimates_of_each_placement():
    block = sum(dit_block_params(WAN_T2V_1_3B)) * 2
    layer = text_encoder_bytes(REQ, _plan())[0]
    resident = H.host_phases(REQ, _plan())
    assert {p.needed for p in resident.values()} - {resident["vae_decode"].needed} == {H.HOST_PROCESS_CUDA}
    assert resident["vae_decode"].anon == H.video_host(REQ) == 3 * 81 * 480 * 832 * 6
    # Pinned copies: every streamed block, exactly; from the mapped file: a ring of staging buffers.
    pinned = H.dit_host(REQ, _plan(dit_blocks_resident=10))
    mapped = H.dit_host(REQ, _plan(dit_blocks_resident=10, dit_stream_source="mmap"))
    assert pinned.pinned == 20 * block and pinned.mapped == 0
    assert mapped.pinned == mapped.mapped == 2 * block and mapped.cache == pinned.cache
    te = _plan(text_encoder_blocks_resident=0)
    assert H.text_encoder_host(REQ, te, encoding=True).pinned == 24 * layer
    te_file = H.text_encoder_host(
        REQ, _plan(text_encoder_blocks_resident=0, text_encoder_stream_source="mmap"), encoding=True
    )
    assert te_file.pinned == 2 * layer
    # Freed after encoding: nothing left; kept: its pinned copies stay.
    assert (
        H.text_encoder_host(
            REQ, _plan(text_encoder_blocks_resident=0, free_text_encoder=True), encoding=False
        ).total()
        == 0
    )
    assert H.text_encoder_host(REQ, replace(te, free_text_encoder=False), encoding=False).pinned == 24 * layer
    # On the CPU: all its weights (mapped: the file is bf16 like the plan), an fp32 block and activations.
    cpu = H.text_encoder_host(REQ, _plan(text_encoder_device="cpu"), encoding=True)
    assert cpu.mapped > 11e9 and cpu.anon > 4 * layer // 2
    # A file in fp32 is converted: ordinary memory, not mapped pages.
    fp32_file = Request(WAN_T2V_1_3B, text_encoder_file_dtype="float32")
    assert H.text_encoder_host(fp32_file, _plan(text_encoder_device="cpu"), encoding=True).mapped == 0


def test_fp8_storage_of_umt5_halves_its_matrices():
    request = replace(REQ, text_encoder_file_dtype="bfloat16")
    bf16 = text_encoder_bytes(request, _plan())
    fp8 = text_encoder_bytes(request, _plan(text_encoder_dtype="float8_e4m3fn"))
    assert 0.5 * bf16[0] < fp8[0] < 0.51 * bf16[0] and fp8[2] == bf16[2]  # the embedding stays bf16
    # Streaming from the mapped file keeps the file's dtype, whatever the plan's storage.
    from_file = _plan(
        text_encoder_dtype="float8_e4m3fn", text_encoder_blocks_resident=0, text_encoder_stream_source="mmap"
    )
    assert text_encoder_bytes(request, from_file) == bf16


def test_14b_at_720p_on_a_4090_streams_from_pinned_copies_or_the_file_as_the_ram_allows():
    request = Request(WAN_T2V_14B, height=720, width=1280, model_name="14B")
    roomy = plan_for(request, hardware=emulated("rtx4090", 28.0))  # a 32 GB machine
    assert roomy.plan.dit_blocks_resident is not None and roomy.plan.dit_stream_source == "pinned"
    assert roomy.host_bytes <= roomy.budget.host_bytes
    small = plan_for(request, hardware=emulated("rtx4090", 16.0))
    assert small.plan.dit_stream_source == "mmap" and small.host_bytes <= small.budget.host_bytes
    assert small.plan.dit_blocks_resident == roomy.plan.dit_blocks_resident  # the card is the same


def test_umt5_in_fp8_from_its_file_as_a_setting_and_as_a_knob_with_fp8():
    from wanfit.plan import planner as P

    fp8_file = replace(REQ, text_encoder_file_dtype="float8_e4m3fn")
    assert plan_for(fp8_file, hardware=emulated("h100")).plan.text_encoder_dtype == "float8_e4m3fn"
    setting = Constraints.from_options(settings=["text_encoder_dtype=fp8"])
    result = plan_for(REQ, setting, emulated("h100"))
    assert result.plan.text_encoder_dtype == "float8_e4m3fn" and "text_encoder_dtype" in result.frozen
    bf16 = plan_for(REQ, hardware=emulated("h100"))
    assert result.phases["text_encoder"].peak < bf16.phases["text_encoder"].peak - 3 * GIB
    # The knob: only with fp8 DiT storage (--fp8, the user's opt-in to fp8's loss).
    base = bf16.plan
    assert P._text_encoder_fp8(base, REQ) == []
    with_fp8 = replace(base, storage_dtype="float8_e4m3fn")
    assert P._text_encoder_fp8(with_fp8, REQ)[0].text_encoder_dtype == "float8_e4m3fn"


def test_an_out_of_memory_notch_fits_the_host_too():
    from wanfit.plan import planner as P

    plan = plan_for(REQ, hardware=emulated("h100")).plan  # all resident, umT5 on the card
    roomy = P.step_down(plan, REQ, "text_encoder")
    small = P.step_down(plan, REQ, "text_encoder", host_budget=6 * GIB)
    assert roomy.text_encoder_blocks_resident == 0 and roomy.text_encoder_stream_source == "pinned"
    assert small.text_encoder_blocks_resident == 0 and small.text_encoder_stream_source == "mmap"
    assert P.host_bytes(REQ, small) <= 6 * GIB < P.host_bytes(REQ, roomy)
