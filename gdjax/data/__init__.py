"""Data for gdjax: sources, class-incremental splits, and batching.

`sources` reads raw uint8 arrays (scikit-learn digits, IDX / CIFAR files, prepared TFDS data,
image folders); `splits` draws avalanche's class order and cuts it into experiences;
`pipeline` preprocesses once at load time and serves deterministic, resumable, sharded
batches. Importing this package initialises no JAX backend.
"""

from gdjax.data.pipeline import (
    ImageSplit,
    Prefetcher,
    batch_indices,
    batch_iterator,
    check_batch_size,
    convert_channels,
    data_sharding,
    epoch_permutation,
    flip_mask,
    flip_rows,
    global_rows,
    host_batch,
    load_dataset,
    load_uint8_split,
    local_rows,
    pad_rows,
    preprocess,
    resize_bilinear,
    resize_uint8_pil,
    resize_weights,
    shard_batch,
    steps_per_epoch,
)
from gdjax.data.sources import (
    SOURCES,
    SPLITS,
    digits_split_indices,
    prepare_tfds,
    read_cifar10,
    read_digits,
    read_idx,
    read_image_folder,
    read_source,
    read_tfds,
)
from gdjax.data.splits import (
    experience_indices,
    make_experiences,
    nc_class_order,
    resolve_class_order,
    seen_classes,
    seen_indices,
    torch_randperm,
    validate_class_order,
)

__all__ = [
    "ImageSplit", "Prefetcher", "batch_indices", "batch_iterator", "check_batch_size",
    "convert_channels", "data_sharding", "epoch_permutation", "flip_mask", "flip_rows",
    "global_rows", "host_batch", "pad_rows",
    "load_dataset", "load_uint8_split", "local_rows", "preprocess", "resize_bilinear",
    "resize_uint8_pil", "resize_weights",
    "shard_batch", "steps_per_epoch",
    "SOURCES", "SPLITS", "digits_split_indices", "prepare_tfds", "read_cifar10", "read_digits",
    "read_idx", "read_image_folder", "read_source", "read_tfds",
    "experience_indices", "make_experiences", "nc_class_order", "resolve_class_order",
    "seen_classes", "seen_indices", "torch_randperm", "validate_class_order",
]
