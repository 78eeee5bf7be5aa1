"""Configuration: the JSON schema (with defaults), config stacks, and checks that span keys.

The schema is `workflow/schemas/config.schema.yaml`; the package ships it as
`sslpipe/config.schema.yaml` (a symlink to that file in the checkout, a copy in a wheel), read
with importlib.resources. A config is a *stack*: YAML files merged in order (dicts key by key,
anything else replaced, as Snakemake's `--configfile A B` does), then `--config key=value`
overrides, whose strings are coerced by the schema's types. `resolve_stack` validates it,
fills the defaults and runs the checks of several keys (`problems`) and of the data
(`sslpipe.data.check_source`); every problem is one line naming the key and the file it came
from. The Snakefile and `sslpipe check-config` both use it, so they agree by construction.
"""
from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import importlib.resources
import json
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from sslpipe.metrics import clashing_tags

SCHEMA_PATH = Path(str(importlib.resources.files("sslpipe") / "config.schema.yaml"))
SCHEMA_NAME = "workflow/schemas/config.schema.yaml"

# The smallest input each backbone can take: the small CNN pools by 2 three times; the
# CIFAR ResNet-18 downsamples by 8 (three stride-2 stages).
MIN_IMAGE_SIZE = {"small_cnn": 8, "resnet18": 8}
DEFAULT = "schema default"
OVERRIDE = "--config"


class ConfigError(ValueError):
    """A config value is invalid; the message has one line per problem, naming key and file."""


def load_schema() -> dict:
    """The schema, parsed once per process (each job asks ~3 times: ~0.1 s a parse with the pure
    Python loader); a fresh copy each call, so no caller can change another's."""
    return copy.deepcopy(_parsed_schema())


@functools.lru_cache(maxsize=1)
def _parsed_schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # the C loader where built


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


# ----------------------------------------------------------------------------- stacks
def read_yaml(path: str | Path) -> dict:
    """One config file as a dict; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {where}: YAML syntax error: {what}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must be a YAML mapping of keys, not a {type(data).__name__}")
    return data


def merge(base: dict, new: dict) -> dict:
    """Merge `new` into `base` in place like snakemake.utils.update_config: dicts key by key."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _leaves(d: dict, prefix: tuple = ()):
    for key, value in d.items():
        path = prefix + (str(key),)
        yield path
        if isinstance(value, dict):
            yield from _leaves(value, path)


def _subschema(schema: dict, root: dict) -> dict:
    if "$ref" in schema:
        name = schema["$ref"].split("/")[-1]
        return {**root["$defs"][name], **{k: v for k, v in schema.items() if k != "$ref"}}
    return schema


def coerce(value: Any, schema: dict, root: dict | None = None) -> Any:
    """Snakemake hands `--config` values over as strings (nested ones always): turn them into
    the schema's types (integer, number, boolean, null, array, object); leave the rest as is
    so validation reports what cannot be converted."""
    root = root or schema
    schema = _subschema(schema, root)
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if isinstance(value, dict) and "properties" in schema:
        props = schema["properties"]
        return {k: coerce(v, props[k], root) if k in props else v for k, v in value.items()}
    if isinstance(value, list) and "items" in schema:
        return [coerce(v, schema["items"], root) for v in value]
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "string" in types:
            return str(value)  # e.g. name=2024 arrives as an int
        return value
    text = value.strip()
    if "null" in types and text.lower() in ("null", "none", "~", ""):
        return None
    if "boolean" in types and text.lower() in ("true", "false", "yes", "no", "on", "off"):
        return text.lower() in ("true", "yes", "on")
    if "integer" in types:
        try:
            return int(text)
        except ValueError:
            pass
    if "number" in types:
        try:
            return float(text)
        except ValueError:
            pass
    if ("array" in types or "object" in types) and text[:1] in "[{":
        try:
            return coerce(yaml.safe_load(text), schema, root)
        except yaml.YAMLError:
            pass
    return value


def stack(files: list[str | Path], overrides: dict | None = None) -> tuple[dict, dict]:
    """(merged config, origin of each key path) of YAML files and `--config` overrides."""
    cfg: dict = {}
    origins: dict[tuple, str] = {}
    for f in files:
        layer = read_yaml(f)
        merge(cfg, layer)
        origins.update({p: str(f) for p in _leaves(layer)})
    if overrides:
        layer = coerce(dict(overrides), load_schema())
        merge(cfg, layer)
        origins.update({p: OVERRIDE for p in _leaves(layer)})
    return cfg, origins


def resolve_stack(files: list[str | Path], overrides: dict | None = None, data: bool = True,
                  device: bool = True) -> dict:
    """Merge, coerce, validate, fill defaults and check a config stack (see the module doc);
    `data` / `device` also check data.path's contents and a requested GPU."""
    cfg, origins = stack(files, overrides)
    return resolve(cfg, origins, data=data, device=device)


def parse_overrides(items: list[str]) -> dict:
    """`key=value` words as `snakemake --config` takes them (values coerced later)."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config {item!r}: expected key=value, e.g. seeds='[0,1,2]'")
        out[key] = value
    return out


# ----------------------------------------------------------------------------- validation
def resolve(cfg: dict | None, origins: dict | None = None, data: bool = False, device: bool = False) -> dict:
    """Return a deep copy of `cfg` with every default filled in; raise ConfigError listing
    every problem (one line each) if invalid."""
    resolved = copy.deepcopy(cfg or {})
    schema = load_schema()
    validator = _with_defaults(jsonschema.Draft202012Validator)(schema)
    errors = sorted(validator.iter_errors(resolved), key=lambda e: [str(p) for p in e.absolute_path])
    lines = [line for e in errors for line in format_schema_error(e, schema, origins or {})]
    if not lines:
        lines = problems(resolved, origins or {}, data=data, device=device)
    if lines:
        raise ConfigError("\n".join(dict.fromkeys(lines)))
    return resolved


def origin(origins: dict, key: str) -> str:
    """' (from FILE)': the file (or --config) that set `key` or its closest parent; ' (schema
    default)' when none did; '' when no origins are known (a config given as one dict)."""
    if not origins:
        return ""
    path = tuple(key.split("."))
    while path:
        if path in origins:
            return f" (from {origins[path]})"
        path = path[:-1]
    return f" ({DEFAULT})"


def allowed(schema: dict) -> str:
    """What a schema node accepts, in a few words."""
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    types = schema.get("type", "any")
    words = " or ".join(types) if isinstance(types, list) else types
    bounds = [f"{op} {schema[k]}" for k, op in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                 ("maximum", "<="), ("exclusiveMaximum", "<"))
              if k in schema]
    if "items" in schema and "enum" in schema["items"]:
        words += " of " + ", ".join(schema["items"]["enum"])
    elif "items" in schema and "type" in schema["items"]:
        words += f" of {allowed(schema['items'])}"
    if "pattern" in schema:
        bounds.append(f"matching {schema['pattern']}")
    return words + (" " + ", ".join(bounds) if bounds else "")


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_schema_error(err: jsonschema.ValidationError, root: dict, origins: dict) -> list[str]:
    """One line per problem: key, value, the file it came from, what is allowed, a suggestion."""
    key = ".".join(str(p) for p in err.absolute_path)
    sub = _subschema(err.schema, root) if isinstance(err.schema, dict) else {}
    if err.validator == "additionalProperties":
        known = sorted(sub.get("properties", {}))
        lines = []
        for extra in sorted(set(err.instance) - set(known)):
            full = f"{key}.{extra}" if key else extra
            guess = difflib.get_close_matches(str(extra), known, n=1, cutoff=0.6)
            hint = f"did you mean '{(key + '.' if key else '') + guess[0]}'? " if guess else ""
            lines.append(f"config key '{full}'{origin(origins, full)}: unknown key; {hint}"
                         f"allowed keys{' in ' + repr(key) if key else ''}: {', '.join(known)}")
        return lines
    shown = key or "(top level)"
    head = f"config key '{shown}' = {_short(err.instance)}{origin(origins, key)}"
    if err.validator == "enum":
        guess = difflib.get_close_matches(str(err.instance), [str(v) for v in err.validator_value], n=1)
        hint = f"; did you mean {json.dumps(guess[0])}?" if guess else ""
        return [f"{head}: not allowed; allowed: {allowed(sub)}{hint}"]
    if err.validator == "type":
        return [f"{head}: wrong type; allowed: {allowed(sub)}"]
    return [f"{head}: {err.message if len(err.message) < 120 else err.validator + ' check failed'}; "
            f"allowed: {allowed(sub)}"]


def problems(cfg: dict, origins: dict | None = None, data: bool = False, device: bool = False) -> list[str]:
    """Checks that need several keys at once (and, optionally, the data and the device).
    `cfg` is already schema-valid with defaults. One line per problem."""
    origins = origins or {}
    out: list[str] = []

    def bad(key: str, text: str) -> None:
        out.append(f"config key '{key}'{origin(origins, key)}: {text}")

    size = cfg["data"]["image_size"]
    backbone = cfg["model"]["backbone"]
    if size < MIN_IMAGE_SIZE[backbone]:
        bad("data.image_size", f"{size} is too small for backbone '{backbone}' "
                               f"(minimum {MIN_IMAGE_SIZE[backbone]}): raise data.image_size.")
    if cfg["data"]["source"] in ("npz", "folder") and not cfg["data"]["path"]:
        bad("data.path", f"is required for data.source '{cfg['data']['source']}': "
                         "set it to the file or directory to load.")
    for method in cfg["methods"]:
        views = cfg[method]["views"]
        for part in ("crop_scale", "crop_ratio"):
            lo, hi = views[part]
            if lo > hi:
                bad(f"{method}.views.{part}", f"[{lo}, {hi}]: the minimum exceeds the maximum.")
    if "pirl" in cfg["methods"]:
        grid = cfg["pirl"]["grid"]
        # Each jigsaw patch goes through the backbone on its own, so it must be at least as
        # large as the backbone's smallest input.
        if size // grid < MIN_IMAGE_SIZE[backbone]:
            bad("pirl.grid", f"{grid} cuts {size}px images into {size // grid}px patches, smaller than "
                             f"backbone '{backbone}' accepts ({MIN_IMAGE_SIZE[backbone]}px): "
                             "lower pirl.grid or raise data.image_size.")
    fractions = cfg["evaluate"]["label_fractions"]
    tags = clashing_tags(fractions)
    if tags:
        bad("evaluate.label_fractions", f"{fractions} gives clashing metric names {tags}: use distinct fractions.")
    procs = cfg["pretrain"]["processes"]
    for method in cfg["methods"]:
        b = train_settings(cfg, method)["batch_size"]
        key = f"{method}.pretrain.batch_size" if "batch_size" in cfg[method]["pretrain"] else "pretrain.batch_size"
        if b % procs:
            bad(key, f"{b} is not divisible by pretrain.processes = {procs}: "
                     "each process takes an equal share of every batch.")
    if "cd" in cfg["methods"] and cfg["cd"]["mode"] == "pcd" and cfg["cd"]["buffer_size"] < train_settings(cfg, "cd")["batch_size"]:
        bad("cd.buffer_size", f"{cfg['cd']['buffer_size']} is smaller than the batch size "
                              f"{train_settings(cfg, 'cd')['batch_size']}: the replay buffer must hold a batch.")
    if device and cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            bad("device", "'cuda' but no CUDA GPU is visible (torch.cuda.is_available() is False); "
                          "allowed: auto (CUDA when present, else CPU), cpu, cuda")
    if data and not out:
        from sslpipe.data import check_source

        out += [f"config key '{key}'{origin(origins, key)}: {text}" for key, text in check_source(cfg["data"])]
    return out


def check(cfg: dict, origins: dict | None = None) -> None:
    """Raise ConfigError listing `problems(cfg)`, if any."""
    lines = problems(cfg, origins)
    if lines:
        raise ConfigError("\n".join(lines))


def train_settings(cfg: dict, method: str) -> dict:
    """The `pretrain` section as `method` trains with it: the shared values, overridden by the
    method's own `{method}.pretrain` keys (its published recipe: optimiser, lr, epochs, ...)."""
    return {**cfg["pretrain"], **cfg[method]["pretrain"]}


def config_hash(cfg: Any) -> str:
    """A short, stable hash of what in a (resolved) config or slice can change results: the
    `tracking` section and `pretrain.checkpoint_every` are left out, so pointing MLflow elsewhere
    or checkpointing more often is still the same "config" to `compare` and to the parent run."""
    if isinstance(cfg, dict):
        cfg = {k: v for k, v in cfg.items() if k != "tracking"}
        if isinstance(cfg.get("pretrain"), dict):
            cfg["pretrain"] = {k: v for k, v in cfg["pretrain"].items() if k != "checkpoint_every"}
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def load(path: str | Path, data: bool = False) -> dict:
    """Read a YAML config file and resolve it (`data`: also check data.path's contents)."""
    return resolve_stack([path], data=data, device=False)
