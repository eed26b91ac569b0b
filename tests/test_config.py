"""Every option of every group composes into the typed run config; bad overrides fail early."""

from __future__ import annotations

import json

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from instruct.config import SCHEMAS, compose, option_names, to_container
from instruct.model import BUILDERS

GROUPS = sorted({key.split("/")[0] for key in SCHEMAS})
REQUIRED = {
    "data=file": ["data.paths=[train.jsonl]"],
    "data=hf": ["data.path=tatsu-lab/alpaca"],
    "model=hf": ["model.path=some/model"],
    "model=gguf": ["model.path=some/folder", "model.gguf_file=model.gguf"],
}


def all_options() -> list[str]:
    return [f"{group}={name}" for group in GROUPS for name in option_names(group)]


def test_every_group_ships_options():
    assert set(GROUPS) >= {"template", "data", "model", "lora", "optimizer", "trainer", "logger"}
    assert {"alpaca", "vicuna", "chatml", "native"} <= set(option_names("template"))
    assert len(set(option_names("template")) - {"alpaca", "vicuna", "chatml", "native"}) >= 1


# Groups used by an entry point other than training, and the primary config that has them.
PRIMARY = {"sampling": ("generate", ["checkpoint=ck"])}


@pytest.mark.slow
@pytest.mark.parametrize("override", all_options())
def test_every_option_composes_into_the_schema(override):
    config_name, required = PRIMARY.get(override.split("=")[0], ("config", []))
    cfg = compose([override, *required, *REQUIRED.get(override, [])], config_name=config_name)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    group, name = override.split("=")
    assert OmegaConf.get_type(cfg[group]) is not dict  # validated against a dataclass


@pytest.mark.parametrize(
    "name, required",
    [
        ("generate", ["checkpoint=ck", "prompt=hi"]),
        ("chat", ["checkpoint=ck"]),
        ("evaluate", ["checkpoint=ck"]),
        ("export", ["checkpoint=ck", "out=merged"]),
    ],
)
def test_entry_point_configs_compose(name, required):
    cfg = compose(required, config_name=name)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    with pytest.raises(ConfigCompositionException):
        compose([*required, "no_such_key=1"], config_name=name)


@pytest.mark.slow
def test_every_model_option_names_a_builder():
    for name in option_names("model"):
        assert compose([f"model={name}"]).model.builder in BUILDERS


@pytest.mark.slow
def test_every_template_option_builds_and_renders(templates, tokenizer):
    from instruct.data.templates import render

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    for name, t in templates.items():
        assert render(messages, t, tokenizer).trained_text().lstrip().startswith("Hello"), name


def test_overrides_reach_the_config():
    cfg = compose(["model=tiny", "template=chatml", "lora.rank=16", "data.domains=[code,math]"])
    assert (cfg.template.name, cfg.lora.rank) == ("chatml", 16)
    assert list(cfg.data.domains) == ["code", "math"]


@pytest.mark.parametrize(
    "override",
    [
        "lora.rank=abc",  # wrong type
        "lora.rnak=8",  # unknown key
        "trainer.batch_size=eight",
        "optimizer.lr=fast",
        "template=no_such_template",
        "data.no_such_key=1",
    ],
)
def test_bad_overrides_fail_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose([override])


# Every key with a fixed set of values (an Enum field), with its values as users write them;
# the config they compose in, and the overrides it needs.
FIXED_SETS = [
    ("template.kind", ["format", "native"], "config", []),
    ("model.dtype", ["auto", "float32", "bfloat16", "float16"], "config", []),
    ("lora.dropout_draw", ["auto", "positions", "mask"], "config", []),
    ("optimizer.name", ["adamw"], "config", []),
    ("optimizer.scheduler", ["cosine", "linear", "constant"], "config", []),
    ("trainer.precision", ["fp32", "bf16", "fp16", "auto"], "config", []),
    ("logger.backend", ["wandb", "none"], "config", []),
    ("logger.mode", ["online", "offline", "disabled"], "config", []),
    ("data.train_on", ["all_assistant", "last_assistant", "per_message"], "config", []),
    (
        "data.format",
        ["auto", "jsonl", "json", "parquet", "csv", "tsv", "saved", "hub"],
        "config",
        ["data=file"],
    ),
    ("dtype", ["auto", "float32", "bfloat16", "float16"], "export", ["checkpoint=ck", "out=o"]),
    ("logger.mode", ["online", "offline", "disabled"], "evaluate", ["checkpoint=ck"]),
]


@pytest.mark.parametrize("key, allowed, config_name, required", FIXED_SETS)
def test_a_value_outside_a_fixed_set_fails_at_composition_naming_key_and_values(
    key, allowed, config_name, required
):
    with pytest.raises(ConfigCompositionException) as error:
        compose([*required, f"{key}=fp99"], config_name=config_name)
    message = f"{error.value}\n{error.value.__cause__}"
    assert f"Invalid value 'fp99', expected one of [{', '.join(allowed)}]" in message
    assert f"full_key: {key}\n" in message


@pytest.mark.slow
@pytest.mark.parametrize("key, allowed, config_name, required", FIXED_SETS)
def test_every_value_of_a_fixed_set_is_written_out_as_the_plain_string_given(
    key, allowed, config_name, required
):
    for value in allowed:
        cfg = compose([*required, f"{key}={value}"], config_name=config_name)
        member = OmegaConf.select(cfg, key)
        assert member == value and f"{member}" == value and json.dumps(member) == f'"{value}"'
        for written in (to_container(cfg), yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))):
            for part in key.split("."):
                written = written[part]
            assert type(written) is str and written == value


def test_required_keys_fail_before_any_model_loads():
    cfg = compose(["data=file"])
    with pytest.raises(Exception, match="paths"):
        OmegaConf.to_container(cfg, throw_on_missing=True)
