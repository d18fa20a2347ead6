"""What a run reports: TensorBoard event files under `<run>/tb`, `metrics.jsonl` with the same
scalars (one JSON object per logging point), optionally Weights & Biases (`monitor.wandb`), and
the progress display on the terminal.

Each validation also reports, for single-label classification heads: a confusion matrix image,
per-class precision / recall / F1 (as scalars, up to `PER_CLASS_LIMIT` classes) and one-vs-rest
precision-recall curves (up to `PR_CURVE_LIMIT` classes)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from surgery.heads import HeadInfo
from surgery.inputs import InputSpec
from surgery.schema import Recipe

TB_DIR = "tb"
METRICS_FILE = "metrics.jsonl"
WANDB_DIR = "wandb"
PER_CLASS_LIMIT = 100
PR_CURVE_LIMIT = 32


def memory_scalars(device: torch.device) -> dict[str, float]:
    """CUDA allocated/reserved MiB on GPU; the process RSS MiB otherwise."""
    if device.type == "cuda":
        return {
            "system/cuda_allocated_mib": torch.cuda.memory_allocated(device) / 2**20,
            "system/cuda_reserved_mib": torch.cuda.memory_reserved(device) / 2**20,
        }
    import psutil

    return {"system/rss_mib": psutil.Process().memory_info().rss / 2**20}


def _truncate_jsonl(path: Path, after_step: int) -> None:
    """Drop lines logged after `after_step` (a resumed run logs those steps again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    path.write_text("".join(line + "\n" for line in kept))


def _hparams(recipe: Recipe) -> dict[str, Any]:
    t = recipe.train
    return {
        "backbone": f"{recipe.backbone.source}:{recipe.backbone.name}",
        "optimizer": t.optimizer.name,
        "lr": t.optimizer.lr,
        "weight_decay": t.optimizer.weight_decay,
        "scheduler": t.scheduler.name,
        "batch_size": recipe.data.batch_size if recipe.data else 0,
        "epochs": t.epochs,
        "accumulate": t.accumulate,
        "precision": t.precision,
        "seed": t.seed,
    }


class RunMonitor:
    """TensorBoard + metrics.jsonl for one run. `resume_step` drops events logged after the
    checkpoint a resumed run starts from, so curves don't double back."""

    def __init__(self, run_dir: Path, recipe: Recipe, *, resume_step: int | None = None, enabled: bool = True) -> None:
        self.recipe = recipe
        self.settings = recipe.monitor
        self.enabled = enabled
        self.writer: Any = None
        self.jsonl: TextIO | None = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        path = run_dir / METRICS_FILE
        if resume_step is not None:
            _truncate_jsonl(path, resume_step)
        self.jsonl = path.open("a", buffering=1)
        if self.settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(
                str(run_dir / TB_DIR), purge_step=resume_step + 1 if resume_step is not None else None
            )
        self.wandb = start_wandb(run_dir, recipe) if self.settings.wandb is not None else None

    def scalars(self, step: int, values: dict[str, float], *, epoch: int | None = None) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
        if self.writer is not None:
            for tag, value in clean.items():
                self.writer.add_scalar(tag, value, step)
        assert self.jsonl is not None
        self.jsonl.write(json.dumps({"step": step, "epoch": epoch, "time": round(time.time(), 3), **clean}) + "\n")
        if self.wandb is not None:
            self.wandb.log({**clean, "epoch": epoch}, step=step)

    def classification_reports(
        self,
        tracker: Any,
        head_info: dict[str, HeadInfo],
        class_names: dict[str, list[str]],
        step: int,
        epoch: int | None = None,
    ) -> None:
        """Confusion matrix image, per-class precision/recall/F1 and PR curves of each single-label
        classification head, from a validation pass's `MetricTracker`."""
        from surgery.metrics import class_scores, collected, confusion_matrix, per_class

        if not self.enabled:
            return
        for head, (outputs, targets, task) in collected(tracker).items():
            if task not in ("multiclass", "binary"):
                continue
            probs, true = class_scores(outputs, targets, task)
            classes = probs.shape[1]
            info = head_info.get(head)
            names = class_names.get(head) or (info.labels if info else None) or []
            labels = [str(names[c]) if c < len(names) else str(c) for c in range(classes)]
            matrix = confusion_matrix(probs.argmax(1), true, classes)
            if classes <= PER_CLASS_LIMIT:
                scores = per_class(matrix)
                self.scalars(
                    step,
                    {
                        f"val/{head}/{kind}/{label}": float(values[c])
                        for kind, values in scores.items()
                        for c, label in enumerate(labels)
                    },
                    epoch=epoch,
                )
            image = confusion_image(matrix, labels)
            if self.writer is not None:
                self.writer.add_image(f"val/{head}/confusion_matrix", image, step)
                if classes <= PR_CURVE_LIMIT:
                    for c, label in enumerate(labels[1:] if task == "binary" else labels, start=int(task == "binary")):
                        self.writer.add_pr_curve(f"val/{head}/pr/{label}", true == c, probs[:, c], step)
            if self.wandb is not None:
                import wandb

                self.wandb.log({f"val/{head}/confusion_matrix": wandb.Image(image.permute(1, 2, 0).numpy())}, step=step)

    def skipped_files(self, step: int, skipped: list[tuple[str, str]]) -> None:
        """Record the data files left out as unreadable: their count (a scalar) and each file with why."""
        if not self.enabled or not skipped:
            return
        if self.writer is not None:
            self.writer.add_scalar("data/skipped_files", len(skipped), step)
        assert self.jsonl is not None
        files = [{"file": file, "why": why} for file, why in skipped]
        self.jsonl.write(json.dumps({"step": step, "data/skipped_files": len(skipped), "skipped": files}) + "\n")

    def histograms(self, model: torch.nn.Module, step: int) -> None:
        if self.writer is None or not self.settings.histograms:
            return
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            self._histogram(f"weights/{name}", param.detach(), step)
            if param.grad is not None:
                self._histogram(f"grads/{name}", param.grad.detach(), step)

    def _histogram(self, tag: str, values: torch.Tensor, step: int, bins: int = 64) -> None:
        # torch.histc, not TensorBoard's numpy path (which sorts every value: 10× slower); one
        # aminmax pass finds the range and, through inf/nan there, any non-finite value.
        values = values.float().flatten()
        if values.numel() == 0:
            return
        low, high = (float(v) for v in torch.aminmax(values))
        if not (math.isfinite(low) and math.isfinite(high)):
            return
        if high <= low:
            high = low + 1e-12
        counts = torch.histc(values, bins=bins, min=low, max=high)
        limits = torch.linspace(low, high, bins + 1)[1:]
        self.writer.add_histogram_raw(
            tag,
            min=low,
            max=high,
            num=values.numel(),
            sum=float(values.sum()),
            sum_squares=float(torch.dot(values, values)),
            bucket_limits=limits.tolist(),
            bucket_counts=counts.cpu().tolist(),
            global_step=step,
        )

    def graph(self, model: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> None:
        if self.writer is None or not self.settings.graph:
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.writer.add_graph(model, example_inputs, use_strict_trace=False)
        except Exception as err:  # tracing fails on some models; the graph is a nicety
            warnings.warn(f"TensorBoard model graph skipped: {type(err).__name__}: {str(err)[:200]}", stacklevel=2)

    def sample_predictions(
        self,
        images: torch.Tensor,
        predictions: Sequence[str],
        truths: Sequence[str],
        spec: InputSpec,
        step: int,
    ) -> None:
        """Validation images with 'prediction / truth' drawn under each, as one grid."""
        if self.writer is None or not self.settings.sample_predictions or images.ndim != 4:
            return
        grid = prediction_grid(images, predictions, truths, spec)
        self.writer.add_image("val/predictions", grid, step)
        if self.wandb is not None:
            import wandb

            self.wandb.log({"val/predictions": wandb.Image(grid.permute(1, 2, 0).numpy())}, step=step)

    def hparams(self, final_metrics: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in final_metrics.items() if math.isfinite(float(v))})
        if self.writer is None:
            return
        metrics = {f"hparam/{k}": float(v) for k, v in final_metrics.items() if math.isfinite(float(v))}
        self.writer.add_hparams(_hparams(self.recipe), metrics, run_name="hparams")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            wandb.teardown()  # wait for W&B's writer process: finish() may return before the run file is complete
            self.wandb = None
        if self.jsonl is not None:
            self.jsonl.close()


def wandb_mode(setting: str) -> str:
    """`auto` → online when an API key is configured (WANDB_API_KEY, or `wandb login`'s netrc entry), else offline."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    import netrc

    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def start_wandb(run_dir: Path, recipe: Recipe) -> Any:
    """A W&B run for this run folder (resumed with it: the id follows the folder), files under `<run>/wandb/`."""
    import re

    from surgery.errors import SurgeryError

    try:
        import wandb
    except ImportError:
        raise SurgeryError(
            "monitor.wandb needs the `wandb` package: pip install 'surgery[wandb]' (or remove monitor.wandb)"
        ) from None
    settings = recipe.monitor.wandb
    assert settings is not None
    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", f"{recipe.name}-{Path(run_dir).name}")[:64]
    (Path(run_dir) / WANDB_DIR).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=settings.project,
        name=Path(run_dir).name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=wandb_mode(settings.mode),
        config={**_hparams(recipe), "recipe": recipe.model_dump(mode="json")},
        settings=wandb.Settings(console="off", silent=True),
    )


def confusion_image(matrix: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
    """A confusion matrix (rows: true class, columns: predicted) as a C×H×W image in [0, 1]: cells
    shaded by the share of their row, counts written when there is room, class names on the axes."""
    from PIL import Image, ImageDraw

    n = matrix.shape[0]
    cell = max(4, min(40, 640 // max(1, n)))
    margin = 0 if n > 40 else 60
    side = margin + cell * n
    canvas = Image.new("RGB", (side + 4, side + 4), "white")
    draw = ImageDraw.Draw(canvas)
    rows = matrix.double()
    share = rows / rows.sum(1, keepdim=True).clamp(min=1)
    for t in range(n):
        for p in range(n):
            shade = int(255 * (1 - float(share[t, p])))
            x, y = margin + p * cell, margin + t * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255))
            if cell >= 24:
                ink = "white" if shade < 128 else "black"
                draw.text((x + 2, y + cell // 3), str(int(matrix[t, p])), fill=ink)
    if margin:
        for c, label in enumerate(labels):
            draw.text((2, margin + c * cell + cell // 3), label[:9], fill="black")  # true, down the left
            draw.text((margin + c * cell + 2, 2 + (c % 3) * 14), label[:6], fill="black")  # predicted, on top
    pixels = torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8)
    return pixels.view(canvas.height, canvas.width, 3).permute(2, 0, 1).float() / 255


def prediction_grid(
    images: torch.Tensor, predictions: Sequence[str], truths: Sequence[str], spec: InputSpec
) -> torch.Tensor:
    """Un-normalise images, upscale small ones, write 'pred/true' under each; C×H×W grid in [0, 1]."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import make_grid

    channels = images.shape[1]
    mean = torch.tensor(list(spec.mean)[:channels] or [0.0]).view(-1, 1, 1)
    std = torch.tensor(list(spec.std)[:channels] or [1.0]).view(-1, 1, 1)
    tiles = []
    for image, pred, true in zip(images.detach().float().cpu(), predictions, truths, strict=False):
        pixels = (image[:3] * std[:3] + mean[:3]).clamp(0, 1)
        if pixels.shape[0] == 1:
            pixels = pixels.expand(3, -1, -1)
        scale = max(1, 64 // max(pixels.shape[1:]))
        pixels = F.resize(
            pixels, [pixels.shape[1] * scale, pixels.shape[2] * scale], interpolation=F.InterpolationMode.NEAREST
        )
        canvas = Image.new("RGB", (max(pixels.shape[2], 64), pixels.shape[1] + 14), "white")
        canvas.paste(F.to_pil_image(pixels), (0, 0))
        ImageDraw.Draw(canvas).text(
            (2, pixels.shape[1] + 1), f"{pred}/{true}"[:12], fill="green" if pred == true else "red"
        )
        tiles.append(F.pil_to_tensor(canvas).float() / 255)
    return make_grid(tiles, nrow=min(8, len(tiles)), padding=2, pad_value=1.0)


# --------------------------------------------------------------------------- progress


def _fmt(values: dict[str, float], limit: int = 4) -> str:
    return "  ".join(f"{k.removeprefix('train/')} {v:.4g}" for k, v in list(values.items())[:limit])


class Progress:
    """Rich bars on a terminal (loss, metrics, throughput, ETA), plain lines otherwise, or nothing."""

    def __init__(self, mode: str, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "rich" if self.stream.isatty() else "plain"
        self.mode = mode if enabled else "none"
        self._bar: Any = None
        self._task: Any = None
        self._epoch_start = 0.0

    def note(self, message: str) -> None:
        if self.mode != "none":
            print(message, file=self.stream, flush=True)

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int = 0) -> None:
        self._epoch_start = time.perf_counter()
        self._label = f"epoch {epoch + 1}/{epochs}"
        self._total = total
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as Bar,
            )

            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=total, completed=done, info="")
        elif self.mode == "plain":
            print(f"{self._label}: {total - done} batches", file=self.stream, flush=True)

    def update(self, batch: int, values: dict[str, float], throughput: float, *, log: bool) -> None:
        info = f"{_fmt(values)}  {throughput:,.0f} samples/s"
        if self.mode == "rich" and self._bar is not None:
            self._bar.update(self._task, completed=batch, info=info)
        elif self.mode == "plain" and log:
            elapsed = time.perf_counter() - self._epoch_start
            print(f"{self._label} [{batch}/{self._total}] {info}  {elapsed:.1f}s", file=self.stream, flush=True)

    def end_epoch(self, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.mode != "none" and metrics:
            elapsed = time.perf_counter() - self._epoch_start
            print(f"{self._label} done in {elapsed:.1f}s  {_fmt(metrics, 8)}", file=self.stream, flush=True)

    def summary(self, title: str, rows: dict[str, Any]) -> None:
        if self.mode == "none":
            return
        if self.mode == "rich":
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title)
            table.add_column("")
            table.add_column("value", justify="right")
            for key, value in rows.items():
                table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
            Console(file=self.stream).print(table)
            return
        width = max(len(k) for k in rows) if rows else 0
        print(title, file=self.stream)
        for key, value in rows.items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            print(f"  {key:<{width}}  {shown}", file=self.stream, flush=True)
