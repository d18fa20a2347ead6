"""The `surgery` command: thin Typer commands, each handing off to one function.

Nothing heavy is imported here at module level: `surgery --help`, `validate`, `schema` and
`show` never import torch, timm, transformers or ray.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from surgery import __version__
from surgery.errors import SurgeryError

app = typer.Typer(
    name="surgery",
    help="Declarative model surgery, training, export and serving for PyTorch.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Options shared by every command that reads a recipe.
RecipeArg = Annotated[
    Path,
    typer.Argument(
        help="Recipe YAML file, or a library reference: a name (`quickstart`) or name@version.", show_default=False
    ),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", "-s", help="Override a field: --set train.optimizer.lr=3e-4 (value parsed as YAML). Repeatable."
    ),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"surgery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Declarative model surgery, training, export and serving for PyTorch."""


RuntimeOption = Annotated[
    str | None,
    typer.Option(
        help="What runs the model: torch, onnxruntime (the bundle's model.onnx), onnxruntime-int8 (its "
        "model.int8.onnx, if it passed the parity gate), or auto (time them on this process's threads and keep "
        "the fastest; each serving replica does). Default: the bundled recipe's serve.runtime, else auto."
    ),
]


@app.command()
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files to check.", show_default=False)],
    set_: SetOpt = None,
) -> None:
    """Check recipes: one OK line per valid file, or every problem with file:line:column."""
    from surgery.recipe import load_recipe

    failed: list[str] = []
    for path in recipes:
        try:
            recipe = load_recipe(path, set_ or ())
        except SurgeryError as err:
            failed.append(str(err))
            continue
        typer.echo(f"OK {path} ({recipe.name})")
    if failed:
        typer.echo("\n".join(failed), err=True)
        raise typer.Exit(2)


@app.command()
def schema() -> None:
    """Print the JSON Schema of recipes (point your editor's YAML language server at it)."""
    import json

    from surgery.schema import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


@app.command()
def show(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Print the fully resolved recipe (after `extends` and `--set`)."""
    from surgery.recipe import dump_recipe, load_recipe

    typer.echo(dump_recipe(load_recipe(recipe, set_ or ())), nl=False)


@app.command()
def plan(
    recipe: RecipeArg,
    set_: SetOpt = None,
    depth: Annotated[int, typer.Option(help="Depth of the module tree.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    data: Annotated[
        bool,
        typer.Option("--data", help="Also read the data as build would: samples per split and per class, bad rows."),
    ] = False,
) -> None:
    """Build the model without weights or training and print its modules, shapes, parameters,
    FLOPs and a training-memory estimate."""
    from surgery.plan import plan_command

    typer.echo(plan_command(recipe, set_ or (), depth=depth, as_json=as_json, data=data))


@app.command()
def build(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Resume the latest run of this recipe from its last complete checkpoint.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Resume even though the recipe changed in a way that is not safe.")
    ] = False,
    runs: Annotated[Path, typer.Option(help="Folder that holds run folders.")] = Path("runs"),
    run_id: Annotated[
        str | None, typer.Option(help="Run folder name (default: a timestamp; with --resume: the latest run).")
    ] = None,
) -> None:
    """Compile, train, checkpoint and export a recipe into runs/<recipe>/<run-id>/."""
    from surgery.build import build_command

    run_dir = build_command(recipe, set_ or (), resume=resume, force=force, runs_root=runs, run_id=run_id)
    typer.echo(f"run: {run_dir}\nbundle: {run_dir / 'bundle'}")


@app.command()
def tune(
    recipe: RecipeArg,
    set_: SetOpt = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the latest (or --search-id) search; finished trials are not rerun."),
    ] = False,
    runs: Annotated[Path, typer.Option(help="Folder that holds run folders.")] = Path("runs"),
    search_id: Annotated[
        str | None, typer.Option(help="Search folder name, runs/<name>/tune-<id> (default: a timestamp).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the tuned recipe (default: <search>/<name>.tuned.yaml).")
    ] = None,
) -> None:
    """Search hyperparameters (the recipe's `tune:` section) on Ray Tune; write the results and the
    best trial's recipe as <name>.tuned.yaml, and export its bundle."""
    from surgery.tune import tune_command

    folder = tune_command(
        recipe, set_ or (), resume=resume, runs_root=runs, search_id=search_id, out=out, echo=typer.echo
    )
    typer.echo(f"search: {folder}")


@app.command()
def export(
    target: Annotated[Path, typer.Argument(help="A run folder or a checkpoint file.", show_default=False)],
    formats: Annotated[
        str | None,
        typer.Option(
            "--format", help="Comma-separated: safetensors,onnx,torchscript,pt2 (default: the recipe's export.formats)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Bundle folder (default: <run>/bundle).")] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: also write model.int8.onnx from model.onnx, with its metric against the float model's on "
            "the validation split and the parity gate's verdict in the manifest (default: the recipe's export.quantize)."
        ),
    ] = None,
) -> None:
    """Export a run's best checkpoint (or a given checkpoint) as a verified bundle."""
    from surgery.export import export_command

    fmt = [f.strip() for f in formats.split(",") if f.strip()] if formats else None
    typer.echo(f"bundle: {export_command(target, fmt, out, quantize=quantize)}")


@app.command()
def serve(
    targets: Annotated[
        list[Path] | None, typer.Argument(help="Bundles or run folders to serve.", show_default=False)
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    replicas: Annotated[
        int | None, typer.Option(help="Replicas per model (default: the recipe's serve.replicas).")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Largest dynamic batch (default: the recipe's).")] = None,
    batch_wait_ms: Annotated[float | None, typer.Option(help="Batch wait in ms (default: the recipe's).")] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File holding a bearer token required on every route but the liveness and readiness probes "
            "(/healthz, /v2/health/*); or set SURGERY_SERVE_TOKEN."
        ),
    ] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Deploy and return, leaving the server running.")] = False,
    ingress: Annotated[
        str,
        typer.Option(
            help="HTTP ingress of a Ray started here: haproxy (Ray Serve's high-throughput ingress, about 8 ms "
            "faster per request), proxy (Ray's Python proxy), or auto (haproxy when installed)."
        ),
    ] = "auto",
    config_out: Annotated[
        Path | None,
        typer.Option(help="Write a Ray Serve config file for `serve run`/`serve deploy` instead of serving."),
    ] = None,
    runtime: RuntimeOption = None,
) -> None:
    """Serve bundles over HTTP with Ray Serve and dynamic batching."""
    from serve.launch import serve_command

    serve_command(
        targets or [],
        host=host,
        port=port,
        replicas=replicas,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        token_file=token_file,
        detach=detach,
        ingress=ingress,
        config_out=config_out,
        runtime=runtime,
    )


@app.command()
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run folder (its bundle/) or a bundle.", show_default=False)],
    data: Annotated[
        Path | None, typer.Option(help="A folder of class sub-folders or a table (default: the recipe's data).")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Without --data: train or val (default val); with a folder: its sub-folder.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for evaluations/ (default: the run, else the bundle's).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Inputs per forward.")] = 64,
    runtime: RuntimeOption = None,
) -> None:
    """Every head's metrics, per-class precision/recall/F1 and confusion matrices (printed, JSON, PNG),
    written to evaluations/<name>-<time>/. Never changes the run."""
    from surgery.evaluate import evaluate_command

    typer.echo(evaluate_command(target, data=data, split=split, out=out, batch_size=batch_size, runtime=runtime))


@app.command()
def predict(
    target: Annotated[
        str,
        typer.Argument(
            help="A bundle or run folder (offline), or a served model's URL (http://...).", show_default=False
        ),
    ],
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders, globs, tables (.csv/.tsv/.jsonl/.parquet), or texts.", show_default=False
        ),
    ],
    out: Annotated[
        Path | None, typer.Option(help="Write .csv, .jsonl or .parquet (default: a table on stdout).")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Labels per classification head.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Inputs per forward.")] = 64,
    column: Annotated[
        str | None, typer.Option(help="A table's input column (feature columns: a,b,c); default: path/image/text...")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Decoding worker processes (default: auto).")] = None,
    engine: Annotated[
        str | None, typer.Option(help="local, or ray for Ray Data (default: ray when RAY_ADDRESS is set).")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="Ray Data actors, each loading the bundle once.")] = 2,
    runtime: RuntimeOption = None,
    token_file: Annotated[
        Path | None, typer.Option(help="URL only: bearer token file (or SURGERY_SERVE_TOKEN).")
    ] = None,
) -> None:
    """Predict offline from a bundle (batched, top-k per head, unreadable inputs reported per row),
    or send inputs to a served model when TARGET is a URL."""
    if target.startswith(("http://", "https://")):
        from serve.client import predict_command as ask_server

        typer.echo(ask_server(target, inputs, token_file=token_file))
        return
    from surgery.predict import PredictSettings, predict_command

    settings = PredictSettings(top_k=top_k, batch_size=batch_size, workers=workers, column=column, runtime=runtime)
    done = predict_command(Path(target), inputs, out=out, settings=settings, engine=engine, concurrency=concurrency)
    typer.echo(done, err=out is None)


recipes_app = typer.Typer(help="The recipe library: list, show, start from, and add sources.", no_args_is_help=True)
keys_app = typer.Typer(help="Ed25519 signing keys and the keys you trust.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
app.add_typer(keys_app, name="keys")


@recipes_app.command("list")
def recipes_list(tag: Annotated[str | None, typer.Option(help="Only recipes with this tag.")] = None) -> None:
    """Every recipe of the shipped library and the configured sources."""
    from surgery.library_commands import list_recipes

    typer.echo(list_recipes(tag))


@recipes_app.command("show")
def recipes_show(
    reference: Annotated[str, typer.Argument(help="A name, name@version or path.", show_default=False)],
) -> None:
    """The recipe file as written, and where it comes from."""
    from surgery.library_commands import show_recipe

    typer.echo(show_recipe(reference), nl=False)


@recipes_app.command("new")
def recipes_new(
    name: Annotated[str, typer.Argument(help="Name of the new recipe (writes NAME.yaml).", show_default=False)],
    base: Annotated[str, typer.Option("--from", help="The recipe it extends (name, name@version or path).")],
    folder: Annotated[Path | None, typer.Option("--dir", help="Folder to write it in (default: here).")] = None,
) -> None:
    """Write a starter recipe that extends BASE."""
    from surgery.library_commands import new_recipe

    typer.echo(f"wrote {new_recipe(name, base, folder)}")


@recipes_app.command("add-source")
def recipes_add_source(
    location: Annotated[str, typer.Argument(help="A library folder or URL.", show_default=False)],
    allow_unsigned: Annotated[
        bool, typer.Option("--allow-unsigned", help="Accept a remote library whose index is not signed.")
    ] = False,
) -> None:
    """Add a library (a local folder, or a URL serving index.json) to search for recipe names."""
    from surgery.library_sources import add_source

    library = add_source(location, allow_unsigned=allow_unsigned)
    signed = f", signed by {library.signed_by}" if library.signed_by else ""
    typer.echo(f"added {library.label}: {len(library.entries)} recipes{signed}")


@recipes_app.command("remove-source")
def recipes_remove_source(location: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Stop searching a library."""
    from surgery.library_sources import remove_source

    remove_source(location)


@recipes_app.command("sources")
def recipes_sources() -> None:
    """The libraries searched for recipe names, in order."""
    from surgery.library_sources import configured_sources

    typer.echo("shipped")
    for source in configured_sources():
        typer.echo(source["location"] + ("  (unsigned allowed)" if source.get("allow_unsigned") else ""))


@recipes_app.command("index")
def recipes_index(
    folder: Annotated[Path, typer.Argument(help="Folder of recipes to publish.", show_default=False)],
    sign: Annotated[str | None, typer.Option(help="Sign the index with this key (name or file).")] = None,
    expires_days: Annotated[
        float | None,
        typer.Option(help="Days the index stays valid (default 90); clients refuse it after that: publish it again."),
    ] = None,
) -> None:
    """Validate a folder of recipes and write its index.json (then serve the folder as static files)."""
    from surgery.library_commands import build_index

    typer.echo(f"wrote {build_index(folder, sign=sign, expires_days=expires_days)}")


@keys_app.command("new")
def keys_new(name: Annotated[str, typer.Argument(show_default=False)]) -> None:
    """Make a signing key; its public key is trusted here and printed to share."""
    from surgery.keys import new_key

    path, line = new_key(name)
    typer.echo(f"private key: {path}\npublic key (give this to others): {line}")


@keys_app.command("list")
def keys_list() -> None:
    """Your keys and the trusted ones."""
    from surgery.keys import list_keys

    typer.echo(list_keys())


@keys_app.command("trust")
def keys_trust(public_key: Annotated[str, typer.Argument(help="A .pub file or its line.", show_default=False)]) -> None:
    """Trust signatures made with this public key."""
    from surgery.keys import trust

    typer.echo(f"trusted {trust(public_key)}")


@keys_app.command("untrust")
def keys_untrust(key: Annotated[str, typer.Argument(help="Key id or name.", show_default=False)]) -> None:
    """Stop trusting a key."""
    from surgery.keys import untrust

    untrust(key)


@app.command()
def pack(
    target: Annotated[Path, typer.Argument(help="A run folder or a bundle.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Archive to write (.tar, or .tar.gz to compress).")],
    sign: Annotated[str | None, typer.Option(help="Sign with this key (name or file).")] = None,
) -> None:
    """Pack a trained model to share: bundle, resolved recipe, model card and sha256 manifest."""
    from surgery.share import pack_command

    typer.echo(pack_command(target, out, sign=sign))


@app.command()
def pull(
    source: Annotated[str, typer.Argument(help="A packed archive: file path or URL.", show_default=False)],
    out: Annotated[
        Path | None,
        typer.Option(help="Folder to unpack into (default: the archive's name without .tar/.tar.gz, here)."),
    ] = None,
    allow_unsigned: Annotated[
        bool, typer.Option("--allow-unsigned", help="Accept an unsigned archive from a URL.")
    ] = False,
    max_size: Annotated[
        str | None,
        typer.Option(
            help="Most bytes to download and to unpack, e.g. 64G (the default, or $SURGERY_PULL_MAX_SIZE), 500M."
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds the whole download may take (default 4 hours).", min=1)
    ] = None,
) -> None:
    """Fetch and verify a packed model; `surgery serve` accepts the folder."""
    from surgery.share import pull_command

    typer.echo(pull_command(source, out, allow_unsigned=allow_unsigned, max_size=max_size, timeout_s=timeout))


@app.command()
def doctor() -> None:
    """Versions, devices and memory, hub reachability, and cache sizes."""
    from serve.ingress import doctor_lines
    from surgery.doctor import doctor_report

    typer.echo(doctor_report(serving=doctor_lines()))


def main() -> None:
    """Entry point: domain errors become a message and exit 2; nothing prints a traceback."""
    try:
        code = app(standalone_mode=False)  # returns the exit code of a `typer.Exit`
    except SurgeryError as err:
        from surgery.cluster import report_rank_error

        if report_rank_error(str(err)):  # under torchrun: rank 0's alone
            typer.echo(f"error: {err}" if "\n" not in str(err) else str(err), err=True)
        sys.exit(err.exit_code)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("aborted", err=True)
        sys.exit(130)
    except Exception as err:  # the last line of defence against tracebacks
        if isinstance(err, typer.TyperException) and hasattr(err, "show"):  # usage errors (typer's own click)
            err.show()
            sys.exit(err.exit_code)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):  # a log line, an event file...
            from surgery.files import disk_full_error

            typer.echo(f"error: {disk_full_error(err.filename or Path.cwd(), None)}", err=True)
            sys.exit(2)
        if os.environ.get("SURGERY_DEBUG"):
            raise
        typer.echo(
            f"internal error: {type(err).__name__}: {err} (a bug in surgery; SURGERY_DEBUG=1 shows the traceback)",
            err=True,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
