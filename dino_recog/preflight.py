"""The checks `train.sh` runs once, before torchrun starts its workers: the config (file, overrides, every constraint)
and the paths it names (data roots, the pretrained weights, a resume checkpoint).

    python -m dino_recog.preflight SCRIPT [ARGS...]      # exit 0, or 2 after one line on stderr

Without it, a mistake is printed once per worker and then buried under torchrun's report of the failed workers.
Only the training scripts are checked; any other script (an evaluation, your own) passes through unchanged. This
module imports no torch, so the check costs a fraction of a second (a `timm:<name>` model.arch imports timm to
check the name and the input sizes).
"""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

from . import config as C

__all__ = ["check", "is_override", "load"]

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train_dino.py": (C.DinoConfig, "cfg_dino.yaml"), "train_recog.py": (C.RecogConfig, "cfg_recog.yaml"),
           "train_usl.py": (C.UslConfig, "cfg_usl.yaml")}  # fmt: skip


def is_override(arg: str, cls: type) -> bool:
    """`key.sub=value` whose first key is a section of the config (`data.eval_set.name=market1501`, `run.seed=1`)."""
    section = arg.split("=", 1)[0].split(".", 1)[0].split("[", 1)[0]
    return "=" in arg and not arg.startswith("-") and section in {f.name for f in fields(cls)}


def check(script: str, argv: list[str]) -> str | None:
    """What is wrong with `script ARGV` before it starts, as one line; None if nothing that can be seen from here."""
    try:
        cfg = load(script, argv)
    except C.ConfigError as e:
        return f"config error: {e}"
    return None if cfg is None else _missing_path(cfg)


def load(script: str, argv: list[str]):
    """The config `script ARGV` will run with (`--config` or the script's default file, then the overrides), or None
    for a script that is not one of the training scripts. Raises ConfigError."""
    if Path(script).name not in SCRIPTS:
        return None
    cls, default = SCRIPTS[Path(script).name]
    config = str(ROOT / default)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config = argv[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    return C.load(config, [a for a in argv if is_override(a, cls)], cls=cls)


def _missing_path(cfg) -> str | None:
    data = cfg.data
    sets = [(f"data.train[{i}]", s) for i, s in enumerate(data.train)] if isinstance(data.train, list) else \
        [("data.train", data.train)]  # fmt: skip
    sets += [(key, getattr(data, key.split(".")[1], None)) for key in ("data.test", "data.eval_set")]
    sets += [(f"data.source[{i}]", s) for i, s in enumerate(getattr(data, "source", []))]  # train_usl.py
    for key, spec in sets:
        if spec is not None and spec.name != "demo" and not Path(spec.root).is_dir():
            return f"{key}.root: {spec.root} does not exist; expected the directory of the {spec.name} data set"
    resume = cfg.run.resume if cfg.run.resume not in ("auto", "") else ""
    if resume and not Path(resume).is_file():
        return f"run.resume: {resume} not found; expected a checkpoint file, auto (the newest in run.output_dir) or ''"
    pretrained = getattr(cfg.model, "pretrained", "")
    if pretrained and not Path(pretrained).is_file() and isinstance(cfg, C.DinoConfig):
        # continued pre-training; the words of dino_recog.tasks.dino.load_pretrained
        return (f"model.pretrained: {pretrained} not found; point it at a checkpoint or set model.pretrained='' to "
                "start from random weights")  # fmt: skip
    if pretrained and not Path(pretrained).is_file():  # the words of dino_recog.tasks.reid.build_model
        return (
            f"model.pretrained: {pretrained} not found; run stage 1 first (train_dino.py exports "
            "teacher_backbone.pth), point it at other weights, or set model.pretrained='' to start from scratch"
        )
    teacher = getattr(getattr(cfg, "loss", None), "distill_teacher", "")
    if teacher and getattr(cfg.loss, "distill_weight", 0) > 0 and not Path(teacher).is_file():
        return f"loss.distill_teacher: {teacher} not found; expected a stage-2 checkpoint"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    problem = check(argv[0], argv[1:]) if argv else None
    if problem:
        print(problem, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
