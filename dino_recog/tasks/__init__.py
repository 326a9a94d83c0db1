"""One nn.Module per training stage, each run by `engine.train_one_epoch`: `forward(batch, step) -> (loss, terms)`,
`cancel_gradients(step)`, `after_step(step)`, `param_groups(...)`, `parts()` (what checkpoints hold)."""

from .dino import DinoStep, DinoTask, DinoV2Terms, build_dino_task, dino_schedule
from .reid import INPUTS, LossTerm, ReIDNet, ReIDStep, ReIDTask, build_model, build_reid_task, model_spec, reid_schedule
from .usl import PseudoLabels, USLTask, build_usl_task, pseudo_label

__all__ = [
    "DinoStep",
    "DinoTask",
    "DinoV2Terms",
    "build_dino_task",
    "dino_schedule",
    "INPUTS",
    "LossTerm",
    "ReIDNet",
    "ReIDStep",
    "ReIDTask",
    "build_model",
    "build_reid_task",
    "model_spec",
    "reid_schedule",
    "PseudoLabels",
    "USLTask",
    "build_usl_task",
    "pseudo_label",
]
