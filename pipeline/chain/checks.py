"""What the chain checks before it starts anything (a dry run checks exactly this): storage reachable
and writable, the train split's shards present (or the plan to create them) and fitting the models."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from pipeline.chain.config import TrainVarConfig
from pipeline.core.errors import VarrayError
from pipeline.core.storage import StorageOptions, exists, is_s3, join_uri, remove, write_bytes_atomic
from pipeline.data.shards import INDEX_FILE, read_index

logger = logging.getLogger(__name__)


class ChainError(VarrayError, ValueError):
    """The chain cannot start or continue; one line saying why."""


def probe_storage(root: str, storage: StorageOptions | None = None) -> None:
    """Write and delete one object under `root`: proves the location is reachable and writable."""
    created_root = not is_s3(root) and not os.path.exists(root)
    probe = join_uri(root, f".varray-probe-{uuid.uuid4().hex[:8]}")
    try:
        write_bytes_atomic(probe, b"probe", storage)
        remove(probe, storage)
    except OSError as exc:
        raise ChainError(f"storage.root: cannot write to {root}: {str(exc).splitlines()[0]}") from None
    finally:
        if created_root and os.path.isdir(root) and not os.listdir(root):
            os.rmdir(root)


def check_data(config: TrainVarConfig, storage: StorageOptions | None = None) -> dict[str, Any]:
    """The train split's index (or the plan to create it) checked against the models; a summary."""
    var = config.var_model
    train_uri = config.data.train.shards_uri
    if not exists(join_uri(train_uri, INDEX_FILE), storage):
        if config.data.create is None:
            raise ChainError(f"data.train.shards_uri: no {INDEX_FILE} at {train_uri} (write shards with "
                             "jobs/make_shards.py, or set data.create to make them from Fashion-MNIST or an "
                             "image folder)")
        from pipeline.data.sharding import plan
        try:
            planned = plan(_make_shards_config(config))
        except (OSError, ValueError) as exc:
            raise ChainError(f"data.create: {str(exc).splitlines()[0]}") from None
        return {"train": train_uri, "create": planned}
    index = read_index(train_uri, storage)  # its images are read at the tokenizer's size (TrainVarConfig)
    if index.num_classes > var.num_classes:
        raise ChainError(f"gpt.model.num_classes: the shards have {index.num_classes} classes, the model "
                         f"{var.num_classes}")
    if config.data.validation is not None and not exists(join_uri(config.data.validation.shards_uri, INDEX_FILE),
                                                         storage) and config.data.create is None:
        raise ChainError(f"data.validation.shards_uri: no {INDEX_FILE} at {config.data.validation.shards_uri}")
    return {"train": train_uri, "samples": index.total, "classes": index.num_classes,
            "image_size": index.image_size, "channels": index.channels}


def _make_shards_config(config: TrainVarConfig):
    from pipeline.data.sharding import MakeShardsConfig

    create = config.data.create
    common = dict(input=create.input, output=config.data.shards_root, image_size=config.data.train.image_size,
                  channels=config.data.train.channels, limit=create.limit, samples_per_shard=create.samples_per_shard,
                  seed=create.seed)
    if create.source == "folder":
        return MakeShardsConfig(source="folder", labels=create.labels, val_fraction=create.val_fraction,
                                workers=create.workers, **common)
    return MakeShardsConfig(source=create.source,
                            splits=["train", "test"] if config.data.validation is not None else ["train"], **common)


def ensure_shards(config: TrainVarConfig, storage: StorageOptions | None = None) -> bool:
    """Write the shards (Fashion-MNIST or an image folder) when data.create says so and the train split has
    none; True if written."""
    if exists(join_uri(config.data.train.shards_uri, INDEX_FILE), storage):
        return False
    if config.data.create is None:
        raise ChainError(f"data.train.shards_uri: no {INDEX_FILE} at {config.data.train.shards_uri}")
    from pipeline.data.sharding import make_shards

    logger.info("writing %s shards under %s", config.data.create.source, config.data.shards_root)
    make_shards(_make_shards_config(config), storage)
    return True
