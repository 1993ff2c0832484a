"""The training objective of a run, chosen by its family (`Family.objective`): DDPM (SD, SDXL:
`sdflow.training.objective` with the noise schedules of `sdflow.models.schedulers`) or rectified
flow (SD3, Flux: `sdflow.training.flow_objective`). The loop, validation and export ask this table
for the schedules and the loss and never branch on the family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdflow.models import schedulers
from sdflow.training import flow_objective, objective


@dataclass(frozen=True)
class Objective:
    noise_scheduler: Callable[..., Any]  # (config, sources) -> the training schedule
    inference_scheduler: Callable[..., Any]  # (config, sources, trained) -> the export's sampler
    loss: Callable[..., Any]  # one step's loss from a batch (draws from the generator)
    loss_at: Callable[..., Any]  # the loss of given inputs (validation's fixed ones)


OBJECTIVES = {
    "ddpm": Objective(
        schedulers.noise_scheduler,
        schedulers.inference_scheduler,
        objective.diffusion_loss,
        objective.loss_at,
    ),
    "flow": Objective(
        flow_objective.noise_scheduler,
        flow_objective.inference_scheduler,
        flow_objective.flow_loss,
        flow_objective.loss_at,
    ),
}


def objective_of(family: Any) -> Objective:
    return OBJECTIVES[family.objective]
