"""Read what infra/ declares: YAML documents, the Dockerfile's ARG defaults, the project's pins, and
every job command a manifest or infra/README.md names (the part after `python`)."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
CLUSTER_CONFIG = INFRA / "aws" / "cluster.yaml"
RUNTIME_ENV = INFRA / "runtime_env.yaml"
README = INFRA / "README.md"
YAML_FILES = sorted(INFRA.rglob("*.yaml"))
K8S_FILES = sorted((INFRA / "k8s").glob("*.yaml"))


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def yaml_documents(path: Path) -> list[Any]:
    with path.open() as stream:
        return [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def k8s_resources() -> list[tuple[str, dict[str, Any]]]:
    """(file, resource) for every document under infra/k8s/."""
    return [(rel(path), doc) for path in K8S_FILES for doc in yaml_documents(path)]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pinned_requirements() -> dict[str, Requirement]:
    """The project's dependencies by (lower-case) name."""
    return {Requirement(text).name.lower(): Requirement(text) for text in pyproject()["project"]["dependencies"]}


def exact_pin(requirement: Requirement) -> str:
    """The version of an `==` pin (the test fails if the dependency is not pinned exactly)."""
    versions = [spec.version for spec in requirement.specifier if spec.operator == "=="]
    assert len(versions) == 1, f"{requirement} is not pinned with =="
    return versions[0]


def dockerfile_args() -> dict[str, str]:
    """ARG defaults, quotes removed: `ARG RAY_VERSION=2.60.0` -> {"RAY_VERSION": "2.60.0"}."""
    args = {}
    for line in DOCKERFILE.read_text().splitlines():
        match = re.match(r"\s*ARG\s+(\w+)=(.*)$", line)
        if match:
            args[match.group(1)] = match.group(2).strip().strip('"')
    return args


def dockerfile_workdir() -> str:
    workdirs = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert len(workdirs) == 1, f"expected one WORKDIR in {rel(DOCKERFILE)}, found {workdirs}"
    return workdirs[0]


@dataclass(frozen=True)
class JobCommand:
    """One job invocation: where it is written and its argv after `python` (argv[0] = jobs/<name>.py)."""

    source: str
    argv: tuple[str, ...]

    @property
    def script(self) -> str:
        return self.argv[0]

    def option(self, flag: str) -> str | None:
        """The value after `flag` (last one wins, as argparse does)."""
        values = [self.argv[i + 1] for i, token in enumerate(self.argv[:-1]) if token == flag]
        return values[-1] if values else None

    def options(self, flag: str) -> list[str]:
        return [self.argv[i + 1] for i, token in enumerate(self.argv[:-1]) if token == flag]


def job_argv(command_line: str) -> tuple[str, ...] | None:
    """argv after `python` when the line runs `python jobs/...`, else None."""
    tokens = shlex.split(command_line, comments=True)
    for index, token in enumerate(tokens[:-1]):
        if token in ("python", "python3") and tokens[index + 1].startswith("jobs/"):
            return tuple(tokens[index + 1:])
    return None


def shell_lines(markdown: str) -> list[tuple[int, str]]:
    """(line number, logical line) of every ```bash block, backslash continuations joined."""
    lines: list[tuple[int, str]] = []
    in_block, pending, start = False, "", 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = stripped in ("```bash", "```sh", "```shell") if not in_block else False
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append((start, pending + stripped))
        pending = ""
    return lines


def readme_shell_lines() -> list[tuple[int, str]]:
    return shell_lines(README.read_text())


def readme_commands() -> list[JobCommand]:
    commands = []
    for number, line in readme_shell_lines():
        argv = job_argv(line)
        if argv is not None:
            commands.append(JobCommand(f"{rel(README)}:{number}", argv))
    return commands


def manifest_commands() -> list[JobCommand]:
    """RayJob entrypoints, and any `python jobs/...` the cluster launcher's command lists run."""
    commands = []
    for source, resource in k8s_resources():
        if resource.get("kind") == "RayJob":
            argv = job_argv(resource["spec"]["entrypoint"])
            assert argv is not None, f"{source}: entrypoint does not run `python jobs/...`"
            commands.append(JobCommand(f"{source}:{resource['metadata']['name']}", argv))
    cluster = yaml_documents(CLUSTER_CONFIG)[0]
    for key, value in cluster.items():
        if key.endswith("commands"):
            for line in value:
                argv = job_argv(line)
                if argv is not None:
                    commands.append(JobCommand(f"{rel(CLUSTER_CONFIG)}:{key}", argv))
    return commands


def all_commands() -> list[JobCommand]:
    return readme_commands() + manifest_commands()


def unique_commands() -> dict[tuple[str, ...], list[str]]:
    """argv -> the places that write it (one dry run per distinct command)."""
    unique: dict[tuple[str, ...], list[str]] = {}
    for command in all_commands():
        unique.setdefault(command.argv, []).append(command.source)
    return unique


def pod_templates(resource: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group name, pod template) of a RayJob's or RayCluster's head and worker groups."""
    spec = resource["spec"]["rayClusterSpec"] if resource["kind"] == "RayJob" else resource["spec"]
    groups = [("head", spec["headGroupSpec"]["template"])]
    groups += [(group["groupName"], group["template"]) for group in spec.get("workerGroupSpecs", [])]
    return groups


def cluster_spec(resource: dict[str, Any]) -> dict[str, Any]:
    return resource["spec"]["rayClusterSpec"] if resource["kind"] == "RayJob" else resource["spec"]


def gpus_per_pod(template: dict[str, Any]) -> int:
    total = 0
    for container in template["spec"]["containers"]:
        limits = container.get("resources", {}).get("limits", {})
        total += int(limits.get("nvidia.com/gpu", 0))
    return total


def worker_gpus(resource: dict[str, Any]) -> int:
    """GPUs of all worker groups at their largest size."""
    spec = cluster_spec(resource)
    return sum(gpus_per_pod(group["template"]) * int(group.get("maxReplicas", group.get("replicas", 0)))
               for group in spec.get("workerGroupSpecs", []))
