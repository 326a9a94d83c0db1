"""Command-line handling shared by the entry scripts: `--config PATH` then `key.sub=value` overrides."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

from . import config as C
from . import distributed as dist
from .preflight import is_override
from .run_lock import lock_output_dir

__all__ = ["apply_speed_options", "eval_options", "load_config", "recog_eval_model", "start_run"]

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


def load_config(
    cls: type[T],
    default_config: str,
    description: str,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    aliases: Mapping[str, str] | None = None,
    config_beside_checkpoint: bool = False,
) -> tuple[T, argparse.Namespace]:
    """Parse `[--config PATH] [flags] [key.sub=value ...]` and load the config; a config error exits with its message.

    Args:
        add_arguments: adds a script's own flags to the parser.
        aliases: flags that stand for overrides, e.g. `{"--rerank": "eval.rerank=true"}`. They are applied before
            the `key.sub=value` items, so those win, and the config is validated once with all of them.
        config_beside_checkpoint: without `--config`, use the `config.yaml` that the run which wrote `--checkpoint`
            saved beside it (when it is a config of this kind), else `default_config`; the choice is printed.

    Returns:
        The validated config and the parsed arguments (for the script's own flags).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help=f"YAML config (default: {default_config})")
    if add_arguments is not None:
        add_arguments(parser)
    for flag, override in (aliases or {}).items():
        parser.add_argument(flag, action="append_const", const=override, dest="alias_overrides",
                            help=f"same as {override}")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied after the file")
    argv = sys.argv[1:] if argv is None else list(argv)
    # Overrides are taken out first: a flag with nargs="+" (eval_knn's --k) would otherwise swallow them.
    items = [a for a in argv if is_override(a, cls)]
    args = parser.parse_args([a for a in argv if not is_override(a, cls)])
    overrides = (getattr(args, "alias_overrides", None) or []) + items
    args.overrides = items
    try:
        if args.config is None:
            args.config = _default_config(cls, default_config, getattr(args, "checkpoint", None),
                                          config_beside_checkpoint)  # fmt: skip
        return C.load(args.config, overrides, cls=cls), args
    except C.ConfigError as e:
        sys.exit(f"config error: {e}")


def _default_config(cls: type, default_config: str, checkpoint: str | None, beside: bool) -> str:
    run_config = Path(checkpoint).parent / "config.yaml" if beside and checkpoint else None
    if run_config is not None and run_config.is_file():
        try:
            C.load(run_config, [], cls=cls)
        except C.ConfigError as e:  # another stage's config, or one this version no longer reads
            _say(f"config: {default_config} ({run_config} beside the checkpoint is not a {cls.__name__}: {e})")
        else:
            _say(f"config: {run_config} (the run's, beside the checkpoint; --config to choose another)")
            return str(run_config)
    return str(ROOT / default_config)


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once under torchrun
        print(line, file=sys.stderr)


def start_run(cfg: object, output_dir: Path) -> None:
    """What every run does first, after joining the process group: a check that the output directory is writable,
    its lock (one run at a time: dino_recog/run_lock.py), logging (rank 0), the resolved config printed once, and the
    per-rank seed."""
    dist.run_on_main(lambda: _check_writable(Path(output_dir)))
    previous = dist.run_on_main(lambda: lock_output_dir(output_dir))  # one run per folder
    dist.setup_logging(str(output_dir))
    if previous:
        logging.getLogger("dino_recog").info("run.output_dir %s was last held by a run now gone (%s); taking over",
                                             output_dir, previous)  # fmt: skip
    logging.getLogger("dino_recog").info("resolved config:\n%s", C.dump(cfg))
    dist.seed_everything(cfg.run.seed)  # config.yaml is written by TrainingRun.resume, once the run is known to start


# Written (and deleted) by the check below: room for the logs, config.yaml and tensorboard's first events. On a full
# disk the run stops here in one line, before its logging and tensorboard would fail with tracebacks of their own.
_ROOM_PROBE = 256 * 1024


def _check_writable(output_dir: Path) -> None:
    """Fail now, with the directory named, rather than at the first checkpoint hours later."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-") as fh:
            fh.write(bytes(_ROOM_PROBE))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise OSError(e.errno, f"run.output_dir {output_dir}: no space left on its file system; free some and "
                          "rerun (run.resume=auto continues from the last checkpoint)") from None  # fmt: skip
        raise OSError(
            e.errno, f"run.output_dir {output_dir}: cannot write there ({e.strerror or e}); set run.output_dir to a "
            "writable directory"
        ) from None  # fmt: skip


def apply_speed_options(run: C.RunConfig, *backbones: torch.nn.Module) -> None:
    """The `run.*` speed options on each backbone (after it is on its device, before DDP wraps it)."""
    from .models.backbones import configure_speed

    for b in backbones:
        configure_speed(b, run.fused_attn, run.grad_checkpointing, run.channels_last, run.compile)


def eval_options(e: C.RecogEvalConfig) -> dict:
    """The optional evaluation steps of `eval.*` as keyword arguments of `evaluation.query_gallery_metrics`."""
    return {
        "rerank": (e.rerank_k1, e.rerank_k2, e.rerank_lambda) if e.rerank else None,
        "aqe": (e.aqe_k, e.aqe_alpha) if e.aqe else None,
        "topk": e.topk,
    }


def recog_eval_model(cfg: C.RecogConfig, checkpoint: str, device: torch.device, allow_missing: bool = False):
    """The model of any checkpoint as stage-2 evaluation sees it, and the configured query/gallery preprocessed as
    that model expects. A file with a BackboneSpec (stage-2 model, backbone export, stage-1 checkpoint) brings its
    architecture, input size and normalisation; other backbone weights (official DINO, timm, older exports) are
    described by `model.*` and `aug.*`. Backbone weights that lack some of the model's tensors are refused unless
    `allow_missing` (the tools' `--allow-missing`).

    Returns:
        (model on `device`, its BackboneSpec as a dict, ReIDData, query set, gallery set).
    """
    from .data.build import query_gallery
    from .models.spec import BackboneSpec
    from .weights import open_feature_model

    model, spec = open_feature_model(checkpoint, BackboneSpec.from_recog_config(cfg), cfg.model.pretrained_key,
                                     allow_missing=allow_missing)
    data, query, gallery = query_gallery(cfg.data.test, spec.img_size, spec.mean, spec.std)
    return model.to(device), spec.to_dict(), data, query, gallery
