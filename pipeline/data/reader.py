"""Ray Data reader of WebDataset shards: `image_dataset(config) -> ray.data.Dataset`.

Rows: `key` (str), `image` (float32 [C, H, W] in [-1, 1]), `label` (int64). One read task per shard
(a `FileBasedDatasource` of its own, on Ray's public API; files shuffled per epoch when `shuffle`)
groups the tar's members into samples (`pipeline.data.tar_samples`, webdataset's rule) and emits them
as Arrow blocks of raw bytes, `decode_batch_size` samples each; PNG decoding, checks, resizing and normalising happen
in `map_batches` on whole numpy batches, which Ray fuses into the read task, so raw bytes never pass
through the object store. Before reading, every shard is checked against index.json (exists, same
byte size, not empty), so a truncated or missing shard is attributed to its name before any sample
is read.

Shards: make_shards' (index.json; `.png` or kept `.jpg` images, `.cls` labels), or WebDataset
shards other tools wrote, without index.json: images as `.jpg`/`.jpeg`/`.png`/`.webp`, labels as
`.cls` or as the `label_key` field of `.json` (an id or a class name). Their index is built by one
listing pass and cached (`pipeline.data.listing`); their images may differ from the first one in
size or mode: they are converted (image_folder's rules) and resized + center-cropped to the size, where
make_shards' shards are held to the size and mode their index promises.

Training: pass the dataset as `TorchTrainer(datasets={"train": ds})`; in the worker loop, for each
epoch, `torch_batches(ray.train.get_dataset_shard("train"), config, batch_size)` - a fresh
iterator per epoch; Ray Train's streaming split gives each worker a disjoint part. After training,
`bad_sample_summary(config)` says what was skipped.
"""

from __future__ import annotations

import io
import logging
import tarfile
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from PIL import Image
from pydantic import Field
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.data.datasource import FileBasedDatasource

from pipeline.core.configuration import StrictModel
from pipeline.core.storage import Location, StorageOptions, is_s3, join_uri, pyarrow_filesystem
from pipeline.data import bad_samples
from pipeline.data.bad_samples import WHOLE_SHARD, BadSampleError, BadSampleSummary, SkipBudget
from pipeline.data.listing import IMAGE_SUFFIXES, LISTING, image_entry, label_from_json, load_index
from pipeline.data.shards import ShardIndex
from pipeline.data.sources import image_folder
from pipeline.data.tar_samples import iter_tar_samples

logger = logging.getLogger(__name__)

_MODES = {1: "L", 3: "RGB"}
# What breaks a tar mid-read: tarfile's own errors, a short read, the grouping (keys out of order).
_SHARD_DAMAGE = (tarfile.TarError, OSError, EOFError, ValueError)


class ImageDataConfig(StrictModel):
    shards_uri: Location  # one split's folder (holds index.json), local path or s3://
    image_size: int | None = Field(default=None, ge=1)  # None: the index's size; else resized
    channels: Literal[1, 3] | None = None  # None: the index's; else converted
    shuffle: bool = True  # shuffle shard order, differently every epoch
    shuffle_buffer_size: int = Field(default=1024, ge=0)  # local shuffle buffer in torch_batches; 0 = off
    seed: int | None = 0
    on_bad_sample: Literal["skip", "fail"] = "skip"
    decode_batch_size: int = Field(default=128, ge=1)  # samples per read block = per map_batches call
    # The label: None = the `.cls` entry; a field name (dots walk into objects) = that field of `.json`,
    # an integer class id or a class name (of the index's class_names).
    label_key: str | None = Field(default=None, min_length=1)
    # Shards without index.json: the folder where the index built by listing them is cached;
    # None = beside the shards (<shards_uri>/index.listed.json).
    index_cache: Location | None = None


@dataclass(frozen=True)
class _DecodeSpec:
    """What a decode task needs: the index's promises and the wanted output."""

    source_size: int
    source_channels: int
    num_classes: int
    size: int
    channels: int
    fail: bool
    scheme: str  # "s3://" or "": turns the filesystem paths back into URIs for messages
    class_names: tuple[str, ...] = ()
    label_key: str | None = None  # None: labels are `.cls` entries; else this field of `.json`
    strict: bool = True  # make_shards' index: images must be its size and mode; listed: converted to them


class _BadSample(Exception):
    pass


def _label(raw: Any, spec: _DecodeSpec) -> int:
    num_classes = spec.num_classes
    if spec.label_key is not None:
        if not isinstance(raw, bytes):
            raise _BadSample("missing label: no .json entry")
        try:
            value = label_from_json(raw, spec.label_key)
        except ValueError as exc:
            raise _BadSample(str(exc)) from None
        if isinstance(value, str):
            if value not in spec.class_names:
                raise _BadSample(f"label not a class name: {value[:20]!r}")
            return spec.class_names.index(value)
        label = value
    else:
        if not isinstance(raw, (bytes, str)):
            raise _BadSample("missing label: no .cls entry")
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        try:
            label = int(text.strip())
        except ValueError:
            raise _BadSample(f"label not an integer: {text.strip()[:20]!r}") from None
    if not 0 <= label < num_classes:
        raise _BadSample(f"label out of range: {label} not in 0..{num_classes - 1}")
    return label


def _image(raw: Any, spec: _DecodeSpec) -> Image.Image:
    if not isinstance(raw, bytes):
        raise _BadSample(f"missing image: no {'/'.join('.' + suffix for suffix in IMAGE_SUFFIXES)} entry")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Exception as exc:  # PIL raises several types for non-image or damaged bytes
        raise _BadSample(f"not an image: {type(exc).__name__}: {str(exc)[:80]}") from None
    expected_mode = _MODES[spec.source_channels]
    if not spec.strict:  # another tool's shards: any mode and size, made the index's
        try:
            image = image_folder.to_gray_or_rgb(image).convert(expected_mode)
        except image_folder.ImageRefused as exc:
            raise _BadSample(f"not an image: {exc}") from None
        return image_folder.resize_center_crop(image, spec.source_size)
    if image.mode != expected_mode:
        raise _BadSample(f"wrong channels: mode {image.mode}, index says {spec.source_channels} ({expected_mode})")
    if image.size != (spec.source_size, spec.source_size):
        raise _BadSample(f"wrong size: {image.size[0]}x{image.size[1]}, index says {spec.source_size}")
    return image


def decode_batch(batch: dict[str, np.ndarray], spec: _DecodeSpec, log=None) -> dict[str, np.ndarray]:
    """Raw samples of one shard (`__key__`, `__url__`, `image` and `label` bytes: the image entry and the
    `.cls` or `.json` entry) -> key, image float32 [N, C, H, W] in [-1, 1], label int64. A bad sample
    fails with its shard and key, or is logged, counted and left out."""
    keys, count = batch["__key__"], len(batch["__key__"])
    pngs, labels_raw = batch["image"], batch["label"]
    shard = spec.scheme + str(batch["__url__"][0]) if count else ""  # a block never spans two shards
    # Channels-first uint8 while copying each image in: the float pass below then runs over contiguous
    # memory (4x faster than converting a transposed NHWC view at 256 px).
    pixels = np.empty((count, spec.channels, spec.size, spec.size), dtype=np.uint8)
    labels = np.empty(count, dtype=np.int64)
    kept: list[int] = []
    rejected: list[tuple[str, str, str, int]] = []
    for row in range(count):
        try:
            labels[row] = _label(labels_raw[row], spec)
            image = _image(pngs[row], spec)
        except _BadSample as exc:
            if spec.fail:
                raise BadSampleError(bad_samples.describe(shard, str(keys[row]), str(exc))) from None
            rejected.append((shard, str(keys[row]), str(exc), 1))
            continue
        if spec.channels != spec.source_channels:
            image = image.convert(_MODES[spec.channels])
        if spec.size != spec.source_size:
            image = image.resize((spec.size, spec.size), Image.Resampling.LANCZOS)
        pixels[row] = np.asarray(image).reshape(spec.size, spec.size, spec.channels).transpose(2, 0, 1)
        kept.append(row)
    if rejected:
        bad_samples.record(log, rejected)
        pixels, labels, keys = pixels[kept], labels[kept], keys[kept]
    # One vectorised pass: uint8 -> float32 in [-1, 1].
    images = np.multiply(pixels, np.float32(2 / 255), dtype=np.float32)
    images -= 1.0
    return {"key": np.asarray(keys, dtype=object).astype(str), "image": images, "label": labels}


def _raw_block(samples: list[dict[str, Any]], path: str, label_entry: str) -> pa.Table:
    """Samples as one Arrow block of raw bytes: the image entry, the label entry (`cls` or `json`); a
    missing entry is a null, which decoding reports."""
    return pa.table({
        "__key__": pa.array([str(sample["__key__"]) for sample in samples], pa.string()),
        "__url__": pa.array([path] * len(samples), pa.string()),
        "image": pa.array([image_entry(sample) for sample in samples], pa.binary()),
        "label": pa.array([sample.get(label_entry) for sample in samples], pa.binary()),
    })


class _ShardDatasource(FileBasedDatasource):
    """Ray Data's file datasource (file listing, per-epoch file shuffle, opens through pyarrow, whose S3
    retries storage.py bounds), emitting each shard as Arrow blocks of raw samples (pandas rows would
    cost more CPU per sample than decoding a small PNG).

    A tar that breaks mid-read (bad header, cut short, keys out of order) or that ends before the
    number of samples its index entry promises (a zero block reads as a clean end of archive) is
    attributed to the shard: in `fail` mode an error naming it; in `skip` mode every complete sample
    read before the damage is kept and the rest are counted as lost with the shard.
    """

    def __init__(self, paths: list[str], expected_samples: dict[str, int], spec: _DecodeSpec, log,
                 block_size: int, suffixes: list[str], **kwargs: Any):
        super().__init__(paths, **kwargs)
        self.suffixes = suffixes
        self.label_entry = "json" if spec.label_key is not None else "cls"
        self.expected_samples = expected_samples
        self.spec, self.log, self.block_size = spec, log, block_size

    def _read_stream(self, stream, path: str):
        shard = self.spec.scheme + path
        samples = iter_tar_samples(stream, self.suffixes)
        pending: list[dict[str, Any]] = []
        read, problem = 0, None
        while True:
            try:
                sample = next(samples, None)
            except _SHARD_DAMAGE as exc:
                # First line only: some errors append advice on further lines.
                first_line = (str(exc).splitlines() or [""])[0][:120]
                problem = f"unreadable shard: {type(exc).__name__}: {first_line} (after {read} samples)"
                break
            if sample is None:
                break
            read += 1
            pending.append(sample)
            if len(pending) == self.block_size:
                yield _raw_block(pending, path, self.label_entry)
                pending = []
        if pending:
            yield _raw_block(pending, path, self.label_entry)
        expected = self.expected_samples.get(path)
        if problem is None and expected is None:
            problem = "shard not in index.json"  # never expected: paths are the index's
        elif problem is None and read != expected:
            problem = f"shard sample count: read {read}, index says {expected}"
        if problem is None:
            return
        if self.spec.fail:
            raise BadSampleError(bad_samples.describe(shard, WHOLE_SHARD, problem))
        lost = max(0, expected - read) if expected is not None else 0
        bad_samples.record(self.log, [(shard, WHOLE_SHARD, problem, lost)])


def _check_shards(index: ShardIndex, split_uri: str, fs: pafs.FileSystem, root: str, fail: bool,
                  log) -> list[str]:
    """Paths (for `fs`) of the shards that match index.json; the others are skipped or fail."""
    paths = [f"{root.rstrip('/')}/{shard.name}" for shard in index.shards]
    good, rejected = [], []
    for shard, path, info in zip(index.shards, paths, fs.get_file_info(paths)):
        uri = join_uri(split_uri, shard.name)
        if info.type == pafs.FileType.NotFound:
            reason = "missing shard: listed in index.json, not found"
        elif info.size == 0 or shard.samples == 0:
            reason = f"empty shard: {info.size} bytes, index says {shard.samples} samples"
        elif info.size != shard.bytes:
            reason = f"truncated or altered shard: {info.size} bytes, index says {shard.bytes}"
        else:
            good.append(path)
            continue
        if fail:
            raise BadSampleError(bad_samples.describe(uri, WHOLE_SHARD, reason))
        rejected.append((uri, WHOLE_SHARD, reason, shard.samples))
    bad_samples.record(log, rejected)
    if not good:
        raise BadSampleError(f"{split_uri}: no readable shards (all {len(paths)} failed the index check)")
    return good


def _identity(config: ImageDataConfig) -> str:
    return config.model_dump_json()


def image_dataset(config: ImageDataConfig, storage: StorageOptions | None = None) -> ray.data.Dataset:
    """A lazy Ray Dataset of one split's shards: columns key, image, label (see module doc)."""
    index = dataset_index(config, storage)
    fs, root = pyarrow_filesystem(config.shards_uri, storage)
    fail = config.on_bad_sample == "fail"
    log = None if fail else bad_samples.get_log(_identity(config))
    paths = _check_shards(index, config.shards_uri, fs, root, fail, log)
    spec = _DecodeSpec(source_size=index.image_size, source_channels=index.channels,
                       num_classes=index.num_classes, size=config.image_size or index.image_size,
                       channels=config.channels or index.channels, fail=fail,
                       scheme="s3://" if is_s3(config.shards_uri) else "", class_names=tuple(index.class_names),
                       label_key=config.label_key, strict=index.source.get("name") != LISTING)
    shuffle = ray.data.FileShuffleConfig(seed=config.seed, reseed_after_execution=True) if config.shuffle else None
    expected = {f"{root.rstrip('/')}/{shard.name}": shard.samples for shard in index.shards}
    source = _ShardDatasource(paths, expected, spec, log, config.decode_batch_size, suffixes=[*IMAGE_SUFFIXES, "json" if config.label_key else "cls"],
                              filesystem=fs, shuffle=shuffle)
    # One read task per shard, and decoding per block (batch_size=None): Ray fuses a map into the read
    # only then (it will not fuse when it splits a file's output into more blocks, nor when the map asks
    # for a batch size), so decoding runs in the task that read the bytes.
    raw = ray.data.read_datasource(source, override_num_blocks=len(paths))
    return raw.map_batches(decode_batch, batch_format="numpy", batch_size=None,
                           fn_kwargs={"spec": spec, "log": log}, zero_copy_batch=True)


def dataset_index(config: ImageDataConfig, storage: StorageOptions | None = None) -> ShardIndex:
    """The split's index (class names, sizes, counts) for whoever builds the model: its index.json, or
    for shards that came without one the index built by listing them (cached; pipeline.data.listing)."""
    return load_index(config.shards_uri, storage, label_key=config.label_key, cache=config.index_cache)


def skip_budget(config: ImageDataConfig, max_fraction: float, storage: StorageOptions | None = None) -> SkipBudget:
    """What reading `config`'s split may lose before a job fails (see `SkipBudget`)."""
    return SkipBudget(_identity(config), config.shards_uri, dataset_index(config, storage).total, max_fraction)


def bad_sample_summary(config: ImageDataConfig) -> BadSampleSummary:
    """What `image_dataset(config)` skipped so far (all epochs, each sample counted once)."""
    summary = bad_samples.summary_for(_identity(config))
    if not summary.clean:
        logger.warning("%s: %s", config.shards_uri, summary)
    return summary


def _tensor(array: np.ndarray):
    import torch

    # Batches from the object store are read-only; torch wants writable memory.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class ImageCollate(NumpyBatchCollateFn):
    """numpy batch -> {"image": FloatTensor [B,C,H,W], "label": LongTensor [B], "key": list[str]}.

    iter_torch_batches' default collate refuses string columns; keys stay a list for logging.
    """

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"image": _tensor(batch["image"]), "label": _tensor(batch["label"]), "key": batch["key"].tolist()}


def torch_batches(data, config: ImageDataConfig, batch_size: int, epoch: int = 0, **kwargs: Any):
    """A fresh per-epoch iterator of torch batches (see `ImageCollate`) over a Dataset or a Train shard."""
    seed = None if config.seed is None else config.seed + epoch
    return data.iter_torch_batches(
        batch_size=batch_size, local_shuffle_buffer_size=config.shuffle_buffer_size or None,
        local_shuffle_seed=seed if config.shuffle_buffer_size else None, collate_fn=ImageCollate(), **kwargs)
