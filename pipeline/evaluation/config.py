"""`EvaluateConfig`: which run and generated set to judge, against which real images, at which N, where figures go.

Preset (`preset:` / `--preset`), filling in what the user did not set:
- `fashion-mnist`: the reference is Fashion-MNIST's own test split and the classifier's training data
  its train split, from the IDX files (the Debian package's, or `reference.folder`), at 28x28.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.core.configuration import StrictModel
from pipeline.core.storage import Location

PresetName = Literal["fashion-mnist"]
PRESETS: dict[str, dict[str, Any]] = {"fashion-mnist": {"reference": {"source": "fashion-mnist"}}}


class EvalModelSection(StrictModel):
    run: Location | None = Field(None, description="a train_var run folder; gives the exports, the data splits "
                                                   "and default paths")
    tokenizer: Location | None = Field(None, description="tokenizer export (default <run>/tokenizer/export)")
    var: Location | None = Field(None, description="VAR export (default <run>/gpt/export)")


class ReferenceSection(StrictModel):
    source: Literal["run", "shards", "fashion-mnist"] = Field(
        "run", description="run: the run's data.validation split; shards: reference.shards_uri; fashion-mnist: "
                           "its IDX test split")
    shards_uri: Location | None = Field(None, description="source shards: the reference split's folder")
    train_shards_uri: Location | None = Field(None, description="the train split (classifier, real-vs-real floor); "
                                                                "default: the run's data.train, else the split "
                                                                "the tokenizer export was trained on")
    label_key: str | None = Field(None, min_length=1, description="labels from this .json field instead of .cls "
                                                                  "(default: the run's)")
    folder: Location | None = Field(None, description="source fashion-mnist: folder of the IDX files "
                                                      "(default: the Debian package's)")

    @model_validator(mode="after")
    def _fields_of_the_source(self) -> ReferenceSection:
        if self.source == "shards" and self.shards_uri is None:
            raise ValueError("shards_uri: required with reference.source=shards")
        if self.source != "shards" and self.shards_uri is not None:
            raise ValueError(f"shards_uri: for reference.source=shards only (source is {self.source})")
        if self.source != "fashion-mnist" and self.folder is not None:
            raise ValueError(f"folder: for reference.source=fashion-mnist only (source is {self.source})")
        if self.source == "fashion-mnist" and (self.train_shards_uri or self.label_key):
            raise ValueError("train_shards_uri: not with reference.source=fashion-mnist (its train split is used)")
        return self


class FIDSection(StrictModel):
    samples: int = Field(1000, ge=0, description="N per side for every Inception figure (FID, KID, precision/"
                                                 "recall) and its real-vs-real floor; 0 skips them (slow: ~5-10 "
                                                 "img/s on 2 CPU cores)")
    batch_size: int = Field(16, ge=1)


class KIDSection(StrictModel):
    subsets: int = Field(100, ge=1, description="random subsets the MMD is averaged over")
    subset_size: int = Field(1000, ge=2, description="images per side in a subset (capped at N)")


class PrecisionRecallSection(StrictModel):
    k: int = Field(3, ge=1, description="k-th nearest neighbour radius of the manifold estimate")


class InceptionScoreSection(StrictModel):
    splits: int = Field(10, ge=1)


class FeatureSection(StrictModel):
    samples: int = Field(10000, ge=0, description="N per side for the classifier-feature Frechet distance; 0 skips")


class ClassifierSection(StrictModel):
    epochs: int = Field(1, ge=1)
    min_steps: int = Field(200, ge=0, description="train at least this many steps (small data: more epochs)")
    train_samples: int = Field(60000, ge=1, description="train images it learns from (at most the split)")
    image_size: int | None = Field(None, ge=8, description="its input size (default: the reference's, at most 32)")
    seed: int = 0
    cache: Location | None = Field(None, description="weights file URI (default <cache>/classifier_<digest>"
                                                     ".safetensors, the digest of its data and recipe)")


class ReconstructionSection(StrictModel):
    samples: int = Field(1000, ge=0, description="reference images run through encode -> decode; 0 skips")
    batch_size: int = Field(256, ge=1)


class EvaluateConfig(StrictModel):
    preset: PresetName | None = Field(None, description="fashion-mnist: judge against Fashion-MNIST's IDX splits")
    model: EvalModelSection = EvalModelSection()
    generated: Location | None = Field(None, description="generated set URI (default <run>/generated)")
    output: Location | None = Field(None, description="where metrics.json and the PNGs go (default <run>/eval)")
    cache: Location | None = Field(None, description="cache of classifier weights and real-image features "
                                                     "(default: eval_cache next to the run)")
    reference: ReferenceSection = ReferenceSection()
    fid: FIDSection = FIDSection()
    kid: KIDSection = KIDSection()
    precision_recall: PrecisionRecallSection = PrecisionRecallSection()
    inception_score: InceptionScoreSection = InceptionScoreSection()
    features: FeatureSection = FeatureSection()
    classifier: ClassifierSection = ClassifierSection()
    reconstruction: ReconstructionSection = ReconstructionSection()
    grid_per_class: int = Field(10, ge=1, le=64, description="columns of the sample grid")
    seed: int = Field(0, description="which real and generated images form each N-sample subset")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's)")

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        """The preset's values under whatever the user set (explicit values win)."""
        if not isinstance(data, dict) or data.get("preset") not in PRESETS:
            return data
        merged = dict(data)
        for section, values in PRESETS[data["preset"]].items():
            given = merged.get(section) or {}
            if isinstance(given, dict):
                merged[section] = {**values, **given}
        return merged
