import pytest
import torch

from wanfit.errors import ConfigError
from wanfit.hardware import probe
from wanfit.precision import dtype_name, parse_dtype, precision_policy


@pytest.mark.parametrize(
    "card, compute, storage",
    [("h100", torch.bfloat16, torch.bfloat16), ("a100", torch.bfloat16, torch.bfloat16),
     ("rtx3060", torch.bfloat16, torch.bfloat16), ("t4", torch.float16, torch.float16),
     ("v100", torch.float16, torch.float16), ("rtx2080ti", torch.float16, torch.float16),
     ("cpu", torch.float32, torch.bfloat16)],
)  # fmt: skip
def test_default_policy_follows_the_card(card, compute, storage):
    policy = precision_policy(probe(card))
    assert (policy.compute, policy.storage, policy.notes) == (compute, storage, ())


def test_user_overrides_and_their_notes():
    t4 = probe("t4")
    policy = precision_policy(t4, compute="bf16", storage="fp8")
    assert policy.compute == torch.bfloat16 and policy.storage == torch.float8_e4m3fn
    assert "no native bf16" in policy.notes[0]
    assert precision_policy(probe("cpu"), compute="fp16").notes
    assert precision_policy(probe("h100"), compute="float32").compute == torch.float32
    assert precision_policy(probe("h100")).to_dict() == {
        "compute": "bfloat16",
        "storage": "bfloat16",
        "notes": [],
    }


def test_bad_dtypes_are_config_errors():
    with pytest.raises(ConfigError, match="int8"):
        parse_dtype("int8")
    with pytest.raises(ConfigError, match="float8_e4m3fn is not supported"):
        precision_policy(probe("h100"), compute="fp8")
    assert parse_dtype("torch.float16") == torch.float16 and dtype_name(torch.bfloat16) == "bfloat16"


def test_one_dtype_table_for_names_aliases_files_and_sizes():
    from wanfit.plan.plan import Plan
    from wanfit.precision import ALIASES, DTYPES, dtype_bytes, parse_stored_dtype

    assert all(dtype_name(d) == name for name, d in DTYPES.items())
    assert all(parse_dtype(alias) == DTYPES[name] for alias, name in ALIASES.items())
    assert (dtype_bytes("bfloat16"), dtype_bytes("fp8"), dtype_bytes(torch.float32)) == (2, 1, 4)
    # What files say: safetensors header names and pickled torch names; integers are no float dtype.
    assert parse_stored_dtype("BF16") == parse_stored_dtype("bfloat16") == torch.bfloat16
    assert parse_stored_dtype("F8_E4M3") == torch.float8_e4m3fn
    assert parse_stored_dtype("F64") == torch.float64 and parse_stored_dtype("I8") is None
    with pytest.raises(ConfigError, match="float64"):  # read from files, never chosen
        parse_dtype("float64")
    plan = Plan(compute_dtype="float16", text_encoder_dtype="bfloat16")
    assert (plan.torch_compute_dtype, plan.torch_text_encoder_dtype) == (torch.float16, torch.bfloat16)
