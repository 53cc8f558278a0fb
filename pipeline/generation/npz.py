"""A generated set as the `.npz` file that OpenAI's guided-diffusion evaluator reads (`evaluations/evaluator.py`),
which is how VAR's users report FID, IS, precision and recall:

    arr_0   uint8 [N, H, W, 3]   every image, grey ones repeated to 3 channels
    arr_1   int64 [N]            each image's class index

in the set's row order (units in order, (label, index) inside each). The file is a plain, uncompressed
numpy `.npz` (`np.load(path)["arr_0"]` reads it) written as one stream: the header of the whole array
first, then each unit's images as they are decoded, so a 50,000-image set at 256 px (9.8 GB) never has
to be in memory at once. The stream is published atomically (pipeline.core.storage.StagedOutput: a
local staging file renamed, or one S3 upload completed) so a reader never sees half a file.
"""

from __future__ import annotations

import zipfile
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.core.images import decode_png
from pipeline.core.storage import StagedOutput, join_uri, list_files, pyarrow_filesystem
from pipeline.generation.reader import iter_generated_units
from pipeline.generation.schema import DATA_DIR, STATS_DIR


def rgb_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W] or [N,H,W,1|3] -> uint8 [N,H,W,3] (grey repeated to 3 channels)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 [N,H,W] or [N,H,W,3] images, got {images.dtype} {images.shape}")
    return np.ascontiguousarray(images)


def _shape(uri: str) -> tuple[int, int, int]:
    """(rows, height, width) of a set from its Parquet footers, without reading any image."""
    fs, root = pyarrow_filesystem(join_uri(uri, DATA_DIR))
    units = sorted(name.replace("\\", "/").rsplit("/", 1)[-1].removesuffix(".json")
                   for name in list_files(join_uri(uri, STATS_DIR), ".json"))
    rows, sizes = 0, set()
    for unit in units:
        path = f"{root}/{unit}.parquet"
        rows += pq.read_metadata(path, filesystem=fs).num_rows
        table = pq.read_table(path, filesystem=fs, columns=["width", "height"])
        sizes |= set(zip(table.column("height").to_pylist(), table.column("width").to_pylist()))
    if len(sizes) != 1:
        raise ValueError(f"{uri}: images of {len(sizes)} different sizes; one .npz array needs one size")
    height, width = sizes.pop()
    return rows, height, width


def _write_array(archive: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, chunks) -> int:
    """One `<name>.npy` member: the .npy header for `shape`, then the chunks' bytes; returns the rows written."""
    written = 0
    with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(member, header)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype)
            member.write(chunk.tobytes())
            written += len(chunk)
    return written


def export_npz(generated_uri: str, npz_uri: str) -> dict[str, Any]:
    """Write the set at `generated_uri` as one .npz at `npz_uri` (local or s3://); returns what it wrote."""
    count, height, width = _shape(generated_uri)
    labels: list[np.ndarray] = []

    def images():
        for table in iter_generated_units(generated_uri, ["label", "image"]):
            labels.append(table.column("label").to_numpy().astype(np.int64))
            yield rgb_uint8(np.stack([decode_png(png) for png in table.column("image").to_pylist()]))

    stream = StagedOutput(npz_uri)
    try:
        with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            written = _write_array(archive, "arr_0", (count, height, width, 3), np.uint8, images())
            if written != count:
                raise ValueError(f"{generated_uri}: read {written} images, its Parquet footers say {count}")
            _write_array(archive, "arr_1", (count,), np.int64, labels)
        size = stream.tell()
        stream.close()  # publishes the file
    except BaseException:
        stream.discard()
        raise
    return {"uri": npz_uri, "images": count, "shape": [count, height, width, 3], "bytes": size}
