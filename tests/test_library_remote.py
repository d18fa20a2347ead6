"""Remote indexes under attack (TUF's rollback and freeze): a replayed older index, an expired one,
an index without dates, a server that answers 404 where a cached index exists, and indexes that
used to end in internal errors (deep nesting, lone surrogates). Offline, the cached index is used
and says so in one line."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from surgery.errors import SurgeryError
from surgery.keys import new_key, sign_document
from surgery.library import build_index
from surgery.library_index import format_date, parse_index
from surgery.library_sources import add_source, remove_source
from surgery.recipe import load_recipe


@pytest.fixture(autouse=True)
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGERY_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("surgery.library_remote._noted", set())


def recipe(folder: Path, version: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"team-base-{version}.yaml").write_text(
        textwrap.dedent(f"""
        name: team-base
        version: "{version}"
        backbone: {{source: timm, name: test_resnet, pretrained: false}}
        heads: [{{name: label, layers: [{{linear: {{out_features: 3}}}}], loss: cross_entropy}}]
        """)
    )


def republish(index: Path, **changes: object) -> bytes:
    """The index with `changes` (None removes a key), signed again by `team`: valid, but edited."""
    doc = json.loads(index.read_text())
    doc.update(changes)
    doc = {k: v for k, v in doc.items() if v is not None}
    data = json.dumps(sign_document(doc, "team")).encode()
    index.write_bytes(data)
    return data


def ago(days: float) -> str:
    return format_date(datetime.now(UTC) - timedelta(days=days))


@pytest.fixture
def library(tmp_path: Path, http_folder) -> tuple[Path, str, Callable[[], None]]:
    lib = tmp_path / "www"
    recipe(lib, "1.0.0")
    new_key("team")
    build_index(lib, sign="team")
    url = http_folder(lib)
    return lib, url, lambda: http_folder.stop(url)


def test_a_replayed_older_index_is_refused(library) -> None:
    lib, url, _ = library
    old = republish(lib / "index.json", published=ago(2))  # validly signed, published two days ago
    recipe(lib, "2.0.0")
    build_index(lib, sign="team")
    add_source(url)
    assert load_recipe("team-base@2.0.0").name == "team-base"
    (lib / "index.json").write_bytes(old)  # the server (or someone between) replays the old index
    with pytest.raises(SurgeryError, match="refusing a rolled-back index") as err:
        load_recipe("team-base")
    assert "\n" not in str(err.value)
    remove_source(url)  # a user who knows the publisher went back starts afresh
    add_source(url)
    assert load_recipe("team-base").version == "1.0.0"


def test_an_expired_index_is_refused_online(library) -> None:
    lib, url, _ = library
    republish(lib / "index.json", published=ago(100), expires=ago(10))
    with pytest.raises(SurgeryError, match=r"expired on .*refusing a stale index"):
        add_source(url)


def test_build_index_writes_dates_and_takes_an_expiry(tmp_path: Path) -> None:
    recipe(tmp_path / "lib", "1")
    doc = json.loads(build_index(tmp_path / "lib", expires_days=7).read_text())
    published = datetime.strptime(doc["published"], "%Y-%m-%dT%H:%M:%SZ")
    expires = datetime.strptime(doc["expires"], "%Y-%m-%dT%H:%M:%SZ")
    assert expires - published == timedelta(days=7)
    assert json.loads(build_index(tmp_path / "lib").read_text())["expires"] > doc["expires"]  # 90 days
    with pytest.raises(SurgeryError, match="between 1 and 3650"):
        build_index(tmp_path / "lib", expires_days=0)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"published": None, "expires": None}, "has no `published` and `expires` dates"),
        ({"published": format_date(datetime.now(UTC) + timedelta(days=30))}, "published in the future"),
        ({"expires": "tomorrow"}, "`expires` is not a date"),
    ],
)
def test_indexes_without_sound_dates_are_refused(library, changes: dict, match: str) -> None:
    lib, url, _ = library
    if "expires" not in changes:
        changes["expires"] = format_date(datetime.now(UTC) + timedelta(days=60))
    republish(lib / "index.json", **changes)
    with pytest.raises(SurgeryError, match=match):
        add_source(url)


def test_a_404_does_not_fall_back_to_the_cached_index(library) -> None:
    lib, url, _ = library
    add_source(url)
    assert load_recipe("team-base").name == "team-base"
    (lib / "index.json").unlink()
    with pytest.raises(SurgeryError, match=r"HTTP 404 .*the server answered, so the index cached earlier is not used"):
        load_recipe("team-base")


def test_offline_the_cached_index_is_used_and_says_so_once(library, capsys: pytest.CaptureFixture[str]) -> None:
    _lib, url, stop = library
    add_source(url)
    load_recipe("team-base")
    capsys.readouterr()
    stop()
    assert load_recipe("team-base").name == "team-base"
    assert load_recipe("team-base").name == "team-base"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline, so using the index cached on the last fetch, published" in err


def test_offline_an_expired_cached_index_says_it_expired(
    library, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lib, url, stop = library
    add_source(url)
    load_recipe("team-base")
    stop()
    (cached,) = (tmp_path / "cache" / "indexes").iterdir()
    cached.write_bytes(republish(lib / "index.json", published=ago(100), expires=ago(10)))  # time went by
    capsys.readouterr()
    assert load_recipe("team-base").name == "team-base"
    assert f", expired on {ago(10)[:10]}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"format": "surgery-library", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", "nested too deeply"),
        (b'{"format": "surgery-library", "format_version": 1, "recipes": [], "d": "\\ud800"}', "lone surrogate"),
        (b"\xff\xfe", "not a JSON index"),
    ],
)
def test_hostile_index_documents_are_one_line_errors(data: bytes, match: str) -> None:
    with pytest.raises(SurgeryError, match=match) as err:
        parse_index(data, "http://x/index.json", allow_unsigned=True, remote=True)
    assert "\n" not in str(err.value)
