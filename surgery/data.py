"""Training data: sources from the `DATA_SOURCES` registry, augmentations from `AUGMENTATIONS`,
and DataLoaders whose order is a pure function of (seed, epoch).

A source returns two `Examples` (train, val): raw inputs plus one target tensor per head. The
`ExampleDataset` turns a raw input into model tensors with the same preprocessing serving uses
(`surgery.preprocess`). Data order and augmentations derive from (seed, epoch, index) only, never
from global random state, so a run resumed mid-epoch sees exactly the batches it would have seen.

This module is the data's public face, and the `DATA_SOURCES` registry's owner: importing it
registers every source. Its parts, each below the next:

- `surgery.data_examples`: `Examples` (what every source returns) and the seeded hold-out split;
- `surgery.data_targets`: labels checked against the heads, one target tensor per head;
- `surgery.data_table_read`: CSV/TSV, JSONL and Parquet files read into bounded, traceable cells;
- `surgery.data_columns`: columns -> examples (input column(s), each head's target, bad rows);
- sources, one module per kind of input, each registering with `DATA_SOURCES`:
  `surgery.data_images` (`digits`, `image_folder`), `surgery.data_tables` (`csv`, `jsonl`,
  `parquet`), `surgery.data_hf` (`hf`), `surgery.data_synthetic` (`synthetic`); a new source is a
  new module imported below;
- `surgery.data_split`: `examples_for`, one named split of a recipe-like data spec
  (what `surgery evaluate --data` reads);
- `surgery.data_augment`: the `AUGMENTATIONS` builders;
- `surgery.data_dataset`: examples → tensors (serving's preprocessing) and collation;
- `surgery.data_order`: the seeded, resumable batch order;
- `surgery.data_loaders`: `load_data`, which puts the parts together for one rank.

`from surgery.data import ...` keeps working for every name below; code inside `surgery/` imports
from the part that defines a name.
"""

from __future__ import annotations

from surgery.data_augment import Stage, build_augmentations
from surgery.data_dataset import Collate, ExampleDataset, sample_seed
from surgery.data_examples import Examples, class_counts, limit_examples, split_examples
from surgery.data_hf import hf_source
from surgery.data_images import IMAGE_SUFFIXES, digits_source, image_folder_source, verify_images
from surgery.data_loaders import TrainingData, auto_num_workers, data_report, load_data, load_examples
from surgery.data_order import EpochBatchSampler
from surgery.data_split import ModelView, check_data, examples_for
from surgery.data_synthetic import synthetic_source
from surgery.data_tables import csv_source, jsonl_source, parquet_source
from surgery.data_targets import class_targets, column_targets, head_columns, target_columns

__all__ = [
    "IMAGE_SUFFIXES",
    "Collate",
    "EpochBatchSampler",
    "ExampleDataset",
    "Examples",
    "ModelView",
    "Stage",
    "TrainingData",
    "auto_num_workers",
    "build_augmentations",
    "check_data",
    "class_counts",
    "class_targets",
    "column_targets",
    "csv_source",
    "data_report",
    "digits_source",
    "examples_for",
    "head_columns",
    "hf_source",
    "image_folder_source",
    "jsonl_source",
    "limit_examples",
    "load_data",
    "load_examples",
    "parquet_source",
    "sample_seed",
    "split_examples",
    "synthetic_source",
    "target_columns",
    "verify_images",
]
