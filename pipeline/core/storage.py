"""Every location is a URI: `s3://bucket/prefix` or a local path. This module alone knows which.

It turns a URI into the filesystem each library wants: a pyarrow filesystem (Ray Data, Ray Train
storage) or an fsspec one (s3fs; webdataset writing). Endpoint, region and credentials come from
the standard AWS variables or from `StorageOptions`. pyarrow ignores `AWS_ENDPOINT_URL`, so the
endpoint is passed to it explicitly as `endpoint_override` with the scheme taken from the URL.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlparse

import fsspec
import pyarrow.fs as pafs
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo

from pipeline.core.errors import VarrayError

S3_PREFIX = "s3://"
DEFAULT_CONNECT_TIMEOUT = 2.0  # seconds per connection attempt
DEFAULT_MAX_ATTEMPTS = 3


class StorageError(VarrayError, OSError):
    """A storage location is missing, unreachable or refused; the message names the URI."""


class StorageOptions(BaseModel):
    """S3 connection settings; None means 'let the library's default chain decide'."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    # Bounded retries: an unreachable endpoint fails in well under 10 s instead of retrying for half a
    # minute. Applied to s3fs (botocore config) and pyarrow alike; env VARRAY_S3_CONNECT_TIMEOUT /
    # VARRAY_S3_MAX_ATTEMPTS override the defaults.
    connect_timeout: float = Field(default=DEFAULT_CONNECT_TIMEOUT, gt=0, allow_inf_nan=False)  # seconds
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1)  # tries per request, the first included

    @classmethod
    def from_env(cls) -> StorageOptions:
        """Read the standard AWS_* variables (AWS_ENDPOINT_URL_S3 wins over AWS_ENDPOINT_URL) and
        VARRAY_S3_CONNECT_TIMEOUT / VARRAY_S3_MAX_ATTEMPTS."""
        env = os.environ
        try:
            return cls(
                endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
                region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
                access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                session_token=env.get("AWS_SESSION_TOKEN") or None,
                **{name: cls._env_number(name, variable, env[variable]) for variable, name in (
                    ("VARRAY_S3_CONNECT_TIMEOUT", "connect_timeout"), ("VARRAY_S3_MAX_ATTEMPTS", "max_attempts"))
                   if env.get(variable)},
            )
        except ValidationError as exc:
            error = exc.errors()[0]
            variable = {"connect_timeout": "VARRAY_S3_CONNECT_TIMEOUT", "max_attempts": "VARRAY_S3_MAX_ATTEMPTS"}.get(
                str(error["loc"][0]), str(error["loc"][0]))
            raise StorageError(f"{variable}: {error['msg']} (got {error.get('input')!r})") from None

    @staticmethod
    def _env_number(name: str, variable: str, text: str) -> float | int:
        try:
            return int(text) if name == "max_attempts" else float(text)
        except ValueError:
            raise StorageError(f"{variable}: not a number (got {text!r})") from None


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def absolute_uri(uri: str) -> str:
    """`uri` as every process can read it: an s3:// URI as it is (it must name a bucket), a local
    path made absolute against this process's working directory (`~` expanded).

    Called in the driver, before any Ray task or worker starts: Ray runs workers and actors in a
    folder of its own, where a relative path would mean something else.
    """
    uri = str(uri)
    if is_s3(uri):
        if not _strip_scheme(uri).split("/", 1)[0]:
            raise ValueError(f"{uri!r} names no bucket: give s3://bucket/prefix")
        return uri
    if not uri:
        raise ValueError("an empty location: give a local folder or s3://bucket/prefix")
    return os.path.abspath(os.path.expanduser(uri))


RELATIVE_LOCATIONS = "relative_locations"  # validation-context key: where the relative inputs are recorded


def _location(value: str, info: ValidationInfo) -> str:
    resolved = absolute_uri(value)
    if info.context is not None and resolved != value and not value.startswith(("/", "~")):
        info.context.setdefault(RELATIVE_LOCATIONS, []).append(f"{info.field_name}={value}")
    return resolved


# A config field holding a location: validated (an S3 URI names its bucket) and made absolute as the
# config is loaded, in the driver. load_config records which ones were given relative, so a job that
# joins a multi-node cluster can refuse them (pipeline.core.ray_runtime).
Location = Annotated[str, AfterValidator(_location)]


def _strip_scheme(uri: str) -> str:
    return str(uri)[len(S3_PREFIX):].rstrip("/") if is_s3(uri) else str(uri)


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a URI with '/' (S3) or the OS separator (local)."""
    base = str(base)
    if is_s3(base):
        return posixpath.join(base.rstrip("/"), *(p.strip("/") for p in parts))
    return os.path.join(base, *parts)


def _options(options: StorageOptions | None) -> StorageOptions:
    return options if options is not None else StorageOptions.from_env()


def pyarrow_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path without scheme) for Ray Data reads and Ray Train storage."""
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    opts = _options(options)
    kwargs: dict[str, Any] = {"connect_timeout": opts.connect_timeout,
                              "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=opts.max_attempts)}
    if opts.endpoint_url:
        parsed = urlparse(opts.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if opts.region:
        kwargs["region"] = opts.region
    if opts.access_key_id:
        kwargs["access_key"] = opts.access_key_id
        kwargs["secret_key"] = opts.secret_access_key
        if opts.session_token:
            kwargs["session_token"] = opts.session_token
    return pafs.S3FileSystem(**kwargs), _strip_scheme(uri)


def fsspec_filesystem(uri: str, options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path without scheme): s3fs for S3, the local filesystem otherwise."""
    if not is_s3(uri):
        return fsspec.filesystem("file"), os.path.abspath(uri)
    return _s3fs(_options(options)), _strip_scheme(uri)


@functools.lru_cache(maxsize=8)
def _s3fs(opts: StorageOptions) -> fsspec.AbstractFileSystem:
    """One s3fs instance per set of options: each new one costs a session set-up (~0.2 s)."""
    import s3fs

    client_kwargs: dict[str, Any] = {}
    if opts.region:
        client_kwargs["region_name"] = opts.region
    fs = s3fs.S3FileSystem(
        endpoint_url=opts.endpoint_url, key=opts.access_key_id, secret=opts.secret_access_key,
        token=opts.session_token, client_kwargs=client_kwargs,
        # botocore retries (standard mode: connection errors, throttling, 5xx), bounded; s3fs's own retry
        # loop on top would multiply them, so it tries once.
        config_kwargs={"connect_timeout": opts.connect_timeout,
                       "retries": {"max_attempts": opts.max_attempts, "mode": "standard"}},
        # Our own cache above is keyed by the options; s3fs's listing cache would hide new files.
        skip_instance_cache=True, use_listings_cache=False,
    )
    fs.retries = 1
    return fs


def _describe(uri: str, exc: BaseException) -> StorageError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    lowered = text.lower()
    if isinstance(exc, PermissionError) or any(word in lowered for word in (
            "accessdenied", "access denied", "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch",
            "403")):
        return StorageError(f"{uri}: access denied (check AWS credentials / endpoint): {text}")
    if isinstance(exc, FileNotFoundError) or "nosuchbucket" in lowered or "nosuchkey" in lowered:
        return StorageError(f"{uri}: does not exist")
    return StorageError(f"{uri}: {text}")


@contextlib.contextmanager
def _described(uri: str) -> Iterator[None]:
    """Any failure inside as one StorageError naming `uri` (s3fs/botocore raise many types)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        raise _describe(uri, exc) from exc


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = fsspec_filesystem(uri, options)
    with _described(uri):
        with fs.open(path, "rb") as f:
            return f.read()


def sha256_of(uri: str, options: StorageOptions | None = None, chunk_size: int = 8 << 20) -> str:
    """Hex sha256 of one file, read in chunks (a multi-GB checkpoint never sits in memory whole)."""
    fs, path = fsspec_filesystem(uri, options)
    digest = hashlib.sha256()
    with _described(uri):
        with fs.open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                digest.update(chunk)
    return digest.hexdigest()


def write_bytes_atomic(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Publish `data` at `uri` all at once: readers see the old file or the whole new one.

    Local: write a temp file in the same folder, then os.replace. S3: a single PUT is atomic.
    """
    fs, path = fsspec_filesystem(uri, options)
    with _described(uri):
        if is_s3(uri):
            fs.pipe_file(path, data)
            return
        folder = Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{Path(path).name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(temp, 0o644)  # mkstemp makes 0600; a published file is readable like any other
            os.replace(temp, path)
        except BaseException:
            if os.path.exists(temp):
                os.unlink(temp)
            raise


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = fsspec_filesystem(uri, options)
    with _described(uri):
        return bool(fs.exists(path))


def file_size(uri: str, options: StorageOptions | None = None) -> int:
    """Size in bytes of one file; StorageError if it does not exist."""
    fs, path = fsspec_filesystem(uri, options)
    with _described(uri):
        return int(fs.size(path))


def list_files(uri: str, suffix: str = "", options: StorageOptions | None = None) -> list[str]:
    """URIs of the files directly under `uri` whose names end with `suffix`, sorted."""
    fs, path = fsspec_filesystem(uri, options)
    with _described(uri):
        entries = fs.ls(path, detail=True)
    names = sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file")
    return [join_uri(uri, name) for name in names if name.endswith(suffix)]


def remove(uri: str, options: StorageOptions | None = None) -> None:
    """Delete a file or a whole folder/prefix; a missing one is not an error."""
    fs, path = fsspec_filesystem(uri, options)
    with _described(uri):
        if fs.exists(path):
            fs.rm(path, recursive=True)


STAGING_SUFFIX = ".tmp"


def is_staging_name(name: str, final_name: str) -> bool:
    """Whether `name` is one of this module's staging names for `final_name` (`.<final>.<8 chars>.tmp`)."""
    return re.fullmatch(rf"\.{re.escape(final_name)}\.[a-z0-9_]{{8}}{re.escape(STAGING_SUFFIX)}", name) is not None


class StagedOutput:
    """A binary write stream published under its final name only by `close()`; `discard()` removes what
    it wrote and nothing else. Local: a staging file in the same folder, then os.replace. S3: the
    (multipart) upload, which S3 publishes whole at the end or not at all. Errors are StorageErrors."""

    def __init__(self, uri: str, options: StorageOptions | None = None):
        self.uri = uri
        self.closed = False
        self._discarded = False
        fs, path = fsspec_filesystem(uri, options)
        try:
            if is_s3(uri):
                self._staging = None
                self._file = fs.open(path, "wb")
            else:
                folder = Path(path).parent
                folder.mkdir(parents=True, exist_ok=True)
                fd, self._staging = tempfile.mkstemp(dir=folder, prefix=f".{Path(path).name}.",
                                                     suffix=STAGING_SUFFIX)
                self._file = os.fdopen(fd, "wb")
        except Exception as exc:
            raise _describe(uri, exc) from exc
        self._path = path

    def write(self, data: bytes) -> int:
        if self._discarded:  # e.g. tarfile's finaliser flushing into a dropped shard: nothing to publish
            return len(data)
        try:
            return self._file.write(data)
        except Exception as exc:
            self.discard()
            raise _describe(self.uri, exc) from exc

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        pass  # close() publishes; a flush of an S3 file would upload a part early

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._file.close()
            if self._staging is not None:
                os.chmod(self._staging, 0o644)
                os.replace(self._staging, self._path)
        except Exception as exc:
            self.discard()
            raise _describe(self.uri, exc) from exc
        self.closed = True

    def discard(self) -> None:
        """Drop the unfinished output: the staging file (local) or the pending upload (S3)."""
        if self.closed:
            return
        self.closed = self._discarded = True
        try:
            if self._staging is None:
                self._file.discard()
            else:
                self._file.close()
                if os.path.exists(self._staging):
                    os.unlink(self._staging)
        except Exception:  # a failed clean-up must not hide the error that caused it
            pass


def read_json_object(uri: str, what: str, error: type[Exception], options: StorageOptions | None = None) -> dict:
    """The JSON object stored at `uri`. StorageError if it cannot be read; `error` with one line naming
    the file and `what` it should be ("a valid shard index") if it is not JSON or not an object."""
    raw = read_bytes(uri, options)
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON
        raise error(f"{uri}: not {what}: not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise error(f"{uri}: not {what}: a JSON {type(value).__name__}, expected an object")
    return value


def list_tree(uri: str, options: StorageOptions | None = None) -> list[str]:
    """The names, relative to the folder `uri`, of every file and folder below it ([] when it does not
    exist); StorageError if it is a file or cannot be listed."""
    if not exists(uri, options):
        return []
    fs, root = fsspec_filesystem(uri, options)
    with _described(uri):
        if fs.isfile(root):
            raise StorageError(f"{uri}: is a file, not a folder")
        root = root.rstrip("/")
        return sorted(name for name in (path.rstrip("/")[len(root) + 1:] for path in fs.find(root, withdirs=True))
                      if name)


def move_aside(uri: str, options: StorageOptions | None = None) -> str | None:
    """Rename a file or folder to `<uri>.replaced-<UTC time>` so that a step can be made afresh without
    losing the old output; returns the new URI (None when nothing was there)."""
    fs, path = fsspec_filesystem(uri, options)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = f"{uri.rstrip('/')}.replaced-{stamp}"
    with _described(uri):
        if not fs.exists(path):
            return None
        fs.mv(path, fsspec_filesystem(target, options)[1], recursive=True)
    return target


def open_output(uri: str, options: StorageOptions | None = None):
    """A binary write stream at `uri` (parent folders made locally): for writers that stream, e.g. tar shards."""
    fs, path = fsspec_filesystem(uri, options)
    with _described(uri):
        if not is_s3(uri):
            fs.makedirs(posixpath.dirname(path) if os.sep == "/" else os.path.dirname(path), exist_ok=True)
        return fs.open(path, "wb")
