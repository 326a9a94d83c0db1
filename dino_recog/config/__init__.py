"""Configuration: dataclasses filled from YAML, then from `key.sub=value` overrides, validated once.

Precedence: dataclass defaults -> YAML file -> command-line overrides. Every key is checked against the dataclass:
an unknown key is an error that names its full path and the closest valid key, a wrong type names the key, the
value and the expected type, and impossible values are refused here rather than hours into a run.

- `loader`: the generic part (load, from_dict, save, dump); `yaml_file`: reading the YAML file;
- `constraints`: the value checks declared next to the fields (`positive(...)`, `choice(...)`) and `validate`;
- `common`: what both stages share (DatasetSpec, RunConfig, architecture and data set names);
- `dino`, `recog`: the two stages' schemas; `usl`: stage 2 without labels (reuses recog's sections).
"""

from __future__ import annotations

import os
from typing import TypeVar

from . import loader
from .common import (
    ARCHS,
    DATASETS_LABELED,
    DATASETS_UNLABELED,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VIT_ARCHS,
    DatasetSpec,
    RunConfig,
)
from .constraints import ConfigError, validate
from .dino import (
    DinoConfig,
    DinoDataConfig,
    DinoEvalConfig,
    DinoLossConfig,
    DinoModelConfig,
    DinoTrainConfig,
    MultiCropConfig,
)
from .loader import dump, from_dict, save, to_dict
from .recog import (
    RecogConfig,
    RecogDataConfig,
    RecogEvalConfig,
    RecogLossConfig,
    RecogModelConfig,
    RecogTrainConfig,
    ReIDAugConfig,
)
from .usl import UslClusterConfig, UslConfig, UslDataConfig, UslLossConfig, UslTrainConfig

__all__ = [
    "ARCHS",
    "DATASETS_LABELED",
    "DATASETS_UNLABELED",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIT_ARCHS",
    "ConfigError",
    "DatasetSpec",
    "DinoConfig",
    "DinoDataConfig",
    "DinoEvalConfig",
    "DinoLossConfig",
    "DinoModelConfig",
    "DinoTrainConfig",
    "MultiCropConfig",
    "RecogConfig",
    "RecogDataConfig",
    "RecogEvalConfig",
    "RecogLossConfig",
    "RecogModelConfig",
    "RecogTrainConfig",
    "ReIDAugConfig",
    "RunConfig",
    "UslClusterConfig",
    "UslConfig",
    "UslDataConfig",
    "UslLossConfig",
    "UslTrainConfig",
    "dump",
    "from_dict",
    "load",
    "save",
    "to_dict",
    "validate",
]

T = TypeVar("T")


def load(path: str | os.PathLike | None, overrides: list[str] | None = None, cls: type[T] = DinoConfig) -> T:
    """`loader.load` with stage 1 as the default schema (the loader itself knows none).

    Args:
        path: YAML file; None uses the dataclass defaults only.
        overrides: items like `train.lr=0.001` or `data.train[0].root=/data/market`; values are parsed as YAML.
        cls: the config dataclass (DinoConfig or RecogConfig).

    Raises:
        ConfigError: naming the file or override, the key, the value and what was expected.
    """
    return loader.load(path, overrides, cls)
