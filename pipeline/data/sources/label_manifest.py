"""A label manifest: which class id and display name each folder of an image folder gets.

Without one, class i is the i-th folder name in sorted order and its name is the folder name
(torchvision ImageFolder's rule). With one, ids and names come from the manifest, so they stay the
same whichever folders a copy of the data holds (e.g. ImageNet synsets -> their published ids and
names). Three shapes are read:

- CSV with a header naming `folder` and `id` columns, `name` optional (default: the folder name):
      folder,id,name
      n01440764,0,tench
- JSON object, folder -> {"id": int, "name": str}:  {"n01440764": {"id": 0, "name": "tench"}}
- JSON object, id -> [folder, name] (Keras' imagenet_class_index.json): {"0": ["n01440764", "tench"]}
- JSON list of {"folder", "id", "name"} objects.

Ids must run 0..K-1 without gaps, each folder and each id once (names may repeat: ImageNet has two
"crane"s). Every class folder must be named by the manifest; a manifest may name folders this copy
lacks (a subset of ImageNet keeps ImageNet's ids), which is logged. Any disagreement stops with one
line, `LabelManifestError`, naming the manifest and the folder.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass

from pipeline.core.errors import VarrayError
from pipeline.core.storage import read_bytes

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".json", ".csv")


class LabelManifestError(VarrayError, ValueError):
    """A label manifest that cannot be read or disagrees with the folders; one line naming the folder."""


@dataclass(frozen=True)
class LabelManifest:
    uri: str
    folders: tuple[str, ...]  # folder of class id i
    names: tuple[str, ...]  # display name of class id i

    def id_of(self, folder: str) -> int:
        return self.folders.index(folder)

    def check_folders(self, present: list[str], root: str) -> None:
        """Every class folder under `root` is named here; folders named here but absent are logged."""
        known = set(self.folders)
        for folder in sorted(present):
            if folder not in known:
                raise LabelManifestError(f"label manifest {self.uri}: folder {folder!r} (in {root}) is not in "
                                         f"the manifest")
        missing = [folder for folder in self.folders if folder not in set(present)]
        if missing:
            logger.warning("label manifest %s: %d of its %d classes have no folder in %s (e.g. %s): they keep "
                           "their ids, with no images", self.uri, len(missing), len(self.folders), root,
                           ", ".join(missing[:3]))


def _rows_from_json(value, fail) -> list[tuple[str, object, object]]:
    if isinstance(value, list):
        rows = []
        for number, entry in enumerate(value):
            if not isinstance(entry, dict) or "folder" not in entry or "id" not in entry:
                fail(f"entry {number}: expected an object with 'folder' and 'id' (and 'name')")
            rows.append((entry["folder"], entry["id"], entry.get("name", entry["folder"])))
        return rows
    if not isinstance(value, dict):
        fail(f"a JSON {type(value).__name__}, expected an object or a list")
    rows = []
    for key, entry in value.items():
        if isinstance(entry, dict):  # folder -> {"id", "name"}
            if "id" not in entry:
                fail(f"folder {key!r}: no 'id'")
            rows.append((key, entry["id"], entry.get("name", key)))
        elif isinstance(entry, list) and len(entry) == 2:  # id -> [folder, name]
            if not key.strip().isdigit():
                fail(f"key {key!r}: an [folder, name] entry needs its class id as the key")
            rows.append((entry[0], int(key), entry[1]))
        else:
            fail(f"entry {key!r}: expected {{\"id\": ..., \"name\": ...}} or [folder, name]")
    return rows


def _rows_from_csv(text: str, fail) -> list[tuple[str, object, object]]:
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    if "folder" not in header or "id" not in header:
        fail(f"the CSV header must name 'folder' and 'id' columns (and optionally 'name'), got {header}")
    reader.fieldnames = header
    rows = []
    for row in reader:
        folder = (row.get("folder") or "").strip()
        rows.append((folder, (row.get("id") or "").strip(), (row.get("name") or "").strip() or folder))
    return rows


def read_label_manifest(uri: str) -> LabelManifest:
    """Parse and check the manifest at `uri` (a local path or s3://); LabelManifestError otherwise."""
    def fail(message: str):
        raise LabelManifestError(f"label manifest {uri}: {message}")

    raw = read_bytes(uri)  # StorageError naming the file if it is missing
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        fail("not UTF-8 text")
    if uri.lower().endswith(".csv"):
        rows = _rows_from_csv(text, fail)
    else:
        try:
            value = json.loads(text)
        except ValueError as exc:
            fail(f"not JSON ({str(exc).splitlines()[0]})")
        rows = _rows_from_json(value, fail)
    if not rows:
        fail("names no classes")
    by_id: dict[int, tuple[str, str]] = {}
    seen: dict[str, int] = {}
    for folder, raw_id, name in rows:
        if not isinstance(folder, str) or not folder or "/" in folder:
            fail(f"folder {folder!r}: not a folder name")
        if isinstance(raw_id, int) and not isinstance(raw_id, bool):
            class_id = raw_id
        else:
            class_id = int(raw_id) if isinstance(raw_id, str) and raw_id.strip().isdigit() else None
        if class_id is None or class_id < 0:
            fail(f"folder {folder!r}: id {raw_id!r} is not an integer >= 0")
        if not isinstance(name, str) or not name:
            fail(f"folder {folder!r}: name {name!r} is not a non-empty string")
        if folder in seen:
            fail(f"folder {folder!r} appears twice (ids {seen[folder]} and {class_id})")
        if class_id in by_id:
            fail(f"folder {folder!r}: id {class_id} is also folder {by_id[class_id][0]!r}'s")
        seen[folder] = class_id
        by_id[class_id] = (folder, name)
    gaps = [i for i in range(len(by_id)) if i not in by_id]
    if gaps:
        highest = max(by_id)
        fail(f"folder {by_id[highest][0]!r}: id {highest} leaves id {gaps[0]} unused (ids must run "
             f"0..{len(by_id) - 1} without gaps)")
    ordered = [by_id[i] for i in range(len(by_id))]
    return LabelManifest(uri=uri, folders=tuple(f for f, _ in ordered), names=tuple(n for _, n in ordered))
