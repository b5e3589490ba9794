"""Config: YAML + dotted overrides, type checks and validation naming the key, built-ins, help."""

import dataclasses

import pytest
import yaml

from r7b_fast import config as C
from r7b_fast.config import ConfigError, load_config

BUILTIN_TINY = ("sft_tiny", "dpo_tiny", "online_dpo_tiny")
BUILTIN_R7B = ("sft_r7b", "dpo_r7b", "online_dpo_r7b")


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


BASE = {"run": {"output_dir": "out"}, "data": {"synthetic_families": ["arith_ar"]}}


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE),
        [
            "optim.lr=3e-4",
            "model.tiny_overrides={hidden_size: 64}",
            "data.synthetic_families=[arith_ar,count_ar]",
            "checkpoint.resume=false",
            "optim.epochs=2",
        ],
    )
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.tiny_overrides == {"hidden_size": 64}
    assert cfg.data.synthetic_families == ["arith_ar", "count_ar"]
    assert cfg.checkpoint.resume is False
    assert cfg.optim.epochs == 2.0 and isinstance(cfg.optim.epochs, float)  # int accepted for float
    assert cfg.run.output_dir == "out" and cfg.optim.micro_batch == 1  # defaults kept


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["dpo.beta=0.2", "run.stage=dpo"])
    C.save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(str(tmp_path / "resolved.yaml"))
    assert again == cfg


@pytest.mark.parametrize(
    "override, key",
    [
        ("optim.lrr=1", "optim.lrr"),  # unknown key
        ("optimm.lr=1", "optimm"),  # unknown section
        ("optim.lr=fast", "optim.lr"),  # wrong type
        ("optim.micro_batch=2.5", "optim.micro_batch"),  # float for int
        ("checkpoint.resume=3", "checkpoint.resume"),  # int for bool
        ("optim.micro_batch=16", "optim.micro_batch"),  # micro > global (8)
        ("optim.global_batch=7", "optim.global_batch"),  # global % micro
        ("run.stage=ppo", "run.stage"),
        ("dpo.loss_type=kto", "dpo.loss_type"),
        ("dpo.label_smoothing=0.5", "dpo.label_smoothing"),
        ("optim.lr=0", "optim.lr"),
        ("online.num_samples=1", "online.num_samples"),
        ("model.attention=flash", "model.attention"),
        ("data.synthetic_families=[arith_xx]", "data.synthetic_families[0]"),
        ("data.train=[/no/such/file.jsonl]", "data.train"),  # both train and synthetic given
        ("model.path=/no/such/model", "model.path"),
        ("run.output_dir=", "run.output_dir"),
        ("optim.lr", "optim.lr"),  # no '='
        ("model.compile=maybe", "model.compile"),
        ("model.compile=1", "model.compile"),  # an int is no bool alias
        ("model.activation_checkpointing=partial", "model.activation_checkpointing"),
        ("model.activation_checkpointing_every=0", "model.activation_checkpointing_every"),
    ],
)
def test_errors_name_the_key(tmp_path, override, key):
    overrides = ["optim.global_batch=8", "optim.micro_batch=2", override]
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE), overrides)
    assert str(e.value).startswith(key), str(e.value)


@pytest.mark.parametrize(
    "key, given, want",
    [
        ("activation_checkpointing", True, "full"),
        ("activation_checkpointing", False, "none"),
        ("activation_checkpointing", "selective", "selective"),
        ("compile", True, "on"),
        ("compile", False, "off"),
        ("compile", "auto", "auto"),
    ],
)
def test_bool_aliases_of_str_fields(tmp_path, key, given, want):
    """YAML true/false on the str fields that name them (config.BOOL_ALIASES), in the file and
    as an override; the resolved config saves the name and loads back the same."""
    data = {**BASE, "model": {key: given}}
    from_file = load_config(write(tmp_path, data))
    from_override = load_config(write(tmp_path, BASE), [f"model.{key}={str(given).lower()}"])
    assert getattr(from_file.model, key) == getattr(from_override.model, key) == want
    C.save_config(from_file, tmp_path / "resolved.yaml")
    assert load_config(str(tmp_path / "resolved.yaml")) == from_file


def test_bool_alias_only_on_named_fields(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.attention: expected str, got bool"):
        load_config(write(tmp_path, BASE), ["model.attention=true"])


def test_missing_dataset_path_names_index(tmp_path):
    data = {"run": {"output_dir": "o"}, "data": {"train": [str(tmp_path), "/no/such.jsonl"]}}
    with pytest.raises(ConfigError, match=r"^data\.train\[1\]: dataset path not found"):
        load_config(write(tmp_path, data))


def test_online_needs_steps_per_round(tmp_path):
    with pytest.raises(ConfigError, match=r"^optim\.max_steps"):
        load_config(write(tmp_path, BASE), ["run.stage=online_dpo", "optim.max_steps=0"])


def test_check_world():
    cfg = C.Config()
    cfg.optim.global_batch, cfg.optim.micro_batch = 8, 2
    assert C.check_world(cfg, 1) == 4 and C.check_world(cfg, 2) == 2 and C.check_world(cfg, 4) == 1
    with pytest.raises(ConfigError, match=r"^optim\.global_batch"):
        C.check_world(cfg, 3)


@pytest.mark.parametrize("name", BUILTIN_TINY)
def test_builtin_tiny_configs_load(name):
    cfg = load_config(name)
    assert cfg.run.stage == name.removesuffix("_tiny") and cfg.model.path == "tiny"


@pytest.mark.parametrize("name", BUILTIN_R7B)
def test_builtin_r7b_configs_need_real_paths(tmp_path, name):
    with pytest.raises(ConfigError, match=r"^model\.path"):
        load_config(name)
    (tmp_path / "d.jsonl").write_text("{}\n")
    cfg = load_config(name, [f"model.path={tmp_path}", f"data.train=[{tmp_path / 'd.jsonl'}]"])
    assert cfg.model.activation_checkpointing and cfg.data.max_tokens >= 4096
    assert C.check_world(cfg, 8) >= 1


def test_unknown_builtin_lists_names():
    with pytest.raises(ConfigError, match="sft_tiny"):
        load_config("sft_tinyy")


def test_every_field_has_a_docstring():
    docs = C.field_docs()
    cfg = C.Config()
    for section in C.SECTIONS:
        for f in dataclasses.fields(getattr(cfg, section)):
            assert docs.get(f"{section}.{f.name}"), f"{section}.{f.name} has no docstring"
    assert "optim.micro_batch" in C.help_text()
