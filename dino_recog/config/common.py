"""What both stages' configs share: data set and run sections, the names they accept, and checks on model sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .loader import ConfigError, Constraint, choice, declare, non_negative, positive

__all__ = [
    "ARCHS",
    "DATASETS_LABELED",
    "DATASETS_UNLABELED",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VIT_ARCHS",
    "DatasetSpec",
    "RunConfig",
    "check_heads",
    "check_patches",
]

VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")
ARCHS = VIT_ARCHS + ("resnet18", "resnet50", "resnet101")
DATASETS_LABELED = ("market1501", "msmt17", "labeled_folder", "demo")
DATASETS_UNLABELED = ("luperson", "luperson_lmdb", "image_folder", "demo") + DATASETS_LABELED[:3]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PATCH_SIZES = (8, 14, 16)
ALL_POSITIVE = Constraint(lambda v: all(x > 0 for x in v), "{value}; expected positive values")


@dataclass
class DatasetSpec:
    """One data set: what it is and where it lives.

    Which names are allowed depends on the stage (labeled or not), so the section holding a spec checks `name`.
    """

    name: str = "market1501"  # market1501 | msmt17 | labeled_folder | demo (+ luperson | luperson_lmdb | image_folder)
    root: str = "data/Market-1501-v15.09.15"  # directory of the data set (demo: generated there on first use)
    version: str = choice("auto", "V1", "V2")  # MSMT17 only: V1, V2 or auto (detected from the folders)
    use_val: bool = True  # MSMT17 only: list_val.txt joins training (TransReID, PASS, TransReID-SSL do)

    def validate(self, path: str) -> None:
        if not self.root and self.name != "demo":
            raise ConfigError(f"{path}.root: empty; expected the directory of the {self.name} data set")


_OUTPUT_DIR = Constraint(bool, "empty; expected a directory to write the run into")


@dataclass
class RunConfig:
    """Where a run writes, how it is seeded and resumed."""

    # checkpoints, exports, config.yaml, log.jsonl and tensorboard go here
    output_dir: str = declare("output/dino", _OUTPUT_DIR)
    seed: int = 0  # base random seed; rank r uses seed + r for augmentation
    resume: str = "auto"  # auto: newest checkpoint in output_dir if any; "": start fresh; else a checkpoint path
    device: str = choice("auto", "cuda", "cpu")  # auto: cuda when available, else cpu; or cuda / cpu
    # bf16 (when the device supports it), fp16 (with a gradient scaler) or fp32
    amp: str = choice("bf16", "fp16", "fp32")
    log_every: int = positive(50)  # iterations between JSON-lines / tensorboard records
    keep_last: int = positive(3)  # how many checkpoints (end-of-epoch and mid-epoch) are kept
    # also checkpoint every this many iterations inside an epoch; 0 = at epoch ends only
    save_every_steps: int = non_negative(0)
    # NaN/inf-loss steps skipped (no update) before the run stops; 0 = stop at the first
    skip_nonfinite_steps: int = non_negative(0)
    fused_attn: bool = True  # ViT attention through fused scaled_dot_product_attention (false: explicit softmax)
    fused_optimizer: bool = True  # on CUDA, the fused AdamW/Adam/SGD kernels (else the foreach implementation)
    compile: bool = False  # torch.compile the backbone (one graph per crop size; first steps are slow)
    channels_last: bool = False  # ResNets: channels-last memory format (faster convolutions with autocast on GPU)
    grad_checkpointing: bool = False  # recompute ViT blocks in backward: less memory, about 30% more compute


def check_heads(path: str, model: Any) -> None:
    """A ViT's width splits evenly over its attention heads (0 = the architecture's, checked when built)."""
    if model.embed_dim and model.num_heads and model.embed_dim % model.num_heads:
        raise ConfigError(f"{path}.embed_dim: {model.embed_dim} is not divisible by num_heads {model.num_heads}")


def check_patches(key: str, size: tuple[int, int], patch_size: int) -> None:
    """A ViT input must be a whole number of patches in height and width (at least one each)."""
    if any(v % patch_size or v < patch_size for v in size):
        raise ConfigError(
            f"{key}: {list(size)} is not a multiple of model.patch_size {patch_size} in height and width; "
            f"expected e.g. {[max(patch_size, round(v / patch_size) * patch_size) for v in size]}"
        )
