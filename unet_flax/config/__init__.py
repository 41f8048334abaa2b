"""Every configuration in one place: the network (`UNetConfig`), training (`TrainConfig`, its presets and
how flags, a preset, a saved config and the data become one config) and sampling (`SamplingConfig`),
all frozen dataclasses built on one field framework (`fields`)."""
from .sampling_config import SAMPLERS, SamplingConfig
from .train_config import PRESETS, TrainConfig, fit_to_data, resolve_config
from .unet_config import BlockSpec, UNetConfig

__all__ = ["BlockSpec", "PRESETS", "SAMPLERS", "SamplingConfig", "TrainConfig", "UNetConfig", "fit_to_data",
           "resolve_config"]
