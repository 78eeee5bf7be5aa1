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


def test_overrides_are_coerced_by_the_schema_types():
    """Snakemake passes --config values as strings (nested ones always)."""
    raw = C.parse_overrides(["seeds=[0,1,2]", "pretrain={epochs: '3', compile: 'true', lr: '1e-3'}",
                             "data={max_train: 'null'}", "evaluate={label_fractions: '[0.5]'}"])
    cfg = C.resolve_stack([], raw)
    assert cfg["seeds"] == [0, 1, 2] and cfg["pretrain"]["epochs"] == 3 and cfg["pretrain"]["compile"] is True
    assert cfg["pretrain"]["lr"] == 1e-3 and cfg["data"]["max_train"] is None
    assert cfg["evaluate"]["label_fractions"] == [0.5]
    with pytest.raises(C.ConfigError, match=r"config key 'pretrain.epochs' = \"ten\" \(from --config\): wrong type"):
        C.resolve_stack([], {"pretrain": "{epochs: ten}"})


def test_a_stack_merges_in_order_and_names_the_file_of_each_problem(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"pretrain": {"epochs": 2, "lr": 0.1}, "seeds": [1]}))
    b.write_text(yaml.safe_dump({"pretrain": {"epochs": 3}}))
    cfg = C.resolve_stack([a, b])
    assert (cfg["pretrain"]["epochs"], cfg["pretrain"]["lr"], cfg["seeds"]) == (3, 0.1, [1])
    b.write_text(yaml.safe_dump({"pretrain": {"epoch": 3, "lr": -1}, "methods": ["simclr", "mocco"]}))
    with pytest.raises(C.ConfigError) as err:
        C.resolve_stack([a, b])
    lines = str(err.value).splitlines()
    assert lines == [
        "config key 'methods.1' = \"mocco\" (from %s): not allowed; allowed: one of \"simclr\", \"moco\", \"pirl\", "
        "\"dae\", \"cd\"; did you mean \"moco\"?" % b,
        "config key 'pretrain.epoch' (from %s): unknown key; did you mean 'pretrain.epochs'? allowed keys in "
        "'pretrain': %s" % (b, ", ".join(sorted(C.load_schema()["properties"]["pretrain"]["properties"]))),
        "config key 'pretrain.lr' = -1 (from %s): -1 is less than or equal to the minimum of 0; allowed: number > 0" % b,
    ]


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nseeds: [0, 1\n")
    with pytest.raises(C.ConfigError, match=rf"config file {bad}:3:1: YAML syntax error"):
        C.resolve_stack([bad])


def test_the_schema_is_package_data():
    import importlib.resources

    shipped = importlib.resources.files("sslpipe") / "config.schema.yaml"
    assert shipped.read_text() == (REPO / "workflow/schemas/config.schema.yaml").read_text()
