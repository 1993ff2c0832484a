"""The prior-preservation loss of DreamBooth (Ruiz et al. 2022, arXiv 2208.12242), per step.

With `train.prior_preservation` every micro-batch of instance rows is paired with a micro-batch of
class rows (the `class_images` stage's cache), and the step's loss is

    loss = L(instance batch) + loss_weight x L(class batch)

with L the family's own objective (`sdflow.training.objectives`: DDPM or rectified flow, min-SNR
or flow weighting included), each part the mean over its own rows, as diffusers'
train_dreambooth.py computes it from one concatenated batch chunked in two. Here the two parts are
two calls of the same objective in one step, instance first, both drawing from the run's one
generator: the class rows are square (generated at `download.resolution`) while an instance
batch may be of another bucket, and per-row extras of one part never become None for both
(`collate`). The maths is that of the chunked batch: a denoiser has no layer that mixes rows.

Class micro-batch m of process r is batch `m x world + r` of the class rows' own `EpochOrder`
(seeded by `train.seed`), a function of the step alone, so a resumed run pairs the same rows and
draws the same numbers as one never interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from sdflow.config import RunConfig, TrainConfig
from sdflow.errors import UserError
from sdflow.store.stageio import Manifest
from sdflow.training.latent_data import caption_key
from sdflow.training.schedules import CachedBatches, EpochOrder, collate

ORDER_SALT = 7_919  # the class order's seed is train.seed + this: not the instance order's


@dataclass
class PriorBatches:
    """The class rows of a run and the order they are read in."""

    source: CachedBatches
    order: EpochOrder
    weight: float
    train: TrainConfig  # the run's, tag shuffling off: the class prompt is one cached sentence
    world: int = 1
    rank: int = 0

    def batch(self, micro: int) -> dict[str, Any]:
        """Class micro-batch `micro` of this process."""
        rows = self.order.batch(micro * self.world + self.rank)
        return collate([self.source.dataset[i] for i in rows])


def prior_batches(
    config: RunConfig, upstream: dict[str, Manifest | None], workdir: str, world: int, rank: int
) -> PriorBatches | None:
    """The class rows when the run uses prior preservation, else None."""
    prior = config.train.prior_preservation
    if prior is None:
        return None
    manifest = upstream.get("class_images")
    if not manifest:
        raise UserError(
            "train.prior_preservation is set but there is no class_images stage output: run the "
            "class_images stage first (`sdflow run PROFILE --only class_images`)."
        )
    source = CachedBatches(workdir, manifest, caption_key(config.train))
    order = source.order(config.train.seed + ORDER_SALT, config.train.batch_size)
    unshuffled = config.train.model_copy(update={"caption_shuffle": False, "keep_tokens": 0})
    return PriorBatches(source, order, prior.loss_weight, unshuffled, world, rank)


def with_prior_loss(trainer: Any, scheduler: Any, loss: Tensor, micro: int) -> Tensor:
    """`loss` (the instance part) plus `loss_weight` x the objective's loss on class micro-batch
    `micro`; `loss` itself without prior preservation."""
    prior: PriorBatches | None = getattr(trainer, "prior", None)
    if prior is None:
        return loss
    prior_loss = trainer.objective.loss(
        trainer.unet,
        scheduler,
        prior.source,
        prior.batch(micro),
        trainer.generator,
        prior.train,
        trainer.accelerator.device,
        text_encoder=trainer.text_encoder,
        family=trainer.family,
    )
    return loss + prior.weight * prior_loss
