"""Where everything of one run lives, `<storage>/<run>/`, in one place (chain, harness, generation,
evaluation and the demo all read it from here):

  config.json              the resolved TrainVarConfig the finished steps were made with
  tokenizer/               Ray Train run of stage 1 (checkpoints); tokenizer/export/ the tokenizer export
  token_cache/             Parquet token cache of the train split (data/*.parquet + _SUCCESS.json)
  token_cache_validation/  the validation split's token cache (when the GPT stage validates)
  gpt/                     Ray Train run of stage 2; gpt/export/ the VAR export (gpt/samples/ its grids)
  samples.png              one row per class, labelled with the class names
  chain.json               what each chain step did and how long it took (written last)
  generated/               a generated set (jobs/generate_dataset.py, the demo)
  eval/                    evaluation figures of the generated set
  ../eval_cache/           reference statistics and the classifier, shared by the runs of one storage root
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from pipeline.core.storage import join_uri

EXPORT_DIR = "export"  # a training stage's export, inside its Ray Train run folder
TOKENIZER_RUN, GPT_RUN = "tokenizer", "gpt"


def stage_export(stage_run: str) -> str:
    """The export folder of a training stage's run folder."""
    return join_uri(stage_run, EXPORT_DIR)


@dataclass(frozen=True)
class RunLayout:
    """Every location of one run. A stage job run alone may point one input elsewhere
    (`dataclasses.replace(layout, tokenizer_export=...)`); the run's own folders stay where they are."""

    run: str
    config: str
    tokenizer_export: str
    token_cache: str
    validation_token_cache: str
    gpt_export: str
    samples: str
    summary: str
    generated: str
    evaluation: str
    evaluation_cache: str

    @classmethod
    def of(cls, run: str) -> RunLayout:
        return cls(
            run=run, config=join_uri(run, "config.json"),
            tokenizer_export=stage_export(join_uri(run, TOKENIZER_RUN)), token_cache=join_uri(run, "token_cache"),
            validation_token_cache=join_uri(run, "token_cache_validation"),
            gpt_export=stage_export(join_uri(run, GPT_RUN)), samples=join_uri(run, "samples.png"),
            summary=join_uri(run, "chain.json"), generated=join_uri(run, "generated"),
            evaluation=join_uri(run, "eval"),
            evaluation_cache=join_uri(posixpath.dirname(run.rstrip("/")), "eval_cache"))

    @property
    def tokenizer_run(self) -> str:
        return join_uri(self.run, TOKENIZER_RUN)

    @property
    def gpt_run(self) -> str:
        return join_uri(self.run, GPT_RUN)
