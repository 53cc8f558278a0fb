"""The token cache: every training image encoded once by the trained tokenizer, stored as Parquet.

`precompute_token_cache` is a Ray Data batch-inference job: shards -> `image_dataset` (no shuffle) ->
an actor pool of `TokenizerEncoder`s (`map_batches`) -> `write_parquet`. The GPT stage then reads
token maps (`read_token_cache`) instead of running the tokenizer's encoder every epoch as the
official code does.

Layout under the cache URI (the schema is in pipeline/token_cache/schema.py):
  data/part-00000.parquet ...   the rows; every file carries the provenance in its metadata
  _SUCCESS.json                 manifest (provenance, files, row counts), written last

Publishing is all-or-nothing: the files are written under a fresh staging prefix, moved to `data/`
under deterministic names, and the manifest goes last. A run that finds the manifest skips the work;
a run that finds no manifest removes what a killed run of its own left (`_staging-*` folders,
`data/part-*.parquet`, temp files of the manifest) and starts again, so files are never duplicated.
It never deletes anything else: an output folder holding any other name is not a token cache and is
refused with one line.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from pipeline.core.exports import TOKENIZER_FORMAT, load_tokenizer, read_export_info
from pipeline.core.storage import (
    StorageOptions,
    absolute_uri,
    exists,
    is_s3,
    join_uri,
    list_tree,
    pyarrow_filesystem,
    read_bytes,
    remove,
    write_bytes_atomic,
)
from pipeline.data.bad_samples import BadSampleError
from pipeline.token_cache.schema import (
    DATA_DIR,
    FORMAT,
    MANIFEST_FILE,
    TokenCacheError,
    TokenCacheInfo,
    flipped_tokens_column,
    tokens_column,
)

logger = logging.getLogger(__name__)

# ~1.4 kB per image at the official 680 tokens in uint16: 50k rows is a ~70 MB file.
ROWS_PER_FILE = 50_000


class TokenizerEncoder:
    """Ray Data actor: loads the tokenizer once, then maps image batches to token-map columns."""

    def __init__(self, tokenizer_uri: str, flip: bool, num_threads: int | None = None,
                 class_names: tuple[str, ...] = ()) -> None:
        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(tokenizer_uri).to(self.device)
        config = self.tokenizer.config
        self.info = TokenCacheInfo(self.tokenizer.checksum, config.scales, config.codebook_size, flip,
                                   class_names=class_names)
        self.schema = self.info.schema()
        self.expected_shape = (config.in_channels, config.image_size, config.image_size)

    def _encode(self, images: torch.Tensor) -> list[np.ndarray]:
        token_maps = self.tokenizer.encode_tokens(images)
        dtype = self.info.dtype
        return [maps.reshape(maps.shape[0], -1).cpu().numpy().astype(dtype) for maps in token_maps]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images = np.asarray(batch["image"], dtype=np.float32)
        if images.shape[1:] != self.expected_shape:
            raise TokenCacheError(f"images of shape {images.shape[1:]} (e.g. key {batch['key'][0]}) do not fit the "
                                  f"tokenizer, which expects {self.expected_shape}")
        if not images.flags.writeable:  # zero-copy batches are read-only; torch wants to own writable memory
            images = images.copy()
        images_t = torch.from_numpy(images).to(self.device)
        with torch.inference_mode():
            token_sets = [self._encode(images_t)]
            if self.info.flipped:
                token_sets.append(self._encode(torch.flip(images_t, dims=[-1])))
        columns: dict[str, Any] = {"key": pa.array([str(k) for k in batch["key"]], pa.string()),
                                   "label": pa.array(np.asarray(batch["label"], dtype=np.int64))}
        for set_index, tokens in enumerate(token_sets):
            name = tokens_column if set_index == 0 else flipped_tokens_column
            for side, flat in zip(self.info.scales, tokens):
                columns[name(side)] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), side * side)
        return pa.Table.from_pydict(columns, schema=self.schema)


def _unshuffled(data_config: Any) -> Any:
    """The same data config in shard order: a cache is written once, and order does not matter to it."""
    return data_config.model_copy(update={"shuffle": False})


def read_manifest(cache_uri: str, storage: StorageOptions | None = None) -> dict[str, Any] | None:
    """The manifest of a complete cache, or None when the cache is absent or incomplete."""
    manifest_uri = join_uri(cache_uri, MANIFEST_FILE)
    if not exists(manifest_uri, storage):
        return None
    try:
        manifest = json.loads(read_bytes(manifest_uri, storage))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TokenCacheError(f"{manifest_uri}: damaged token cache manifest, not JSON "
                              f"({str(exc).splitlines()[0][:120]}); remove it to rebuild the cache") from None
    if not isinstance(manifest, dict) or not {"tokenizer_checksum", "scales", "codebook_size", "flipped",
                                              "files"} <= set(manifest):
        raise TokenCacheError(f"{manifest_uri}: not a token cache manifest (format {FORMAT}); remove it to "
                              "rebuild the cache")
    return manifest


STAGING_PREFIX = "_staging-"
# Every name a run of this job writes under the cache (a killed run's leftovers included).
_OWN_NAMES = re.compile(rf"{re.escape(MANIFEST_FILE)}|\.{re.escape(MANIFEST_FILE)}\.[^/]+\.tmp|"
                        rf"{DATA_DIR}|{DATA_DIR}/part-\d{{5}}\.parquet|{STAGING_PREFIX}[0-9a-f]+(/.*)?")


def _own_leftovers(output_uri: str, storage: StorageOptions | None) -> list[str]:
    """The top-level names and data files a killed run of this job left under `output_uri`, to remove.

    A folder holding anything else is not (only) a token cache of varray: TokenCacheError, and
    nothing is removed.
    """
    names = list_tree(output_uri, storage)
    foreign = [name for name in names if not _OWN_NAMES.fullmatch(name)]
    if foreign:
        raise TokenCacheError(f"{output_uri}: not empty and not a token cache of varray (holds {foreign[0]!r}"
                              f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); nothing was "
                              "removed: choose an empty or new folder")
    return [name for name in names if name.startswith(STAGING_PREFIX) and "/" not in name
            or name.startswith(f"{DATA_DIR}/") or name.endswith(".tmp")]


def _file_info(fs: pafs.FileSystem, path: str) -> tuple[TokenCacheInfo, int]:
    with fs.open_input_file(path) as handle:
        metadata = pq.read_metadata(handle)
    return TokenCacheInfo.from_metadata(metadata.schema.to_arrow_schema().metadata, path), metadata.num_rows


def _publish(fs: pafs.FileSystem, staging: str, data_dir: str, local: bool) -> list[tuple[str, str]]:
    """Move the staged Parquet files to `data_dir` under deterministic names; returns (name, path) pairs."""
    staged = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(staging, recursive=True))
                    if info.type == pafs.FileType.File and info.path.endswith(".parquet"))
    if local:  # S3 has no folders; creating one would only leave marker objects behind
        fs.create_dir(data_dir, recursive=True)
    published = []
    for index, source in enumerate(staged):
        name = f"part-{index:05d}.parquet"
        target = f"{data_dir.rstrip('/')}/{name}"
        fs.move(source, target)
        published.append((name, target))
    return published


def precompute_token_cache(tokenizer_uri: str, data_config: Any, output_uri: str, *, batch_size: int = 256,
                           concurrency: int = 1, flip_augmentation: bool = False,
                           storage: StorageOptions | None = None, num_cpus: float = 1.0,
                           num_gpus: float = 0.0, max_skipped_fraction: float = 0.01) -> dict[str, Any]:
    """Encode every image of `data_config`'s shards with the tokenizer export and publish the cache.

    Returns the manifest. Skips the work when a complete cache by the same tokenizer exists; refuses
    (TokenCacheError) a complete cache by another tokenizer rather than overwrite it. A cache that
    lost more than `max_skipped_fraction` of the split to bad samples is not published (BadSampleError).
    """
    import ray

    from pipeline.data.reader import dataset_index, image_dataset, skip_budget

    # The encoder actors run in Ray's folder, not the driver's: they get absolute locations only.
    tokenizer_uri, output_uri = absolute_uri(tokenizer_uri), absolute_uri(output_uri)
    export = read_export_info(tokenizer_uri)
    if export.get("format") != TOKENIZER_FORMAT:
        raise TokenCacheError(f"{tokenizer_uri}: not a tokenizer export (format {export.get('format')!r})")
    config = export["config"]
    checksum, scales, codebook_size = export["checksum"], tuple(config["scales"]), int(config["codebook_size"])

    existing = read_manifest(output_uri, storage)
    if existing is not None:
        TokenCacheInfo(existing["tokenizer_checksum"], tuple(existing["scales"]), existing["codebook_size"],
                       existing["flipped"]).check_matches(output_uri, checksum, scales, codebook_size)
        logger.info("token cache %s is complete (%d rows); skipping", output_uri, existing["num_rows"])
        if existing["flipped"] != flip_augmentation:
            logger.warning("token cache %s was built with flip=%s; remove it to rebuild with flip=%s", output_uri,
                           existing["flipped"], flip_augmentation)
        return existing

    # No manifest: what is there must be a killed run's leftovers, and only those are removed.
    for name in _own_leftovers(output_uri, storage):
        remove(join_uri(output_uri, name), storage)
    # The shards' class names travel with the tokens: a cache alone says what each label means.
    class_names = tuple(dataset_index(data_config, storage).class_names)
    info = TokenCacheInfo(checksum, scales, codebook_size, flip_augmentation, class_names=class_names)
    fs, root = pyarrow_filesystem(output_uri, storage)
    staging_name = f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    staging = f"{root.rstrip('/')}/{staging_name}"
    started = time.time()
    data_config = _unshuffled(data_config)
    dataset = image_dataset(data_config, storage=storage)
    tokens = dataset.map_batches(
        TokenizerEncoder, fn_constructor_kwargs={"tokenizer_uri": tokenizer_uri, "flip": flip_augmentation,
                                                 "num_threads": max(1, int(num_cpus)) if not num_gpus else None,
                                                 "class_names": class_names},
        compute=ray.data.ActorPoolStrategy(size=concurrency), batch_size=batch_size, batch_format="numpy",
        num_cpus=num_cpus, num_gpus=num_gpus)
    tokens.write_parquet(staging, filesystem=fs, schema=info.schema(), min_rows_per_file=ROWS_PER_FILE,
                         try_create_dir=not is_s3(output_uri))

    files = []
    for name, path in _publish(fs, staging, f"{root.rstrip('/')}/{DATA_DIR}", local=not is_s3(output_uri)):
        written, num_rows = _file_info(fs, path)
        written.check_matches(path, info.tokenizer_checksum, info.scales, info.codebook_size)
        files.append({"name": name, "num_rows": num_rows})
    remove(join_uri(output_uri, staging_name), storage)
    # Bad samples the reader skipped (and logged) on the way; too many and the cache stays unpublished.
    budget = skip_budget(data_config, max_skipped_fraction, storage)
    skipped = budget.report()
    if budget.exceeded() is not None:
        raise BadSampleError(budget.exceeded())
    manifest = {**info.to_json(), "tokenizer_uri": tokenizer_uri, "num_rows": sum(f["num_rows"] for f in files),
                "files": files, "source": data_config.shards_uri,
                **{key: value for key, value in skipped.items() if key != "samples"},
                "seconds": round(time.time() - started, 1), "created": time.time()}
    write_bytes_atomic(join_uri(output_uri, MANIFEST_FILE), json.dumps(manifest, indent=2).encode(), storage)
    logger.info("token cache %s: %d rows in %d files, %.1f s", output_uri, manifest["num_rows"], len(files),
                manifest["seconds"])
    return manifest


def _concatenate_scales(batch: pa.Table, scales: tuple[int, ...], flipped: bool,
                        flip_probability: float) -> dict[str, np.ndarray]:
    """Per-scale token columns -> one int64 [B, L] array, scales coarse to fine, each row-major."""
    def flat(name: str, side: int) -> np.ndarray:
        values = pc.list_flatten(batch.column(name)).to_numpy(zero_copy_only=False)
        return values.reshape(batch.num_rows, side * side)

    tokens = np.concatenate([flat(tokens_column(s), s) for s in scales], axis=1).astype(np.int64)
    if flipped and flip_probability > 0:
        flipped_tokens = np.concatenate([flat(flipped_tokens_column(s), s) for s in scales], axis=1)
        use_flipped = np.random.default_rng().random(batch.num_rows) < flip_probability
        tokens[use_flipped] = flipped_tokens[use_flipped]
    return {"key": batch.column("key").to_numpy(zero_copy_only=False),
            "label": batch.column("label").to_numpy().astype(np.int64), "tokens": tokens}


def read_token_cache(uri: str, expected_tokenizer_checksum: str, scales: tuple[int, ...] | list[int],
                     codebook_size: int, *, flip_probability: float = 0.0,
                     storage: StorageOptions | None = None) -> ray.data.Dataset:
    """The cache as a Dataset with columns key (str), label (int64), tokens (int64 [L]).

    Refuses (TokenCacheError, one line) an incomplete cache or one whose metadata names another
    tokenizer, scales or codebook size. With `flip_probability` > 0 and a cache built with flips, each
    row yields its flipped token set with that probability (drawn afresh every epoch).
    """
    manifest = read_manifest(uri, storage)
    if manifest is None:
        raise TokenCacheError(f"{uri}: no complete token cache here ({MANIFEST_FILE} missing); "
                              "run jobs/precompute_tokens.py")
    scales = tuple(int(s) for s in scales)
    fs, root = pyarrow_filesystem(uri, storage)
    paths = [f"{root.rstrip('/')}/{DATA_DIR}/{entry['name']}" for entry in manifest["files"]]
    if not paths:
        raise TokenCacheError(f"{uri}: token cache holds no files (no images were encoded)")
    flipped = True
    for path in paths:  # Parquet metadata is the authority: every file must carry matching provenance
        info, _ = _file_info(fs, path)
        info.check_matches(uri, expected_tokenizer_checksum, scales, codebook_size)
        flipped = flipped and info.flipped
    columns = ["key", "label"] + [tokens_column(s) for s in scales]
    if flipped and flip_probability > 0:
        columns += [flipped_tokens_column(s) for s in scales]
    dataset = ray.data.read_parquet(paths, filesystem=fs).select_columns(columns)
    return dataset.map_batches(_concatenate_scales, batch_format="pyarrow",
                               fn_kwargs={"scales": scales, "flipped": flipped, "flip_probability": flip_probability})


def split_tokens(tokens: torch.Tensor, scales: tuple[int, ...] | list[int]) -> list[torch.Tensor]:
    """int64 [B, L] (as read_token_cache yields) -> token maps [B, s, s] per scale, coarse to fine."""
    maps, start = [], 0
    for side in scales:
        maps.append(tokens[:, start:start + side * side].reshape(-1, side, side))
        start += side * side
    if start != tokens.shape[1]:
        raise TokenCacheError(f"tokens have {tokens.shape[1]} entries per row, scales {list(scales)} need {start}")
    return maps


__all__ = ["TokenizerEncoder", "precompute_token_cache", "read_token_cache", "read_manifest", "split_tokens",
           "TokenCacheError", "TokenCacheInfo"]
