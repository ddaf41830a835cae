"""Checkpoints and weights files: atomic writes, validity checks, ``--resume auto``, RNG capture.

A checkpoint is one ``torch.save`` file holding plain data (tensors, numbers,
strings, lists, dicts) so it loads with ``weights_only=True``::

    {"format": "stdd-checkpoint-v1", "epoch": int, "step_in_epoch": int,
     "global_step": int (optimizer steps so far), "model": state_dict, "optimizer": ...,
     "scheduler": ..., "scaler": ... or None, "ema": ... or None,
     "rng": [capture_rng_state() per rank], "phase_sampler": PhaseSampler.state_dict() or None,
     "config": resolved config (dict),
     "metrics": {...}}

``epoch``/``step_in_epoch`` say where training resumes: after 3 complete
epochs they are (3, 0); inside the 0-based epoch 3 after 17 optimizer steps,
(3, 17) (a ``-mid`` checkpoint).

Writes are atomic (:func:`stdd.files.atomic_write`: temporary file in the same
directory, fsync, rename, fsync of the directory), so a crash mid-write leaves
either the old file or nothing under the final name, never a half file.
Loads verify the file (:func:`stdd.serialization.load_torch_file`: every zip
member against its CRC-32, then ``torch.load(weights_only=True)``) and that the
model weights are finite, so a flipped byte or a NaN weight is an error naming
the file, never a silently different run. ``find_latest_checkpoint`` *loads*
each candidate, newest first, and skips any that fail (a file truncated or
changed by a disk error, copied partially); on ``--resume auto`` the skipped
ones are renamed ``<name>.corrupt`` (kept for a person to look at, out of every
later resume and of pruning) and reported, so ``--resume auto`` always lands on
the newest usable one. Pruning only ever removes mid-epoch checkpoints older
than the one just written.
"""

from __future__ import annotations

import io
import random
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from omegaconf import OmegaConf

from ..errors import UsageError
from ..files import atomic_write
from ..serialization import UnreadableFileError, load_torch_file
from .distributed import all_gather_objects, barrier

CHECKPOINT_FORMAT = "stdd-checkpoint-v1"
WEIGHTS_FORMAT = "stdd-weights-v1"
REQUIRED_KEYS = ("format", "epoch", "step_in_epoch", "global_step", "model")
_NAME_PATTERN = re.compile(r"^checkpoint-e(\d{4,})-s(\d{9,})(-mid)?\.pt$")
CORRUPT_SUFFIX = ".corrupt"  # an unusable checkpoint found by --resume auto is renamed <name>.corrupt


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint file cannot be used; the message names the file and why."""


class NonFiniteError(UsageError, RuntimeError):
    """Training produced a NaN/inf loss or weights; the message names the step and the last good checkpoint."""


def checkpoint_name(epoch: int, global_step: int, mid_epoch: bool = False) -> str:
    """``checkpoint-e0003-s000001234.pt`` after 3 complete epochs (global step 1234);
    ``...-mid.pt`` for a checkpoint taken inside epoch ``epoch`` (0-based), which
    is superseded by the next one and may be pruned."""
    return f"checkpoint-e{epoch:04d}-s{global_step:09d}{'-mid' if mid_epoch else ''}.pt"


def parse_checkpoint_name(name: str) -> Optional[tuple[int, int, bool]]:
    """``(epoch, global_step, mid_epoch)`` or None if ``name`` is not a checkpoint name."""
    match = _NAME_PATTERN.match(name)
    return (int(match.group(1)), int(match.group(2)), match.group(3) is not None) if match else None


def atomic_torch_save(obj: Any, path: Union[str, Path]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (:func:`stdd.files.atomic_write`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getvalue())


def _load_plain_data(path: Path, map_location, name: str):
    """The file verified and loaded with ``weights_only=True``; any failure is a ``CheckpointError``
    naming ``name`` and the file."""
    try:
        return load_torch_file(path, name, map_location=map_location)
    except UnreadableFileError as error:  # truncated, a byte changed, wrong format, unpickling refused ...
        raise CheckpointError(str(error)) from error


def first_non_finite(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The name of the first floating-point tensor of ``state_dict`` holding NaN or inf, or None."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return str(name)
    return None


def _check_finite_model(state: Mapping[str, Any], path: Path, name: str) -> None:
    bad = first_non_finite(state["model"]) if isinstance(state.get("model"), Mapping) else None
    if bad is not None:
        raise CheckpointError(f"{name} {path}: model weight {bad!r} holds NaN or inf values")


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    """Load and check a checkpoint; ``CheckpointError`` names the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    state = _load_plain_data(path, map_location, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path}: not an stdd checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path}: missing keys {missing}")
    _check_finite_model(state, path, "checkpoint")
    return state


def save_checkpoint(directory: Union[str, Path], state: Mapping[str, Any]) -> Path:
    """Atomically write ``state`` (must hold REQUIRED_KEYS except format) under its standard name."""
    state = dict(state)
    state["format"] = CHECKPOINT_FORMAT
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ValueError(f"save_checkpoint: state is missing keys {missing}")
    mid_epoch = int(state["step_in_epoch"]) > 0
    path = Path(directory) / checkpoint_name(int(state["epoch"]), int(state["global_step"]), mid_epoch)
    return atomic_torch_save(state, path)


def save_weights(path: Union[str, Path], state_dict: dict, config, **extra) -> Path:
    """A weights-only file ``{"format": "stdd-weights-v1", "model": ..., "config": ...}``
    that ``stdd.eval`` / ``stdd.predict`` load (as they load training checkpoints).
    ``config``: the run's config (stored resolved, as plain data)."""
    if OmegaConf.is_config(config):
        config = OmegaConf.to_container(config, resolve=True)
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise NonFiniteError(f"{path}: not written: model weight {bad!r} holds NaN or inf values")
    payload = {"format": WEIGHTS_FORMAT, "model": state_dict, "config": config}
    payload.update(extra)
    return atomic_torch_save(payload, path)


def load_weights(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    """``{"model": state_dict, "config": dict or None}`` from a weights file or a training checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    return weights_of(_load_plain_data(path, map_location, "--checkpoint"), path)


def is_stdd_payload(payload) -> bool:
    """Whether a loaded file is an stdd weights file or training checkpoint (its ``format`` says so)."""
    return isinstance(payload, dict) and payload.get("format") in (WEIGHTS_FORMAT, CHECKPOINT_FORMAT)


def weights_of(payload, path: Union[str, Path]) -> dict:
    """:func:`load_weights`'s result from an already loaded file ``payload`` (checked the same way)."""
    path = Path(path)
    if not is_stdd_payload(payload):
        raise CheckpointError(
            f"--checkpoint {path}: not an stdd weights file or training checkpoint "
            f"(expected format {WEIGHTS_FORMAT!r} or {CHECKPOINT_FORMAT!r})"
        )
    _check_finite_model(payload, path, "--checkpoint")
    return {"model": payload["model"], "config": payload.get("config")}


def prune_mid_epoch_checkpoints(directory: Union[str, Path], keep_last: int = 1,
                                just_saved: Optional[Union[str, Path]] = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` mid-epoch checkpoints (end-of-epoch ones are
    kept: weight averaging reads them). Returns the deleted paths.

    ``just_saved``: the checkpoint the run has just written; only checkpoints before it
    (in step order) are candidates, so nothing at or after it is ever deleted, e.g. a
    later checkpoint of an earlier attempt, which must not make the pruner delete the
    new ones instead.
    """
    checkpoints = list_checkpoints(directory)
    if just_saved is not None:
        names = [p.name for p in checkpoints]
        name = Path(just_saved).name
        checkpoints = checkpoints[: names.index(name) + 1] if name in names else []
    mids = [p for p in checkpoints if parse_checkpoint_name(p.name)[2]]
    doomed = mids[: max(len(mids) - keep_last, 0)]
    if just_saved is not None:
        doomed = [p for p in doomed if p.name != Path(just_saved).name]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed


def list_checkpoints(directory: Union[str, Path]) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first (by epoch, then global step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        parsed = parse_checkpoint_name(entry.name)
        if parsed is not None and entry.is_file():
            # an end-of-epoch file and the mid-epoch one of the next epoch never share a
            # global step unless the epoch is empty; the end-of-epoch one sorts first then
            found.append((parsed[1], parsed[2], parsed[0], entry))
    return [entry for *_, entry in sorted(found)]


def set_aside_corrupt(path: Union[str, Path]) -> Path:
    """Rename an unusable checkpoint to ``<name>.corrupt`` (``<name>.<n>.corrupt`` if taken); the new path."""
    path = Path(path)
    target, number = path.with_name(path.name + CORRUPT_SUFFIX), 1
    while target.exists():
        target, number = path.with_name(f"{path.name}.{number}{CORRUPT_SUFFIX}"), number + 1
    path.rename(target)
    return target


def find_latest_checkpoint(directory: Union[str, Path], *, set_aside: bool = False,
                           skipped: Optional[list] = None) -> Optional[tuple[Path, dict]]:
    """Newest checkpoint in ``directory`` that loads, with its state; None if there is none.

    Unloadable files are reported with a warning and skipped, never deleted (a
    person may want to look at them). ``set_aside=True`` (``--resume auto``)
    renames each to ``<name>.corrupt``: no later resume tries it again and the
    pruner does not count it. ``skipped`` (a list) receives ``(path, reason,
    new path or None)`` for each.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            moved = set_aside_corrupt(path) if set_aside else None
            where = f"; renamed to {moved.name}" if moved is not None else ""
            warnings.warn(f"resume: skipping {error}{where}", stacklevel=2)
            if skipped is not None:
                skipped.append((path, str(error), moved))
    return None


def checkpoint_for_epoch(directory: Union[str, Path], epoch: int) -> Path:
    """The checkpoint written after ``epoch`` complete epochs (0 = before training)."""
    candidates = [
        p for p in list_checkpoints(directory)
        if parse_checkpoint_name(p.name)[0] == epoch and not parse_checkpoint_name(p.name)[2]
    ]
    if not candidates:
        raise CheckpointError(f"no end-of-epoch checkpoint for epoch {epoch} in {directory}")
    return candidates[-1]


# ----------------------------------------------------------------------------------------- RNG
def _numpy_state_to_plain(state) -> dict:
    name, keys, position, has_gauss, cached_gaussian = state
    return {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "position": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_plain(state: Mapping) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["position"], state["has_gauss"], state["cached_gaussian"])


def capture_rng_state(generators: Optional[Mapping[str, torch.Generator]] = None) -> dict:
    """Every random stream a training step may draw from, as plain data.

    ``generators``: named ``torch.Generator`` objects a caller keeps outside the
    global streams, captured alongside them. (The STCA training phases need
    none: they are derived per clip, and the sampler's state is saved once as
    ``"phase_sampler"``.)
    """
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: Mapping, generators: Optional[Mapping[str, torch.Generator]] = None) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = list(state["cuda"])
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(
                f"resume: checkpoint has CUDA RNG states for {len(cuda_states)} devices, this process sees "
                f"{torch.cuda.device_count()}; CUDA random streams are not restored",
                stacklevel=2,
            )
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise CheckpointError(f"resume: checkpoint has no state for random generator {name!r}")
        gen.set_state(saved[name])


# ------------------------------------------------------------------------------- a run's checkpoints
class CheckpointManager:
    """A training run's checkpoints: save (every process's random streams included), prune, resume.

    ``directory``: the run's ``checkpoints/``; ``context``: the process group (rank 0
    writes, every rank takes part in gathering the random streams); ``log``: the
    run's logger (``.log(event, step, **values)`` / ``.info(text)``).
    """

    def __init__(self, directory: Union[str, Path], context, log, *, keep_mid_epoch: int = 1):
        self.directory = Path(directory)
        self.context = context
        self.log = log
        self.keep_mid_epoch = int(keep_mid_epoch)
        self.last_good: Optional[tuple[Path, int]] = None  # (path, global step) last written or resumed from

    def last_good_text(self) -> str:
        """``"The last good checkpoint is <path> (step N)"`` or that none was written yet."""
        if self.last_good is None:
            return "No checkpoint of this run was written before it"
        return f"The last good checkpoint is {self.last_good[0]} (step {self.last_good[1]})"

    def exists(self) -> bool:
        return bool(list_checkpoints(self.directory))

    def save(self, state: Mapping[str, Any]) -> Optional[Path]:
        """Write ``state`` plus ``rng`` (one entry per rank) and ``world_size``; prune old mid-epoch ones."""
        state = dict(state, rng=all_gather_objects(capture_rng_state(), self.context),
                     world_size=self.context.world_size)
        path = None
        if self.context.is_main:
            path = save_checkpoint(self.directory, state)
            prune_mid_epoch_checkpoints(self.directory, keep_last=self.keep_mid_epoch, just_saved=path)
            self.log.log("checkpoint", int(state["global_step"]), epoch=int(state["epoch"]), path=str(path))
        barrier(self.context)
        self.last_good = (path or self.directory / checkpoint_name(
            int(state["epoch"]), int(state["global_step"]), int(state["step_in_epoch"]) > 0), int(state["global_step"]))
        return path

    def load(self, resume: Optional[str]) -> Optional[tuple[Path, dict]]:
        """The checkpoint ``--resume`` names: ``None`` (a fresh run: refused if checkpoints exist),
        ``"auto"`` (the newest loadable one, or ``None``) or a path."""
        if resume in (None, "", "none"):
            if self.exists():
                raise CheckpointError(
                    f"run directory {self.directory.parent} already has checkpoints; pass --resume auto to "
                    f"continue it or set run.output_dir to a new directory"
                )
            return None
        if resume == "auto":
            found = self._find_latest_usable()
            if found is None:
                self.log.info(f"--resume auto: no checkpoint in {self.directory}, starting fresh")
        else:
            found = Path(resume), load_checkpoint(resume)
        self.last_good = (found[0], int(found[1]["global_step"])) if found is not None else None
        return found

    def _find_latest_usable(self) -> Optional[tuple[Path, dict]]:
        """``--resume auto``: rank 0 finds the newest usable checkpoint, setting aside (``.corrupt``) and
        reporting the unusable ones; the other ranks then load the one it chose."""
        found = None
        if self.context.is_main:
            skipped: list = []
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # reported below, through the run's log
                found = find_latest_checkpoint(self.directory, set_aside=True, skipped=skipped)
            for path, reason, moved in skipped:
                self.log.info(f"--resume auto: {reason}; renamed to {moved.name} and skipped")
                self.log.log("corrupt_checkpoint", 0, path=str(path), renamed_to=str(moved), reason=reason)
        chosen = all_gather_objects(str(found[0]) if found is not None else None, self.context)[0]
        if self.context.is_main or chosen is None:
            return found
        return Path(chosen), load_checkpoint(chosen)

    def restore_random_streams(self, state: Mapping[str, Any]) -> None:
        """This rank's saved random streams, when the checkpoint was written by as many processes."""
        saved = state.get("rng") or []
        if len(saved) == self.context.world_size:
            restore_rng_state(saved[self.context.rank])
        else:
            self.log.info(
                f"resume: checkpoint was written by {len(saved)} process(es), this run has "
                f"{self.context.world_size}: random streams are reseeded, the run is not bit-reproducible"
            )
