"""One training run described by a typed config: :class:`Trainer` (``python -m stdd.train`` runs it).

Multi-GPU / multi-node: under ``torchrun`` every process trains on its shard of
each epoch (``ResumableDistributedSampler``); DDP averages the gradients; rank 0
alone logs, saves checkpoints and writes the run directory:

    <run.output_dir>/config.yaml         the resolved config of this run
    <run.output_dir>/metrics.jsonl       one JSON object per logged event
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
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from ..data.dataset import video_dataloader
from ..seeding import derive_seed, torch_generator
from . import checkpoint as ckpt
from .averaging import ExponentialMovingAverage, average_epoch_checkpoints, parse_epoch_selection
from .checkpoint import save_weights
from .config import ConfigError, save_config
from .distributed import (
    DistributedContext,
    ResumableDistributedSampler,
    all_reduce_mean,
    barrier,
    init_distributed,
    parameters_in_sync,
)
from .precision import autocast, autocast_dtype
from .runlog import RunLogger
from .schedule import build_scheduler, scaled_lr


# ------------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def optimizer_param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on 1-D parameters (biases, norms, the
    class/positional embeddings' scalars) as in Open-VCLIP's ZERO_WD_1D_PARAM."""
    decay, no_decay = [], []
    for parameter in module.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim <= 1 else decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _without_teacher(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("teacher.")}


def _gather_objects(obj, context: DistributedContext) -> list:
    if not context.is_distributed:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


# ------------------------------------------------------------------------------------- trainer
class Trainer:
    """One training run described by a resolved config (see ``stdd/configs/*.yaml``)."""

    def __init__(self, cfg: DictConfig, *, resume: Optional[str] = None, context: Optional[DistributedContext] = None,
                 quiet: bool = False):
        from .task import build_training_task  # model + data, imported lazily (heavy)

        self.cfg = cfg
        self.context = context or init_distributed(cfg.run.device)
        self.device = self.context.device
        self.quiet = quiet
        self.run_directory = Path(os.path.expanduser(str(cfg.run.output_dir)))
        self.checkpoint_directory = self.run_directory / "checkpoints"
        self.logger = RunLogger(
            self.run_directory, enabled=self.context.is_main,
            tensorboard=cfg.run.tensorboard,
        )
        self.quiet = quiet

        # Seeds: model init is identical on every rank (DDP also broadcasts rank 0's weights);
        # then each process's global streams are its own ("process" stream, keyed by rank).
        seed = int(cfg.run.seed)
        if cfg.data.dataset == "synthetic":  # generate once (rank 0), the others then reuse it
            from .task import prepare_synthetic

            if self.context.is_main:
                prepare_synthetic(cfg)
            barrier(self.context)
        seed_everything(seed)
        self.task = build_training_task(cfg, self.device)
        seed_everything(derive_seed(seed, "process", self.context.rank))

        self.module = self.task.module.to(self.device)
        if self.context.is_distributed:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,  # buffers are frozen text features / teacher stats: same everywhere
            )
        else:
            self.ddp = self.module

        data = cfg.data
        self.batch_size = int(data.batch_size)
        self.accumulation = int(cfg.optim.accumulation_steps)
        if self.batch_size <= 0 or self.accumulation <= 0:
            raise ConfigError("data.batch_size and optim.accumulation_steps must be positive")
        self.global_batch = self.batch_size * self.accumulation * self.context.world_size
        self.sampler = ResumableDistributedSampler(
            self.task.train_dataset,
            num_replicas=self.context.world_size,
            rank=self.context.rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
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
                f"an epoch of {len(self.task.train_dataset)} videos over {self.context.world_size} process(es) gives "
                f"{batches} batch(es) of data.batch_size={self.batch_size} per process: fewer than one optimizer "
                f"step of optim.accumulation_steps={self.accumulation}"
            )
        self.epochs = int(cfg.optim.epochs)
        self.total_steps = self.steps_per_epoch * self.epochs

        optim = cfg.optim
        self.lr = (
            scaled_lr(float(optim.lr), self.global_batch, int(optim.reference_batch))
            if optim.scale_lr else float(optim.lr)
        )
        self.optimizer = torch.optim.AdamW(
            optimizer_param_groups(self.module, float(optim.weight_decay)),
            lr=self.lr,
            betas=tuple(optim.betas),
            eps=float(optim.eps),
        )
        self.scheduler = build_scheduler(
            self.optimizer,
            total_steps=self.total_steps,
            warmup_steps=min(round(float(optim.warmup_epochs) * self.steps_per_epoch), self.total_steps),
            warmup_start_factor=float(optim.warmup_start_factor),
            end_factor=float(optim.end_factor),
        )
        self.autocast_dtype = autocast_dtype(str(cfg.run.precision), self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        ema_decay = cfg.averaging.ema_decay
        self.ema = ExponentialMovingAverage(self.module.model, float(ema_decay)) if ema_decay else None
        self.grad_clip = optim.grad_clip_norm

        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self._resume(resume)

    # -------------------------------------------------------------- state
    def _state(self) -> dict:
        rng_states = _gather_objects(ckpt.capture_rng_state(), self.context)
        sampler = self.task.phase_sampler
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "model": self.task.student_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_states,  # one entry per rank
            "phase_sampler": sampler.state_dict() if sampler is not None else None,
            "world_size": self.context.world_size,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save_checkpoint(self) -> Optional[Path]:
        state = self._state()  # every rank takes part in gathering the RNG states
        path = None
        if self.context.is_main:
            path = ckpt.save_checkpoint(self.checkpoint_directory, state)
            keep = int(self.cfg.checkpoint.keep_mid_epoch)
            ckpt.prune_mid_epoch_checkpoints(self.checkpoint_directory, keep_last=keep)
            self.logger.log("checkpoint", self.global_step, epoch=self.epoch, path=str(path))
        barrier(self.context)
        return path

    def _resume(self, resume: Optional[str]) -> None:
        existing = ckpt.list_checkpoints(self.checkpoint_directory)
        if resume in (None, "", "none"):
            if existing:
                raise ConfigError(
                    f"run directory {self.run_directory} already has checkpoints; pass --resume auto to continue "
                    f"it or set run.output_dir to a new directory"
                )
            return
        if resume == "auto":
            found = ckpt.find_latest_checkpoint(self.checkpoint_directory)
            if found is None:
                self.logger.info(f"--resume auto: no checkpoint in {self.checkpoint_directory}, starting fresh")
                return
            path, state = found
        else:
            path = Path(resume)
            state = ckpt.load_checkpoint(path)
        self.task.load_student_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved_schedule = state["scheduler"]
        self.scheduler.load_state_dict(saved_schedule)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self.epoch, self.step_in_epoch, self.global_step = (
            int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"])
        )
        if self.task.phase_sampler is not None and state.get("phase_sampler"):
            self.task.phase_sampler.load_state_dict(state["phase_sampler"])
        rng_states = state.get("rng") or []
        if len(rng_states) == self.context.world_size:
            ckpt.restore_rng_state(rng_states[self.context.rank])
        else:
            self.logger.info(
                f"resume: checkpoint was written by {len(rng_states)} process(es), this run has "
                f"{self.context.world_size}: random streams are reseeded, the run is not bit-reproducible"
            )
        if self.step_in_epoch >= self.steps_per_epoch:  # a mid-epoch checkpoint at the very end of an epoch
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.logger.info(f"resumed from {path} (epoch {self.epoch}, step {self.step_in_epoch} of the epoch)")

    # -------------------------------------------------------------- loop
    def _loader(self, epoch: int, start_step: int):
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
        workers = int(self.cfg.data.num_workers)
        # A dedicated generator: the loader's per-epoch base seed must not come from (and shift)
        # the global torch stream, or a resumed run would draw different numbers afterwards.
        loader_generator = torch_generator(self.cfg.run.seed, "loader", epoch)
        return video_dataloader(
            self.task.train_dataset, batch_size=self.batch_size, sampler=self.sampler, num_workers=workers,
            drop_last=True, pin_memory=self.device.type == "cuda", generator=loader_generator,
        )

    def _micro_step(self, batch, sync: bool) -> dict:
        video, labels, phase = self.task.to_device(batch, self.device)
        no_sync = self.ddp.no_sync if (self.context.is_distributed and not sync) else contextlib.nullcontext
        with no_sync():
            with autocast(self.device, self.autocast_dtype):
                out = self.ddp(video, labels, phase)
            loss = out["loss"] / self.accumulation
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        return {key: value.detach() for key, value in out.items()}

    def _optimizer_step(self) -> float:
        grad_norm = float("nan")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                [p for p in self.module.parameters() if p.requires_grad], float(self.grad_clip)
            ))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.module.model)
        return grad_norm

    def train(self) -> dict:
        cfg = self.cfg
        if self.context.is_main:
            self.run_directory.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_directory / "config.yaml")
            self.logger.info(
                f"training {self.epochs} epochs x {self.steps_per_epoch} steps, global batch {self.global_batch} "
                f"({self.context.world_size} process(es) x {self.batch_size} x {self.accumulation} accumulation), "
                f"lr {self.lr:.3g}, device {self.device}, precision {cfg.run.precision}"
            )
        if self.global_step == 0 and self.step_in_epoch == 0 and cfg.averaging.include_raw_clip:
            # "epoch 0" for weight averaging: the weights before any update (the raw CLIP weights)
            if not ckpt.list_checkpoints(self.checkpoint_directory):
                self.save_checkpoint()
        max_steps = cfg.run.max_steps
        log_every = int(cfg.run.log_every_steps)
        every_epochs = int(cfg.checkpoint.every_epochs)
        every_steps = int(cfg.checkpoint.every_steps)
        # the epochs weight averaging will read are always saved, whatever checkpoint.every_epochs says
        averaged_epochs = set(parse_epoch_selection(cfg.averaging.epochs, self.epochs))
        eval_every = int(cfg.eval.every_epochs)
        history = []
        stopped_early = False
        progress = None
        if self.context.is_main and not self.quiet:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.global_step, unit="step", dynamic_ncols=True,
                            desc="train", file=sys.stderr, mininterval=1.0)
        start_time = time.time()
        while self.epoch < self.epochs:
            self.module.train()
            self.task.set_train_mode(self.module)
            loader = self._loader(self.epoch, self.step_in_epoch)
            iterator = iter(loader)
            epoch_sums: dict[str, torch.Tensor] = {}
            epoch_count = 0
            while self.step_in_epoch < self.steps_per_epoch:
                step_logs: dict[str, torch.Tensor] = {}
                for micro in range(self.accumulation):
                    batch = next(iterator)
                    out = self._micro_step(batch, sync=micro == self.accumulation - 1)
                    for key, value in out.items():
                        step_logs[key] = step_logs.get(key, 0) + value / self.accumulation
                lr_used = self.optimizer.param_groups[0]["lr"]
                grad_norm = self._optimizer_step()
                self.global_step += 1
                self.step_in_epoch += 1
                for key, value in step_logs.items():
                    epoch_sums[key] = epoch_sums.get(key, 0) + value
                epoch_count += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(epoch=self.epoch, loss=f"{float(step_logs['loss']):.4f}", lr=f"{lr_used:.2e}")
                if self.global_step % log_every == 0 or self.step_in_epoch == self.steps_per_epoch:
                    reduced = {k: float(all_reduce_mean(v, self.context)) for k, v in step_logs.items()}
                    self.logger.log("train", self.global_step, epoch=self.epoch, lr=lr_used, grad_norm=grad_norm,
                                    **reduced)
                at_epoch_end = self.step_in_epoch == self.steps_per_epoch
                if at_epoch_end:
                    self.epoch += 1
                    self.step_in_epoch = 0
                hit_max = max_steps is not None and self.global_step >= int(max_steps)
                want_checkpoint = (
                    (at_epoch_end and (self.epoch % every_epochs == 0 or self.epoch == self.epochs
                                       or self.epoch in averaged_epochs))
                    or (not at_epoch_end and every_steps and self.global_step % every_steps == 0)
                    or hit_max
                )
                if want_checkpoint:
                    self.save_checkpoint()
                if hit_max and self.epoch < self.epochs:
                    stopped_early = True
                    break
                if at_epoch_end:
                    break
            if stopped_early:
                break
            epoch_means = {k: float(all_reduce_mean(v / max(epoch_count, 1), self.context)) for k, v in epoch_sums.items()}
            record = {"epoch": self.epoch, **{f"train_{k}": v for k, v in epoch_means.items()}}
            if eval_every and (self.epoch % eval_every == 0 or self.epoch == self.epochs):
                record.update(self.evaluate())
            history.append(record)
            self.logger.log("epoch", self.global_step, **record)
        if progress is not None:
            progress.close()
        if self.context.is_distributed:
            # DDP keeps replicas bitwise equal; a broken invariant would silently train N models
            in_sync = parameters_in_sync(self.module, self.context)
            self.logger.log("sync_check", self.global_step, parameters_identical_across_ranks=in_sync)
            if not in_sync:
                raise RuntimeError("DDP replicas hold different parameters after training")
        result = {
            "epochs_done": self.epoch,
            "global_step": self.global_step,
            "stopped_early": stopped_early,
            "seconds": time.time() - start_time,
            "history": history,
            "run_directory": str(self.run_directory),
        }
        if not stopped_early:
            result.update(self._finish())
        return result

    def evaluate(self) -> dict:
        """Top-1 of the current weights on the validation set (if the task has one)."""
        if getattr(self.task, "val_dataset", None) is None:
            return {}
        metrics = self.task.evaluate(self.module, self.context)
        self.module.train()
        self.task.set_train_mode(self.module)
        return {f"val_{k}": v for k, v in metrics.items()}

    def _finish(self) -> dict:
        out = {}
        if self.context.is_main:
            final = save_weights(self.run_directory / "final.pt", self.task.student_state_dict(), self.cfg,
                                 epoch=self.epoch)
            out["final_weights"] = str(final)
            if self.ema is not None:
                out["ema_weights"] = str(save_weights(
                    self.run_directory / "ema.pt", _without_teacher(self.ema.averaged_state_dict(self.module.model)),
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
        self.logger.close()


def run_training(cfg: DictConfig, *, resume: Optional[str] = None, quiet: bool = False) -> dict:
    context = init_distributed(cfg.run.device)
    trainer = Trainer(cfg, resume=resume, context=context, quiet=quiet)
    try:
        return trainer.train()
    finally:
        trainer.close()
