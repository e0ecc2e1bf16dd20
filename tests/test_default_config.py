"""The declarations of anychip/config.py are the reference: the shipped default.toml is
generated from them, every key is documented, and every declared allowed value is enforced."""

import dataclasses
import re
import subprocess
import sys
import typing

import pytest

from anychip.config import (
    FAULT_KINDS,
    GRPO_CONFIG,
    MODEL_DEFAULTS,
    Range,
    default_config_text,
    default_toml,
    field_docs,
    keys,
    load_config,
    section_doc,
    sections,
    split_fault,
    tomllib,
)
from anychip.errors import ConfigError
from anychip.models import ModelArgs
from anychip.models.deepseek.presets import PRESETS


def test_the_shipped_default_toml_is_generated_from_the_dataclasses():
    assert default_config_text() == default_toml(), (
        "anychip/configs/default.toml is out of date with anychip/config.py; regenerate it with "
        "`python -m anychip.config > anychip/configs/default.toml`"
    )


def test_every_section_and_key_has_a_doc():
    for name, cls in sections().items():
        assert section_doc(cls) and not section_doc(cls).startswith(cls.__name__ + "("), f"[{name}] has no docstring"
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name, "").strip(), f"{name}.{f.name} has no doc (a string literal under the field)"
    for key, (value, doc) in MODEL_DEFAULTS.items():
        assert doc.strip(), key
        # the preset's own values: written out only so that every run's config.toml names them
        assert getattr(PRESETS["tiny"], key) == value, key


def declared_violations() -> list[tuple[str, object]]:
    """(section.key, a value outside what the field declares) for every bound and choice."""
    cases = []
    for name, cls in sections().items():
        for key, hint in keys(cls).items():
            where = f"{name}.{key}"
            base, *extras = typing.get_args(hint) if typing.get_origin(hint) is typing.Annotated else (hint,)
            for r in [e for e in extras if isinstance(e, Range)]:
                cases += [(where, r.gt)] if r.gt is not None else []
                cases += [(where, r.ge - 1)] if r.ge is not None else []
                cases += [(where, r.lt)] if r.lt is not None else []
                cases += [(where, r.le + 1)] if r.le is not None else []
            if typing.get_origin(base) is typing.Literal:
                cases.append((where, "not_a_choice"))
            if typing.get_origin(base) is list and typing.get_origin(typing.get_args(base)[0]) is typing.Literal:
                cases.append((where, "not_a_choice"))
    return cases


def test_the_declarations_cover_the_known_constraints():
    declared = {key for key, _ in declared_violations()}
    assert len(declared) > 60
    expected = {"train.mode", "train.steps", "train.lr", "train.min_lr_ratio", "train.beta1", "train.beta2"}
    expected |= {"grpo.top_p", "grpo.temperature", "guards.straggler_factor", "device.type", "chaos.kinds"}
    expected |= {"chaos.hang", "model.preset", "eval.loss_batches", "parallel.preempt_grace_s"}
    assert expected <= declared, expected - declared


@pytest.mark.parametrize("key, value", declared_violations(), ids=lambda v: str(v))
def test_every_declared_bound_and_choice_is_enforced(key, value):
    text = f"{value:g}" if isinstance(value, (int, float)) else value
    with pytest.raises(ConfigError, match=re.escape(f"--set {key}={text}: {key} = ") + ".* is invalid: expected"):
        load_config(None, [f"{key}={text}"], check_inputs=False)


def test_range_and_choice_messages():
    assert [str(Range(gt=0)), str(Range(ge=0)), str(Range(gt=1))] == ["> 0", ">= 0", "> 1"]
    assert [str(Range(gt=0, lt=1)), str(Range(ge=0, le=1)), str(Range(ge=0, lt=1)), str(Range(gt=0, le=1))] == [
        "in (0, 1)",
        "in [0, 1]",
        "in [0, 1)",
        "in (0, 1]",
    ]
    assert 0.5 in Range(gt=0, lt=1) and 1 not in Range(gt=0, lt=1) and 0 in Range(ge=0) and 1.0 in Range(le=1)
    with pytest.raises(ConfigError, match=r"chaos\.kinds = \['kill', 'boom'\] is invalid: expected .*bad_batch, sdc"):
        load_config(None, ["chaos.kinds=kill,boom"])
    with pytest.raises(ConfigError, match=r"train\.dtype = 'fp8' is invalid: expected one of auto, float32"):
        load_config(None, ["train.dtype=fp8"])


def test_a_bad_value_in_the_file_may_be_fixed_by_a_later_set(tmp_path):
    """Allowed values are checked once everything is applied, as before."""
    f = tmp_path / "c.toml"
    f.write_text("[train]\nsteps = 0\n")
    assert load_config(f, ["train.steps=5"]).train.steps == 5
    with pytest.raises(ConfigError, match=r"c\.toml: train\.steps = 0 is invalid: expected > 0"):
        load_config(f)


def test_the_embedded_grpo_config_uses_known_keys_only():
    raw = tomllib.loads(default_config_text(GRPO_CONFIG))
    model_fields = {f.name for f in dataclasses.fields(ModelArgs)} - {"hf_extra", "rope_scaling"}
    for name, values in raw.items():
        assert name in sections(), name
        for key in values:
            assert key in keys(sections()[name]) or (name == "model" and key in model_fields), f"{name}.{key}"
    cfg = load_config(embedded=GRPO_CONFIG, overrides=["model.init_from=/tmp"], check_inputs=False)
    assert cfg.train.mode == "grpo"


def test_fault_kinds_have_one_source():
    from anychip import chaos

    assert tuple(chaos.KINDS) == FAULT_KINDS
    assert split_fault("kill@30:1") == ("kill", 30, 1) and split_fault(" nan@12") == ("nan", 12, 0)
    for bad in ("kill", "boom@3", "nan@x", "nan@0", "nan@3:r"):
        with pytest.raises(ValueError):
            split_fault(bad)


def test_device_types_have_one_source():
    from anychip.device import NAMES

    assert typing.get_args(keys(sections()["device"])["type"]) == NAMES


@pytest.mark.parametrize("first", ["anychip.config", "anychip.init_from", "anychip.export", "anychip.chaos"])
def test_no_import_circle(first):
    """Each module imports on its own, whichever is imported first."""
    code = f"import {first}, anychip.config, anychip.init_from, anychip.export, anychip.chaos"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_python_m_anychip_config_prints_the_default():
    r = subprocess.run([sys.executable, "-m", "anychip.config"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout == default_toml()
