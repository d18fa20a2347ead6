"""The `hf` source: Hugging Face `datasets` (optional extra `hf`). Placeholder until written."""

from __future__ import annotations

from typing import Any

from surgery.data_examples import Examples
from surgery.errors import DataError
from surgery.registry import DATA_SOURCES
from surgery.schema import Recipe


@DATA_SOURCES.implements("hf")
def hf_source(recipe: Recipe, model: Any) -> tuple[Examples, Examples]:
    raise DataError("not yet")
