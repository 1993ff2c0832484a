"""The UNet training loop: from scratch, full fine-tune or LoRA, with exact resume.

`train_unet(config, upstream, workdir, out_dir)` is a plain function with no Prefect inside. The train
stage calls `sdflow.training.processes.run_training`, which runs it in this process or in
`train.processes` accelerate processes. `train.batch_size` is per process; process r reads the r-th slice of
each global batch, and DDP averages the gradients, so N processes x B/N see the same samples per step
as one process x B. Only rank 0 writes checkpoints and the summary.

It reads the latents stage's cached latents and text embeddings (`train.cache_latents: false` encodes
images and captions at every step instead, for comparison), and checkpoints into `out_dir/checkpoints`
every `train.checkpoint_every` steps. With `train.text_encoder` lora or full the cache holds token ids
and the step runs the trained text encoder on them (`sdflow.training.text_training`).

Exact resume: one torch.Generator (seeded by `train.seed`) draws everything random in the order
written in `sdflow.training.objective.draw_inputs`, and the data order is a function of (seed, epoch) and
the step alone (`StepBatches`). A checkpoint holds that generator's state with the weights, optimizer, lr schedule
and EMA, so a run killed at any point and resumed reaches the same weights as one never interrupted.

Validation (`train.validate_every`, `sdflow.training.validation`) runs between steps on fixed held-out
inputs; its state (curve, best step, patience) is checkpointed too. With `train.keep_best`, a step
with a new lowest validation loss is checkpointed and marked BEST (never pruned); with
`train.early_stop_patience` the run ends, checkpointed, after that many validations without one.
Memory options: `train.optimizer: adamw8bit` (bitsandbytes, CUDA only) and `train.ema_on_cpu`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import ProjectConfiguration
from diffusers.optimization import get_scheduler
from torch import Tensor
from torch.utils.data import DataLoader

from sdflow.config import RunConfig, TrainConfig
from sdflow.models.components import component_sources
from sdflow.models.families import family_of
from sdflow.models.trainable import (
    build_trainable_denoiser,
    build_trainable_text_encoder,
)
from sdflow.ops.artifacts import report_progress
from sdflow.store.checkpoints import load_latest
from sdflow.store.stageio import Manifest
from sdflow.training.master_weights import step_in_float32
from sdflow.training.memory import make_ema
from sdflow.training.objectives import objective_of
from sdflow.training.optimizers import check_optimizer, make_optimizer
from sdflow.training.prior import prior_batches, with_prior_loss
from sdflow.training.schedules import StepBatches, collate, log_bucket_plan, make_batches
from sdflow.training.sharding import (
    accelerator_options,
    allow_cpu_fsdp,
    load_sharded_optimizer,
    sharded,
)
from sdflow.training.speed import (
    apply_tf32,
    check_speed_options,
    compile_unet,
    fused_adamw,
    prepare_unet,
)
from sdflow.training.tag_shuffle import with_caption_shuffle
from sdflow.training.text_training import param_groups, trained_parameters
from sdflow.training.trainer import Progress, Trainer, TrainSummary, restore, save, summarize
from sdflow.training.validation import Validator

CHECKPOINTS = "checkpoints"
LOGS = "logs"
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

log = logging.getLogger("sdflow.train")


def train_unet(
    config: RunConfig, upstream: dict[str, Manifest | None], workdir: str, out_dir: str | Path
) -> TrainSummary:
    """Train to `train.max_steps`, resuming from the newest checkpoint in `out_dir/checkpoints`."""
    out_dir = Path(out_dir)
    check_optimizer(config.train)
    accelerator = make_accelerator(config.train, out_dir)
    check_speed_options(config.train, accelerator.device)
    family = family_of(config)
    family.check(config)
    sources = component_sources(config, upstream, workdir)
    trainer = make_trainer(accelerator, config, sources)
    scheduler = trainer.objective.noise_scheduler(config, sources)
    if config.train.validate_every:
        trainer.validator = Validator(config, upstream, workdir, sources, scheduler, out_dir)
    found = load_latest(out_dir / CHECKPOINTS)
    if found:
        restore(trainer, found[1])
        log.info("Resuming training from the checkpoint of step %d", trainer.progress.step)
    resumed_from = trainer.progress.step
    trainer.param_names = [n for n, p in trainer.unet.named_parameters() if p.requires_grad]
    if trainer.text_encoder is None:
        trainer.unet, trainer.optimizer = accelerator.prepare(trainer.unet, trainer.optimizer)
        if sharded(config.train):  # fully_shard replaced the parameters by their DTensor shards
            trainer.params = [p for p in trainer.unet.parameters() if p.requires_grad]
            if found and "optimizer" in found[1]:
                values = found[1]["optimizer"]
                load_sharded_optimizer(trainer.unet, trainer.optimizer, values, trainer.param_names)
    else:  # prepared together: the same autocast, device and (several processes) DDP wrapping
        trainer.unet, trainer.text_encoder, trainer.optimizer = accelerator.prepare(
            trainer.unet, trainer.text_encoder, trainer.optimizer
        )
    if trainer.ema and not config.train.ema_on_cpu:
        trainer.ema.to(accelerator.device)
    trainer.tf32 = apply_tf32(config.train, accelerator.device)
    compile_unet(accelerator.unwrap_model(trainer.unet), config.train)
    dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    source = make_batches(config, upstream, workdir, sources, accelerator.device, dtype)
    source = with_caption_shuffle(config, source, sources, accelerator.device, dtype)
    world, rank = accelerator.num_processes, accelerator.process_index
    trainer.prior = prior_batches(config, upstream, workdir, world, rank)  # DreamBooth class rows
    fit(trainer, source, scheduler, out_dir / CHECKPOINTS)
    accelerator.end_training()
    return summarize(trainer, resumed_from)


def make_trainer(accelerator: Accelerator, config: RunConfig, sources) -> Trainer:
    train = config.train
    weight_dtype = WEIGHT_DTYPES[accelerator.mixed_precision]
    unet = prepare_unet(build_trainable_denoiser(config, sources, weight_dtype, True), train)
    params = [p for p in unet.parameters() if p.requires_grad]
    text_encoder = build_trainable_text_encoder(config, sources, weight_dtype)
    text_params = trained_parameters(text_encoder)
    # Not under fp16's GradScaler: the fused kernel skips an inf/NaN step itself, unseen by
    # accelerate, so the lr schedule and EMA would not wait for the next real update.
    fused = fused_adamw(train, accelerator.device) and accelerator.scaler is None
    optimizer = make_optimizer(train, param_groups(train, params, text_params), fused)
    if train.master_weights == "bfloat16":
        step_in_float32(optimizer, train.seed)
    lr_scheduler = get_scheduler(
        train.lr_scheduler,
        optimizer,
        num_warmup_steps=train.warmup_steps,
        num_training_steps=train.max_steps,
        num_cycles=train.lr_cycles,
        power=train.lr_power,
    )
    ema = make_ema(train, params)
    generator = torch.Generator().manual_seed(train.seed + accelerator.process_index)
    return Trainer(
        accelerator,
        train,
        unet,
        params,
        optimizer,
        lr_scheduler,
        ema,
        generator,
        Progress(),
        text_encoder,
        text_params,
        family=family_of(config),
        objective=objective_of(family_of(config)),
    )


def fit(trainer: Trainer, source, scheduler, checkpoints: Path) -> None:
    """The loop: one optimizer step per iteration, a checkpoint every `checkpoint_every` steps."""
    train, progress, accelerator = trainer.train, trainer.progress, trainer.accelerator
    order = source.order(train.seed, train.batch_size)
    log_bucket_plan(order.summary(), train.batch_size, log)
    sampler = StepBatches(
        order,
        start=progress.step * train.gradient_accumulation,
        stop=train.max_steps * train.gradient_accumulation,
        world=accelerator.num_processes,
        rank=accelerator.process_index,
    )
    loader = DataLoader(
        source.dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=train.data_workers,
        pin_memory=train.pin_memory and accelerator.device.type == "cuda",
        prefetch_factor=train.prefetch_factor,
    )
    batches = iter(loader)
    trainer.unet.train()
    while progress.step < train.max_steps and trainer.validation.stopped_at is None:
        started = time.monotonic()
        lr = trainer.lr_scheduler.get_last_lr()[0]
        loss = run_step(trainer, source, scheduler, batches)
        accumulated = train.gradient_accumulation
        progress.samples_seen += sampler.samples(progress.step * accumulated, accumulated)
        progress.step += 1
        progress.seconds += time.monotonic() - started
        trainer.pending.append((progress.step, loss, lr))  # read at the next log or checkpoint
        report_progress("train", progress.step, train.max_steps, "steps")  # no-op in a worker
        if progress.step % train.log_every == 0 or progress.step == train.max_steps:
            loss = read_losses(trainer)
            accelerator.log({"loss": loss, "lr": lr}, step=progress.step)
            log.info("step %d/%d loss %.5f lr %.3g", progress.step, train.max_steps, loss, lr)
        keep = progress.step % train.checkpoint_every == 0 or progress.step == train.max_steps
        best = False
        if trainer.validator and progress.step % train.validate_every == 0:
            best = trainer.validator.run(trainer, trainer.validation) and train.keep_best
        if keep or best or trainer.validation.stopped_at is not None:
            read_losses(trainer)
            save(trainer, checkpoints)
    read_losses(trainer)


def read_losses(trainer: Trainer) -> float:
    """Move the pending step losses into the history as numbers; the newest one's value.

    One device-to-host read per log line instead of one per step: a step never waits for the
    GPU to finish the previous one just to print its loss."""
    pending, trainer.pending = trainer.pending, []
    if pending:
        values = torch.stack([loss for _, loss, _ in pending]).tolist()
        trainer.progress.history += [
            [step, value, lr] for (step, _, lr), value in zip(pending, values, strict=True)
        ]
    return trainer.progress.history[-1][1]


def run_step(trainer: Trainer, source, scheduler, batches) -> Tensor:
    """One optimizer step over `gradient_accumulation` micro-batches; returns the mean loss (a
    0-d tensor on the device, not read yet)."""
    accelerator, train = trainer.accelerator, trainer.train
    total = torch.zeros((), device=accelerator.device)
    text_encoder = trainer.text_encoder
    models = [trainer.unet] if text_encoder is None else [trainer.unet, text_encoder]
    for micro in range(train.gradient_accumulation):
        batch = next(batches)
        with accelerator.accumulate(*models):
            loss = trainer.objective.loss(
                trainer.unet,
                scheduler,
                source,
                batch,
                trainer.generator,
                train,
                accelerator.device,
                text_encoder=text_encoder,
                family=trainer.family,
            )
            micro_index = trainer.progress.step * train.gradient_accumulation + micro
            loss = with_prior_loss(trainer, scheduler, loss, micro_index)  # prior preservation
            accelerator.backward(loss)  # divides by gradient_accumulation
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(
                    trainer.params + trainer.text_params, train.max_grad_norm
                )
            trainer.optimizer.step()  # a no-op until the last micro-batch
            trainer.optimizer.zero_grad(set_to_none=True)
        total += loss.detach().float()
    if accelerator.optimizer_step_was_skipped:
        # The GradScaler found inf/NaN gradients and left the weights alone: the lr schedule and
        # EMA wait for a real update too (as diffusers' AcceleratedScheduler does).
        trainer.progress.skipped_steps += 1
        log.warning("step %d: inf/NaN gradients, optimizer step skipped", trainer.progress.step + 1)
    else:
        trainer.lr_scheduler.step()
        if trainer.ema:
            trainer.ema.step(trainer.params)
    return accelerator.reduce(total / train.gradient_accumulation, "mean").float()


# ------------------------------------------------------------------------------------------ setup


def make_accelerator(train: TrainConfig, out_dir: Path) -> Accelerator:
    project = ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / LOGS))
    options = dict(
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation,
        log_with="tensorboard",
        project_config=project,
        **accelerator_options(train),  # train.sharding: fsdp
    )
    try:
        accelerator = Accelerator(**options)
    except ValueError:
        # An earlier in-process run fixed another mixed precision; only a single process resets it.
        if AcceleratorState().num_processes > 1:
            raise
        AcceleratorState._reset_state()
        accelerator = Accelerator(**options)
    allow_cpu_fsdp(accelerator, train)
    accelerator.init_trackers("train", config=tracker_config(train))
    return accelerator


def tracker_config(train: TrainConfig) -> dict[str, Any]:
    """Scalar hyper-parameters for TensorBoard's hparams view."""
    values = train.model_dump()
    return {k: v for k, v in values.items() if isinstance(v, int | float | str | bool)}
