"""Export: a trained model → a verified, self-describing bundle folder.

Every format is checked where it is written: the file is loaded back (ONNX through
onnxruntime) and run on sample inputs of several batch sizes (the one batch size a graph takes
with `export.dynamic_batch: false`), and its largest difference from eager PyTorch goes into the
manifest, with what the file really is (its ONNX opset, its batch size). A format that cannot represent the model, or misses the
tolerance, is left out of the bundle and reported; the other formats are still written, and the
export then fails with one line per failed format (the bundle with the formats that worked is
already in place).

The bundle is assembled in a temporary sibling folder, fsynced, and swapped in by rename, so a
reader sees either the old bundle or the new one, never a mixture.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgery.bundle import (
    BUNDLE_FORMAT_VERSION,
    FORMAT_FILES,
    MANIFEST,
    RECIPE,
    TOKENIZER_DIR,
    WEIGHTS,
    hash_files,
)
from surgery.errors import ExportError
from surgery.export_formats import (
    GRAPH_FORMATS,
    ExportJob,
    error_line,
    export_job,
    quiet_exporters,
)
from surgery.files import disk_full_error, fsync_path, fsync_tree, is_disk_full
from surgery.registry import EXPORT_FORMATS
from surgery.versions import package_versions


class PartialExportError(ExportError):
    """Some formats failed; the bundle was written with the others (`bundle`, `failures`)."""

    def __init__(self, bundle: Path, written: list[str], failures: dict[str, str]) -> None:
        self.bundle = bundle
        self.failures = dict(failures)
        lines = [f"export incomplete: bundle {bundle} holds {', '.join(written)}; failed formats:"]
        lines += [f"  {fmt}: {reason}" for fmt, reason in failures.items()]
        super().__init__("\n".join(lines))


def export_bundle(
    model: nn.Module,
    recipe: Any,
    out: Path,
    *,
    formats: Sequence[str] | None = None,
    metrics: dict[str, float] | None = None,
    source: str | Path | None = None,
    quantize: str | None = None,
) -> Path:
    """Write a verified bundle of `model` (a `SurgicalModel`) at `out`, atomically.

    `safetensors` is always written; each other format is exported, loaded back and compared
    with eager PyTorch on sample inputs. `quantize="int8"` (default: the recipe's
    `export.quantize`; `"none"` for no quantization) adds `model.int8.onnx` and its parity gate
    (`surgery.quantize`). Formats that fail, and an int8 model that fails its gate, are reported
    together in a `PartialExportError` raised after the bundle with the others is in place.
    """
    from surgery.recipe_dump import dump_recipe, recipe_hash

    out = Path(out).resolve()
    wanted = _formats(formats if formats is not None else recipe.export.formats)
    quantized_kind = _quantize(quantize if quantize is not None else recipe.export.quantize, wanted)
    _check_replaceable(out)
    _check_finite(model)
    model, lora_merged = _merged(_on_cpu(model))
    was_training = model.training
    model.eval()
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        job = export_job(model, recipe, tmp)
        results: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        for fmt in wanted:
            job.details = {}
            try:
                diff = EXPORT_FORMATS.get(fmt)(job)
                if diff > recipe.export.tolerance:
                    raise ExportError(
                        f"max abs difference from eager PyTorch {diff:.3g} exceeds export.tolerance {recipe.export.tolerance:g}"
                    )
            except Exception as err:  # a format that can't represent the model must not stop the others
                if is_disk_full(err, tmp):  # ...but a full disk stops them all (the finally removes tmp)
                    raise disk_full_error(out, None) from None
                if fmt == "safetensors":
                    raise ExportError(f"safetensors: {error_line(err)}") from err
                failures[fmt] = error_line(err)
                _remove_format_files(tmp, fmt)
                continue
            results[fmt] = {"file": FORMAT_FILES[fmt], "max_abs_diff": diff, **job.details}
            if fmt in GRAPH_FORMATS:
                results[fmt]["dynamic_batch"] = job.dynamic_batch
                if not job.dynamic_batch:
                    results[fmt]["batch_size"] = job.batch_size  # the only batch the file takes
        quantized = _quantized(job, recipe, quantized_kind, results, failures)
        (tmp / RECIPE).write_text(dump_recipe(recipe), encoding="utf-8")
        _save_backbone_files(model, tmp)
        manifest = _manifest(model, recipe, recipe_hash(recipe), job, results, failures, metrics, source, lora_merged)
        manifest["quantized"] = quantized
        manifest["files"] = hash_files(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        fsync_tree(tmp)
        _swap_in(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        model.train(was_training)
    if failures:
        raise PartialExportError(out, list(results), failures)
    return out


def _formats(formats: Sequence[str]) -> list[str]:
    wanted = ["safetensors"]
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ExportError(str(EXPORT_FORMATS.unknown(fmt)) + f"; formats are {', '.join(EXPORT_FORMATS.names)}")
        if fmt not in wanted:
            wanted.append(fmt)
    return wanted


def _quantize(kind: str | None, formats: list[str]) -> str | None:
    if kind in (None, "none"):
        return None
    if kind != "int8":
        raise ExportError(f"unknown quantization {kind!r}; choose int8 (or none)")
    if "onnx" not in formats:
        raise ExportError(
            "int8 is quantized from model.onnx: add onnx to the formats (--format ...,onnx), or skip it (--quantize none)"
        )
    return kind


def _quantized(
    job: ExportJob, recipe: Any, kind: str | None, results: dict[str, Any], failures: dict[str, str]
) -> dict[str, Any]:
    """The manifest's `quantized` entry: `model.int8.onnx` written and judged, when asked for. A
    failed quantization adds its reason to `failures`; so does a failed parity gate, whose model
    stays in the bundle marked failed."""
    from surgery.bundle import INT8_ONNX
    from surgery.quantize import quantize_int8

    if kind is None:
        return {}
    if "onnx" not in results:
        failures[kind] = "needs model.onnx, which failed"
        return {}
    try:
        with quiet_exporters():
            entry = quantize_int8(job.model, recipe, job.folder, job.input_names)
    except Exception as err:
        if is_disk_full(err, job.folder):
            raise
        failures[kind] = error_line(err)
        for p in job.folder.glob(INT8_ONNX + "*"):
            p.unlink(missing_ok=True)
        return {}
    if not entry["passed"]:
        failures[kind] = f"parity gate failed: {entry['reason']} ({INT8_ONNX} kept, marked failed: no runtime uses it)"
    return {kind: entry}


def _check_finite(model: nn.Module) -> None:
    # A model that diverged (NaN or inf weights) is never a bundle: it would serve NaN.
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ExportError(
            f"the model's weights are not finite ({bad[0]}{' and more' if len(bad) > 1 else ''}): "
            "training diverged; nothing to export"
        )


def _check_replaceable(out: Path) -> None:
    # Never swap away a folder that isn't a bundle (a typo'd --out pointing at a project dir).
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ExportError(f"{out}: exists and is not a bundle; choose another --out or remove it")


def _on_cpu(model: nn.Module) -> nn.Module:
    """Export from CPU: the graphs are portable, and eager CUDA (TF32 convolutions) would not be
    the reference onnxruntime's CPU results are held to. A GPU model is copied, not moved."""
    if all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()]):
        return model
    return copy.deepcopy(model).to("cpu")


def _merged(model: nn.Module) -> tuple[nn.Module, bool]:
    """The model with LoRA adapters merged into the base weights (a copy; the caller's model
    keeps training as it was)."""
    from surgery.ops import has_lora, merge_lora

    if not has_lora(model):
        return model, False
    merged = copy.deepcopy(model)
    result = merge_lora(merged)
    return (result if isinstance(result, nn.Module) else merged), True


def _remove_format_files(folder: Path, fmt: str) -> None:
    name = FORMAT_FILES[fmt]
    for p in folder.glob(name + "*"):  # model.onnx and model.onnx.data
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _save_backbone_files(model: nn.Module, folder: Path) -> None:
    """Tokenizer files, plus a transformers backbone's config.json in the same folder: together
    they are a model folder `AutoTokenizer`/`AutoConfig` (and so `build_model`) read offline."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder / TOKENIZER_DIR))
    config = _hf_config(model.backbone)
    if config is not None:
        config.save_pretrained(str(folder / TOKENIZER_DIR))


def _hf_config(backbone: nn.Module) -> Any:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    for module in backbone.modules():
        if isinstance(module, PreTrainedModel):
            return module.config
    return None


def _manifest(
    model: nn.Module,
    recipe: Any,
    recipe_sha: str,
    job: ExportJob,
    results: dict[str, dict[str, Any]],
    failures: dict[str, str],
    metrics: dict[str, float] | None,
    source: str | Path | None,
    lora_merged: bool,
) -> dict[str, Any]:
    spec = model.input_spec.to_dict()
    if (job.folder / TOKENIZER_DIR).is_dir():
        spec["tokenizer"] = TOKENIZER_DIR
    head_info = getattr(model, "head_info", {})
    heads = []
    for name in job.output_names:
        info = head_info[name].to_dict() if name in head_info else {}
        heads.append(
            {
                "name": name,
                "task": info.get("task"),
                "labels": info.get("labels"),
                "out_features": info.get("out_features"),
                "output_shape": _symbolic_shape(job, name),
            }
        )
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "name": recipe.name,
        "recipe_sha256": recipe_sha,
        "recipe": RECIPE,
        "input": spec,
        "input_names": list(job.input_names),
        "heads": heads,
        "formats": results,
        "failed_formats": failures,
        "lora_merged": lora_merged,
        "metrics": dict(metrics or {}),
        "source": str(source) if source is not None else None,
        "packages": package_versions(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _symbolic_shape(job: ExportJob, head: str) -> list[int | str]:
    """Output shape with the dimensions that follow the inputs named (`batch`, `sequence`). The
    first is the batch whatever the graphs take: the bundle's own model (safetensors) takes any."""
    shapes = [tuple(out[head].shape) for out in job.expected]
    first = shapes[0]
    result: list[int | str] = []
    for i, size in enumerate(first):
        varies = any(len(s) != len(first) or s[i] != size for s in shapes)
        result.append("batch" if i == 0 else "sequence" if varies else int(size))
    return result


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames only: the old bundle is moved aside whole, the new one
    moved in whole, then the old one deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(
    run_dir: Path, formats: list[str] | None = None, out: Path | None = None, *, quantize: str | None = None
) -> Path:
    """Export a run's best checkpoint (else its last) to `out` (default `<run>/bundle`)."""
    from surgery.checkpoint import find_best

    run_dir = Path(run_dir)
    # find_best falls back to the last
    return _export_checkpoint(run_dir, find_best(run_dir), formats, out, quantize)


def export_command(target: Path, formats: list[str] | None, out: Path | None, *, quantize: str | None = None) -> Path:
    """`surgery export`: `target` is a run folder, a checkpoint folder or its model.safetensors."""
    target = Path(target)
    if not target.exists():
        raise ExportError(f"{target}: no such run or checkpoint")
    if target.is_file():
        target = target.parent
    if target.name == "checkpoints" and (target.parent / "recipe.lock.yaml").is_file():
        target = target.parent
    if (target / WEIGHTS).is_file() and target.parent.name == "checkpoints":
        return _export_checkpoint(target.parent.parent, target, formats, out, quantize)
    if (target / "checkpoints").is_dir():
        return export_run(target, formats, out, quantize=quantize)
    raise ExportError(f"{target}: not a run folder (no checkpoints/) or a checkpoint folder (no {WEIGHTS})")


def _export_checkpoint(
    run_dir: Path, checkpoint: Path, formats: list[str] | None, out: Path | None, quantize: str | None = None
) -> Path:
    from surgery.checkpoint import read_meta, trained_model
    from surgery.recipe import load_recipe

    lock = run_dir / "recipe.lock.yaml"
    if not lock.is_file():
        raise ExportError(f"{run_dir}: no recipe.lock.yaml; is this a run folder made by `surgery build`?")
    recipe = load_recipe(lock)
    try:
        model = trained_model(recipe, checkpoint)  # frozen weights a lean checkpoint references, verified
    except RuntimeError as err:  # shape mismatches
        raise ExportError(f"{checkpoint / WEIGHTS}: weights do not fit the model of {lock}: {err}") from None
    meta = read_meta(checkpoint)
    metrics = meta.get("metrics") or {}
    if meta.get("evaluated") is False:  # validation metrics in its meta are an earlier checkpoint's
        metrics = {k: v for k, v in metrics.items() if not k.startswith("val/")}
    return export_bundle(
        model,
        recipe,
        Path(out) if out is not None else run_dir / "bundle",
        formats=formats,
        metrics=metrics,
        source=checkpoint.resolve(),
        quantize=quantize,
    )
