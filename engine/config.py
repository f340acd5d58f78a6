"""YAML configs: `_base_` inheritance, command-line overrides and validation against `engine.schema`.

The resolved config is always schema defaults <- bases (in order) <- the file <- overrides, checked key
by key before anything is built, so a typo or a wrong type stops a run at start-up with the key, the
file it came from and what would be accepted. Dicts merge deeply; lists and scalars replace.

    cfg = load_config("configs/frcnn_r50.yaml", ["solver.base_lr=0.01", "model.backbone.norm=GN"])
    cfg.model.backbone.depth          # 50
    save_config(cfg, cfg.output_dir)  # output_dir/config.yaml, which load_config reads back unchanged
"""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .schema import OVERRIDE_ALIASES, SCHEMA, NoneType, Opt, all_keys, defaults

BASE_KEY = "_base_"
CONFIG_FILENAME = "config.yaml"


class _Loader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader (no Python tags, nothing executed) that also reads `1e-4` as a float and
    refuses a key written twice in one mapping (YAML would keep the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                # `<<` merge keys may repeat and may be overridden by explicit keys; only those are compared.
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    earlier = first.setdefault(key, key_node.start_mark)
                except TypeError:  # unhashable: the constructor below reports it
                    continue
                if earlier is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {earlier.line + 1}); "
                        "keep one of them", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """`yaml.safe_dump`'s dumper that quotes strings `_Loader` would otherwise read back as floats."""


# PyYAML implements YAML 1.1, where `1e-4` and `1.0e4` (no dot, or no exponent sign) are strings. Weight
# decays are written that way, and "expects float, got str ('1e-4')" would be a baffling error.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    # `min_size_train: [640, 672, 704]` on one line, the way configs are written by hand.
    flow = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)


class Config(dict):
    """A config: a dict with attribute access (`cfg.model.backbone.depth`); nested dicts are Configs.

    `Config(d)` only wraps `d`; `Config.from_dict` and `load_config` also fill defaults and validate.
    Keys that are dict method names (`items`, `keys`, ...) are reachable only as `cfg["items"]`.
    A resolved config also remembers which keys the command line set (`overridden`), outside its keys.
    """

    # Not a config key, so it is neither validated nor written to config.yaml.
    __slots__ = ("_overridden",)

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.update(*args, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping, overrides: Iterable[str] = ()) -> Config:
        """Resolve and validate a config written in code. A `_base_` in it is relative to the working directory."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"Config.from_dict expects a mapping of config keys, got {type(data).__name__}")
        data = dict(data)
        layers: list[tuple[dict, str]] = []
        _expand_bases(data, Path.cwd(), "in the dict given to Config.from_dict", (), layers)
        return _resolve(layers, overrides)

    def __setitem__(self, key, value):
        super().__setitem__(key, _wrap(value))

    def update(self, *args, **kwargs):
        # dict.update bypasses __setitem__, which would leave nested plain dicts without attribute access.
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def copy(self) -> Config:
        copied = Config(self)
        record = overridden(self)
        if record:
            object.__setattr__(copied, "_overridden", dict(record))
        return copied

    def __getattr__(self, name):
        # Dunder lookups (pickle's __setstate__, copy's __deepcopy__) must fail the ordinary way.
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}; it has {', '.join(map(str, self)) or 'none'}") from None

    def __setattr__(self, name, value):
        self[name] = value

    def __reduce__(self):
        # pickle (any protocol) and copy.deepcopy: the keys, and the record of overrides, which is no key.
        return _rebuild_config, (dict(self), overridden(self))

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def get_path(self, key: str, default: Any = ...) -> Any:
        """The value at a dotted key ("model.backbone.depth"); `default` if given and the key is missing."""
        node: Any = self
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                if default is not ...:
                    return default
                raise ConfigError(f"no config key '{key}'{_suggestion(key, _dotted_keys(self))}")
            node = node[part]
        return node

    def to_dict(self) -> dict:
        """Plain dicts and lists, for yaml, json or code that type-checks for dict."""
        return _plain(self)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config and its `_base_` files, apply `KEY=VALUE` overrides, validate against the schema."""
    layers: list[tuple[dict, str]] = []
    _load_file(Path(path), (), layers)
    return _resolve(layers, overrides)


def _rebuild_config(items: dict, record: dict) -> Config:
    cfg = Config(items)
    if record:
        object.__setattr__(cfg, "_overridden", record)
    return cfg


def overridden(cfg: Config) -> dict[str, Any]:
    """The dotted keys that KEY=VALUE overrides set when `cfg` was resolved, each with the value the files
    (or the schema's defaults) gave it before: what the user asked for on the command line, which
    `engine.solver.scale_to_world_size` takes literally. {} for a config resolved without overrides or
    built by hand. The record itself, not a copy: code that adapts `cfg` in place keeps it true."""
    try:
        return object.__getattribute__(cfg, "_overridden")
    except AttributeError:  # not resolved with overrides, or not a Config
        return {}


def as_config(config: str | Path | Mapping, overrides: Iterable[str] = ()) -> Config:
    """A config from a YAML path or an already resolved mapping, with `KEY=VALUE` overrides applied to either."""
    if isinstance(config, Config) and not overrides:
        return config
    if isinstance(config, Mapping):
        return Config.from_dict(config, overrides)
    return load_config(config, overrides)


def save_config(cfg: Mapping, output_dir: str | Path) -> Path:
    """Write the resolved config to `output_dir/config.yaml` and return that path."""
    from engine.distributed import is_main

    out = Path(output_dir)
    path = out / CONFIG_FILENAME
    if not is_main():  # one process of a distributed run writes it
        return path
    text = (cfg if isinstance(cfg, Config) else Config(cfg)).to_yaml()
    try:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write the config to {path}: {e.strerror or e}") from None
    return path


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except RecursionError:
        raise ConfigError(f"invalid YAML in {path}: nested too deeply to read") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        if isinstance(e, yaml.constructor.ConstructorError) and "tag" in problem:
            problem += ("; config files hold only mappings, lists, strings, numbers, booleans and null, "
                        "so tags such as !!python/object are refused")
        raise ConfigError(f"invalid YAML in {path}{_line(e)}: {problem}") from None
    if data is None:  # an empty file, or only comments
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config keys, got {type(data).__name__}")
    _check_plain_tree(data, str(path))
    return data


# YAML anchors and aliases can make a list that contains itself, or a few lines that expand to billions
# of values; neither is a config. Real configs have a few hundred values.
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 50


def _check_plain_tree(data: Any, where: str) -> None:
    """Raise ConfigError for a value that contains itself, nests deeper than MAX_CONFIG_DEPTH or holds
    more than MAX_CONFIG_VALUES values once its aliases are expanded."""
    count = 0
    stack = [(data, 0, ())]
    while stack:
        node, depth, parents = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_VALUES} values once YAML aliases are expanded; "
                              "a config is a few hundred keys (is an alias repeated many times?)")
        if not isinstance(node, (dict, list)):
            continue
        if id(node) in parents:
            raise ConfigError(f"{where}: a value contains itself through a YAML alias (&anchor ... *anchor "
                              "inside it); write the value out")
        if depth >= MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: values nested more than {MAX_CONFIG_DEPTH} levels deep; "
                              "no config key takes that")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1, parents + (id(node),)) for child in children)


def _line(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _load_file(path: Path, chain: tuple[Path, ...], layers: list) -> None:
    data = _read_yaml(path)
    _expand_bases(data, path.absolute().parent, f"in {path}", chain + (path.resolve(),), layers)


def _expand_bases(data: dict, base_dir: Path, origin: str, chain: tuple[Path, ...], layers: list) -> None:
    """Append (data, origin) to `layers` after the layers of its `_base_` files, which are relative to base_dir."""
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{BASE_KEY} ({origin}) must be a path or a list of paths, got {bases!r}")
    for base in bases:
        base_path = base_dir / base
        if base_path.resolve() in chain:
            files = " -> ".join(str(p) for p in chain + (base_path.resolve(),))
            raise ConfigError(f"{BASE_KEY} cycle: {files}")
        if not base_path.is_file():
            raise ConfigError(f"{BASE_KEY} file not found: {base_path} (named {origin})")
        _load_file(base_path, chain, layers)
    layers.append((data, origin))


def _resolve(layers: list[tuple[dict, str]], overrides: Iterable[str]) -> Config:
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of 'KEY=VALUE' strings, got the single string {overrides!r}")
    merged = defaults()
    origins: dict[str, str] = {}  # dotted key -> where its value was last set, for error messages
    for data, origin in layers:
        _check_keys(data, SCHEMA, origin)
        _merge(merged, data, origin, origins)
    from_files = copy.deepcopy(merged)
    for item in overrides or ():
        key, raw = _split_override(item)
        key = OVERRIDE_ALIASES.get(key, key)
        origin = f"from override {item!r}"
        value = _parse_override_value(raw, item)
        spec = _override_spec(key, value, origin)
        if isinstance(spec, Opt) and str in spec.types and not _accepted(value, spec.types):
            # The shell has already eaten any quotes: `data.train.img_dir=2017` means the string, and
            # `model.fpn.norm=` (yaml: null) the empty string.
            value = raw.strip()
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _merge(merged, nested, origin, origins)
    _validate(merged, SCHEMA, origins)
    cfg = Config(_expand_env(merged))
    files = Config(_expand_env(from_files))
    record = {}
    for key, origin in origins.items():
        if origin.startswith("from override "):
            before = files.get_path(key, None)
            record[key] = before.to_dict() if isinstance(before, Config) else before
    if record:
        object.__setattr__(cfg, "_overridden", record)
    return cfg


# `${NAME}` or `${NAME:-default}` in string values: dataset locations differ per machine, so configs
# write `${DATASETS:-datasets}/coco` and each machine sets DATASETS once.
_ENV_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand_env(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v) for v in node]
    if isinstance(node, str):
        return _ENV_VAR.sub(lambda m: os.environ.get(m[1], m[2] if m[2] is not None else m[0]), node)
    return node


def _split_override(item: Any) -> tuple[str, str]:
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(
            f"override {item!r} is not of the form KEY=VALUE with a dotted KEY, "
            "e.g. solver.base_lr=0.01, input.min_size_train=[640,672] or model.backbone.weights=null"
        )
    key, raw = item.split("=", 1)
    key = key.strip()
    if not all(key.split(".")):
        raise ConfigError(f"override {item!r}: KEY must be a dotted config key such as solver.base_lr")
    return key, raw


def _parse_override_value(raw: str, item: str) -> Any:
    try:
        value = yaml.load(raw, Loader=_Loader)
    except (yaml.YAMLError, RecursionError):
        return raw
    _check_plain_tree(value, f"override {item!r}")
    return value


def _override_spec(key: str, value: Any, origin: str) -> Opt | dict:
    """The schema entry an override sets; raises for an unknown key, or unknown keys in a mapping value."""
    spec: Any = SCHEMA
    for part in key.split("."):
        if not isinstance(spec, dict) or part not in spec:
            candidates = all_keys(include_sections=isinstance(value, dict))
            raise ConfigError(f"unknown config key '{key}' ({origin}){_suggestion(key, candidates)}")
        spec = spec[part]
    if isinstance(spec, dict) and isinstance(value, dict):
        _check_keys(value, spec, origin, key + ".")
    return spec


def _check_keys(data: dict, schema: dict, origin: str, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        spec = schema.get(key) if isinstance(key, str) else None
        if spec is None:
            # A mapping under an unknown key is most likely a misspelt section.
            candidates = all_keys(include_sections=isinstance(value, dict))
            raise ConfigError(f"unknown config key '{dotted}' ({origin}){_suggestion(dotted, candidates)}")
        if isinstance(spec, dict) and isinstance(value, dict):
            _check_keys(value, spec, origin, dotted + ".")


def _merge(dst: dict, src: Mapping, origin: str, origins: dict, prefix: str = "") -> None:
    for key, value in src.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, origin, origins, dotted + ".")
            continue
        dst[key] = _plain(value)
        for stale in [k for k in origins if k.startswith(dotted + ".")]:
            del origins[stale]
        origins[dotted] = origin


def _validate(node: dict, schema: dict, origins: dict, prefix: str = "") -> None:
    # Unknown keys were rejected layer by layer before merging, where the file that holds them is known.
    for key, spec in schema.items():
        dotted = prefix + key
        if key not in node:
            # Only when a section was replaced by a non-mapping and then re-created by an override.
            node[key] = defaults(spec) if isinstance(spec, dict) else copy.deepcopy(spec.default)
        if isinstance(spec, dict):
            if not isinstance(node[key], dict):
                raise ConfigError(
                    f"config key '{dotted}' is a section and expects a mapping, "
                    f"got {_describe(node[key])}{_where(dotted, origins)}"
                )
            _validate(node[key], spec, origins, dotted + ".")
        else:
            node[key] = _check_value(dotted, node[key], spec, origins)


def _check_value(key: str, value: Any, opt: Opt, origins: dict) -> Any:
    value = _coerce(key, value, opt.types, opt, origins)
    if opt.elem is not None and isinstance(value, list):
        value = [_coerce(f"{key}[{i}]", v, (opt.elem,), None, origins) for i, v in enumerate(value)]
    if opt.choices is not None and value is not None and value not in opt.choices:
        valid = ", ".join(repr(c) for c in opt.choices)
        raise ConfigError(f"config key '{key}' must be one of {valid}; got {value!r}{_where(key, origins)}")
    if opt.min is not None:
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if v is not None and v < opt.min:
                name = f"{key}[{i}]" if isinstance(value, list) else key
                raise ConfigError(f"config key '{name}' must be at least {opt.min}, got {v!r}{_where(key, origins)}")
    return value


def _accepted(value: Any, types: tuple) -> bool:
    if isinstance(value, bool):
        # bool is an int subclass, but `seed: true` is a mistake, not 1.
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _coerce(key: str, value: Any, types: tuple, opt: Opt | None, origins: dict) -> Any:
    """`value` if it has one of `types`, an int converted to float where only float is expected; else raise."""
    if _accepted(value, types):
        if isinstance(value, float) and not math.isfinite(value):
            # `.nan` or `.inf` is never a setting: a learning rate or threshold of NaN trains silently wrong.
            raise ConfigError(f"config key '{key}' expects a finite number, got {value!r}{_where(key, origins)}")
        if isinstance(value, int) and not isinstance(value, bool) and int not in types:
            return float(value)
        return value
    expected = " or ".join(_type_name(t, opt.elem if opt is not None and t is list else None) for t in types)
    raise ConfigError(f"config key '{key}' expects {expected}, got {_describe(value)}{_where(key, origins)}")


def _wrap(value: Any) -> Any:
    if isinstance(value, Config):
        return value
    if isinstance(value, Mapping):
        return Config(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


def _dotted_keys(node: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys.append(f"{prefix}{key}")
        if isinstance(value, Mapping):
            keys.extend(_dotted_keys(value, f"{prefix}{key}."))
    return keys


def _suggestion(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1)
    return f"; did you mean '{match[0]}'?" if match else ""


def _where(key: str, origins: dict) -> str:
    """Where the value at `key` (or at the nearest enclosing section) was set: ' (in FILE)', or ''."""
    key = key.split("[", 1)[0]
    while key:
        if key in origins:
            return f" ({origins[key]})"
        key = key.rpartition(".")[0]
    return ""


def _type_name(t: type, elem: type | None = None) -> str:
    if t is NoneType:
        return "null"
    return f"list of {elem.__name__}" if elem is not None else t.__name__


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} ({text})"
