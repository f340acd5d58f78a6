import copy
import pickle
import textwrap

import pytest
from pathlib import Path

from engine import Config, ConfigError, load_config, save_config
from engine.schema import SCHEMA, Opt, all_keys, defaults


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_defaults_load():
    cfg = Config.from_dict({})
    assert cfg == defaults()
    assert cfg.model.name == "resnet_fpn"
    assert cfg.model.backbone.depth == 50
    assert cfg.model.backbone.dilation == [False, False, False]
    assert cfg.model.fpn.norm == ""
    assert cfg.input.min_size_train == [800]
    assert cfg.solver.weight_decay == pytest.approx(1e-4)  # the schema's float literal: no arithmetic, exact
    assert cfg.solver.steps == []
    assert cfg.data.train.ann_file is None
    assert cfg.output_dir == "output/default"


def test_empty_file_gives_defaults(tmp_path):
    path = write(tmp_path / "empty.yaml", "# only a comment\n")
    assert load_config(path) == defaults()


def test_defaults_are_fresh_copies():
    a = Config.from_dict({})
    a.input.min_size_train.append(1024)
    assert Config.from_dict({}).input.min_size_train == [800]


def test_all_keys():
    keys = all_keys()
    assert "model.backbone.depth" in keys
    assert "data.val.img_dir" in keys
    assert "output_dir" in keys
    assert "model.backbone" not in keys
    assert "model.backbone" in all_keys(include_sections=True)
    assert len(keys) == len(set(keys))


def test_no_schema_key_hides_a_dict_method():
    # `cfg.items` would return dict.items, not the config value.
    def names(schema):
        for key, spec in schema.items():
            yield key
            if isinstance(spec, dict):
                yield from names(spec)

    assert [k for k in names(SCHEMA) if hasattr(dict, k)] == []


def test_opt_types_with_none():
    assert Opt((str, None), None).types == (str, type(None))
    assert Opt(int, 0, choices=[1, 2]).choices == (1, 2)


def test_base_single_relative_to_the_file(tmp_path, monkeypatch):
    write(tmp_path / "configs" / "_base_" / "models" / "r50.yaml", """
        model:
          backbone:
            depth: 101
            norm: FrozenBN
    """)
    path = write(tmp_path / "configs" / "det" / "frcnn.yaml", """
        _base_: ../_base_/models/r50.yaml
        solver:
          base_lr: 0.02
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.model.backbone.depth == 101
    assert cfg.model.backbone.norm == "FrozenBN"
    assert cfg.solver.base_lr == 0.02
    assert cfg.model.backbone.groups == 1  # default kept
    assert "_base_" not in cfg


def test_base_list_merged_in_order_then_file(tmp_path):
    # b1 names its own base relative to its own folder.
    write(tmp_path / "base" / "deeper" / "b0.yaml", "seed: 7\ndevice: cpu\n")
    write(tmp_path / "base" / "b1.yaml", """
        _base_: [deeper/b0.yaml]
        seed: 1
        solver: {base_lr: 0.5, momentum: 0.8}
    """)
    write(tmp_path / "base" / "b2.yaml", "solver: {base_lr: 0.25}\noutput_dir: out/b2\n")
    path = write(tmp_path / "main" / "m.yaml", """
        _base_:
          - ../base/b1.yaml
          - ../base/b2.yaml
        output_dir: out/main
    """)
    cfg = load_config(path)
    assert cfg.device == "cpu"  # from b0
    assert cfg.seed == 1  # b1 over b0
    assert cfg.solver.base_lr == 0.25  # b2 over b1
    assert cfg.solver.momentum == 0.8  # b1, untouched by b2
    assert cfg.output_dir == "out/main"  # the file over its bases
    assert "_base_" not in cfg


def test_diamond_bases_are_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", "seed: 3\n")
    write(tmp_path / "left.yaml", "_base_: root.yaml\n")
    write(tmp_path / "right.yaml", "_base_: root.yaml\n")
    path = write(tmp_path / "top.yaml", "_base_: [left.yaml, right.yaml]\n")
    assert load_config(path).seed == 3


def test_deep_merge_dicts_merge_lists_replace(tmp_path):
    write(tmp_path / "base.yaml", """
        model:
          backbone: {depth: 101, norm: GN, out_features: [res3, res4, res5]}
        input:
          min_size_train: [640, 672, 704]
    """)
    path = write(tmp_path / "child.yaml", """
        _base_: base.yaml
        model:
          backbone: {depth: 50, out_features: [res5]}
        input:
          min_size_train: [800]
    """)
    cfg = load_config(path)
    assert cfg.model.backbone.depth == 50
    assert cfg.model.backbone.norm == "GN"  # sibling kept from the base
    assert cfg.model.fpn.out_channels == 256  # other sections keep defaults
    assert cfg.model.backbone.out_features == ["res5"]
    assert cfg.input.min_size_train == [800]


@pytest.fixture
def nondefault(tmp_path):
    return write(tmp_path / "nondefault.yaml", """
        model:
          backbone: {weights: pretrained/r50.pth, norm: FrozenBN}
        solver: {base_lr: 0.1, amp: false}
        input: {min_size_train: [800]}
    """)


@pytest.mark.parametrize("override, key, expected", [
    ("solver.base_lr=0.01", "solver.base_lr", 0.01),
    ("solver.weight_decay=1e-5", "solver.weight_decay", 1e-5),
    ("input.min_size_train=[640,672]", "input.min_size_train", [640, 672]),
    ("model.backbone.weights=null", "model.backbone.weights", None),
    ("solver.amp=true", "solver.amp", True),
    ("model.backbone.norm=GN", "model.backbone.norm", "GN"),
    ("model.fpn.norm=GN", "model.fpn.norm", "GN"),
    ("model.fpn.norm=", "model.fpn.norm", ""),
    ("model.backbone.weights=", "model.backbone.weights", None),
    ("data.train.root=a=b", "data.train.root", "a=b"),
    ("solver.base_lr=1", "solver.base_lr", 1.0),
    ("data.train.img_dir=2017", "data.train.img_dir", "2017"),
    ("data.train={ann_file: a.json}", "data.train.ann_file", "a.json"),
])
def test_override_each_type(nondefault, override, key, expected):
    before = load_config(nondefault).get_path(key)
    got = load_config(nondefault, [override]).get_path(key)
    assert got == expected
    assert type(got) is type(expected)
    if override != "model.fpn.norm=":
        assert got != before


def test_later_override_wins_and_overrides_beat_the_file(nondefault):
    cfg = load_config(nondefault, ["solver.base_lr=0.2", "solver.base_lr=0.3"])
    assert cfg.solver.base_lr == 0.3


def test_override_without_equals():
    with pytest.raises(ConfigError, match="KEY=VALUE") as e:
        Config.from_dict({}, ["solver.base_lr"])
    assert "solver.base_lr" in str(e.value)


def test_overrides_as_a_single_string_is_refused():
    with pytest.raises(ConfigError, match="list"):
        Config.from_dict({}, "solver.base_lr=0.1")


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path / "typo.yaml", "model:\n  backbone:\n    dpeth: 101\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "'model.backbone.dpeth'" in msg
    assert "did you mean 'model.backbone.depth'" in msg
    assert str(path) in msg


def test_unknown_key_in_a_base_names_the_base(tmp_path):
    base = write(tmp_path / "b" / "base.yaml", "solver: {weight_decya: 0.1}\n")
    path = write(tmp_path / "child.yaml", "_base_: b/base.yaml\n")
    with pytest.raises(ConfigError, match="did you mean 'solver.weight_decay'") as e:
        load_config(path)
    assert str(base) in str(e.value)


def test_unknown_override_key():
    with pytest.raises(ConfigError) as e:
        Config.from_dict({}, ["model.backbone.dpeth=101"])
    msg = str(e.value)
    assert "'model.backbone.dpeth'" in msg
    assert "did you mean 'model.backbone.depth'" in msg
    with pytest.raises(ConfigError, match="did you mean 'solver.base_lr'"):
        Config.from_dict({}, ["solver.lr=0.1"])


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError, match="unknown config key 'zzzz'") as e:
        Config.from_dict({}, ["zzzz=1"])
    assert "did you mean" not in str(e.value)


def test_wrong_type_names_key_expected_and_given(tmp_path):
    path = write(tmp_path / "bad.yaml", "solver:\n  base_lr: abc\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "config key 'solver.base_lr' expects float, got str ('abc')" in msg
    assert str(path) in msg


def test_wrong_type_from_override_names_the_override():
    with pytest.raises(ConfigError, match=r"'seed' expects int, got str \('x'\).*seed=x"):
        Config.from_dict({}, ["seed=x"])


def test_list_elements_are_checked():
    with pytest.raises(ConfigError, match=r"'input\.min_size_train\[1\]' expects int, got str"):
        Config.from_dict({}, ["input.min_size_train=[640,big]"])
    with pytest.raises(ConfigError, match=r"'input\.min_size_train' expects list of int, got int"):
        Config.from_dict({"input": {"min_size_train": 800}})


def test_section_replaced_by_a_scalar():
    with pytest.raises(ConfigError, match="'model.backbone' is a section"):
        Config.from_dict({"model": {"backbone": 50}})


def test_int_accepted_for_float():
    cfg = Config.from_dict({"solver": {"base_lr": 1, "momentum": 0}})
    assert cfg.solver.base_lr == 1.0 and type(cfg.solver.base_lr) is float
    assert type(cfg.solver.momentum) is float


def test_exponent_without_dot_is_a_float(tmp_path):
    # Plain PyYAML (YAML 1.1) reads `1e-4` as the string '1e-4'.
    cfg = load_config(write(tmp_path / "wd.yaml", "solver: {weight_decay: 5e-5}\n"))
    assert cfg.solver.weight_decay == 5e-5


@pytest.mark.parametrize("data, key", [
    ({"seed": True}, "seed"),
    ({"solver": {"base_lr": False}}, "solver.base_lr"),
    ({"model": {"backbone": {"depth": True}}}, "model.backbone.depth"),
])
def test_bool_rejected_for_numbers(data, key):
    with pytest.raises(ConfigError, match=rf"'{key}' expects (int|float), got bool"):
        Config.from_dict(data)


def test_float_rejected_for_int():
    with pytest.raises(ConfigError, match="'solver.max_iter' expects int, got float"):
        Config.from_dict({"solver": {"max_iter": 10.5}})


def test_optional_accepts_none_and_rejects_other_types():
    assert Config.from_dict({"model": {"weights": None}}).model.weights is None
    assert Config.from_dict({"model": {"weights": "w.pth"}}).model.weights == "w.pth"
    with pytest.raises(ConfigError, match="'model.weights' expects str or null, got int"):
        Config.from_dict({"model": {"weights": 5}})
    with pytest.raises(ConfigError, match="'seed' expects int, got null"):
        Config.from_dict({"seed": None})


def test_choices_violation_lists_valid_values():
    with pytest.raises(ConfigError) as e:
        Config.from_dict({}, ["model.backbone.norm=LN"])
    msg = str(e.value)
    assert "'model.backbone.norm'" in msg and "'LN'" in msg
    for valid in ("'BN'", "'FrozenBN'", "'SyncBN'", "'GN'"):
        assert valid in msg
    with pytest.raises(ConfigError, match="18, 34, 50, 101, 152"):
        Config.from_dict({"model": {"backbone": {"depth": 20}}})


def test_base_cycle_lists_the_chain(tmp_path):
    a = write(tmp_path / "a.yaml", "_base_: sub/b.yaml\n")
    b = write(tmp_path / "sub" / "b.yaml", "_base_: ../a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(a)
    msg = str(e.value)
    assert str(a.resolve()) in msg and str(b.resolve()) in msg
    assert msg.index(str(a.resolve())) < msg.index(str(b.resolve()))


def test_self_base_is_a_cycle(tmp_path):
    a = write(tmp_path / "a.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)


def test_missing_base_names_it_and_the_referencing_file(tmp_path):
    path = write(tmp_path / "child.yaml", "_base_: nothere/base.yaml\n")
    with pytest.raises(ConfigError, match="not found") as e:
        load_config(path)
    msg = str(e.value)
    assert str(tmp_path / "nothere" / "base.yaml") in msg
    assert str(path) in msg


def test_bad_base_value(tmp_path):
    path = write(tmp_path / "child.yaml", "_base_: 3\n")
    with pytest.raises(ConfigError, match="_base_"):
        load_config(path)


def test_missing_config_file(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="not found") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "seed: 1\nsolver:\n  base_lr: [0.1\n  momentum: 0.9\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "line 4" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping") as e:
        load_config(path)
    assert str(path) in str(e.value)
    with pytest.raises(ConfigError, match="mapping"):
        Config.from_dict([1, 2])


def test_python_tags_are_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path / "evil.yaml", f"seed: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert "python/object/apply:os.system" in str(e.value)
    assert not marker.exists()
    # The same text as an override value does not parse, so it stays an inert string.
    cfg = Config.from_dict({}, [f"output_dir=!!python/object/apply:os.system ['touch {marker}']"])
    assert cfg.output_dir.startswith("!!python")
    assert not marker.exists()


def test_save_config_round_trip(tmp_path):
    overrides = [
        "solver.weight_decay=1e-5", "input.min_size_train=[640,672,704]", "model.backbone.weights=null",
        "output_dir=1e-4", "device=yes", "model.fpn.norm=", "data.train.ann_file=null",
        "model.backbone.dilation=[false,true,true]", "data.val.img_dir=val 2017: #1",
    ]
    cfg = Config.from_dict({}, overrides)
    path = save_config(cfg, tmp_path / "run" / "nested")
    assert path == tmp_path / "run" / "nested" / "config.yaml"
    again = load_config(path)
    assert again == cfg
    assert again.output_dir == "1e-4" and again.device == "yes"
    assert "_base_" not in path.read_text()


def test_save_config_of_a_based_file(tmp_path):
    write(tmp_path / "base.yaml", "seed: 5\n")
    cfg = load_config(write(tmp_path / "child.yaml", "_base_: base.yaml\n"))
    assert load_config(save_config(cfg, tmp_path / "out")) == cfg


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle(protocol):
    cfg = Config.from_dict({}, ["model.backbone.depth=101"])
    back = pickle.loads(pickle.dumps(cfg, protocol=protocol))
    assert back == cfg
    assert type(back) is Config and type(back.model.backbone) is Config
    assert back.model.backbone.depth == 101


def test_overrides_are_recorded_with_the_files_values(tmp_path):
    from engine.config import overridden

    path = tmp_path / "c.yaml"
    path.write_text("solver: {ims_per_batch: 8, base_lr: 0.01}\n")
    cfg = load_config(path, ["solver.ims_per_batch=2", "model.depth=101", "solver={max_iter: 3}"])
    assert overridden(cfg) == {"solver.ims_per_batch": 8, "model.backbone.depth": 50, "solver.max_iter": 1000}
    assert overridden(load_config(path)) == {} and overridden(cfg.solver) == {}
    for copied in (pickle.loads(pickle.dumps(cfg, protocol=0)), pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg),
                   cfg.copy()):
        assert copied == cfg and overridden(copied) == overridden(cfg)
    assert "_overridden" not in cfg and "overridden" not in cfg.to_yaml()  # no config key


def test_deepcopy_is_independent():
    cfg = Config.from_dict({})
    dup = copy.deepcopy(cfg)
    assert dup == cfg and type(dup.model) is Config
    dup.model.backbone.depth = 101
    dup.input.min_size_train.append(1024)
    assert cfg.model.backbone.depth == 50
    assert cfg.input.min_size_train == [800]


def test_attribute_access():
    cfg = Config.from_dict({"data": {"train": {"root": "coco"}}})
    assert cfg.model.backbone.depth == 50
    assert cfg["model"]["backbone"]["depth"] == 50
    assert cfg.data.train.root == "coco"
    assert isinstance(cfg.model.fpn, Config)
    with pytest.raises(AttributeError, match="backbon"):
        cfg.model.backbon
    assert not hasattr(cfg, "nothing")
    cfg.extra = {"a": {"b": 1}}
    assert cfg.extra.a.b == 1
    cfg.update(more={"c": 2})
    assert cfg.more.c == 2


def test_get_path():
    cfg = Config.from_dict({})
    assert cfg.get_path("model.backbone.depth") == 50
    assert cfg.get_path("model.backbone")["norm"] == "BN"
    assert cfg.get_path("model.backbone.nothing", None) is None
    with pytest.raises(ConfigError, match="did you mean 'model.backbone.depth'"):
        cfg.get_path("model.backbone.dpeth")


def test_to_dict_is_plain():
    def plain(value):
        if isinstance(value, dict):
            return type(value) is dict and all(plain(v) for v in value.values())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return True

    cfg = Config.from_dict({})
    d = cfg.to_dict()
    assert d == cfg and plain(d)
    d["model"]["backbone"]["depth"] = 18
    assert cfg.model.backbone.depth == 50


def test_from_dict_does_not_mutate_its_input():
    data = {"_base_": [], "input": {"min_size_train": [640]}}
    cfg = Config.from_dict(data)
    cfg.input.min_size_train.append(672)
    assert data == {"_base_": [], "input": {"min_size_train": [640]}}


def test_from_dict_base_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "configs" / "base.yaml", "seed: 9\n")
    monkeypatch.chdir(tmp_path)
    assert Config.from_dict({"_base_": "configs/base.yaml"}).seed == 9


def test_environment_variables_in_values(tmp_path, monkeypatch):
    (tmp_path / "c.yaml").write_text("data:\n  root: ${MY_DATASETS:-datasets}/coco\n"
                                     "  val: {ann_file: '${MY_DATASETS}/a.json'}\n")
    monkeypatch.delenv("MY_DATASETS", raising=False)
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.data.root == "datasets/coco"
    assert cfg.data.val.ann_file == "${MY_DATASETS}/a.json"  # unset and no default: left as written
    monkeypatch.setenv("MY_DATASETS", "/data")
    cfg = load_config(tmp_path / "c.yaml", ["data.train.img_dir=${MY_DATASETS}/train"])
    assert (cfg.data.root, cfg.data.val.ann_file, cfg.data.train.img_dir) == ("/data/coco", "/data/a.json", "/data/train")


@pytest.mark.parametrize("name", ["frcnn_r50", "frcnn_r101", "frcnn_r152", "frcnn_x101_32x8d",
                                  "torchvision/frcnn_r50_fpn"])
def test_coco_configs_resolve(name, monkeypatch):
    monkeypatch.setenv("DATASETS", "/mnt/ds")
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml")
    assert cfg.model.name == "faster_rcnn"
    assert cfg.data.val.ann_file == "/mnt/ds/coco/annotations/instances_val2017.json"
    assert cfg.data.train.img_dir == "/mnt/ds/coco/train2017"
    assert len(cfg.data.categories) == 80
    if not name.startswith("torchvision"):
        assert (cfg.solver.ims_per_batch, cfg.solver.base_lr, cfg.solver.max_iter) == (16, 0.02, 90000)
        assert cfg.solver.steps == [60000, 80000] and cfg.input.min_size_train[-1] == 800


def test_script_alias_model_depth():
    cfg = Config.from_dict({"model": {"name": "classifier"}}, ["model.depth=101"])
    assert cfg.model.backbone.depth == 101 and "depth" not in cfg.model
    with pytest.raises(ConfigError, match="model.backbone.depth"):
        Config.from_dict({}, ["model.depth=42"])
