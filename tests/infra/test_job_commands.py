"""Every job command in infra/ (RayJob entrypoints, the launcher config, infra/README.md) is run as
written, plus `--dry-run`: the script exists, argparse accepts the flags, the config and every
`--set` validate, and the job's own pre-flight checks pass.

What the commands expect to find is put in place first, as a user would have it: `s3://` buckets on
the moto server; `$HOME` is a temporary folder; a `--input` folder that is not on this machine (the
README's ImageNet path) becomes a small ImageNet-style stand-in; shards a config reads are written
by jobs/make_shards.py from that stand-in; a `--run` to generate from gets tiny tokenizer + VAR
exports. Jobs whose input is an earlier job's output (the token cache, a generated set) may stop
with the job's own one-line refusal naming that input: by then flags and config were accepted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import infra_files as infra
import numpy as np
import pytest
from infra_files import REPO
from PIL import Image

pytestmark = pytest.mark.s3

COMMANDS = infra.unique_commands()
CHAIN_JOBS = {"jobs/train_var.py", "jobs/train_tokenizer.py", "jobs/precompute_tokens.py", "jobs/train_gpt.py"}
# A job's own one-line refusal when an earlier job's output is not there yet: printed only after
# the flags, the config and the storage were accepted.
MISSING_EARLIER_OUTPUT = {
    "jobs/precompute_tokens.py": "run the step that makes it first",
    "jobs/train_gpt.py": "run the step that makes it first",
    "jobs/evaluate.py": "holds no generated set",
}


def _expand(token: str, variables: dict[str, str]) -> str:
    def substitute(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            pytest.fail(f"command uses ${name}, which the test does not know how to set")
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", substitute, token)


@pytest.fixture(scope="module")
def stand_in_images(tmp_path_factory) -> Path:
    """An ImageNet-style folder: two class folders of four RGB images each, not square."""
    root = tmp_path_factory.mktemp("imagenet-stand-in")
    rng = np.random.default_rng(0)
    for name in ("n01440764", "n01443537"):
        (root / name).mkdir()
        for index in range(4):
            pixels = rng.integers(0, 256, (280, 300, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{index}.png")
    return root


@pytest.fixture
def home(tmp_path) -> Path:
    """$HOME of one command: commands do not see each other's local outputs."""
    return tmp_path


@pytest.fixture(scope="module")
def job_env(s3_endpoint) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env["AWS_ENDPOINT_URL"] = s3_endpoint
    return env


def _create_bucket(uri: str) -> None:
    import boto3

    bucket = uri[len("s3://"):].split("/", 1)[0]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)


def _run(argv: list[str], env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _seed_shards(argv: list[str], images: Path, env: dict[str, str]) -> None:
    """Write the shards the chain config reads (train + validation), unless the config creates them."""
    from pipeline.chain.cli import chain_parser, load_chain_config
    from pipeline.core.storage import exists, join_uri

    config = load_chain_config(chain_parser(argv[0], "").parse_args(argv[1:]))
    data = config.data
    if data.create is not None or exists(join_uri(data.train.shards_uri, "index.json")):
        return
    root = data.shards_root
    if data.validation is not None and data.validation.shards_uri.rstrip("/") != join_uri(root, "validation"):
        pytest.fail(f"cannot stand in for validation shards at {data.validation.shards_uri}")
    if root.startswith("s3://"):
        _create_bucket(root)
    result = _run(["jobs/make_shards.py", "--source", "folder", "--input", str(images),
                   "--image-size", str(data.train.image_size or 256), "--channels", str(data.train.channels or 3),
                   "--val-fraction", "0.5", "--output", root], env)
    assert result.returncode == 0, f"seeding shards failed:\n{result.stderr[-2000:]}"


def _seed_exports(run_uri: str) -> None:
    """Tiny tokenizer + VAR exports where a train_var run keeps them, if the run has none."""
    from pipeline.core.exports import save_tokenizer, save_var
    from pipeline.core.storage import exists, join_uri
    from var_model import TOKENIZER_PRESETS, VAR, VAR_PRESETS, VQVAE

    tokenizer_uri, var_uri = join_uri(run_uri, "tokenizer", "export"), join_uri(run_uri, "gpt", "export")
    if exists(join_uri(tokenizer_uri, "config.json")):
        return
    tokenizer = TOKENIZER_PRESETS["tiny"]
    # The transformer must be built for this tokenizer (the job checks scales, codebook, latent width).
    var = dataclasses.replace(VAR_PRESETS["tiny"], scales=tokenizer.scales, codebook_size=tokenizer.codebook_size,
                              embed_dim=tokenizer.embed_dim)
    save_tokenizer(VQVAE(tokenizer), tokenizer_uri)
    save_var(VAR(var), var_uri)


def _prepare(argv: tuple[str, ...], home: Path, images: Path, env: dict[str, str]) -> list[str]:
    args = [_expand(token, {"HOME": str(home)}) for token in argv]
    for index, token in enumerate(args[:-1]):
        if token == "--input" and not args[index + 1].startswith("s3://") and not Path(args[index + 1]).exists():
            args[index + 1] = str(images)
    for token in args:
        for uri in re.findall(r"s3://[^\s,]+", token):
            _create_bucket(uri)
    if args[0] in CHAIN_JOBS:
        _seed_shards(args, images, env)
    if args[0] == "jobs/generate_dataset.py" and "--run" in args:
        _seed_exports(args[args.index("--run") + 1])
    return args


@pytest.mark.timeout(600)
@pytest.mark.parametrize("argv", list(COMMANDS), ids=[" | ".join(sources) for sources in COMMANDS.values()])
def test_job_command_dry_run(argv, home, stand_in_images, job_env):
    assert (REPO / argv[0]).is_file(), f"{argv[0]} does not exist"
    args = _prepare(argv, home, stand_in_images, job_env)
    result = _run([*args, "--dry-run"], job_env)
    where = ", ".join(COMMANDS[argv])
    if result.returncode != 0:
        missing = MISSING_EARLIER_OUTPUT.get(argv[0])
        if missing and result.returncode == 2 and missing in result.stderr:
            print(f"{where}: accepted; stopped at its missing input: {result.stderr.strip().splitlines()[-1]}")
            return
        pytest.fail(f"{where}: exit {result.returncode}\n{result.stderr[-3000:]}")
    plan = json.loads(result.stdout.strip().splitlines()[-1])
    assert plan.get("dry_run") is True, f"{where}: {plan}"


def test_submitted_commands_use_absolute_locations():
    """Under `ray job submit --working-dir .` a job runs in Ray's temporary copy of the code: a relative
    storage or data path would be written there and lost. Every location a submitted command ends
    up with (flags, --set, and the config's own defaults) must be absolute or s3://."""
    from jobs.generate_dataset import build_parser as generate_parser
    from pipeline.chain.cli import chain_parser, load_chain_config

    submitted = [(number, line) for number, line in infra.readme_shell_lines()
                 if "ray job submit" in line and not line.lstrip().startswith("#")]
    assert submitted, "infra/README.md shows no `ray job submit`"
    for number, line in submitted:
        where = f"infra/README.md:{number}"
        assert "--working-dir ." in line and "--runtime-env infra/runtime_env.yaml" in line, where
        argv = infra.job_argv(line)
        assert argv is not None, f"{where}: submits no `python jobs/...`"
        args = [_expand(token, {"HOME": "/home/user"}) for token in argv]
        if args[0] in CHAIN_JOBS:
            config = load_chain_config(chain_parser(args[0], "").parse_args(args[1:]))
            locations = [config.storage.root, config.data.train.shards_uri]
            locations += [config.data.validation.shards_uri] if config.data.validation else []
        elif args[0] == "jobs/generate_dataset.py":
            parsed = generate_parser().parse_args(args[1:])
            locations = [parsed.run, parsed.output]
        elif args[0] == "jobs/evaluate.py":
            paths = _evaluation_paths(args[1:])
            locations = [paths.generated, paths.output, paths.cache]
        else:
            locations = [value for flag in ("--input", "--output", "--storage") for value in
                         [infra.JobCommand(where, tuple(args)).option(flag)] if value]
        for location in locations:
            assert location.startswith(("s3://", "/")), f"{where}: {location} is relative"


def _evaluation_paths(argv: list[str]):
    """The locations jobs/evaluate.py resolves from its flags and config (its own resolve_paths)."""
    from jobs.evaluate import build_parser as evaluate_parser
    from pipeline.core.configuration import load_config
    from pipeline.core.storage import join_uri
    from pipeline.evaluation.config import EvaluateConfig
    from pipeline.evaluation.run import resolve_paths

    args = evaluate_parser().parse_args(argv)
    run = args.run or (join_uri(args.storage, args.run_name) if args.storage and args.run_name else None)
    config = load_config(EvaluateConfig, args.config, args.overrides,
                         extra={"model.run": run, "generated": args.generated, "output": args.output})
    return resolve_paths(config)
