"""How a run's config is made: the fields' declared flags, choices and resume policies, and
resolve_config / fit_to_data, pure functions of a preset, a saved config, overrides and the data."""
import dataclasses

import pytest

from unet_flax.checkpoint import incompatible_fields
from unet_flax.cli import build_train_parser, given_fields
from unet_flax.config import PRESETS, TrainConfig, UNetConfig, fit_to_data, resolve_config
from unet_flax.config.fields import FIXED, FREE, PER_PROCESS, fields_resumed
from unet_flax.errors import ConfigError

DIGITS = PRESETS["digits"]


def test_every_field_declares_a_resume_policy_the_resume_check_follows():
    saved = DIGITS.to_dict()
    for cls, prefix in ((TrainConfig, ""), (UNetConfig, "model.")):
        policies = {name: policy for policy in (FIXED, FREE, PER_PROCESS) for name in fields_resumed(cls, policy)}
        assert set(policies) == {f.name for f in dataclasses.fields(cls)}
        for field in dataclasses.fields(cls):
            if field.name == "model":
                continue
            current = DIGITS.to_dict()
            target = current["model"] if cls is UNetConfig else current
            target[field.name] = "changed"
            named = [entry.split(" ")[0] for entry in incompatible_fields(saved, current)]
            assert (prefix + field.name in named) == (policies[field.name] == FIXED), field.name


def test_flags_are_the_fields_that_declare_themselves_flags():
    args = build_train_parser("").parse_args(["--lr", "0.5", "--dtype", "bfloat16", "--no-resume",
                                              "--channel-mults", "1,2"])
    assert given_fields(args, TrainConfig, UNetConfig) == {"lr": 0.5, "dtype": "bfloat16", "resume": False,
                                                           "channel_mults": (1, 2)}
    for set_by_the_data in ("--in-channels", "--out-channels", "--num-classes", "--context-dim", "--model"):
        with pytest.raises(SystemExit):
            build_train_parser("").parse_args([set_by_the_data, "3"])


def test_overrides_apply_over_the_preset_and_the_backend_picks_the_dtype():
    config = resolve_config({"lr": 0.5, "base_channels": 64}, "cifar10", backend="gpu")
    assert config.lr == 0.5 and config.model.base_channels == 64 and config.model.dtype == "bfloat16"
    assert config.steps == PRESETS["cifar10"].steps
    assert resolve_config({}, backend="cpu").model.dtype == "float32"
    assert resolve_config({"dtype": "float16"}, backend="cpu").model.dtype == "float16"
    assert resolve_config({}) == dataclasses.replace(DIGITS, model=dataclasses.replace(DIGITS.model, dtype="float32"))


def test_a_saved_config_is_the_base_but_not_its_per_process_fields():
    saved = dataclasses.replace(DIGITS, steps=77, seed=5, distributed=True, coordinator_address="host:1",
                                num_processes=2, process_id=1).to_dict()
    config = resolve_config({"steps": 90}, saved=saved)
    assert config.steps == 90 and config.seed == 5
    assert (config.distributed, config.coordinator_address, config.num_processes, config.process_id) == \
        (False, None, None, None)
    assert resolve_config({}, preset="digits", saved=saved).seed == DIGITS.seed  # --preset wins


def test_bad_overrides_name_the_field():
    with pytest.raises(ConfigError, match="unknown config fields: frobnicate"):
        resolve_config({"frobnicate": 1})
    with pytest.raises(ConfigError, match=r"parallel must be one of \('pmap', 'jit', 'fsdp'\), got 'vmap'"):
        resolve_config({"parallel": "vmap"})
    with pytest.raises(ConfigError, match=r"weight_copy must be one of \('auto', 'on', 'off'\), got 'yes'"):
        resolve_config({"weight_copy": "yes"})


def test_the_data_decides_channels_and_classes():
    config = fit_to_data(dataclasses.replace(DIGITS, class_conditional=True), 3, 7, "folder x")
    assert (config.model.in_channels, config.model.out_channels, config.model.num_classes) == (3, 3, 7)
    assert fit_to_data(dataclasses.replace(DIGITS, class_conditional=False), 1, 10, "x").model.num_classes is None
    with pytest.raises(ConfigError, match="class_conditional needs labels, and folder x has none"):
        fit_to_data(dataclasses.replace(DIGITS, class_conditional=True), 3, None, "folder x")
