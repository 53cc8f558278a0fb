"""`GenerateConfig`: what to generate (the plan), with which model and sampling, where, on how many actors.

Presets (`preset:` / `--preset`) fill in what the user did not set; anything given explicitly wins:
- `fid-50k-style`: VAR's FID protocol, 50 images of every class (50,000 on ImageNet's 1,000) with the
  official FID sampling (cfg 1.5, top-k 900, top-p 0.96; var_model.OFFICIAL_FID_SAMPLING);
- `no-guidance`: the same 50 per class from the model's own distribution (cfg 0, no top-k, top-p 1;
  var_model.NO_GUIDANCE_SAMPLING).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pipeline.core.configuration import SamplingSection, StrictModel
from pipeline.core.storage import Location
from var_model import NO_GUIDANCE_SAMPLING, OFFICIAL_FID_SAMPLING, SamplingSettings

PresetName = Literal["fid-50k-style", "no-guidance"]
# preset -> (images of every class, sampling): VAR's FID protocol is 50 per class.
PRESETS: dict[str, tuple[int, SamplingSettings]] = {
    "fid-50k-style": (50, OFFICIAL_FID_SAMPLING),
    "no-guidance": (50, NO_GUIDANCE_SAMPLING),
}


def apply_preset(tree: dict[str, Any]) -> dict[str, Any]:
    """The raw config with its preset's values filled in where the user gave none (explicit values win)."""
    name = tree.get("preset")
    if name not in PRESETS:
        return tree  # no preset, or an unknown name that validation reports with the field
    per_class, sampling = PRESETS[name]
    tree = dict(tree)
    plan = tree.get("plan") or {}
    if isinstance(plan, dict) and plan.get("per_class") is None and plan.get("classes") is None:
        tree["plan"] = {**plan, "per_class": per_class}
    given = tree.get("sampling") or {}
    if isinstance(given, dict):  # anything else is reported by validation, naming the field
        tree["sampling"] = {**sampling.as_kwargs(), **given}
    return tree


class ModelSection(StrictModel):
    """The two exports (pipeline.core.exports folders); `run` is a shortcut for a train_var run folder."""

    run: Location | None = Field(None, description="a train_var run folder (<storage>/<run_name>); fills tokenizer/var")
    tokenizer: Location | None = Field(None, description="tokenizer export URI (model.safetensors + config.json)")
    var: Location | None = Field(None, description="VAR transformer export URI")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if self.run is None and (self.tokenizer is None or self.var is None):
            raise PydanticCustomError("model", "give model.run, or both model.tokenizer and model.var")
        return self


class PlanSection(StrictModel):
    """(label, seed) pairs: `per_class` images of every class, or `classes` {class name or index: count}."""

    per_class: int | None = Field(None, ge=0, description="images of every class")
    classes: dict[str, Annotated[int, Field(ge=0)]] | None = Field(None, description="class name or index -> count")
    seed: int = Field(0, ge=0, description="plan seed; each sample's seed derives from (seed, label, index)")
    unit_size: int = Field(256, ge=1, description="images per work unit = per output file")

    @field_validator("classes", mode="before")
    @classmethod
    def _keys_as_text(cls, value):
        # YAML reads `{3: 10}` with an int key; names and indices are both looked up as text.
        return {str(key): count for key, count in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _counts(self) -> PlanSection:
        if (self.per_class is None) == (self.classes is None):
            raise PydanticCustomError("plan", "give exactly one of plan.per_class and plan.classes")
        return self


class GenerationSamplingSection(SamplingSection):
    batch_size: int = Field(64, ge=1, description="images per generate() call inside an actor")


class ComputeSection(StrictModel):
    concurrency: int = Field(1, ge=1, description="generator actors")
    num_cpus: float = Field(1.0, gt=0, description="logical CPUs per actor on CPU (fractional is fine)")
    num_gpus: Literal["auto"] | float = Field("auto", description="GPUs per actor; auto: 1 when the cluster has GPUs")
    threads: int | None = Field(None, ge=1, description="torch threads per actor; default max(1, num_cpus)")
    local_num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray started by the job")

    @model_validator(mode="after")
    def _gpus(self) -> ComputeSection:
        if self.num_gpus != "auto" and self.num_gpus < 0:
            raise PydanticCustomError("num_gpus", "compute.num_gpus must be >= 0 or 'auto' (got {value})",
                                      {"value": self.num_gpus})
        return self

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))


class OutputSection(StrictModel):
    uri: Location = Field(..., min_length=1, description="local folder or s3://bucket/prefix of the generated set")
    webdataset: bool = Field(False, description="also write WebDataset shards of the same samples")
    class_names: list[str] | None = Field(None, description="default: from the exports, else the index as text")
    npz: Location | None = Field(None, description="also export the set as one .npz (uint8 [N,H,W,3] under arr_0, "
                                                  "labels under arr_1), as the OpenAI guided-diffusion evaluator "
                                                  "reads it; a file URI ending in .npz")

    @field_validator("npz")
    @classmethod
    def _npz_suffix(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith(".npz"):
            raise ValueError(f"must be a file name ending in .npz (got {value!r})")
        return value


class GenerateConfig(StrictModel):
    preset: PresetName | None = Field(None, description="fid-50k-style: 50 per class, official FID sampling; "
                                                        "no-guidance: 50 per class, cfg 0, top-k 0, top-p 1")
    model: ModelSection
    plan: PlanSection
    sampling: GenerationSamplingSection = GenerationSamplingSection()
    compute: ComputeSection = ComputeSection()
    output: OutputSection

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return apply_preset(data) if isinstance(data, dict) else data
