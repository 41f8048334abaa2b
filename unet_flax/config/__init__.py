"""Every configuration in one place: the network (`UNetConfig`), training (`TrainConfig`, its presets and
how flags, a preset, a saved config and the data become one config) and sampling (`SamplingConfig`, with a
`SamplerConfig`), all frozen dataclasses built on one field framework (`fields`)."""
from .sampler_config import SAMPLERS, SamplerConfig
from .sampling_config import SamplingConfig
from .train_config import PRESETS, TrainConfig, fit_to_data, resolve_config
from .unet_config import BlockSpec, UNetConfig

__all__ = ["BlockSpec", "PRESETS", "SAMPLERS", "SamplerConfig", "SamplingConfig", "TrainConfig", "UNetConfig",
           "fit_to_data", "resolve_config"]
