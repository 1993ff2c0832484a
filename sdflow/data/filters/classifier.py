"""Any transformers image-classification model as a filter (NSFW, watermark, ... classifiers).

`filter.classifiers: [{model: <hub name or local dir>, label: nsfw, max: 0.5}]`: each image's
probability for `label` (softmax over the labels; sigmoid for multi-label models, as transformers'
image-classification pipeline computes it), in batches on the stage's device, must lie within
`min`/`max`; otherwise the row is rejected as `classifier:<label>` with the probability in its detail.
Probabilities are rounded to 6 decimals before the comparison, so a verdict does not depend on the
batch a row ran in. The model's weights hash is part of the filter's settings (stage key and row keys).
"""

from __future__ import annotations

import io
import threading
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sdflow.data.filters import BatchCheck, Rejection, Row, register
from sdflow.errors import UserError

if TYPE_CHECKING:
    from sdflow.config import ClassifierFilter, FilterConfig

DECIMALS = 6
_LOCK = threading.Lock()  # shard jobs on threads share one pipeline


@register("classifiers", cost=2)
def classifier_filters(cfg: FilterConfig) -> list[BatchCheck]:
    return [lambda rows, spec=spec: check_classifier(rows, spec) for spec in cfg.classifiers]


def classifier_identity(spec: ClassifierFilter) -> str:
    """What names the model's weights (a content hash, or the hub commit); refuses a label the
    model does not have, before any work."""
    from sdflow.models.components import absolute_source
    from sdflow.models.files import weights_hash

    source = absolute_source(spec.model)
    identity = weights_hash(source, None)
    _require_label(list(_config_labels(source, identity)), spec)
    return identity


@lru_cache(maxsize=16)
def _config_labels(source: str, identity: str) -> tuple[str, ...]:
    """The model's label names, read from its config once per weights identity."""
    from transformers import AutoConfig

    try:
        return tuple(str(v) for v in AutoConfig.from_pretrained(source).id2label.values())
    except (OSError, ValueError) as exc:
        raise UserError(f"filter.classifiers: could not read {source!r}'s config: {exc}") from None


def check_classifier(rows: list[Row], spec: ClassifierFilter) -> list[Rejection | None]:
    probabilities = label_probabilities(rows, spec)
    return [_verdict(p, spec) for p in probabilities]


def _verdict(probability: float, spec: ClassifierFilter) -> Rejection | None:
    shown = f"{spec.label}={probability:.{DECIMALS}f}"
    if spec.max is not None and probability > spec.max:
        return Rejection(f"classifier:{spec.label}", f"{shown} > max {spec.max:g} ({spec.model})")
    if spec.min is not None and probability < spec.min:
        return Rejection(f"classifier:{spec.label}", f"{shown} < min {spec.min:g} ({spec.model})")
    return None


def label_probabilities(rows: list[Row], spec: ClassifierFilter) -> list[float]:
    """Each row's probability for `spec.label`, rounded to DECIMALS."""
    from PIL import Image

    from sdflow.models.components import absolute_source
    from sdflow.ops.gpuslots import torch_device

    if not rows:
        return []
    images = [Image.open(io.BytesIO(row["image"])).convert("RGB") for row in rows]
    with _LOCK:
        pipe = load_classifier(absolute_source(spec.model), str(torch_device()))
        _require_label([str(v) for v in pipe.model.config.id2label.values()], spec)
        results = pipe(images, top_k=None, batch_size=spec.batch_size)
    return [
        round(next(r["score"] for r in result if r["label"] == spec.label), DECIMALS)
        for result in results
    ]


def _require_label(labels: list[str], spec: ClassifierFilter) -> None:
    if spec.label not in labels:
        raise UserError(
            f"filter.classifiers: label {spec.label!r} is not one of {spec.model!r}'s labels "
            f"({', '.join(labels)})."
        )


@lru_cache(maxsize=4)
def load_classifier(source: str, device: str) -> Any:
    """The model and its image processor as a transformers image-classification pipeline."""
    from transformers import pipeline

    from sdflow.models.components import is_hub_name

    try:
        return pipeline("image-classification", model=source, device=device)
    except (OSError, ValueError) as exc:
        if is_hub_name(source):
            raise  # network trouble, worth a retry
        raise UserError(f"filter.classifiers: could not load {source}: {exc}") from None
