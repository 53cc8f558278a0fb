"""`TrainVarConfig`: the whole chain's typed config (data -> tokenizer -> token cache -> GPT -> samples).

Each section reuses its stage's own config class (B's `ImageDataConfig`, D1's `TokenizerStageConfig`
and `GPTStageConfig`), so a field means the same in a stage job and in the chain. Cross-field rules
(the tokenizer and the transformer must agree on scales, codebook size and latent width; the data
must match the tokenizer's image size and channels) are checked in one model validator, before
any work, with one line naming the offending field.
"""

from __future__ import annotations

import posixpath
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline.core.configuration import GpuCount, SamplingSection, StrictModel
from pipeline.core.layout import RunLayout
from pipeline.core.storage import Location, join_uri
from pipeline.data.reader import ImageDataConfig
from pipeline.train.config import GPTStageConfig, TokenizerStageConfig
from var_model import TokenizerConfig, VARConfig

RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


def field_error(loc: tuple[str, ...], message: str, value: Any) -> ValidationError:
    """A ValidationError located at `loc`, so the one-line message names the field, not the root."""
    return ValidationError.from_exception_data("TrainVarConfig", [InitErrorDetails(
        type=PydanticCustomError("chain_config", message), loc=loc, input=value)])


class CreateShardsSection(StrictModel):
    """Optional: write the shards first when `data.train.shards_uri` has no index.json yet.

    From Fashion-MNIST (shipped as a Debian package; its official splits: `<root>/train` and
    `<root>/test`) or from an ImageNet-style image folder (`<root>/train`, and `<root>/validation`
    carved by `val_fraction`), through the same make_shards as jobs/make_shards.py. The shards go to
    the parent folder of the train split, at `data.train.image_size` and `data.train.channels`.
    """

    source: Literal["fashion-mnist", "folder"] = "fashion-mnist"
    input: Location | None = None  # Fashion-MNIST: the IDX files (default: the Debian package's); folder: required
    labels: Location | None = Field(None, description="folder: label manifest, JSON or CSV (folder -> class id "
                                                      "and name); None: class i is the i-th sorted folder name")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="folder: share of the images carved into "
                                                                 "<root>/validation")
    workers: int | None = Field(None, ge=1, description="folder: processes (Ray tasks in the chain) writing "
                                                        "shards; None: the machine's CPUs")
    limit: int | None = Field(None, ge=1, description="at most this many samples per split (tests)")
    samples_per_shard: int = Field(1000, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _check_source(self) -> CreateShardsSection:
        if self.source == "folder" and self.input is None:
            raise ValueError("input: an image folder is required for source 'folder'")
        if self.source == "fashion-mnist":
            for name in ("labels", "workers"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: for source 'folder' only")
            if self.val_fraction:
                raise ValueError("val_fraction: for source 'folder' only (Fashion-MNIST's validation is its test "
                                 "split)")
        return self

    @property
    def validation_split(self) -> str:
        """The split folder make_shards writes the held-out images to."""
        return "test" if self.source == "fashion-mnist" else "validation"


class DataSection(StrictModel):
    train: ImageDataConfig  # the split the tokenizer trains on and the token cache encodes
    validation: ImageDataConfig | None = None  # held-out split: evaluation, and the GPT stage's validate_every
    create: CreateShardsSection | None = None
    max_skipped_fraction: float = Field(0.01, ge=0, le=1, description=(
        "a step that loses more than this share of the split to bad samples (skipped samples and the "
        "samples inside skipped shards) fails instead of finishing"))

    @model_validator(mode="after")
    def _check_create(self) -> DataSection:
        if self.create is None:
            return self
        # make_shards writes Fashion-MNIST's official splits as <root>/train and <root>/test, a folder's as
        # <root>/train and (with val_fraction) <root>/validation.
        if self.validation is not None and self.create.source == "folder" and not self.create.val_fraction:
            raise field_error(("create", "val_fraction"), "must be > 0 to create data.validation from the "
                              "image folder", self.create.val_fraction)
        for name, split, expected in (("train", self.train, "train"),
                                      ("validation", self.validation, self.create.validation_split)):
            if split is not None and posixpath.basename(split.shards_uri.rstrip("/")) != expected:
                raise field_error((name, "shards_uri"), f"with data.create the split folder must end in "
                                  f"/{expected}", split.shards_uri)
        return self

    @property
    def shards_root(self) -> str:
        return posixpath.dirname(self.train.shards_uri.rstrip("/"))


class CacheSection(StrictModel):
    """The token-cache batch-inference job (pipeline.token_cache.cache)."""

    batch_size: int = Field(256, ge=1, description="images per encoder call")
    concurrency: int = Field(1, ge=1, description="encoder actors")
    num_cpus: float = Field(1.0, gt=0, description="logical CPUs per encoder actor (fractional is fine)")
    num_gpus: GpuCount = Field("auto", description="GPUs per encoder actor; auto: 1 when the cluster has GPUs")
    flip: bool = Field(False, description="also store the horizontally flipped image's tokens")


class SampleSection(SamplingSection):
    """The sample grid at the end of the chain: one row per class, `per_class` columns."""

    classes: list[int] | None = Field(None, description="class indices, one grid row each; None: the first "
                                                        "min(10, num_classes)")
    per_class: int = Field(8, ge=1, le=64)
    seed: int = 0


class StorageSection(StrictModel):
    root: Location = Field("./runs", validate_default=True,
                           description="local folder or s3://bucket/prefix holding every run (relative: against the working directory)")
    run_name: str = Field("var", pattern=RUN_NAME_PATTERN)


class TrainVarConfig(StrictModel):
    data: DataSection
    tokenizer: TokenizerStageConfig
    cache: CacheSection = CacheSection()
    gpt: GPTStageConfig
    sample: SampleSection = SampleSection()
    storage: StorageSection = StorageSection()

    @model_validator(mode="after")
    def _check_chain(self) -> TrainVarConfig:
        # Each stage config has already checked its own preset and model overrides.
        tokenizer = self.tokenizer.tokenizer_config()
        try:  # the transformer's scales, codebook size and latent width are the tokenizer's
            var = self.gpt.var_config(tokenizer)
        except ValueError as exc:
            field, _, message = str(exc).partition(": ")
            raise field_error(("gpt", *field.split(".")), message.rsplit(" (got ", 1)[0],
                              self.gpt.model.get(field.split(".")[-1])) from None
        for split_name in ("train", "validation"):
            split = getattr(self.data, split_name)
            if split is None:
                continue
            # Data image size and channels default to the tokenizer's; a different value given is refused.
            for field, theirs in (("image_size", tokenizer.image_size), ("channels", tokenizer.in_channels)):
                if getattr(split, field) is None:
                    setattr(split, field, theirs)
                elif getattr(split, field) != theirs:
                    raise field_error(("data", split_name, field), f"must equal the tokenizer's "
                                      f"{'in_channels' if field == 'channels' else field} {theirs}",
                                      getattr(split, field))
        for index, label in enumerate(self.sample.classes or []):
            if not 0 <= label < var.num_classes:
                raise field_error(("sample", "classes", str(index)), f"must be a class index in "
                                  f"0..{var.num_classes - 1}", label)
        return self

    @property
    def layout(self) -> RunLayout:
        """Where this run's steps read and write (pipeline.core.layout)."""
        return RunLayout.of(join_uri(self.storage.root, self.storage.run_name))

    @property
    def tokenizer_model(self) -> TokenizerConfig:
        return self.tokenizer.tokenizer_config()

    @property
    def var_model(self) -> VARConfig:
        return self.gpt.var_config(self.tokenizer_model)

    @property
    def sample_classes(self) -> list[int]:
        if self.sample.classes is not None:
            return list(self.sample.classes)
        return list(range(min(10, self.var_model.num_classes)))


__all__ = ["TrainVarConfig", "DataSection", "CreateShardsSection", "CacheSection", "SampleSection",
           "StorageSection", "field_error"]
