import json

import pytest

from hf_vq import FORMAT_VERSION, VQConfig


def test_defaults_and_spec():
    cfg = VQConfig()
    # per-layer PQ is described by format 1 (older hf_vq releases still read it); AQ / sharing need the newest
    assert cfg.quant_method == "hf_vq" and cfg.version == 1
    assert VQConfig(method="aq").version == VQConfig(share="pool").version == FORMAT_VERSION == 3
    assert cfg.k == 256 and cfg.block_size["linear"] == 4 and cfg.block_size["conv3x3"] == 9
    assert cfg.spec == "pq-1x8-l4p4c9e4"


@pytest.mark.parametrize("spec", ["pq-1x8-l8p8c18e8", "pq-1x10-l4p4c9e4", "pq-1xk300-l4p8c18e0", "pq-1x1-l2"])
def test_spec_round_trip(spec):
    cfg = VQConfig.from_spec(spec)
    assert VQConfig.from_spec(cfg.spec) == cfg


def test_json_round_trip():
    cfg = VQConfig(k=1024, block_size={"linear": 8}, modules_to_not_convert=["classifier"],
                   overrides={"fc": {"k": 2048}}, n_iter=10, anneal=False)
    again = VQConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again == cfg and again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"k": 1}, ["VQConfig.k=1", "2 to 65,536"]),
        ({"k": 65_537}, ["VQConfig.k=65537"]),
        ({"k": 3.5}, ["VQConfig.k=3.5"]),
        ({"block_size": {"conv3x3": 8}}, ["block_size['conv3x3']=8", "divide 9 or be a multiple of 9"]),
        ({"block_size": {"lineer": 4}}, ["unknown layer kind 'lineer'"]),
        ({"block_size": {"linear": -1}}, ["block_size['linear']=-1"]),
        ({"method": "sq"}, ["VQConfig.method='sq'"]),
        ({"n_iter": 0}, ["VQConfig.n_iter=0"]),
        ({"overrides": {"fc": {"kk": 3}}}, ["overrides['fc']", "unknown keys ['kk']"]),
        ({"overrides": {"fc": {"k": 1}}}, ["overrides['fc'].k=1"]),
        ({"version": FORMAT_VERSION + 1}, ["newer than the format", "Upgrade hf_vq"]),
        ({"bogus": 1}, ["unknown keys ['bogus']", "valid keys"]),
        ({"modules": {"fc": {"kind": "linear", "shape": [4, 4], "k": 2}}}, ["modules['fc']", "'d'"]),
    ],
)
def test_invalid_values_name_field_and_fix(kwargs, words):
    with pytest.raises(ValueError) as err:
        VQConfig(**kwargs)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("k", [2, 3, 256, 1000, 65_536])
def test_k_range_accepted(k):
    assert VQConfig(k=k).k == k


def test_bad_spec_string():
    with pytest.raises(ValueError, match="not of the form"):
        VQConfig.from_spec("product-quant")


def test_layouts_follow_edits_of_modules():
    """`layouts` is parsed once and reused, but never stale after `modules` changes."""
    config = VQConfig(modules={"fc": {"kind": "linear", "shape": [8, 16], "k": 16, "d": 4}})
    first = config.layouts
    assert config.layouts == first and config.layouts["fc"] is first["fc"]  # reused
    config.modules["fc"]["d"] = 8
    assert config.layouts["fc"].d == 8
    config.modules["head"] = {"kind": "linear", "shape": [2, 8], "k": 4, "d": 2}
    assert set(config.layouts) == {"fc", "head"}
    assert "_layouts_cache" not in dict(config) and set(dict(config)) == set(config.to_dict())
