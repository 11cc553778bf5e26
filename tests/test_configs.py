import pytest

from wanfit.errors import ConfigError
from wanfit.models.configs import WAN_T2V_1_3B, WAN_T2V_14B, DiTConfig


def test_presets_match_the_released_models():
    assert (WAN_T2V_1_3B.dim, WAN_T2V_1_3B.num_heads, WAN_T2V_1_3B.head_dim) == (1536, 12, 128)
    assert (WAN_T2V_14B.dim, WAN_T2V_14B.num_layers, WAN_T2V_14B.head_dim) == (5120, 40, 128)


def test_config_round_trips_through_a_dict():
    cfg = WAN_T2V_14B.with_overrides(num_layers=3)
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_config_key_is_a_clear_error():
    with pytest.raises(ConfigError, match="hidden_size"):
        DiTConfig.from_dict({"hidden_size": 3})
