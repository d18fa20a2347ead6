"""The optional bearer token: where it comes from (a file, else an environment variable). Light,
so the `surgery predict` client reads it without importing Ray."""

from __future__ import annotations

import os
from pathlib import Path

from surgery.errors import SurgeryError

TOKEN_ENV = "SURGERY_SERVE_TOKEN"


def read_token(token_file: str | Path | None) -> str | None:
    """The bearer token from `token_file`, else from $SURGERY_SERVE_TOKEN, else None."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise SurgeryError(f"--token-file {token_file}: cannot read it ({exc.strerror})") from None
        if not token:
            raise SurgeryError(f"--token-file {token_file}: the file is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None
