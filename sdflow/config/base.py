"""What every config section shares: the base class, precision values, fixed sizes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict

# A from-scratch tokenizer's fixed tokens: start and end of text, 256 bytes, 256 word-final bytes.
TOKENIZER_BASE_VOCAB = 2 + 2 * 256

# YAML reads a bare `no` as False; accept it as the "no" it means.
Precision = Annotated[
    Literal["no", "fp16", "bf16"], BeforeValidator(lambda v: "no" if v is False else v)
]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
