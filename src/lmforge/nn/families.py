"""Model families: the registry that maps ``model.family`` to its config class and counting.

A family is one kind of network that lmforge can train, evaluate, generate from and export:
``transformer`` (dense or mixture-of-experts decoder) and ``retro`` (a decoder with chunked
cross-attention to retrieved neighbours). This module holds the model side of a family,
everything below the trainer's layer: its config class (whose ``build()`` returns the model),
how to rebuild a finished checkpoint for inference, and parameter/FLOP counting. The training
side (batch loader, extra callbacks) registers under the same name in
``lmforge.train.families``; the split follows the layers, since eval, serve and export must load
a model without importing the trainer.

Long-context attention, RoPE scaling and other options of an existing network are fields of its
config, not families. A new family: a config class deriving from ``ModelConfig`` with its own
``family`` default, one ``MODEL_FAMILIES.register`` call here, and one in train/families.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

from lmforge.core.errors import ConfigError
from lmforge.core.registry import Registry
from lmforge.nn.config import ModelConfig
from lmforge.nn.counting import ParameterCounts, count_parameters, flops_per_token
from lmforge.nn.multimodal import MultimodalModelConfig
from lmforge.nn.patch_input import count_multimodal_parameters, multimodal_flops_per_token
from lmforge.nn.retro import RetroModelConfig


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config_class: type[ModelConfig]
    # The config that rebuilds a finished checkpoint: training-only settings (e.g. a base model
    # to load weights from, frozen parts) are dropped, since the checkpoint holds every weight.
    inference_config: Callable[[ModelConfig], ModelConfig] = lambda cfg: cfg
    count_parameters: Callable[[ModelConfig], ParameterCounts] = count_parameters
    flops_per_token: Callable[[ModelConfig, int], int] = flops_per_token


MODEL_FAMILIES: Registry[ModelFamily] = Registry("model family")


def _retro_for_inference(cfg: ModelConfig) -> ModelConfig:
    assert isinstance(cfg, RetroModelConfig)
    return dataclasses.replace(cfg, retro=dataclasses.replace(cfg.retro, base_checkpoint=None, freeze_decoder=False))


MODEL_FAMILIES.register("transformer")(ModelFamily("transformer", ModelConfig))
# RETRO's counts are its decoder's (the encoder and cross-attention are logged by the trainer):
# scaling fits and MFU compare decoders.
MODEL_FAMILIES.register("retro")(ModelFamily("retro", RetroModelConfig, inference_config=_retro_for_inference))
# Text and images (nn/multimodal.py): the Transformer's counts over the extended vocabulary, plus the
# patch projection / image encoder of the continuous routes (nn/patch_input.py).
MODEL_FAMILIES.register("multimodal")(ModelFamily("multimodal", MultimodalModelConfig,
                                                  count_parameters=count_multimodal_parameters,  # type: ignore[arg-type]
                                                  flops_per_token=multimodal_flops_per_token))  # type: ignore[arg-type]


def family_name(model: dict[str, Any]) -> str:
    """The family a model section names. Configs and checkpoints written before the family was
    recorded (lmforge up to commit cdee255) had a ``retro:`` section exactly when the model was
    RETRO; that is the only case read from the section's keys."""
    if "family" in model:
        return str(model["family"])
    return "retro" if "retro" in model else "transformer"


def model_config_from_dict(model: dict[str, Any] | None, path: str = "model") -> ModelConfig:
    """Parse a ``model:`` section with its family's config class (errors name the key)."""
    if model is not None and not isinstance(model, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(model).__name__}")
    model = dict(model or {})
    name = family_name(model)
    try:
        family = MODEL_FAMILIES.get(name)
    except ConfigError as exc:
        raise ConfigError(f"{path}.family: {exc}") from None
    model["family"] = name
    return family.config_class.from_dict(model, path=path)  # type: ignore[return-value]


def family_of(cfg: ModelConfig) -> ModelFamily:
    return MODEL_FAMILIES.get(cfg.family)
