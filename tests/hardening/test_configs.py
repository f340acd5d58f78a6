"""Broken and hostile config files and overrides: each is one ConfigError naming the file, key or line."""
import re
from pathlib import Path

import pytest

from engine.config import MAX_CONFIG_VALUES, load_config
from engine.errors import ConfigError, ToolkitError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(path_or_text, overrides=(), tmp_path=None):
    """The ConfigError load_config raises (it must be ours, never yaml's or Python's)."""
    with pytest.raises(ConfigError) as info:
        load_config(path_or_text, overrides)
    assert isinstance(info.value, ToolkitError)
    return str(info.value)


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "a.yaml", "model:\n  backbone:\n    detph: 101\n")
    message = refused(path)
    assert message == (f"unknown config key 'model.backbone.detph' (in {path}); "
                       "did you mean 'model.backbone.depth'?")


def test_unknown_section_in_file(tmp_path):
    path = write(tmp_path, "a.yaml", "solvr:\n  base_lr: 0.1\n")
    assert refused(path) == f"unknown config key 'solvr' (in {path}); did you mean 'solver'?"


def test_unknown_key_as_override():
    message = refused("configs/frcnn_r50.yaml", ["solver.base_rl=0.01"])
    assert message == ("unknown config key 'solver.base_rl' (from override 'solver.base_rl=0.01'); "
                       "did you mean 'solver.base_lr'?")


def test_override_below_a_value_is_unknown():
    # solver.base_lr is a number, not a section: solver.base_lr.x does not exist.
    message = refused("configs/frcnn_r50.yaml", ["solver.base_lr.x=1"])
    assert message.startswith("unknown config key 'solver.base_lr.x' (from override 'solver.base_lr.x=1')")


@pytest.mark.parametrize("override", ["solver.base_lr", "", "=0.1", "solver..base_lr=1"])
def test_override_that_is_not_key_equals_value(override):
    message = refused("configs/frcnn_r50.yaml", [override])
    assert message.startswith(f"override {override!r}")
    assert "KEY" in message


@pytest.mark.parametrize("text, key, expected, got", [
    ("model:\n  num_classes: eighty\n", "model.num_classes", "int", "str ('eighty')"),
    ("solver:\n  base_lr: [0.1, 0.2]\n", "solver.base_lr", "float", "list ([0.1, 0.2])"),
    ("model:\n  num_classes: true\n", "model.num_classes", "int", "bool (True)"),
    ("model:\n  channels_last: 1\n", "model.channels_last", "bool", "int (1)"),
    ("solver:\n  max_iter: 1.5\n", "solver.max_iter", "int", "float (1.5)"),
])
def test_wrong_type_in_file(tmp_path, text, key, expected, got):
    path = write(tmp_path, "a.yaml", text)
    assert refused(path) == f"config key '{key}' expects {expected}, got {got} (in {path})"


@pytest.mark.parametrize("override, message", [
    ("model.num_classes=eighty", "config key 'model.num_classes' expects int, got str ('eighty')"),
    ("solver.base_lr=[0.1]", "config key 'solver.base_lr' expects float, got list ([0.1])"),
    ("model.num_classes=true", "config key 'model.num_classes' expects int, got bool (True)"),
])
def test_wrong_type_as_override(override, message):
    assert refused("configs/frcnn_r50.yaml", [override]) == f"{message} (from override {override!r})"


@pytest.mark.parametrize("override, message", [
    ("solver.ims_per_batch=0", "config key 'solver.ims_per_batch' must be at least 1, got 0"),
    ("test.ims_per_batch=-2", "config key 'test.ims_per_batch' must be at least 1, got -2"),
    ("data.num_workers=-1", "config key 'data.num_workers' must be at least 0, got -1"),
    ("input.min_size_train=[640,0]", "config key 'input.min_size_train[1]' must be at least 1, got 0"),
    ("solver.steps=[-5]", "config key 'solver.steps[0]' must be at least 0, got -5"),
    ("model.roi_heads.batch_size_per_image=0",
     "config key 'model.roi_heads.batch_size_per_image' must be at least 1, got 0"),
])
def test_out_of_range_count_is_refused(tmp_path, override, message):
    """A count below its smallest sensible value (no images per batch, negative workers or sizes) is named
    when the config is read, not as a traceback from a sampler or a tensor shape later."""
    assert refused("configs/frcnn_r50.yaml", [override]) == f"{message} (from override {override!r})"
    path = write(tmp_path, "a.yaml", "_base_: " + str(Path("configs/frcnn_r50.yaml").resolve()) +
                 "\nsolver:\n  log_period: 0\n")
    assert refused(path) == f"config key 'solver.log_period' must be at least 1, got 0 (in {path})"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_number_is_refused(tmp_path, value):
    path = write(tmp_path, "a.yaml", f"solver:\n  base_lr: {value}\n")
    message = refused(path)
    assert message.startswith("config key 'solver.base_lr' expects a finite number, got ")
    assert message.endswith(f"(in {path})")
    override = f"input.pixel_std=[1.0, {value}, 1.0]"
    message = refused("configs/frcnn_r50.yaml", [override])
    assert message.startswith("config key 'input.pixel_std[1]' expects a finite number, got ")
    assert message.endswith(f"(from override {override!r})")


def test_base_cycle_of_two_files(tmp_path):
    a = write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    b = write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    assert refused(a) == f"_base_ cycle: {a.resolve()} -> {b.resolve()} -> {a.resolve()}"


def test_base_of_itself(tmp_path):
    a = write(tmp_path, "a.yaml", "_base_: ./a.yaml\nseed: 1\n")
    assert refused(a) == f"_base_ cycle: {a.resolve()} -> {a.resolve()}"


def test_missing_base_file(tmp_path):
    a = write(tmp_path, "a.yaml", "_base_: [missing.yaml]\n")
    assert refused(a) == f"_base_ file not found: {tmp_path / 'missing.yaml'} (named in {a})"


@pytest.mark.parametrize("tag", ['!!python/object/apply:os.system ["touch {marker}"]',
                                 "!!python/name:os.system", '!!python/object/new:os.system ["touch {marker}"]'])
def test_python_tags_are_refused_and_never_run(tmp_path, tag):
    marker = tmp_path / "MARKER"
    path = write(tmp_path, "evil.yaml", "model:\n  weights: " + tag.format(marker=marker) + "\n")
    message = refused(path)
    assert message.startswith(f"invalid YAML in {path}, line 2, column 12: could not determine a constructor "
                              "for the tag 'tag:yaml.org,2002:python/")
    assert "tags such as !!python/object are refused" in message
    assert not marker.exists()


def test_python_tag_in_an_override_is_a_plain_string_never_run(tmp_path):
    marker = tmp_path / "MARKER"
    override = f'model.weights=!!python/object/apply:os.system ["touch {marker}"]'
    cfg = load_config("configs/frcnn_r50.yaml", [override])
    # An unreadable override value is the text as written (the string key takes it), and nothing ran.
    assert cfg.model.weights == f'!!python/object/apply:os.system ["touch {marker}"]'
    assert not marker.exists()


@pytest.mark.parametrize("text, line", [
    ("model:\n  num_classes: 3\n   depth: 5\n", 3),
    ("seed: 1\nsolver: {base_lr: 0.1\n", 3),
    ("model:\n\tnum_classes: 3\n", 2),
    ('output_dir: "unterminated\n', 2),
])
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    path = write(tmp_path, "bad.yaml", text)
    message = refused(path)
    assert re.match(rf"invalid YAML in {re.escape(str(path))}, line {line}, column \d+: \S", message), message


def test_key_written_twice_is_refused(tmp_path):
    path = write(tmp_path, "a.yaml", "solver:\n  base_lr: 0.1\n  max_iter: 10\n  base_lr: 0.02\n")
    assert refused(path) == (f"invalid YAML in {path}, line 4, column 3: key 'base_lr' is given twice "
                             "(first on line 2); keep one of them")


def test_merge_keys_may_be_overridden(tmp_path):
    # `<<: *anchor` then an explicit key is YAML's way to override, not a duplicate.
    path = write(tmp_path, "a.yaml", "input:\n  pixel_mean: &m [1.0, 2.0, 3.0]\n  pixel_std: *m\n")
    assert load_config(path).input.pixel_std == [1.0, 2.0, 3.0]


def test_alias_that_contains_itself(tmp_path):
    path = write(tmp_path, "a.yaml", "input:\n  pixel_mean: &x [1.0, *x]\n")
    assert refused(path) == (f"{path}: a value contains itself through a YAML alias (&anchor ... *anchor "
                             "inside it); write the value out")


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10^9 strings
    path = write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")
    assert refused(path).startswith(f"{path}: more than {MAX_CONFIG_VALUES} values once YAML aliases are expanded")


def test_deep_nesting_is_refused(tmp_path):
    path = write(tmp_path, "deep.yaml", "seed: " + "[" * 60 + "]" * 60 + "\n")
    assert refused(path).startswith(f"{path}: values nested more than 50 levels deep")
    path = write(tmp_path, "deeper.yaml", "seed: " + "[" * 1500 + "]" * 1500 + "\n")
    assert refused(path).startswith(f"invalid YAML in {path}")


def test_top_level_not_a_mapping(tmp_path):
    path = write(tmp_path, "list.yaml", "- seed\n- 1\n")
    assert refused(path) == f"{path}: the top level must be a mapping of config keys, got list"


def test_binary_file(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01garbage")
    assert refused(path).startswith(f"cannot read config file {path}: ")
