"""What changed between the config a checkpoint was written with and the config that resumes it.

A resumed run continues the stored schedule and data order from the stored position, so a change of, say, the batch
size or the number of epochs silently trains something that neither config describes (a mid-epoch checkpoint with
another batch size would even count its steps in the wrong unit). Only the keys below can change on resume without
that; any other change is refused unless `run.resume_changed: allow`.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["changed_keys", "format_changes", "unsafe_changes"]

# Where the run writes and logs, how fast it computes, what it evaluates: none of it moves the schedule or the data.
SAFE_TO_CHANGE = (
    "run.output_dir", "run.resume", "run.resume_changed", "run.log_every", "run.keep_last", "run.save_every_steps",
    "run.skip_nonfinite_steps", "run.device", "run.amp", "run.fused_attn", "run.fused_optimizer", "run.compile",
    "run.channels_last", "run.grad_checkpointing", "run.parallel", "run.fsdp_cpu_offload",
    "run.checkpoint_format",
    "data.num_workers", "data.test_batch_size", "data.test",
    "data.eval_set", "eval", "model.pretrained",
)  # fmt: skip


_HOW_TO_RESUME = {"run.resume", "run.resume_changed"}  # how this start resumes, not what the run is


def _flat(d: Mapping, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, Mapping) else {key: v})
    return out


def changed_keys(stored: Mapping | None, current: Mapping) -> dict[str, tuple[object, object]]:
    """key -> (stored value, current value) for every key present in both whose value differs. A key that only one
    side has (a key added or removed by another version of dino_recog) is not a change of the run."""
    if not stored:
        return {}
    old, new = _flat(stored), _flat(current)
    return {k: (old[k], new[k]) for k in sorted(old.keys() & new.keys() - _HOW_TO_RESUME) if old[k] != new[k]}


def _is_safe(key: str) -> bool:
    # A data set may move (its root), the rest of its entry may not.
    return key.endswith(".root") or any(key == s or key.startswith(s + ".") for s in SAFE_TO_CHANGE)


def unsafe_changes(changes: Mapping[str, tuple[object, object]]) -> list[str]:
    return [k for k in changes if not _is_safe(k)]


def format_changes(changes: Mapping[str, tuple[object, object]], keys: list[str] | None = None) -> str:
    return ", ".join(f"{k} {changes[k][0]!r} -> {changes[k][1]!r}" for k in (changes if keys is None else keys))
