"""The noise schedules of the DDPM families: the training schedule (the pretrained model's own, or SD's
scaled-linear default), the prediction type (the base's unless `train.prediction_type` re-targets it),
and the exported pipeline's sampler (the base's own scheduler class, or DDIM from scratch)."""

from __future__ import annotations

import logging
from typing import Any

import diffusers
from diffusers import DDIMScheduler, DDPMScheduler, SchedulerMixin

from sdflow.config import RunConfig
from sdflow.errors import UserError
from sdflow.models.components import ComponentSources, load_component, load_revision

log = logging.getLogger("sdflow.models.schedulers")


def base_scheduler_config(config: RunConfig, sources: ComponentSources) -> dict[str, Any] | None:
    """The pretrained model's own `scheduler/scheduler_config.json` (with `_class_name`), or None."""
    if not sources.scheduler:
        return None
    # loading it first checks the source, with errors that name the config key
    load_component(sources.scheduler, "scheduler", DDPMScheduler, config.model)
    revision = load_revision(sources.scheduler, config.model)  # the commit load_component read
    return dict(DDPMScheduler.load_config(sources.scheduler, subfolder="scheduler", **revision))


def prediction_type(config: RunConfig, base: dict[str, Any] | None) -> str:
    """`train.prediction_type`, or unset: the base scheduler's own (epsilon from scratch)."""
    inherited = (base or {}).get("prediction_type") or "epsilon"
    chosen = config.train.prediction_type or inherited
    if base is not None and chosen != inherited:
        log.warning(
            "train.prediction_type is %r but the base model %s predicts %r: the fine-tune is "
            "re-targeted to %r (recorded in the train manifest).",
            chosen,
            config.model.pretrained,
            inherited,
            chosen,
        )
    return chosen


def noise_scheduler(config: RunConfig, sources: ComponentSources) -> DDPMScheduler:
    """The training noise schedule: the pretrained model's own, or SD's scaled-linear default."""
    base = base_scheduler_config(config, sources)
    prediction = prediction_type(config, base)
    if base is not None:
        return DDPMScheduler.from_config(base, prediction_type=prediction)
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction,
        clip_sample=False,  # SD v1 scheduler settings: latents are not clipped to [-1, 1]
        steps_offset=1,
    )


def inference_scheduler(config: RunConfig, sources: ComponentSources, trained: DDPMScheduler):
    """The exported pipeline's sampler: the base model's own scheduler class and config, or (from
    scratch) DDIM on the training noise schedule; both with the prediction type `trained` used."""
    base = base_scheduler_config(config, sources)
    prediction = trained.config.prediction_type
    if base is None:
        # SD's own DDIM settings: the final step does not assume alpha_0 = 1
        return DDIMScheduler.from_config(trained.config, set_alpha_to_one=False)
    cls = getattr(diffusers, base["_class_name"], None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise UserError(
            f"model.pretrained {config.model.pretrained}: its scheduler class "
            f"{base['_class_name']!r} is not a diffusers scheduler."
        )
    return cls.from_config(base, prediction_type=prediction)
