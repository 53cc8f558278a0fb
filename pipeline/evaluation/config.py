"""`EvaluateConfig`: which run and generated set to judge, at which sample counts, and where figures go."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.configuration import StrictModel
from pipeline.core.storage import Location


class EvalModelSection(StrictModel):
    run: Location | None = Field(None, description="a train_var run folder; gives the exports and default paths")
    tokenizer: Location | None = Field(None, description="tokenizer export (default <run>/tokenizer/export)")
    var: Location | None = Field(None, description="VAR export (default <run>/gpt/export)")


class ReferenceSection(StrictModel):
    source: Literal["fashion-mnist"] = "fashion-mnist"
    folder: Location | None = Field(None, description="folder of the IDX files (default: the Debian package's)")


class FIDSection(StrictModel):
    samples: int = Field(500, ge=0, description="N per side for Inception FID; 0 skips it (slow: ~5-10 img/s "
                                                "on 2 CPU cores)")
    batch_size: int = Field(16, ge=1)


class FeatureSection(StrictModel):
    samples: int = Field(10000, ge=0, description="N per side for the classifier-feature Frechet distance; 0 skips")


class ClassifierSection(StrictModel):
    epochs: int = Field(1, ge=1)
    seed: int = 0
    cache: Location | None = Field(None, description="weights file URI (default <cache>/fashion_classifier.safetensors)")


class ReconstructionSection(StrictModel):
    samples: int = Field(1000, ge=0, description="test images run through encode -> decode; 0 skips")
    batch_size: int = Field(256, ge=1)


class EvaluateConfig(StrictModel):
    model: EvalModelSection = EvalModelSection()
    generated: Location | None = Field(None, description="generated set URI (default <run>/generated)")
    output: Location | None = Field(None, description="where metrics.json and the PNGs go (default <run>/eval)")
    cache: Location | None = Field(None, description="cache of classifier weights and real-image features "
                                                "(default: eval_cache next to the run)")
    reference: ReferenceSection = ReferenceSection()
    fid: FIDSection = FIDSection()
    features: FeatureSection = FeatureSection()
    classifier: ClassifierSection = ClassifierSection()
    reconstruction: ReconstructionSection = ReconstructionSection()
    grid_per_class: int = Field(10, ge=1, le=64, description="columns of the sample grid")
    seed: int = Field(0, description="which real images form each N-sample subset")
    threads: int | None = Field(None, ge=1, description="torch threads (default: torch's)")
