"""`data:`: where training and validation data come from, how they are batched and augmented."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from surgery.registry import AUGMENTATIONS, DATA_SOURCES, Registry
from surgery.sections.base import Count, DataSourceName, OneOf, PositiveInt, Seed, Strict, Width


class FlipParams(Strict):
    p: float = Field(0.5, ge=0, le=1, description="Probability of flipping (1: always).")


class ResizedCropParams(Strict):
    scale: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.08, 1.0], description="Range of the crop's area fraction."
    )
    ratio: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=2, max_length=2)] = Field(
        default_factory=lambda: [0.75, 1.3333333333333333], description="Range of the crop's aspect ratio."
    )


class RandomCropParams(Strict):
    padding: Count = Field(4, description="Zero padding added on each side before cropping back to size.")


class RotateParams(Strict):
    degrees: float = Field(15.0, ge=0, le=180, description="Maximum rotation in degrees, either way.")


class ColorJitterParams(Strict):
    brightness: float = Field(0.2, ge=0, description="Brightness jitter factor.")
    contrast: float = Field(0.2, ge=0, description="Contrast jitter factor.")
    saturation: float = Field(0.2, ge=0, description="Saturation jitter factor.")


class NoiseParams(Strict):
    std: float = Field(0.05, gt=0, description="Standard deviation of the noise.")


class Augmentation(OneOf):
    """One training-time augmentation: `{hflip: {p: 0.5}}`."""

    registry: ClassVar[Registry | None] = AUGMENTATIONS

    hflip: FlipParams | None = Field(None, description=AUGMENTATIONS.docs["hflip"])
    vflip: FlipParams | None = Field(None, description=AUGMENTATIONS.docs["vflip"])
    random_resized_crop: ResizedCropParams | None = Field(None, description=AUGMENTATIONS.docs["random_resized_crop"])
    random_crop: RandomCropParams | None = Field(None, description=AUGMENTATIONS.docs["random_crop"])
    rotate: RotateParams | None = Field(None, description=AUGMENTATIONS.docs["rotate"])
    color_jitter: ColorJitterParams | None = Field(None, description=AUGMENTATIONS.docs["color_jitter"])
    gaussian_noise: NoiseParams | None = Field(None, description=AUGMENTATIONS.docs["gaussian_noise"])


assert set(Augmentation.model_fields) == set(AUGMENTATIONS.names), "Augmentation and AUGMENTATIONS disagree"


class Synthetic(Strict):
    num_samples: Annotated[int, Field(gt=0, le=1_000_000)] = Field(
        256, description="Training samples (validation gets a quarter as many); held in memory, at most a million."
    )
    num_classes: Width = Field(10, description="Classes of the random labels (for classification heads).")


class HuggingFace(Strict):
    """Settings of the `hf` source (Hugging Face `datasets`)."""

    name: str | None = Field(
        None,
        description="A hub dataset id, read when online (or from the `datasets` cache); when absent, `data.train` is a `save_to_disk` folder or Arrow/Parquet files.",
    )
    config: str | None = Field(None, description="The hub dataset's configuration name, if it has several.")
    train_split: str = Field("train", min_length=1, description="Split that trains.")
    val_split: str | None = Field(
        None,
        description="Split that validates (e.g. `validation`); when absent, `data.val_split` of the training split is held out.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of `name`.")


MAX_ROW_BYTES = 1 << 24


class Data(Strict):
    """Where training and validation data come from, and how they are batched."""

    source: DataSourceName = Field(description="Data source: " + DATA_SOURCES.describe())
    train: str | None = Field(
        None,
        description="Training data: a folder (`image_folder`), a table (`csv`/`tsv`, `jsonl`, `parquet`), or a `save_to_disk` folder or Arrow/Parquet file (`hf`), relative to the recipe file.",
    )
    val: str | None = Field(
        None, description="Validation data; when absent, `val_split` of the training data is held out."
    )
    val_split: float = Field(0.2, gt=0, lt=1, description="Fraction held out for validation when `val` is absent.")
    split_seed: Seed = Field(0, description="Seed of the train/validation split (independent of the training seed).")
    image_column: str | None = Field(
        None,
        description="Table/`hf` column of image file paths (relative to `image_root`, default the table's folder; a path leaving it is refused), or an `hf` `Image` feature.",
    )
    image_root: str | None = Field(
        None,
        description="Folder the `image_column` paths are relative to (and must stay inside); relative to the recipe file.",
    )
    text_column: str | None = Field(
        None,
        description="Text column (tables, `hf`), tokenised with the backbone's tokenizer; an empty cell is a bad row.",
    )
    feature_columns: list[str] | None = Field(
        None,
        min_length=1,
        description="Numeric feature columns (tables, `hf`) used as a float vector input (the `tabular` backbone takes it).",
    )
    delimiter: Annotated[str, Field(min_length=1, max_length=1)] | None = Field(
        None,
        description="`csv` field delimiter; default `,`, or a tab for `.tsv`/`.tab` files. A UTF-8 BOM is dropped.",
    )
    label_separator: Annotated[str, Field(min_length=1, max_length=8)] | None = Field(
        None,
        description="Multi-label cells (`bce_with_logits` heads with several outputs) written as one string are split on this (e.g. `' '` or `'|'`); JSON lists (`[\"a\", \"b\"]`) are always read.",
    )
    on_bad_row: Literal["error", "skip"] = Field(
        "error",
        description="Tables and `hf`: a row with a missing or bad cell stops the build with file:row:column (`error`), or is left out (`skip`) and counted in the report.",
    )
    max_row_bytes: Annotated[int, Field(gt=0, le=1 << 30)] = Field(
        MAX_ROW_BYTES, description="Tables: a line or cell longer than this many bytes is a bad row (bounds memory)."
    )
    hf: HuggingFace = Field(default_factory=HuggingFace, description="Settings of the `hf` source.")
    label_column: str = Field("label", description="Default label column for heads without a `target`.")
    on_bad_file: Literal["error", "skip"] = Field(
        "error",
        description="`image_folder`: an image that cannot be read stops the build before training (`error`), or is left out (`skip`): counted and listed in the run summary and metrics.jsonl.",
    )
    batch_size: PositiveInt = Field(32, description="Training batch size (per process).")
    eval_batch_size: PositiveInt | None = Field(None, description="Validation batch size; default: `batch_size`.")
    num_workers: Literal["auto"] | Count = Field(
        "auto",
        description="DataLoader worker processes; `auto` is 0 when training on a CPU (the training process loads fastest there: benchmarks/data_loading.py) and, with CUDA, 4 per GPU, at most the CPU count minus one.",
    )
    pin_memory: Literal["auto"] | bool = Field(
        "auto", description="Pin host memory for faster copies; `auto` is on when CUDA is used."
    )
    shuffle: bool = Field(True, description="Shuffle the training data each epoch (seeded).")
    drop_last: bool = Field(False, description="Drop the last incomplete training batch.")
    augment: list[Augmentation] = Field(
        default_factory=list, description="Training-time augmentations, applied in order."
    )
    synthetic: Synthetic = Field(default_factory=Synthetic, description="Settings of the `synthetic` source.")
    limit_train: PositiveInt | None = Field(
        None,
        description="Use at most this many training samples (quick experiments): a seeded subset stratified by the first classification head's classes.",
    )
    limit_val: PositiveInt | None = Field(
        None, description="Use at most this many validation samples (seeded, stratified like `limit_train`)."
    )
