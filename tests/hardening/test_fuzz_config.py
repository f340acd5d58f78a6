"""Property-based fuzzing of the config parser: whatever the YAML, the mutation of a valid config or the
override, parsing gives a valid config or raises ConfigError with a message, never another exception."""
import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import Config, load_config
from engine.errors import ConfigError, ToolkitError
from engine.schema import all_keys

BASE = load_config("configs/frcnn_r50.yaml").to_dict()
KEYS = all_keys(include_sections=True)
LEAF_KEYS = all_keys()

FUZZ = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["BN", "GN", "res2", "faster_rcnn", "${HOME}", "_base_", "1e-4"]))
yaml_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.sampled_from(KEYS[:40] + [k.rsplit(".", 1)[-1] for k in KEYS]),
                              st.text(max_size=8)), inner, max_size=4)), max_leaves=12)


def parse(fn, *args):
    """fn(*args): a Config, or a ConfigError with a message; anything else fails the test."""
    try:
        cfg = fn(*args)
    except ConfigError as e:
        assert isinstance(e, ToolkitError) and str(e).strip()
        return None
    assert isinstance(cfg, Config)
    return cfg


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


@FUZZ
@given(data=st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), yaml_values, max_size=5))
def test_arbitrary_yaml_mappings(tmp_path_factory, data):
    path = write_yaml(tmp_path_factory.mktemp("fuzz") / "cfg.yaml", data)
    parse(load_config, path)


@FUZZ
@given(data=yaml_values)
def test_arbitrary_yaml_documents(tmp_path_factory, data):
    path = write_yaml(tmp_path_factory.mktemp("fuzz") / "cfg.yaml", data)
    parse(load_config, path)


@FUZZ
@given(text=st.lists(st.sampled_from(list("ab:-[]{}&*!|>'\"#%@ \n\t,.0123456789_") + ["_base_", "!!", "seed",
                                                                                    "model", "\n  "]),
                     max_size=30).map("".join))
def test_arbitrary_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "cfg.yaml"
    path.write_text(text)
    parse(load_config, path)


def _set(tree, dotted, value):
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(tree.get(part), dict):
            tree[part] = {}
        tree = tree[part]
    tree[last] = value


def _delete(tree, dotted):
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part) if isinstance(tree, dict) else None
    if isinstance(tree, dict):
        tree.pop(last, None)


mutation = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), yaml_values),
    st.tuples(st.just("set"), st.sampled_from(LEAF_KEYS).map(lambda k: k + "x"), scalars),  # a typo
    st.tuples(st.just("delete"), st.sampled_from(KEYS), st.none()),
)


@settings(FUZZ, max_examples=40)
@given(mutations=st.lists(mutation, min_size=1, max_size=4))
def test_mutations_of_a_valid_config(tmp_path_factory, mutations):
    data = copy.deepcopy(BASE)
    for op, key, value in mutations:
        if op == "set":
            _set(data, key, value)
        else:
            _delete(data, key)
    path = write_yaml(tmp_path_factory.mktemp("fuzz") / "cfg.yaml", data)
    cfg = parse(load_config, path)
    if cfg is not None:  # what was accepted is what the file says, and it round-trips
        assert parse(Config.from_dict, cfg.to_dict()) == cfg


override_text = st.one_of(
    st.text(max_size=30),
    st.builds(lambda k, sep, v: f"{k}{sep}{v}", st.sampled_from(KEYS + ["", ".", "a..b"]),
              st.sampled_from(["=", "==", " = ", ":", ""]),
              st.one_of(st.text(max_size=20), yaml_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True,
                                                                                        width=10**6).strip()))),
)


@settings(FUZZ, max_examples=60)
@given(overrides=st.lists(override_text, max_size=4))
def test_random_overrides(overrides):
    parse(load_config, "configs/frcnn_r50.yaml", overrides)


@FUZZ
@given(data=st.dictionaries(st.sampled_from(KEYS), yaml_values, max_size=4),
       overrides=st.lists(override_text, max_size=2))
def test_from_dict(data, overrides):
    parse(Config.from_dict, data, overrides)
