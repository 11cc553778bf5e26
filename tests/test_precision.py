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
