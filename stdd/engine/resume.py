"""Resume compatibility: a run continues a checkpoint only with the config it was trained with.

A checkpoint stores its run's resolved config. On resume, :func:`check_resume_config`
compares it with the config of the resuming run, key by key (dotted paths):

* keys in :data:`SAFE_TO_CHANGE` (the run-time settings of
  :data:`~stdd.engine.config.RUNTIME_KEYS`: where files go, logging, devices,
  decoding workers and caches, op backends that compute the same thing; and
  checkpoint and evaluation cadence) may differ: each difference is reported as
  a warning;
* the global batch (``data.batch_size`` x ``optim.accumulation_steps`` x
  processes) must stay the same; how it is split may change (a warning);
* every other key changes what is trained (the model and its STCA settings,
  the data, classes and sampling, the loss, the optimizer and its schedule,
  the seed): a difference is refused with :class:`ResumeError`, naming each
  key with both values, unless the key is allowed explicitly
  (``python -m stdd.train ... --allow-config-change optim.lr,data.num_frames``, or ``all``).

A key is refused unless it is listed as safe, so a key added to the schema later
is refused until someone decides otherwise. Top-level sections added with
``+key=value`` are not compared (nothing in stdd reads them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ..errors import UsageError

from .config import RUNTIME_KEYS, SECTIONS

# Keys (or key prefixes ending in ".") whose change does not change what is trained: every run-time
# setting, and these.
SAFE_TO_CHANGE = RUNTIME_KEYS + (
    "model.allow_random_init",  # only gates pretrained=null, which is compared itself
    "data.root",  # the videos moved; the annotation list that names them is compared
    "data.val_annotations",
    "checkpoint.",
    "averaging.",  # derived outputs (SWA/EMA files), not the trained weights
    "eval.",
)
GLOBAL_BATCH_KEYS = ("data.batch_size", "optim.accumulation_steps")
ALLOW_ALL = "all"


class ResumeError(UsageError, RuntimeError):
    """The resuming run's config differs from the checkpoint's in keys that change what is trained."""


@dataclass
class ResumeCheck:
    """What :func:`check_resume_config` found: refused and allowed differences, as one-line texts."""

    refused: list[str] = field(default_factory=list)
    refused_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _leaves(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], list(node) if isinstance(node, tuple) else node


def _plain(config) -> dict:
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    return {key: value for key, value in _leaves(config or {}) if key.split(".", 1)[0] in SECTIONS}


def _is_safe(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_TO_CHANGE)


def _global_batch(values: Mapping[str, Any], world_size: int) -> Optional[int]:
    try:
        return int(values["data.batch_size"]) * int(values["optim.accumulation_steps"]) * int(world_size)
    except (KeyError, TypeError, ValueError):
        return None


def compare_configs(stored, current: DictConfig, *, stored_world_size: Optional[int], world_size: int,
                    allowed: Sequence[str] = ()) -> ResumeCheck:
    """The differences between a checkpoint's stored config and the resuming run's ``current`` one."""
    check = ResumeCheck()
    if not stored:
        check.warnings.append("the checkpoint stores no config: the resuming config cannot be checked against it")
        return check
    old, new = _plain(stored), _plain(current)
    allow_all = ALLOW_ALL in allowed
    for key in sorted(set(old) | set(new)):
        if key in GLOBAL_BATCH_KEYS:
            continue
        if key not in old:
            check.warnings.append(f"{key} is not recorded in the checkpoint (now {new[key]!r})")
            continue
        if key not in new:
            check.warnings.append(f"{key} is in the checkpoint ({old[key]!r}) but not in this config")
            continue
        if old[key] == new[key]:
            continue
        text = f"{key} {old[key]!r} -> {new[key]!r}"
        if _is_safe(key):
            check.warnings.append(text)
        elif allow_all or key in allowed:
            check.warnings.append(f"{text} (allowed by --allow-config-change)")
        else:
            check.refused.append(text)
            check.refused_keys.append(key)
    old_batch = _global_batch(old, stored_world_size or 1)
    new_batch = _global_batch(new, world_size)
    split_old = [old.get(k) for k in GLOBAL_BATCH_KEYS] + [stored_world_size or 1]
    split_new = [new.get(k) for k in GLOBAL_BATCH_KEYS] + [world_size]
    described = ("global batch {} -> {} (data.batch_size x optim.accumulation_steps x processes: "
                 "{} x {} x {} -> {} x {} x {})").format(old_batch, new_batch, *split_old, *split_new)
    if old_batch is None:
        check.warnings.append("the checkpoint does not record its global batch: it cannot be compared")
    elif old_batch != new_batch:
        if allow_all or any(k in allowed for k in GLOBAL_BATCH_KEYS):
            check.warnings.append(f"{described} (allowed by --allow-config-change)")
        else:
            check.refused.append(described)
            check.refused_keys.append(GLOBAL_BATCH_KEYS[0])
    elif split_old != split_new:
        check.warnings.append(f"{described}: the same global batch, split differently")
    return check


def check_resume_config(stored, current: DictConfig, *, source: str, stored_world_size: Optional[int],
                        world_size: int, allowed: Sequence[str] = ()) -> list[str]:
    """Raise :class:`ResumeError` for refused differences; return the warnings (one line each).

    ``source``: the checkpoint's path, for the message.
    """
    check = compare_configs(stored, current, stored_world_size=stored_world_size, world_size=world_size,
                            allowed=allowed)
    if check.refused:
        keys = ",".join(dict.fromkeys(check.refused_keys))
        raise ResumeError(
            f"cannot resume from {source}: this config differs from the one it was trained with in what is "
            f"trained: {'; '.join(check.refused)}. Start a new run (another run.output_dir), or pass "
            f"--allow-config-change {keys} to continue anyway (the checkpoint's optimizer state and "
            f"learning-rate schedule are restored as saved)"
        )
    return check.warnings


def parse_allowed(text: Optional[str]) -> list[str]:
    """``--allow-config-change``'s comma-separated dotted keys (or ``all``) as a list."""
    if not text:
        return []
    return [item.strip() for item in str(text).split(",") if item.strip()]
