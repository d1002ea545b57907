"""Base of every recipe section (see medcritical.recipe)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors, not silently ignored; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
