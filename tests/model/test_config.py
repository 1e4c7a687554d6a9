import pytest
import torch

from krea2_lite import Krea2Config, Krea2Transformer


def test_released_shape_and_derived_sizes():
    cfg = Krea2Config.krea2()
    assert (cfg.features, cfg.heads, cfg.kvheads, cfg.layers, cfg.txtdim, cfg.txtlayers) == (6144, 48, 12, 28, 2560, 12)
    assert cfg.headdim == 128
    assert cfg.axes == (32, 48, 48)
    assert cfg.mlpdim == 16384
    assert cfg.txtmlpdim == 6912  # int(2·2560/3)·4 = 6824, rounded up to 128
    assert cfg.in_channels == 64
    # DESIGN.md: 12.82B parameters, 434M per block.
    assert round(cfg.num_parameters() / 1e9, 2) == 12.82
    per_block = cfg.replace(layers=2).num_parameters() - cfg.replace(layers=1).num_parameters()
    assert round(per_block / 1e6) == 434


@pytest.mark.parametrize("cfg", [Krea2Config.tiny(), Krea2Config.tiny(heads=4, kvheads=1),
                                 Krea2Config.medium(layers=1)])
def test_parameter_count_matches_built_model(cfg):
    with torch.device("meta"):
        model = Krea2Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()


@pytest.mark.parametrize("bad, message", [
    (dict(features=65), "not divisible by heads"),
    (dict(kvheads=3, heads=2), "not divisible by kvheads"),
    (dict(layers=0), "layers must be a positive int"),
    (dict(features=16, heads=2), "head dim 8"),
])
def test_invalid_configs_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        Krea2Config.tiny(**bad)


def test_dict_round_trip_and_unknown_fields():
    cfg = Krea2Config.tiny()
    assert Krea2Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown Krea2Config fields"):
        Krea2Config.from_dict({**cfg.to_dict(), "hidden_size": 3})
