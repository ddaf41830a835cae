"""One training run described by a typed config: :class:`Trainer` (``python -m stdd.train`` runs it).

Multi-GPU / multi-node: under ``torchrun`` every process trains on its shard of
each epoch (``ResumableDistributedSampler``); DDP averages the gradients; rank 0
alone logs, saves checkpoints and writes the run directory:

    <run.output_dir>/run.lock            held while the run is alive (stdd.engine.runlock)
    <run.output_dir>/config.yaml         the resolved config of this run
    <run.output_dir>/metrics.jsonl       one JSON object per logged event (a "resume" record
                                         where a resumed run continues, a "restart" record where
                                         a run starts over after an attempt that left no
                                         checkpoint: stdd.engine.runlog)
    <run.output_dir>/tensorboard/        the same scalars for TensorBoard
    <run.output_dir>/checkpoints/        checkpoint-eEEEE-sSSSSSSSSS[-mid].pt
    <run.output_dir>/final.pt            the weights after the last epoch
    <run.output_dir>/averaged.pt         the SWA weights (if averaging.epochs is set)

Reproducibility: the data order of an epoch depends only on (seed, epoch), the
STCA training phases of a clip only on (seed, epoch, clip index) (``stdd.seeding``,
``stdd.model.phases``); every process's random streams (Python, NumPy, torch
CPU/CUDA) and the phase sampler's state are saved in each checkpoint, so
``--resume auto`` continues the run exactly where the checkpoint was taken; on
CPU with ``data.num_workers=0`` the resumed run is bitwise equal to an
uninterrupted one (tested). With worker processes the augmentation of a sample
is still seeded per sample by the dataset, so the order-independent part stays
reproducible.

Safety: one run at a time holds the run directory (a second one fails at once
naming the holder; the lock of a killed run is taken over); the temporary
files a killed write left there are removed at start; a resume refuses a
config that changes what is trained (``stdd.engine.resume``); a step whose
loss is NaN or inf stops the run naming the step and the last good checkpoint
(``optim.on_nonfinite_loss: skip`` skips such steps instead and counts them),
and no checkpoint or weights file with NaN/inf weights is ever written.

Videos that fail to decode are replaced by others (``data.on_error: skip``), each
file logged once; every ``epoch`` record of ``metrics.jsonl`` counts them over all
processes (``decode_failures``: failed decodes, ``videos_failed``: distinct
videos), and the run's summary holds both over the epochs of this invocation.

Progress goes to stderr: a bar redrawn in place on a terminal; anywhere else (a
batch job's log file) one plain line every ``run.log_every_steps`` steps, without
carriage returns (:class:`stdd.engine.runlog.Progress`).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..data.dataset import log_new_failures, video_dataloader
from ..seeding import derive_seed, torch_generator
from ..files import remove_orphan_temporaries
from .averaging import average_epoch_checkpoints, parse_epoch_selection
from .checkpoint import CheckpointManager, NonFiniteError, first_non_finite, save_weights
from .config import ConfigError, save_config
from .distributed import (
    DistributedContext,
    ResumableDistributedSampler,
    all_gather_objects,
    all_reduce_mean,
    barrier,
    init_distributed,
    parameters_in_sync,
)
from .optimization import NONFINITE_POLICIES, build_optimization
from .precision import autocast
from .resume import check_resume_config
from .runlock import acquire_lock, describe_holder
from .runlog import RESTART_EVENT, RESUME_EVENT, Progress, RunLogger
from .task import build_training_task, check_prompt_kinds, prepare_synthetic


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _student_part(state: dict, student_keys) -> dict:
    """The entries of a whole-model state dict that a student state dict holds (no teacher; with
    prompt-based adaptation no frozen tower either)."""
    return {k: v for k, v in state.items() if k in student_keys}


def _check_policies(cfg: DictConfig) -> None:
    """Values of ``checkpoint.*`` / ``optim.on_nonfinite_loss`` the trainer cannot act on."""
    for key in ("every_epochs", "every_steps", "keep_mid_epoch"):
        value = cfg.checkpoint[key]
        if value is None or int(value) < 0:
            raise ConfigError(f"checkpoint.{key}={value!r}: expected an integer >= 0 (0: none)")
    if cfg.optim.on_nonfinite_loss not in NONFINITE_POLICIES:
        raise ConfigError(f"optim.on_nonfinite_loss={cfg.optim.on_nonfinite_loss!r}: expected one of "
                          f"{', '.join(NONFINITE_POLICIES)}")


@dataclass
class _EpochMeans:
    """Running sums of one epoch's step logs (the epoch record is their mean over the steps)."""

    sums: dict = field(default_factory=dict)
    steps: int = 0

    def add(self, logs: dict) -> None:
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.steps += 1

    def means(self, context: DistributedContext) -> dict:
        return {k: float(all_reduce_mean(v / max(self.steps, 1), context)) for k, v in self.sums.items()}


class Trainer:
    """One training run described by a resolved config (see ``stdd/configs/*.yaml``).

    Parts: the training task (model, data, phase sampler: ``stdd.engine.task``), the
    optimization (``optimization.py``), the run's checkpoints (``CheckpointManager``);
    :meth:`train` is the epoch loop.
    """

    def __init__(self, cfg: DictConfig, *, resume: Optional[str] = None, context: Optional[DistributedContext] = None,
                 quiet: bool = False, allow_config_change: Sequence[str] = ()):
        self.cfg = cfg
        self.context = context or init_distributed(cfg.run.device)
        self.device = self.context.device
        self.quiet = quiet
        self.allow_config_change = tuple(allow_config_change)
        _check_policies(cfg)
        check_prompt_kinds(cfg)  # a prompt source without the spatial / temporal split: before anything is written
        self.run_directory = Path(os.path.expanduser(str(cfg.run.output_dir)))
        self.checkpoint_directory = self.run_directory / "checkpoints"
        self.logger = None
        # Before anything is written to the run directory: the lock, held until close().
        self.lock = acquire_lock(self.run_directory, self.context)
        try:
            self._build(resume)
        except BaseException:
            self.close()
            raise

    def _build(self, resume: Optional[str]) -> None:
        cfg = self.cfg
        self.logger = RunLogger(self.run_directory, enabled=self.context.is_main, tensorboard=cfg.run.tensorboard)
        if self.lock is not None:
            if self.lock.stale_holder:
                self.logger.info(f"took over the lock of {self.run_directory} from a run that is gone "
                                 f"({describe_holder(self.lock.stale_holder)})")
                self.logger.log("stale_lock_taken_over", 0, holder=describe_holder(self.lock.stale_holder))
            # no other run writes here (we hold the lock): temporary files are a killed write's leftovers
            for directory in (self.run_directory, self.checkpoint_directory):
                for orphan in remove_orphan_temporaries(directory):
                    self.logger.info(f"removed {orphan}, the temporary file of a write that was killed")
        self.checkpoints = CheckpointManager(self.checkpoint_directory, self.context, self.logger,
                                             keep_mid_epoch=cfg.checkpoint.keep_mid_epoch)
        self.nonfinite_steps_skipped = 0

        # Seeds: model init is identical on every rank (DDP also broadcasts rank 0's weights);
        # then each process's global streams are its own ("process" stream, keyed by rank).
        if cfg.data.dataset == "synthetic":  # generate once (rank 0), the others then reuse it
            if self.context.is_main:
                prepare_synthetic(cfg)
            barrier(self.context)
        seed_everything(cfg.run.seed)
        self.task = build_training_task(cfg)
        seed_everything(derive_seed(cfg.run.seed, "process", self.context.rank))
        self.module = self.task.module.to(self.device)
        self.ddp = self.module
        if self.context.is_distributed:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # buffers are frozen text features / teacher stats: same everywhere
            )
        self._build_data()
        self.epochs = int(cfg.optim.epochs)
        self.total_steps = self.steps_per_epoch * self.epochs
        self.optimization = build_optimization(cfg, self.module, global_batch=self.global_batch,
                                               steps_per_epoch=self.steps_per_epoch, device=self.device)
        self.epoch = self.step_in_epoch = self.global_step = 0
        self._resume(resume)

    def _build_data(self) -> None:
        """The per-process batch, the epoch's sampler (or DALI loader) and the steps per epoch."""
        data, context = self.cfg.data, self.context
        self.batch_size, self.accumulation = int(data.batch_size), int(self.cfg.optim.accumulation_steps)
        if self.batch_size <= 0 or self.accumulation <= 0:
            raise ConfigError("data.batch_size and optim.accumulation_steps must be positive")
        self.global_batch = self.batch_size * self.accumulation * context.world_size
        self.sampler = ResumableDistributedSampler(
            self.task.train_dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True,
            seed=self.cfg.run.seed, drop_last=True,
        )
        self.dali_loader = None
        if data.decoder == "dali":
            # DALI shards by itself (shard_id/num_shards = rank/world size) with the same
            # per-epoch seeded order; batches are the same dicts as the PyAV loader's.
            self.dali_loader = self.task.build_dali_train_loader(self.batch_size)
            batches = len(self.dali_loader)
        else:
            batches = self.sampler.num_samples // self.batch_size
        self.steps_per_epoch = batches // self.accumulation
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"an epoch of {len(self.task.train_dataset)} videos over {context.world_size} process(es) gives "
                f"{batches} batch(es) of data.batch_size={self.batch_size} per process: fewer than one optimizer "
                f"step of optim.accumulation_steps={self.accumulation}"
            )

    # -------------------------------------------------------------- state
    def save_checkpoint(self) -> Optional[Path]:
        sampler = self.task.phase_sampler
        model = self.task.student_state_dict()
        bad = first_non_finite(model)  # the same on every rank (DDP replicas are equal): all stop together
        if bad is not None:
            raise NonFiniteError(
                f"step {self.global_step} (epoch {self.epoch}): model weight {bad!r} holds NaN or inf after the "
                f"optimizer step; no checkpoint was written. {self.checkpoints.last_good_text()}"
            )
        return self.checkpoints.save({
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "model": model, **self.optimization.state_dict(),
            "phase_sampler": sampler.state_dict() if sampler is not None else None,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "nonfinite_steps_skipped": self.nonfinite_steps_skipped,
        })

    def _resume(self, resume: Optional[str]) -> None:
        found = self.checkpoints.load(resume)
        if found is None:
            self._record_restart()
            return
        path, state = found
        for warning in check_resume_config(
                state.get("config"), self.cfg, source=str(path), stored_world_size=state.get("world_size"),
                world_size=self.context.world_size, allowed=self.allow_config_change):
            self.logger.info(f"resume: config changed since the checkpoint: {warning}")
        self.task.load_student_state_dict(state["model"])
        self.optimization.load_state_dict(state)
        if self.task.phase_sampler is not None and state.get("phase_sampler"):
            self.task.phase_sampler.load_state_dict(state["phase_sampler"])
        self.checkpoints.restore_random_streams(state)
        self.epoch, self.step_in_epoch, self.global_step = (
            int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"])
        )
        self.nonfinite_steps_skipped = int(state.get("nonfinite_steps_skipped", 0))
        if self.step_in_epoch >= self.steps_per_epoch:  # a mid-epoch checkpoint at the very end of an epoch
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        # metrics.jsonl: records after this one continue from global_step; earlier records with a
        # larger step belong to the interrupted attempt (stdd.engine.runlog.read_metrics drops them)
        self.logger.log(RESUME_EVENT, self.global_step, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                        path=str(path))
        self.logger.info(f"resumed from {path} (epoch {self.epoch}, step {self.step_in_epoch} of the epoch)")

    def _record_restart(self) -> None:
        """A run starting at step 0 where metrics.jsonl already holds records (an attempt killed before
        its first checkpoint, or whose checkpoints are gone): a ``restart`` record supersedes them
        (stdd.engine.runlog.read_metrics), as a ``resume`` record supersedes the steps after its own."""
        earlier = self.logger.earlier_last_step
        if earlier is None:
            return
        self.logger.log(RESTART_EVENT, 0, superseded_up_to_step=earlier)
        self.logger.info(f"{self.logger.path} holds records of an earlier attempt (up to step {earlier}) that no "
                         f"checkpoint continues: this run starts over at step 0 and supersedes them")

    # -------------------------------------------------------------- steps
    def _batches(self, epoch: int, start_step: int):
        """An iterator over this process's batches of ``epoch``, from optimizer step ``start_step`` on."""
        self.task.set_epoch(epoch)  # seeds the dataset's per-sample randomness and the phases
        if self.dali_loader is not None:
            self.dali_loader.set_epoch(epoch)
            iterator = iter(self.dali_loader)
            # A DALI reader cannot start inside an epoch: on resume the batches already trained
            # on are decoded again and dropped (same order, so the run continues where it was).
            for _ in range(start_step * self.accumulation):
                next(iterator)
            return iterator
        self.sampler.set_epoch(epoch)
        self.sampler.set_start_index(start_step * self.accumulation * self.batch_size)
        # A dedicated generator: the loader's per-epoch base seed must not come from (and shift)
        # the global torch stream, or a resumed run would draw different numbers afterwards.
        return iter(video_dataloader(
            self.task.train_dataset, batch_size=self.batch_size, sampler=self.sampler,
            num_workers=int(self.cfg.data.num_workers), drop_last=True, pin_memory=self.device.type == "cuda",
            generator=torch_generator(self.cfg.run.seed, "loader", epoch),
        ))

    def _note_failures(self, batch) -> None:
        """Decode failures of a batch (the videos were replaced): logged once per file, counted per epoch."""
        failures = batch.get("failures") or ()
        self._epoch_failures.extend(failures)
        log_new_failures(failures, self._reported_paths)

    def _failure_counts(self) -> dict:
        """``decode_failures`` / ``videos_failed`` of the epoch so far, over all processes (collective)."""
        local = [failure.index for failure in self._epoch_failures]
        gathered = all_gather_objects(local, self.context)
        indices = [index for part in gathered for index in part]
        self._epoch_failures = []
        self._failed_videos.update(indices)
        return {"decode_failures": len(indices), "videos_failed": len(set(indices))}

    def _micro_step(self, batch, sync: bool) -> dict:
        self._note_failures(batch)
        video, labels, phase = self.task.to_device(batch, self.device)
        no_sync = self.ddp.no_sync if (self.context.is_distributed and not sync) else contextlib.nullcontext
        with no_sync():
            with autocast(self.device, self.optimization.autocast_dtype):
                out = self.ddp(video, labels, phase)
            self.optimization.backward(out["loss"] / self.accumulation)
        return {key: value.detach() for key, value in out.items()}

    def _loss_is_finite(self, loss: torch.Tensor) -> bool:
        """Whether every process's loss of this step is finite (one scalar all-reduce under DDP)."""
        bad = torch.tensor(0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0, device=loss.device)
        return float(all_reduce_mean(bad, self.context)) == 0.0

    def _non_finite_loss(self, loss: torch.Tensor) -> None:
        """A step with a NaN/inf loss: stop naming the step and the last good checkpoint (or count it)."""
        step = self.global_step + 1
        if self.cfg.optim.on_nonfinite_loss == "skip":
            self.nonfinite_steps_skipped += 1
            self.logger.log("nonfinite_loss_skipped", step, epoch=self.epoch, loss=float(loss),
                            skipped_so_far=self.nonfinite_steps_skipped)
            return
        bad = first_non_finite(self.task.student_state_dict())
        cause = (f"the weights hold NaN/inf (model weight {bad!r})" if bad is not None
                 else "the weights are finite: this step's data or forward pass produced it")
        self.logger.log("nonfinite_loss", step, epoch=self.epoch, loss=float(loss))
        raise NonFiniteError(
            f"step {step} (epoch {self.epoch}): the training loss is {float(loss)} ({cause}); training stopped "
            f"without updating the weights. {self.checkpoints.last_good_text()}; "
            f"optim.on_nonfinite_loss=skip skips such steps instead"
        )

    def _train_step(self, batches) -> Optional[dict]:
        """One optimizer step over ``accumulation`` micro-batches; logs it; returns its mean logs
        (None when the step was skipped for a non-finite loss)."""
        logs: dict = {}
        for micro in range(self.accumulation):
            out = self._micro_step(next(batches), sync=micro == self.accumulation - 1)
            for key, value in out.items():
                logs[key] = logs.get(key, 0) + value / self.accumulation
        lr = self.optimization.current_lr
        finite = self._loss_is_finite(logs["loss"])
        if finite:
            grad_norm = self.optimization.step()
        else:
            self._non_finite_loss(logs["loss"])  # raises unless such steps are skipped
            grad_norm = self.optimization.skip_step()
        self.global_step += 1
        self.step_in_epoch += 1
        if self.global_step % int(self.cfg.run.log_every_steps) == 0 or self.step_in_epoch == self.steps_per_epoch:
            reduced = {k: float(all_reduce_mean(v, self.context)) for k, v in logs.items()}
            self.logger.log("train", self.global_step, epoch=self.epoch, lr=lr, grad_norm=grad_norm, **reduced)
        if self.progress is not None:
            self.progress.advance(1, epoch=self.epoch, loss=f"{float(logs['loss']):.4f}", lr=f"{lr:.2e}")
        return logs if finite else None

    def _checkpoint_due(self, at_epoch_end: bool, hit_max: bool) -> bool:
        """After the step just taken: end-of-epoch every ``checkpoint.every_epochs``, the last epoch and the
        epochs weight averaging reads; mid-epoch every ``checkpoint.every_steps``; when stopping at max_steps."""
        policy = self.cfg.checkpoint
        if at_epoch_end:
            every = int(policy.every_epochs)  # 0: no periodic end-of-epoch checkpoint
            return ((every > 0 and self.epoch % every == 0) or self.epoch == self.epochs or hit_max
                    or self.epoch in self.averaged_epochs)
        return hit_max or bool(policy.every_steps and self.global_step % int(policy.every_steps) == 0)

    def _start(self) -> None:
        cfg = self.cfg
        # the epochs weight averaging will read are always saved, whatever checkpoint.every_epochs says
        self.averaged_epochs = set(parse_epoch_selection(cfg.averaging.epochs, self.epochs))
        if self.context.is_main:
            self.run_directory.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_directory / "config.yaml")
            self.logger.info(
                f"training {self.epochs} epochs x {self.steps_per_epoch} steps, global batch {self.global_batch} "
                f"({self.context.world_size} process(es) x {self.batch_size} x {self.accumulation} accumulation), "
                f"lr {self.optimization.lr:.3g}, device {self.device}, precision {cfg.run.precision}"
            )
        if self.global_step == 0 and self.step_in_epoch == 0 and cfg.averaging.include_raw_clip:
            if not self.checkpoints.exists():  # "epoch 0" for weight averaging: the weights before any update
                self.save_checkpoint()
        self.progress = None
        if self.context.is_main and not self.quiet:  # a bar on a terminal, else a line every log_every_steps
            self.progress = Progress(self.total_steps, initial=self.global_step, desc="train", unit="step",
                                     every=int(cfg.run.log_every_steps))

    # -------------------------------------------------------------- the loop
    def _run_epochs(self) -> tuple[list, bool]:
        """The epoch loop from the current position; ``(epoch records, stopped early at max_steps)``."""
        max_steps, eval_every = self.cfg.run.max_steps, int(self.cfg.eval.every_epochs)
        history, stopped_early = [], False
        self._epoch_failures, self._reported_paths, self._failed_videos = [], set(), set()
        self._decode_failures = 0
        while self.epoch < self.epochs and not stopped_early:
            self.module.train()
            self.task.set_train_mode(self.module)
            batches, epoch_logs = self._batches(self.epoch, self.step_in_epoch), _EpochMeans()
            skipped_before = self.nonfinite_steps_skipped
            while True:
                logs = self._train_step(batches)
                if logs is not None:  # a skipped step (non-finite loss) does not enter the epoch's means
                    epoch_logs.add(logs)
                at_epoch_end = self.step_in_epoch == self.steps_per_epoch
                if at_epoch_end:
                    self.epoch, self.step_in_epoch = self.epoch + 1, 0
                hit_max = max_steps is not None and self.global_step >= int(max_steps)
                if self._checkpoint_due(at_epoch_end, hit_max):
                    self.save_checkpoint()
                stopped_early = hit_max and self.epoch < self.epochs
                if stopped_early or at_epoch_end:
                    break
            failed = self._failure_counts()
            self._decode_failures += failed["decode_failures"]
            if not stopped_early:
                record = {"epoch": self.epoch, **{f"train_{k}": v for k, v in epoch_logs.means(self.context).items()},
                          **failed}
                if self.nonfinite_steps_skipped > skipped_before:
                    record["nonfinite_steps_skipped"] = self.nonfinite_steps_skipped - skipped_before
                if eval_every and (self.epoch % eval_every == 0 or self.epoch == self.epochs):
                    record.update(self.evaluate())
                history.append(record)
                self.logger.log("epoch", self.global_step, **record)
        return history, stopped_early

    def train(self) -> dict:
        self._start()
        start_time = time.time()
        try:
            history, stopped_early = self._run_epochs()
        finally:  # also on an error: the message then starts on a line of its own
            if self.progress is not None:
                self.progress.close()
        self._check_replicas()
        result = {"epochs_done": self.epoch, "global_step": self.global_step, "stopped_early": stopped_early,
                  "seconds": time.time() - start_time, "history": history, "run_directory": str(self.run_directory),
                  "nonfinite_steps_skipped": self.nonfinite_steps_skipped,
                  "decode_failures": self._decode_failures, "videos_failed": len(self._failed_videos)}
        if self.nonfinite_steps_skipped:
            self.logger.info(f"{self.nonfinite_steps_skipped} step(s) had a NaN/inf loss and were skipped "
                             "(optim.on_nonfinite_loss=skip)")
        if not stopped_early:
            result.update(self._finish())
        return result

    def _check_replicas(self) -> None:
        if self.context.is_distributed:
            # DDP keeps replicas bitwise equal; a broken invariant would silently train N models
            in_sync = parameters_in_sync(self.module, self.context)
            self.logger.log("sync_check", self.global_step, parameters_identical_across_ranks=in_sync)
            if not in_sync:
                raise RuntimeError("DDP replicas hold different parameters after training")

    def evaluate(self, *, details: bool = False) -> dict:
        """Top-1 of the current weights on the validation set (if the task has one); ``details``: also
        the label and prediction of every video (``val_labels``, ``val_predictions``)."""
        if self.task.val_spec is None:
            return {}
        metrics = self.task.evaluate(self.module, self.context, details=details)
        self.module.train()
        self.task.set_train_mode(self.module)
        return {f"val_{k}": v for k, v in metrics.items()}

    def _finish(self) -> dict:
        out = {}
        if self.context.is_main:
            final = save_weights(self.run_directory / "final.pt", self.task.student_state_dict(), self.cfg,
                                 epoch=self.epoch)
            out["final_weights"] = str(final)
            ema = self.optimization.ema
            if ema is not None:
                out["ema_weights"] = str(save_weights(
                    self.run_directory / "ema.pt", _student_part(ema.averaged_state_dict(self.module.model),
                                                                     set(self.task.student_state_dict())),
                    self.cfg
                ))
            selection = self.cfg.averaging.epochs
            if selection:
                epochs = parse_epoch_selection(selection, self.epochs)
                if self.cfg.averaging.include_raw_clip and 0 not in epochs:
                    epochs = [0] + epochs
                averaged = average_epoch_checkpoints(self.checkpoint_directory, epochs)
                out["averaged_weights"] = str(save_weights(
                    self.run_directory / "averaged.pt", averaged, self.cfg, averaged_epochs=epochs
                ))
                out["averaged_epochs"] = epochs
            self.logger.log("done", self.global_step, **{k: v for k, v in out.items() if not isinstance(v, list)})
        barrier(self.context)
        return out

    def close(self) -> None:
        """Close the logs and release the run directory's lock (idempotent)."""
        if self.logger is not None:
            self.logger.close()
        if self.lock is not None:
            self.lock.release()


def run_training(cfg: DictConfig, *, resume: Optional[str] = None, quiet: bool = False,
                 allow_config_change: Sequence[str] = ()) -> dict:
    context = init_distributed(cfg.run.device)
    trainer = Trainer(cfg, resume=resume, context=context, quiet=quiet, allow_config_change=allow_config_change)
    try:
        return trainer.train()
    finally:
        trainer.close()
