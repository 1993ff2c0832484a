"""A training run's live objects (`Trainer`) and their checkpoint: `state` is everything a resumed
run needs (the trained weights, optimizer, lr schedule, EMA, every process's generator state, the
progress and the validation state), `save` writes it from the main process (a sharded run gathers the
full state first), `restore` loads it into a freshly built trainer; `summarize` is the run's summary.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch import Tensor

from sdflow.config import TrainConfig
from sdflow.models.trainable import CHECKPOINT_GROUP, load_trained_weights
from sdflow.store.checkpoints import mark_best, save_checkpoint
from sdflow.training.objectives import Objective
from sdflow.training.sharding import full_state, sharded
from sdflow.training.validation import ValidationState, Validator, validation_info

log = logging.getLogger("sdflow.train")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint (JSON), so the loss curve survives resume."""

    step: int = 0
    samples_seen: int = 0
    seconds: float = 0.0  # training time summed over all attempts (no start-up, no checkpointing)
    history: list[list[float]] = field(default_factory=list)  # [step, loss, lr] per step
    skipped_steps: int = 0  # optimizer steps the fp16 GradScaler skipped (inf/NaN gradients)


@dataclass
class TrainSummary:
    steps: int
    samples_seen: int
    trainable_params: int
    final_loss: float
    samples_per_second: float
    resumed_from: int
    history: list[list[float]]
    skipped_steps: int = 0
    validation: dict[str, Any] | None = None  # `validation_info`, with `train.validate_every`
    tf32: bool = False  # train.tf32 applied (on CUDA only)


@dataclass
class Trainer:
    """The live objects of one training run; `state()` / `restore()` are its checkpoint."""

    accelerator: Accelerator
    train: TrainConfig
    unet: torch.nn.Module  # the family's denoiser: a UNet (sd, sdxl) or a transformer (sd3, flux)
    params: list[torch.nn.Parameter]  # the trained ones: all, or only LoRA's
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: EMAModel | None
    generator: torch.Generator  # the one source of randomness of the loop
    progress: Progress
    text_encoder: torch.nn.Module | None = None  # None: frozen, its embeddings are cached
    text_params: list[torch.nn.Parameter] = field(default_factory=list)  # its trained ones
    validator: Validator | None = None
    validation: ValidationState = field(default_factory=ValidationState)
    tf32: bool = False
    pending: list[tuple[int, Tensor, float]] = field(default_factory=list)  # losses not yet read
    param_names: list[str] = field(default_factory=list)  # of `params`, in the optimizer's order
    family: Any = None  # the run's model family (sdflow.models.families)
    objective: Objective | None = None  # its training objective (DDPM or rectified flow)
    prior: Any = None  # DreamBooth's class rows (`sdflow.training.prior.PriorBatches`) or None


def state(trainer: Trainer, generators: Tensor, full: tuple | None = None) -> dict[str, Any]:
    """Everything a resumed run needs; only the trained parameters (all, or LoRA's) are saved.

    `generators` stacks every process's generator state (row = process index); `full` is the
    gathered (weights, optimizer state) of a sharded run.
    """
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    model = {n: p for n, p in unet.named_parameters() if p.requires_grad} if full is None else None
    values = {
        "model": model if full is None else full[0],
        "optimizer": trainer.optimizer.state_dict() if full is None else full[1],
        "lr_scheduler": trainer.lr_scheduler.state_dict(),
        "rng": {"generators": generators, "torch": torch.get_rng_state()},
        "progress": asdict(trainer.progress),
    }
    if trainer.text_encoder is not None:
        encoder = trainer.accelerator.unwrap_model(trainer.text_encoder)
        values[CHECKPOINT_GROUP] = {n: p for n, p in encoder.named_parameters() if p.requires_grad}
    if trainer.ema:
        values["ema"] = trainer.ema.state_dict()
    if trainer.validator:
        values["validation"] = asdict(trainer.validation)
    if trainer.accelerator.scaler is not None:  # fp16 loss scale and its growth counter
        values["grad_scaler"] = trainer.accelerator.scaler.state_dict()
    return values


def restore(trainer: Trainer, values: dict[str, Any]) -> None:
    """Load a checkpoint into the freshly built trainer (before `accelerator.prepare`)."""
    load_trained_weights(trainer.unet, values["model"])
    if trainer.text_encoder is not None:
        load_trained_weights(trainer.text_encoder, values[CHECKPOINT_GROUP], "text encoder")
    if sharded(trainer.train):  # the sharded optimizer takes it after `prepare`
        pass
    elif "optimizer" in values:  # after the scheduler set initial_lr
        trainer.optimizer.load_state_dict(values["optimizer"])
    else:  # a finished stage's checkpoint (train.keep_optimizer_state: false)
        log.info("The checkpoint holds no optimizer state: Adam's moments start from zero")
    trainer.lr_scheduler.load_state_dict(values["lr_scheduler"])
    if trainer.ema:
        trainer.ema.load_state_dict(values["ema"])
    if trainer.accelerator.scaler is not None and "grad_scaler" in values:
        trainer.accelerator.scaler.load_state_dict(values["grad_scaler"])
    own = values["rng"]["generators"][trainer.accelerator.process_index]
    trainer.generator.set_state(own.clone())  # a row view (storage offset > 0) crashes set_state
    torch.set_rng_state(values["rng"]["torch"])
    trainer.progress = Progress(**values["progress"])
    if "validation" in values:
        trainer.validation = ValidationState(**values["validation"])
        trainer.validation.reconsider(trainer.train.early_stop_patience)


def save(trainer: Trainer, checkpoints: Path) -> None:
    """The main process writes; the other processes only contribute their generator states."""
    accelerator = trainer.accelerator
    own = trainer.generator.get_state()[None].to(accelerator.device)
    generators = accelerator.gather(own).cpu()
    full = None
    if sharded(trainer.train):  # every rank takes part in gathering the shards
        full = full_state(accelerator, trainer.unet, trainer.optimizer, trainer.param_names)
    if accelerator.is_main_process:
        step = trainer.progress.step
        values = state(trainer, generators, full)
        save_checkpoint(checkpoints, step, values, keep=trainer.train.keep_checkpoints)
        if trainer.train.keep_best and trainer.validation.best_step is not None:
            mark_best(checkpoints, trainer.validation.best_step)  # again after a crash: idempotent
        log.info("Saved checkpoint of step %d", step)
    accelerator.wait_for_everyone()


def summarize(trainer: Trainer, resumed_from: int) -> TrainSummary:
    """Final loss = mean over the last `log_every` steps (one step's loss is too noisy)."""
    progress = trainer.progress
    window = [loss for _, loss, _ in progress.history[-trainer.train.log_every :]]
    return TrainSummary(
        steps=progress.step,
        samples_seen=progress.samples_seen,
        trainable_params=sum(p.numel() for p in trainer.params + trainer.text_params),
        final_loss=sum(window) / max(1, len(window)),
        samples_per_second=progress.samples_seen / progress.seconds if progress.seconds else 0.0,
        resumed_from=resumed_from,
        history=progress.history,
        skipped_steps=progress.skipped_steps,
        validation=validation_summary(trainer),
        tf32=trainer.tf32,
    )


def validation_summary(trainer: Trainer) -> dict[str, Any] | None:
    if trainer.validator is None:
        return None
    grid = trainer.validator.newest_grid(trainer.validation)
    return validation_info(trainer.validation, trainer.train.validate_every, grid)
