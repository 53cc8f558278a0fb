"""The token-cache Parquet schema (format `varray.token_cache/1`): columns, types and provenance.

One row per image:
  key               string                                   the shard sample key
  label             int64                                    class index
  tokens_<s>        fixed_size_list<uintN>[s*s], one per scale (side s), row-major token map
  flipped_tokens_<s> same, for the horizontally flipped image (only when the cache was built with flip)

uintN is the smallest unsigned type holding every code (uint8 up to 256 codes, uint16 up to 65,536,
else uint32). Each Parquet file's schema-level key-value metadata carries the provenance below, so a
file alone says which tokenizer made it; the GPT stage refuses a cache whose provenance differs from
its tokenizer's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.errors import VarrayError

FORMAT = "varray.token_cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "_SUCCESS.json"  # written last: its presence marks a complete cache
DATA_DIR = "data"

# Schema-level Parquet key-value metadata (all values are UTF-8 strings).
META_FORMAT = "varray.format"  # "varray.token_cache/1"
META_TOKENIZER_CHECKSUM = "varray.tokenizer_checksum"  # sha256 of the tokenizer export's weights
META_SCALES = "varray.scales"  # JSON list of scale sides, coarse to fine, e.g. "[1, 2, 4]"
META_CODEBOOK_SIZE = "varray.codebook_size"  # decimal integer
META_TOKEN_DTYPE = "varray.token_dtype"  # "uint8" | "uint16" | "uint32"
META_FLIPPED = "varray.flipped"  # "true" when flipped_tokens_<s> columns are present
META_CLASS_NAMES = "varray.class_names"  # JSON list: the name of each label, from the shards' index (optional)


class TokenCacheError(VarrayError, ValueError):
    """A token cache is missing, incomplete or does not belong to the tokenizer; one line naming why."""


def token_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds codes 0 .. codebook_size - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise TokenCacheError(f"codebook_size: {codebook_size} codes do not fit in uint32")


def tokens_column(side: int) -> str:
    return f"tokens_{side}"


def flipped_tokens_column(side: int) -> str:
    return f"flipped_tokens_{side}"


@dataclass(frozen=True)
class TokenCacheInfo:
    """The provenance a token cache carries in every file's metadata and in its manifest."""

    tokenizer_checksum: str
    scales: tuple[int, ...]
    codebook_size: int
    flipped: bool = False
    format_version: int = FORMAT_VERSION
    class_names: tuple[str, ...] = ()  # label i is class_names[i]; empty when the shards named none

    def __post_init__(self) -> None:
        object.__setattr__(self, "scales", tuple(int(s) for s in self.scales))
        object.__setattr__(self, "class_names", tuple(str(name) for name in self.class_names))

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.codebook_size)

    @property
    def total_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    def to_metadata(self) -> dict[bytes, bytes]:
        values = {
            META_FORMAT: f"{FORMAT}/{self.format_version}",
            META_TOKENIZER_CHECKSUM: self.tokenizer_checksum,
            META_SCALES: json.dumps(list(self.scales)),
            META_CODEBOOK_SIZE: str(self.codebook_size),
            META_TOKEN_DTYPE: self.dtype.name,
            META_FLIPPED: "true" if self.flipped else "false",
        }
        if self.class_names:
            values[META_CLASS_NAMES] = json.dumps(list(self.class_names))
        return {key.encode(): value.encode() for key, value in values.items()}

    @classmethod
    def from_metadata(cls, metadata: dict[bytes, bytes] | None, where: str) -> TokenCacheInfo:
        values = {key.decode(): value.decode() for key, value in (metadata or {}).items()}
        fmt = values.get(META_FORMAT, "")
        name, _, version = fmt.partition("/")
        if name != FORMAT or not version.isdigit():
            raise TokenCacheError(f"{where}: not a token cache (metadata {META_FORMAT}={fmt!r})")
        if int(version) != FORMAT_VERSION:
            raise TokenCacheError(f"{where}: token cache format version {version}, this code reads {FORMAT_VERSION}")
        try:
            return cls(tokenizer_checksum=values[META_TOKENIZER_CHECKSUM],
                       scales=tuple(json.loads(values[META_SCALES])),
                       codebook_size=int(values[META_CODEBOOK_SIZE]), flipped=values.get(META_FLIPPED) == "true",
                       format_version=int(version), class_names=tuple(json.loads(values.get(META_CLASS_NAMES, "[]"))))
        except (KeyError, ValueError) as exc:
            raise TokenCacheError(f"{where}: token cache metadata is incomplete ({exc})") from None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["scales"] = list(self.scales)
        data["class_names"] = list(self.class_names)
        data["format"] = f"{FORMAT}/{self.format_version}"
        data["token_dtype"] = self.dtype.name
        return data

    def schema(self) -> pa.Schema:
        """The Arrow schema of every cache file, provenance included."""
        value_type = pa.from_numpy_dtype(self.dtype)
        fields = [pa.field("key", pa.string(), nullable=False), pa.field("label", pa.int64(), nullable=False)]
        fields += [pa.field(tokens_column(s), pa.list_(value_type, s * s), nullable=False) for s in self.scales]
        if self.flipped:
            fields += [pa.field(flipped_tokens_column(s), pa.list_(value_type, s * s), nullable=False)
                       for s in self.scales]
        return pa.schema(fields, metadata=self.to_metadata())

    def check_matches(self, where: str, tokenizer_checksum: str, scales: tuple[int, ...] | list[int],
                      codebook_size: int) -> None:
        """Refuse a cache made by another tokenizer, with one line naming what differs."""
        if self.tokenizer_checksum != tokenizer_checksum:
            raise TokenCacheError(
                f"{where}: token cache was made by tokenizer {self.tokenizer_checksum[:12]}, not by the expected "
                f"tokenizer {tokenizer_checksum[:12]}; rebuild it with jobs/precompute_tokens.py")
        if self.scales != tuple(int(s) for s in scales):
            raise TokenCacheError(f"{where}: token cache scales {list(self.scales)} differ from the expected "
                                  f"{list(scales)}")
        if self.codebook_size != int(codebook_size):
            raise TokenCacheError(f"{where}: token cache codebook_size {self.codebook_size} differs from the "
                                  f"expected {codebook_size}")


__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST_FILE", "DATA_DIR", "TokenCacheError", "TokenCacheInfo",
           "token_dtype", "tokens_column", "flipped_tokens_column"]
