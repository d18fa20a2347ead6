"""User-facing errors. Anything raised as a `SurgeryError` reaches the user as one line (or one
line per problem) and a non-zero exit, never as a traceback."""

from __future__ import annotations


class SurgeryError(Exception):
    """A problem the user can fix; the message is what they see."""

    exit_code = 2


class RecipeError(SurgeryError):
    """A recipe that does not validate; `problems` holds one formatted line per problem
    (`recipe.yaml:12:5 heads[0].loss: ...`)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class BuildError(SurgeryError):
    """The model cannot be built as the recipe says (unknown module, weights mismatch, offline)."""


class DataError(SurgeryError):
    """Training data that is missing, unreadable or does not fit the heads."""


class CheckpointError(SurgeryError):
    """A checkpoint or resume that cannot proceed."""


class BundleError(SurgeryError):
    """A bundle that is missing, tampered with, truncated or of an unknown format."""


class ExportError(SurgeryError):
    """A format that cannot represent the model, or an export outside tolerance."""
