"""Configuration: the JSON schema (with defaults) and checks that span several keys.

The schema lives in `workflow/schemas/config.schema.yaml`; the Snakefile validates with
`snakemake.utils.validate`, and `resolve` here does the same default-filling validation for
code and tests that run a stage without Snakemake. `check` covers what a schema cannot say
(combinations of keys); both run before any job starts.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"

# The smallest input each backbone can take: the small CNN pools by 2 three times; the
# CIFAR ResNet-18 downsamples by 8 (three stride-2 stages).
MIN_IMAGE_SIZE = {"small_cnn": 8, "resnet18": 8}


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what to do."""


def load_schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def _with_defaults(validator_class):
    """Extend a jsonschema validator so that `default`s are filled in while validating."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def resolve(cfg: dict | None) -> dict:
    """Return a deep copy of `cfg` with every default filled in; raise ConfigError if invalid."""
    resolved = copy.deepcopy(cfg or {})
    validator = _with_defaults(jsonschema.Draft202012Validator)(load_schema())
    errors = sorted(validator.iter_errors(resolved), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(format_schema_error(errors[0]))
    check(resolved)
    return resolved


def format_schema_error(err: jsonschema.ValidationError) -> str:
    key = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    return f"config key '{key}': {err.message}. Fix it in your config file (see workflow/schemas/config.schema.yaml)."


def check(cfg: dict) -> None:
    """Checks that need several keys at once. `cfg` is already schema-valid with defaults."""
    size = cfg["data"]["image_size"]
    backbone = cfg["model"]["backbone"]
    if size < MIN_IMAGE_SIZE[backbone]:
        raise ConfigError(f"config key 'data.image_size' = {size} is too small for backbone '{backbone}' "
                          f"(minimum {MIN_IMAGE_SIZE[backbone]}): raise data.image_size.")
    if cfg["data"]["source"] in ("npz", "folder") and not cfg["data"]["path"]:
        raise ConfigError(f"config key 'data.path' is required for data.source '{cfg['data']['source']}': "
                          "set it to the file or directory to load.")
    for method in cfg["methods"]:
        views = cfg[method]["views"]
        lo, hi = views["crop_scale"]
        if lo > hi:
            raise ConfigError(f"config key '{method}.views.crop_scale' = [{lo}, {hi}]: the minimum exceeds the maximum.")
        lo, hi = views["crop_ratio"]
        if lo > hi:
            raise ConfigError(f"config key '{method}.views.crop_ratio' = [{lo}, {hi}]: the minimum exceeds the maximum.")
    if "pirl" in cfg["methods"]:
        grid = cfg["pirl"]["grid"]
        # Each jigsaw patch goes through the backbone on its own, so it must be at least as
        # large as the backbone's smallest input.
        if size // grid < MIN_IMAGE_SIZE[backbone]:
            raise ConfigError(f"config key 'pirl.grid' = {grid} cuts {size}px images into {size // grid}px patches, "
                              f"smaller than backbone '{backbone}' accepts ({MIN_IMAGE_SIZE[backbone]}px): "
                              "lower pirl.grid or raise data.image_size.")
    procs = cfg["pretrain"]["processes"]
    for method in cfg["methods"]:
        b = train_settings(cfg, method)["batch_size"]
        key = f"{method}.pretrain.batch_size" if "batch_size" in cfg[method]["pretrain"] else "pretrain.batch_size"
        if b % procs:
            raise ConfigError(f"config key '{key}' = {b} is not divisible by pretrain.processes = {procs}: "
                              "each process takes an equal share of every batch.")
    if "cd" in cfg["methods"] and cfg["cd"]["mode"] == "pcd" and cfg["cd"]["buffer_size"] < train_settings(cfg, "cd")["batch_size"]:
        raise ConfigError(f"config key 'cd.buffer_size' = {cfg['cd']['buffer_size']} is smaller than "
                          f"the batch size {train_settings(cfg, 'cd')['batch_size']}: the replay buffer must hold a batch.")


def train_settings(cfg: dict, method: str) -> dict:
    """The `pretrain` section as `method` trains with it: the shared values, overridden by the
    method's own `{method}.pretrain` keys (its published recipe: optimiser, lr, epochs, ...)."""
    own = cfg.get(method, {}).get("pretrain", {}) if isinstance(cfg.get(method), dict) else {}
    return {**cfg["pretrain"], **own}


def config_hash(cfg: Any) -> str:
    """A short, stable hash of a (resolved) config or config slice."""
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def load(path: str | Path) -> dict:
    """Read a YAML config file and resolve it."""
    with open(path) as fh:
        return resolve(yaml.safe_load(fh) or {})
