import copy

import pytest
import yaml

from sslpipe import config as C

REPO = C.SCHEMA_PATH.parents[2]


def test_defaults_fill_every_section_and_match_snakemake_validate():
    from snakemake.utils import validate

    resolved = C.resolve({})
    assert resolved["data"]["source"] == "digits"
    assert resolved["simclr"]["views"]["crop_scale"] == [0.2, 1.0]
    assert resolved["dae"]["views"]["crop_scale"] == [0.8, 1.0]  # a section's own default wins
    assert resolved["dae"]["views"]["flip_p"] == 0.5            # ...and the rest is filled in
    # The Snakefile validates with snakemake.utils.validate: both must agree exactly.
    for raw in ({}, yaml.safe_load((REPO / "config/config.yaml").read_text()),
                yaml.safe_load((REPO / "config/cifar10.yaml").read_text())):
        by_snakemake = copy.deepcopy(raw)
        validate(by_snakemake, str(C.SCHEMA_PATH))
        assert by_snakemake == C.resolve(raw)


@pytest.mark.parametrize("cfg, key", [
    ({"bogus": 1}, "bogus"),
    ({"methods": ["simclr", "byol"]}, "methods.1"),
    ({"pretrain": {"epochs": 0}}, "pretrain.epochs"),
    ({"pretrain": {"batch_size": -4}}, "pretrain.batch_size"),
    ({"pretrain": {"lr": 0}}, "pretrain.lr"),
    ({"pretrain": {"epochs": "ten"}}, "pretrain.epochs"),
    ({"data": {"source": "imagenet"}}, "data.source"),
    ({"data": {"image_size": 4}}, "data.image_size"),
    ({"simclr": {"temperature": -1}}, "simclr.temperature"),
    ({"simclr": {"views": {"flip_p": 1.5}}}, "simclr.views.flip_p"),
    ({"moco": {"queue_size": 0}}, "moco.queue_size"),
    ({"seeds": []}, "seeds"),
])
def test_bad_values_name_the_key(cfg, key):
    with pytest.raises(C.ConfigError, match=f"'{key}'"):
        C.resolve(cfg)


@pytest.mark.parametrize("cfg, key", [
    ({"data": {"source": "npz"}}, "data.path"),
    ({"simclr": {"views": {"crop_scale": [0.9, 0.2]}}}, "simclr.views.crop_scale"),
    ({"data": {"image_size": 16}, "pirl": {"grid": 3}}, "pirl.grid"),
    ({"pretrain": {"batch_size": 256}, "cd": {"buffer_size": 100}}, "cd.buffer_size"),
])
def test_impossible_combinations_are_rejected(cfg, key):
    with pytest.raises(C.ConfigError, match=f"'{key}'"):
        C.resolve(cfg)


def test_config_hash_is_stable_and_sensitive():
    a = C.resolve({})
    assert C.config_hash(a) == C.config_hash(copy.deepcopy(a))
    b = C.resolve({"pretrain": {"epochs": 11}})
    assert C.config_hash(a) != C.config_hash(b)
