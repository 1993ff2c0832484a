"""Validation during training: a deterministic held-out loss, a sample grid, the best step, early stop.

Every `train.validate_every` steps the training loop calls `Validator.run`:

- **Loss**: the diffusion loss (the training objective: target and min-SNR weights alike) of the
  first `train.validation_samples` held-out rows the latents stage cached apart
  (`files["validation"]`), with nothing drawn at random: the latent is the VAE mean, the caption
  is kept, the noise is drawn once from a generator seeded by `train.seed`, and the timesteps are
  spread evenly over the schedule (`spread_timesteps`). Two evaluations of the same weights give
  the same number; with `train.ema` the EMA weights (the ones exported) are evaluated.
- **Grid**: `train.validation_prompts` (default: held-out captions), one image each with seed
  `train.seed + i`, `train.validation_inference_steps` sampler steps, saved as
  `logs/validation/step-XXXXXX.png` (run history, outside the stage fingerprint).
- **Best / early stop**: `ValidationState` records the curve, the lowest loss and its step, and
  how many validations since; it is saved in every checkpoint, so a resumed run decides the same.

Nothing here draws from the training generator or the global RNG, so validating never changes
the trained weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import broadcast
from diffusers import AutoencoderKL
from PIL import Image
from torch import Tensor

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.evaluation.grids import Block, render_grid, save_png
from sdflow.models.components import ComponentSources, load_component
from sdflow.models.families import family_of
from sdflow.store.stageio import Manifest
from sdflow.training.latent_data import held_out_latents, read_shard_captions
from sdflow.training.objectives import objective_of
from sdflow.training.schedules import added_conditioning, collate, same_shape

GRIDS = "logs/validation"  # under the train stage's directory

log = logging.getLogger("sdflow.train")


@dataclass
class ValidationState:
    """The validations so far; saved in every checkpoint (JSON)."""

    curve: list[list[float]] = field(default_factory=list)  # [step, loss] per validation
    best_step: int | None = None
    best_loss: float | None = None
    since_best: int = 0  # validations since the lowest loss
    stopped_at: int | None = None  # the step early stopping ended the run

    def reconsider(self, patience: int | None) -> None:
        """On resume: an early stop holds only if this run's patience would have made it (a run
        continued with a larger `train.early_stop_patience` trains on)."""
        if self.stopped_at is not None and (patience is None or self.since_best < patience):
            log.info("Early stop at step %d lifted: train.early_stop_patience is now %s",
                     self.stopped_at, patience)  # fmt: skip
            self.stopped_at = None

    def record(self, step: int, loss: float) -> bool:
        """Add a validation; True when its loss is the lowest so far."""
        self.curve.append([step, loss])
        if self.best_loss is None or loss < self.best_loss:
            self.best_step, self.best_loss, self.since_best = step, loss, 0
            return True
        self.since_best += 1
        return False


def spread_timesteps(count: int, train_timesteps: int) -> Tensor:
    """`count` timesteps evenly spread over [0, train_timesteps): the middles of equal bins."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * train_timesteps / count).long()


@dataclass
class HeldOut:
    """The fixed inputs of the validation loss, one tensor per latent shape (bucket)."""

    latents: list[Tensor]  # [n, C, h, w] scaled VAE means
    noise: list[Tensor]  # [n, C, h, w]
    timesteps: list[Tensor]  # [n]
    text: list[Tensor]  # [n, L, D]
    captions: list[str]
    added: list[dict[str, Tensor] | None] = field(default_factory=list)  # SDXL's, per shape


def held_out_inputs(
    workdir: str, latents: Manifest, count: int, seed: int, train_timesteps: int
) -> HeldOut:
    data = held_out_latents(workdir, latents)
    if data is None or len(data) == 0:
        raise UserError(
            "train.validate_every is set but the latents stage cached no held-out samples: raise "
            "eval.held_out_fraction (e.g. 0.05) or add data, or set train.validate_every to 0."
        )
    rows = [data[i] for i in range(min(count, len(data)))]
    scale = float(latents["info"]["scaling_factor"])
    shift = float(latents["info"].get("shift_factor") or 0.0)  # SD3's and Flux's VAEs
    generator = torch.Generator().manual_seed(seed)
    spread = spread_timesteps(len(rows), train_timesteps)
    held = HeldOut([], [], [], [], [c for p in data.paths for c in read_shard_captions(p)])
    held.captions = held.captions[: len(rows)]
    for members in same_shape([row["mean"] for row in rows]):  # one group without buckets
        group = collate([rows[i] for i in members])
        held.latents.append((group["mean"].float() - shift) * scale)
        held.noise.append(torch.randn(group["mean"].shape, generator=generator))
        held.timesteps.append(spread[members])
        held.text.append(group["text"].float())
        pooled = group.get("pooled")
        pooled = None if pooled is None else pooled.float()
        held.added.append(added_conditioning(latents["info"], group, pooled))
    return held


class Validator:
    """Computes the validation loss and grid of the weights being trained."""

    def __init__(
        self,
        config: RunConfig,
        upstream: dict[str, Manifest | None],
        workdir: str,
        sources: ComponentSources,
        scheduler,
        out_dir: Path,
    ):
        train = config.train
        self.config, self.scheduler, self.out_dir = config, scheduler, out_dir
        steps = scheduler.config.num_train_timesteps
        self.held = held_out_inputs(
            workdir, upstream["latents"], train.validation_samples, train.seed, steps
        )
        self.prompts = (
            list(train.validation_prompts)
            or _distinct(self.held.captions)[: train.validation_images]
        )
        self.sources = sources
        self.family = family_of(config)
        self.objective = objective_of(self.family)
        self.vae: AutoencoderKL | None = None
        self.embeddings = self._embed(self.prompts) if self.prompts else None

    def _embed(self, prompts: list[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The prompts' and the empty prompt's embeddings, once (the text encoder is frozen)."""
        text = self.family.load_text(self.sources, self.config)
        with torch.no_grad():
            texts = self.family.encode_prompts(text, ["", *prompts])
        texts = {key: value.float() for key, value in texts.items()}
        return {k: v[1:] for k, v in texts.items()}, {k: v[:1] for k, v in texts.items()}

    @torch.no_grad()
    def loss(self, unet, accelerator) -> float:
        """The mean loss over the held-out rows, in batches of `train.batch_size`."""
        held, train, device = self.held, self.config.train, accelerator.device
        total, count = 0.0, sum(len(x) for x in held.latents)
        groups = zip(held.latents, held.noise, held.timesteps, held.text, held.added, strict=True)
        for group_latents, group_noise, group_timesteps, group_text, group_added in groups:
            for a in range(0, len(group_latents), train.batch_size):
                part = slice(a, a + train.batch_size)
                latents, noise = group_latents[part].to(device), group_noise[part].to(device)
                timesteps = group_timesteps[part].to(device)
                added = group_added and {k: v[part].to(device) for k, v in group_added.items()}
                text = group_text[part].to(device)
                with accelerator.autocast():
                    loss = self.objective.loss_at(
                        unet, self.scheduler, latents, noise, timesteps, text, added, train,
                        self.family,
                    )  # fmt: skip
                total += float(loss) * len(latents)
        return total / count

    @torch.no_grad()
    def images(self, unet, accelerator) -> list[Image.Image]:
        """One image per prompt, seed `train.seed + i`, with the exported pipeline's sampler."""
        config, sources = self.config, self.sources
        if self.vae is None:  # loaded once; on the device only while sampling
            self.vae = load_component(
                sources.vae, sources.vae_subfolder, AutoencoderKL, config.model
            )
        scheduler = self.objective.inference_scheduler(config, sources, self.scheduler)
        vae = self.vae.to(accelerator.device).eval()
        pipe = self.family.pipeline(unet, vae, None, scheduler)
        pipe.set_progress_bar_config(disable=True)
        texts, empty = self.embeddings
        device = accelerator.device
        empty = {key: value.to(device) for key, value in empty.items()}
        size = config.download.resolution
        out = []
        for i in range(len(self.prompts)):
            with accelerator.autocast():
                prompt = {key: value[i : i + 1].to(device) for key, value in texts.items()}
                result = pipe(
                    **self.family.prompt_kwargs(prompt, empty),
                    height=size,
                    width=size,
                    num_inference_steps=config.train.validation_inference_steps,
                    guidance_scale=config.eval.guidance_scale,
                    generator=torch.Generator().manual_seed(config.train.seed + i),
                )
            out.append(result.images[0])
        self.vae.to("cpu")
        return out

    def run(self, trainer, state: ValidationState) -> bool:
        """Validate the current weights at `trainer.progress.step`; True when they are the best."""
        accelerator, step = trainer.accelerator, trainer.progress.step
        unet = accelerator.unwrap_model(trainer.unet)
        with torch.random.fork_rng(devices=[]), _averaged(trainer):
            unet.eval()
            try:
                loss = _same_on_every_process(self.loss(unet, accelerator), accelerator)
                grid = self.save_grid(unet, accelerator, step, loss)
            finally:
                unet.train()
        improved = state.record(step, loss)
        patience = self.config.train.early_stop_patience
        if patience is not None and state.since_best >= patience:
            state.stopped_at = step
        accelerator.log({"validation_loss": loss}, step=step)
        log.info(
            "validation at step %d: loss %.5f (best %.5f at step %d)%s%s",
            step,
            loss,
            state.best_loss,
            state.best_step,
            f", grid {grid}" if grid else "",
            f"; early stop: {patience} validations without improvement" if state.stopped_at else "",
        )
        return improved

    def save_grid(self, unet, accelerator, step: int, loss: float) -> Path | None:
        if not self.prompts or not accelerator.is_main_process:
            return None
        images = self.images(unet, accelerator)
        title = [f"validation at step {step}: held-out loss {loss:.5f}"]
        grid = render_grid(self.prompts, [Block(f"step {step}", [[i] for i in images])], title)
        path = self.out_dir / GRIDS / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(grid, path)
        return path

    def newest_grid(self, state: ValidationState) -> str | None:
        """The newest validation grid, relative to the stage directory, if there is one."""
        if not state.curve:
            return None
        name = f"{GRIDS}/step-{int(state.curve[-1][0]):06d}.png"
        return name if (self.out_dir / name).is_file() else None


class _averaged:
    """With `train.ema`, the EMA weights in the model for the duration (the raw ones after)."""

    def __init__(self, trainer):
        self.ema, self.params = trainer.ema, trainer.params

    def __enter__(self) -> None:
        if self.ema:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc) -> None:
        if self.ema:
            self.ema.restore(self.params)


def _same_on_every_process(loss: float, accelerator) -> float:
    """Process 0's loss everywhere, so every process takes the same best / early-stop decision."""
    if accelerator.num_processes == 1:
        return loss
    value = torch.tensor([loss], dtype=torch.float64, device=accelerator.device)
    return float(broadcast(value, from_process=0)[0])


def _distinct(captions: list[str]) -> list[str]:
    return list(dict.fromkeys(c for c in captions if c))


def validation_info(state: ValidationState, every: int, grid: str | None) -> dict:
    """What the manifest and summary.json record of the validations."""
    return {
        "every": every,
        "curve": state.curve,
        "best_step": state.best_step,
        "best_loss": state.best_loss,
        "stopped_early_at": state.stopped_at,
        "grid": grid,
    }
