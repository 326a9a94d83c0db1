"""What both stages' configs share: data set and run sections, the names they accept, and checks on model sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .constraints import (
    NON_NEGATIVE,
    POSITIVE,
    ConfigError,
    Constraint,
    choice,
    declare,
    each,
    is_finite,
    non_negative,
    positive,
)

__all__ = [
    "ARCHS",
    "DATASETS_LABELED",
    "DATASETS_LMDB_LABELED",
    "DATASETS_UNLABELED",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_BATCH",
    "MAX_CROPS",
    "MAX_DEPTH",
    "MAX_HEADS",
    "MAX_NEIGHBOURS",
    "MAX_PROTOTYPES",
    "MAX_SEED",
    "MAX_SIDE",
    "MAX_WIDTH",
    "MAX_WORKERS",
    "TIMM_PREFIX",
    "VIT_ARCHS",
    "arch",
    "arch_is_vit",
    "check_input_sizes",
    "DatasetSpec",
    "RunConfig",
    "check_heads",
    "check_patches",
    "image_size",
    "norm_mean",
    "norm_std",
    "pixels",
]

VIT_ARCHS = ("vit_tiny", "vit_small", "vit_base")
ARCHS = VIT_ARCHS + ("resnet18", "resnet50", "resnet101", "resnet50_ibn_a")
TIMM_PREFIX = "timm:"  # model.arch `timm:<name>`: any timm model (dino_recog.models.timm_backbones)
# a timm model's sizes come from its name: these model.* keys must stay 0 with it
_TIMM_FIXED = ("depth", "embed_dim", "num_heads", "layerscale", "num_register_tokens")
# Besides our names, those torchreid and fast-reid (lowercased) use for the same sets: dukemtmcreid / dukemtmc read
# like market1501 (the same layout, 8 cameras), msmt17_v1 / msmt17_v2 are msmt17 with `version` V1 / V2.
DATASET_ALIASES = ("dukemtmcreid", "dukemtmc", "msmt17_v1", "msmt17_v2")
DATASETS_LABELED = ("market1501", "msmt17", "labeled_folder", "demo", *DATASET_ALIASES)
# training only (no query/gallery): LUPerson-NL's LMDB with its keys.pkl, and the LMDBs of data.build_lmdb
DATASETS_LMDB_LABELED = ("luperson_nl", "labeled_lmdb")
DATASETS_UNLABELED = ("luperson", "luperson_lmdb", "image_folder", "demo", "market1501", "msmt17", "labeled_folder",
                      *DATASET_ALIASES)  # fmt: skip
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PATCH_SIZES = (8, 14, 16)

# Image sides and paddings: person crops are 256 x 128 to 384 x 192. A side of 100000 would not fail: workers and the
# ViT (attention is quadratic in the patches; 4096 x 4096 at patch 16 is already 65536 tokens) would allocate for
# minutes and then hang, so a typo in a size is refused here instead.
MAX_SIDE = 4096
_SIDES = Constraint(lambda v: max(v) <= MAX_SIDE, f"{{value}}; expected each side at most {MAX_SIDE} pixels")
_PADDING = Constraint(lambda v: v <= MAX_SIDE, f"{{value}}; expected at most {MAX_SIDE} pixels")


def image_size(default: tuple[int, int]) -> tuple[int, int]:
    """(height, width) in pixels, each in [1, MAX_SIDE]."""
    return declare(default, each(POSITIVE), _SIDES)


def pixels(default: int) -> int:
    """A number of pixels in [0, MAX_SIDE] (a padding)."""
    return declare(default, NON_NEGATIVE, _PADDING)


# Sizes that allocate (a head, a network, a batch, processes, neighbours): a typo (an extra 0 or two) would not fail but
# allocate for minutes and then hang or be killed, so each has a bound far above any published recipe.
MAX_PROTOTYPES = 262144  # DINO head out_dim: official 65536, DINOv2 ViT-g 131072
MAX_WIDTH = 16384  # head MLP / bottleneck / embedding widths and ViT embed_dim: DINO head 2048, ViT-g 1536
MAX_DEPTH = 64  # ViT blocks: ViT-L 24, ViT-g 40, ViT-G 48
MAX_HEADS = 128  # ViT attention heads: ViT-g 24, ViT-22B 48
MAX_BATCH = 4096  # images per process (batch_size_per_gpu, P x K, test_batch_size): official DINO 64
MAX_CROPS = 64  # local crops per image: official DINO 8, DINOv2 8 to 10
MAX_WORKERS = 256  # DataLoader worker processes per training process
MAX_NEIGHBOURS = 2048  # kNN k, re-ranking k1 / k2, query-expansion k (faiss on a GPU searches at most 2048)

# Seeds: NumPy takes 32 bits (the derived seeds seed + 1000 x epoch + rank reach it modulo 2**32), torch 64 (the
# derived seeds stay far below 2**64 from any seed up to 2**32 - 1); a seed past 2**64 was a traceback deep in torch.
MAX_SEED = 2**32 - 1
_SEED = Constraint(lambda v: 0 <= v <= MAX_SEED, f"{{value}}; expected an integer in [0, {MAX_SEED}] (2**32 - 1)")

# Normalisation: three finite means, three finite positive stds (x / inf is 0 and x / 0 is inf: a run on garbage).
_MEAN = Constraint(lambda v: all(map(is_finite, v)), "{value}; expected 3 finite values")
_STD = Constraint(lambda v: all(is_finite(x) and x > 0 for x in v), "{value}; expected 3 finite values > 0")


def norm_mean(default: tuple[float, float, float] = IMAGENET_MEAN) -> tuple[float, float, float]:
    return declare(default, _MEAN)


def norm_std(default: tuple[float, float, float] = IMAGENET_STD) -> tuple[float, float, float]:
    return declare(default, _STD)


@dataclass
class DatasetSpec:
    """One data set: what it is and where it lives.

    Which names are allowed depends on the stage (labeled or not), so the section holding a spec checks `name`.
    """

    # market1501 | msmt17 | labeled_folder | demo (+ luperson | luperson_lmdb | image_folder; + stage-2 training
    # luperson_nl | labeled_lmdb; + the torchreid and fast-reid names dukemtmcreid, dukemtmc, msmt17_v1, msmt17_v2)
    name: str = "market1501"
    root: str = "data/Market-1501-v15.09.15"  # directory of the data set (demo: generated there on first use)
    version: str = choice("auto", "V1", "V2")  # MSMT17 only: V1, V2 or auto (detected from the folders)
    use_val: bool = True  # MSMT17 only: list_val.txt joins training (TransReID, PASS, TransReID-SSL do)
    # training sets only: text file of the image paths (relative to root) or LMDB keys to keep, one a line; "" = all
    keep_list: str = ""

    def validate(self, path: str) -> None:
        if not self.root and self.name != "demo":
            raise ConfigError(f"{path}.root: empty; expected the directory of the {self.name} data set")


_OUTPUT_DIR = Constraint(bool, "empty; expected a directory to write the run into")


@dataclass
class RunConfig:
    """Where a run writes, how it is seeded and resumed."""

    # checkpoints, exports, config.yaml, log.jsonl and tensorboard go here
    output_dir: str = declare("output/dino", _OUTPUT_DIR)
    seed: int = declare(0, _SEED)  # base random seed, in [0, 2**32 - 1]; rank r uses seed + r for augmentation
    resume: str = "auto"  # auto: newest checkpoint in output_dir if any; "": start fresh; else a checkpoint path
    # a resume whose config changed a key that moves the schedule or the data order (batch size, epochs, lr, seed,
    # data sets, ...; config/diff.py): refuse, or allow (and log what changed)
    resume_changed: str = choice("refuse", "allow")
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
    # several processes: ddp (each holds the whole model) or fsdp (student and teacher sharded per ViT block, FSDP2)
    parallel: str = choice("ddp", "fsdp")
    fsdp_cpu_offload: bool = False  # fsdp: sharded weights, gradients and optimiser state live in CPU memory
    # training checkpoints: full (one file, gathered to rank 0), sharded (a directory every rank writes its shards to,
    # torch.distributed.checkpoint), auto (sharded under fsdp with several processes, else full); both resume anywhere
    checkpoint_format: str = choice("auto", "full", "sharded")


def check_heads(path: str, model: Any) -> None:
    """A ViT's width splits evenly over its attention heads (0 = the architecture's, checked when built)."""
    if model.embed_dim and model.num_heads and model.embed_dim % model.num_heads:
        raise ConfigError(f"{path}.embed_dim: {model.embed_dim} is not divisible by num_heads {model.num_heads}")


def arch(default: str = "vit_small") -> Any:
    """A `model.arch` field: one of ARCHS or `timm:<name>` (the name is checked against timm by `arch_is_vit`)."""
    names = ", ".join(map(repr, ARCHS))
    return declare(default, Constraint(lambda v: v in ARCHS or (isinstance(v, str) and v.startswith(TIMM_PREFIX)
                                                                and len(v) > len(TIMM_PREFIX)),
                                       "{value} is not one of " + names + " or 'timm:<name>'"))  # fmt: skip


def arch_is_vit(path: str, model: Any) -> bool:
    """Whether `model.arch` is a ViT (CLS and patch tokens) rather than a pooled feature map; for `timm:<name>`, the
    name must be timm's (the error lists close names) and the ViT size keys must stay 0."""
    if not model.arch.startswith(TIMM_PREFIX):
        return model.arch in VIT_ARCHS
    from ..models.timm_backbones import timm_info  # here: the models package imports this one

    try:
        info = timm_info(model.arch)
    except ValueError as e:
        raise ConfigError(f"{path}.arch: {e}") from None
    for name in _TIMM_FIXED:
        if getattr(model, name, 0):
            raise ConfigError(f"{path}.{name}: {getattr(model, name)} with {model.arch}; a timm model's sizes come "
                              "from its name (set 0)")  # fmt: skip
    return info.vit


def check_input_sizes(model: Any, sizes: dict[str, tuple[int, int]]) -> None:
    """The input sizes (config key -> (height, width); the first is the one the model is built for) suit the
    architecture: a whole number of patches for our ViTs, and for a timm model, sizes it takes (a meta-device
    forward: a fixed input size or a window grid refuses others)."""
    if model.arch in VIT_ARCHS:
        for key, size in sizes.items():
            check_patches(key, size, model.patch_size)
    elif model.arch.startswith(TIMM_PREFIX):
        from ..models.timm_backbones import check_timm_sizes

        try:
            check_timm_sizes(model.arch, next(iter(sizes.values())), sizes)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_patches(key: str, size: tuple[int, int], patch_size: int) -> None:
    """A ViT input must be a whole number of patches in height and width (at least one each)."""
    if any(v % patch_size or v < patch_size for v in size):
        raise ConfigError(
            f"{key}: {list(size)} is not a multiple of model.patch_size {patch_size} in height and width; "
            f"expected e.g. {[max(patch_size, round(v / patch_size) * patch_size) for v in size]}"
        )
