"""Signing keys (Ed25519, through `cryptography`) and the list of public keys you trust.

A signed document is a JSON object with a `signature` member: the Ed25519 signature of the
canonical JSON of everything else (sorted keys, no spaces, UTF-8), the signer's public key and
its id (the first 16 hex digits of the key's sha256). Library indexes and packed models are
signed this way, and both are read through `read_signed_document`. A signature is accepted only if it verifies *and* its key is in the trust list
(`surgery keys trust`); your own keys are trusted when you make them.

Files, under the config folder (`surgery.places.config_dir()`):
  keys/<name>.key      the private key, PKCS#8 PEM, mode 0600
  keys/<name>.pub      one line: `surgery-ed25519 <base64 public key> <name>`
  trusted_keys         one such line per trusted key
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from surgery.errors import SurgeryError
from surgery.places import config_dir

KEY_TYPE = "surgery-ed25519"
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SignatureError(SurgeryError):
    """A signature that does not verify, a key that is not trusted, or an unusable key file."""


def keys_dir() -> Path:
    return config_dir() / "keys"


def trust_file() -> Path:
    return config_dir() / "trusted_keys"


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(private: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_line(public_raw: bytes, name: str) -> str:
    return f"{KEY_TYPE} {base64.b64encode(public_raw).decode()} {name}"


def parse_public_line(line: str, where: str) -> tuple[bytes, str]:
    """(raw public key, name) from a `surgery-ed25519 <base64> <name>` line."""
    parts = line.strip().split()
    if len(parts) < 2 or parts[0] != KEY_TYPE:
        raise SignatureError(f"{where}: not a public key line (`{KEY_TYPE} <base64> <name>`)")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise SignatureError(f"{where}: the public key is not 32 bytes of base64")
    return raw, parts[2] if len(parts) > 2 else key_id(raw)


def new_key(name: str) -> tuple[Path, str]:
    """`surgery keys new NAME`: a new private key (never overwritten) whose public key is trusted."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not _KEY_NAME.match(name):
        raise SignatureError(f"{name!r}: a key name is letters, digits, '.', '_' or '-'")
    folder = keys_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = folder / f"{name}.key"
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SignatureError(f"{path}: a key called {name!r} exists already; pick another name") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    line = public_line(_public_raw(private), name)
    (folder / f"{name}.pub").write_text(line + "\n", encoding="utf-8")
    trust(line)
    return path, line


def load_private_key(name_or_path: str) -> Any:
    """A private key by name (in keys/) or by file path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = keys_dir() / f"{name_or_path}.key"
    if not path.is_file():
        raise SignatureError(f"no key {name_or_path!r} (neither a file nor a key in {keys_dir()}); `surgery keys new`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 key")
    return key


def trusted_keys() -> dict[str, tuple[bytes, str]]:
    """Trusted keys by id: (raw public key, name)."""
    path = trust_file()
    if not path.is_file():
        return {}
    keys = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            raw, name = parse_public_line(line, f"{path}:{n}")
            keys[key_id(raw)] = (raw, name)
    return keys


def trust(line_or_file: str) -> str:
    """`surgery keys trust`: add a public key (a `.pub` file or its line) to the trust list."""
    path = Path(line_or_file).expanduser()
    text = path.read_text(encoding="utf-8") if path.is_file() else line_or_file
    raw, name = parse_public_line(text, str(path) if path.is_file() else "public key")
    ident = key_id(raw)
    if ident not in trusted_keys():
        trust_file().parent.mkdir(parents=True, exist_ok=True)
        with trust_file().open("a", encoding="utf-8") as f:
            f.write(public_line(raw, name) + "\n")
    return f"{ident} {name}"


def untrust(ident_or_name: str) -> None:
    """`surgery keys untrust`: remove a key (by id or name) from the trust list."""
    keys = trusted_keys()
    kept = {i: v for i, v in keys.items() if ident_or_name not in (i, v[1])}
    if len(kept) == len(keys):
        raise SignatureError(f"{ident_or_name!r} is not a trusted key (`surgery keys list`)")
    trust_file().write_text("".join(public_line(raw, name) + "\n" for raw, name in kept.values()), encoding="utf-8")


def list_keys() -> str:
    """`surgery keys list`: your keys and the trusted ones."""
    own = sorted(keys_dir().glob("*.pub")) if keys_dir().is_dir() else []
    lines = ["your keys:", *(f"  {p.stem}  {p.with_suffix('.key')}" for p in own)]
    if not own:
        lines.append("  (none; `surgery keys new NAME` makes one)")
    lines.append(f"trusted keys ({trust_file()}):")
    trusted = trusted_keys()
    lines += [f"  {ident}  {name}" for ident, (_, name) in trusted.items()] or ["  (none)"]
    return "\n".join(lines)


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes a signature covers: the document without `signature`, as canonical JSON."""
    body = {k: v for k, v in doc.items() if k != "signature"}
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800" escape, or YAML's) has no UTF-8 form
        raise SignatureError("holds text that is not valid Unicode (a lone surrogate)") from None


def sign_document(doc: dict[str, Any], key_name_or_path: str) -> dict[str, Any]:
    """`doc` with a `signature` member made with the given private key."""
    private = load_private_key(key_name_or_path)
    raw = _public_raw(private)
    try:
        signature = private.sign(canonical(doc))
    except SignatureError as err:
        raise SignatureError(f"cannot sign it: it {err}") from None
    return {
        **{k: v for k, v in doc.items() if k != "signature"},
        "signature": {
            "algorithm": "ed25519",
            "key_id": key_id(raw),
            "public_key": base64.b64encode(raw).decode(),
            "value": base64.b64encode(signature).decode(),
        },
    }


def verify_document(doc: dict[str, Any], where: str) -> str | None:
    """The signer (`<key id> <name>`) of a signed document, None if it is unsigned. A signature
    that fails, or whose key is not trusted, is a SignatureError."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    signature = doc.get("signature")
    if signature is None:
        return None
    malformed = SignatureError(f"{where}: malformed signature; refusing it")
    if not isinstance(signature, dict) or signature.get("algorithm") != "ed25519":
        raise malformed
    try:
        raw = base64.b64decode(signature["public_key"], validate=True)
        value = base64.b64decode(signature["value"], validate=True)
        public = Ed25519PublicKey.from_public_bytes(raw)
    except (KeyError, TypeError, ValueError):
        raise malformed from None
    ident = key_id(raw)
    trusted = trusted_keys().get(ident)
    try:
        public.verify(value, canonical(doc))
    except InvalidSignature:
        raise SignatureError(
            f"{where}: bad signature (key {ident}): the content was changed after signing; refusing it"
        ) from None
    if trusted is None:
        raise SignatureError(
            f"{where}: signed by key {ident}, which is not in your trust list; "
            f"if you trust it, `surgery keys trust <its .pub file>`"
        )
    return f"{ident} {trusted[1]}"


def read_signed_document(
    data: bytes,
    where: str,
    *,
    doc_format: str,
    doc_version: int,
    kind: str,
    remote: bool,
    allow_unsigned: bool,
    unsigned: str,
    error: type[SurgeryError],
) -> tuple[dict[str, Any], str | None]:
    """A signed JSON document (a library index, a pack's manifest) and its signer, checked the one
    way both are: a JSON object whose `format` is `doc_format` at `doc_version`, a signature that
    verifies with a trusted key (`verify_document`) if it has one, and, from a remote place, a
    signature unless `allow_unsigned` (else `unsigned` says why it was refused). A document that is
    not what it should be is an `error` (the caller's kind, so its handlers see it); a bad
    signature is a SignatureError."""
    try:
        doc = json.loads(data.decode("utf-8"))
        if isinstance(doc, dict):
            canonical(doc)  # what a signature covers must be writable: no lone surrogates, no depth past the limit
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{where}: not a JSON {kind} ({err})") from None
    except SignatureError as err:
        raise error(f"{where}: {err}; refusing the {kind}") from None
    except RecursionError:
        raise error(f"{where}: nested too deeply to be a surgery {kind}; refusing it") from None
    if not isinstance(doc, dict) or doc.get("format") != doc_format:
        raise error(f"{where}: not a surgery {kind} (its format is not {doc_format!r})")
    if doc.get("format_version") != doc_version:
        raise error(
            f"{where}: unknown {kind} format_version {doc.get('format_version')!r} "
            f"(this surgery reads {doc_version}); upgrade surgery"
        )
    signer = verify_document(doc, where)
    if signer is None and remote and not allow_unsigned:
        raise error(f"{where}: {unsigned}")
    return doc, signer


__all__ = [
    "SignatureError",
    "canonical",
    "list_keys",
    "load_private_key",
    "new_key",
    "read_signed_document",
    "sign_document",
    "trust",
    "trusted_keys",
    "untrust",
    "verify_document",
]
