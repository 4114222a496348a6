"""The Ray launch files in launch/: KubeRay RayJob manifests and the `ray job submit` runtime env.

The manifests are validated offline against the RayJob CRD's openAPIV3Schema (vendored in
tests/data/kuberay by scripts/vendor_kuberay_schema.py), made strict the way `kubectl apply --validate=strict` is:
an unknown field is an error, not silently pruned. What the schema cannot say (CEL rules in
x-kubernetes-validations, list-map key uniqueness) is not checked here.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from opsd.launch.resources import resource_needs
from opsd.config import REPO_ROOT, load_config

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = REPO_ROOT / "tests" / "data" / "kuberay" / "rayjob-v1.schema.json"
MANIFESTS = sorted((REPO_ROOT / "launch" / "kuberay").glob("*.yaml"))
APP_DIR = "/app"  # WORKDIR of both images, where the project is installed in editable mode


def _strict(schema):
    """Reject unknown fields wherever the CRD lists an object's fields (as the API server's strict
    field validation does), except where it says to keep unknown ones."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@pytest.fixture(scope="module")
def rayjob_validator():
    schema = _strict(json.loads(SCHEMA.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def load(path):
    return yaml.safe_load(path.read_text())


def test_manifests_exist():
    assert {p.name for p in MANIFESTS} >= {"rayjob-gpu.yaml", "rayjob-cpu.yaml"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_the_rayjob_crd(path, rayjob_validator):
    doc = load(path)
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    errors = sorted(rayjob_validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_strict_validation_catches_a_misspelt_field(rayjob_validator):
    doc = load(REPO_ROOT / "launch" / "kuberay" / "rayjob-gpu.yaml")
    doc["spec"]["shutdownAfterJobFinish"] = True
    doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "one"
    messages = [e.message for e in rayjob_validator.iter_errors(doc)]
    assert any("shutdownAfterJobFinish" in m for m in messages), messages
    assert any("'one' is not of type 'integer'" in m for m in messages), messages


def entrypoint(doc):
    """(config path inside the repo, overrides) of an `opsd train CONFIG key=value ...` entrypoint."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["opsd", "train"], argv
    config = argv[2]
    assert config.startswith(f"{APP_DIR}/configs/"), f"{config}: expected the image's copy under {APP_DIR}/configs/"
    return REPO_ROOT / Path(config).relative_to(APP_DIR), argv[3:]


def pods(doc):
    spec = doc["spec"]["rayClusterSpec"]
    yield "head", 1, spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["replicas"], group


def cpu_quantity(value) -> float:
    text = str(value)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_entrypoint_config_exists_and_fits_the_pods(path):
    doc = load(path)
    config, overrides = entrypoint(doc)
    assert config.is_file(), f"{path.name}: entrypoint config {config} is not in configs/"
    cfg = load_config(config, overrides)  # the overrides name real keys
    assert cfg.run_dir.startswith("/checkpoints/"), "the run directory must be on the mounted volume"

    gpus = cpus = 0.0
    for name, replicas, group in pods(doc):
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        start = group.get("rayStartParams", {})
        # Ray counts a pod's CPUs from its limit unless rayStartParams says otherwise.
        cpus += replicas * cpu_quantity(start.get("num-cpus", limits["cpu"]))
        gpus += replicas * int(limits.get("nvidia.com/gpu", 0))
    need_gpus, need_cpus = resource_needs(cfg)
    assert gpus >= need_gpus and cpus >= need_cpus, (
        f"{path.name}: pods offer {gpus:g} GPUs / {cpus:g} CPUs, {config.name} needs {need_gpus:g} / {need_cpus:g}"
    )
    assert (cfg.cluster.device == "cuda") == (gpus > 0)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pods_mount_what_they_declare_and_have_shared_memory(path):
    doc = load(path)
    ray_pin = re.search(r'"ray\[default\]==([\d.]+)"', (REPO_ROOT / "pyproject.toml").read_text()).group(1)
    assert doc["spec"]["rayClusterSpec"]["rayVersion"] == ray_pin
    for name, _, group in pods(doc):
        spec = group["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        (container,) = spec["containers"]
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        assert set(mounts.values()) <= set(volumes), f"{name}: mounts a volume it does not declare"
        assert "/dev/shm" in mounts and volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name
        assert "/checkpoints" in mounts, f"{name}: the run directory volume is not mounted"


# --- `ray job submit --runtime-env launch/runtime_env.yaml` --------------------------------------

RUNTIME_ENV = REPO_ROOT / "launch" / "runtime_env.yaml"


def test_runtime_env_does_not_clash_with_the_drivers_ray_init():
    from opsd.launch.cluster import WORKER_ENV

    env = load(RUNTIME_ENV)
    # Ray refuses a job whose runtime env and ray.init(runtime_env=...) set the same variable.
    driver_vars = set(WORKER_ENV) | {"VLLM_ENABLE_V1_MULTIPROCESSING"}
    assert not set(env.get("env_vars", {})) & driver_vars
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values()), "env var values must be strings"


def test_runtime_env_uploads_the_source_and_nothing_big(tmp_path):
    import zipfile

    from ray._private.runtime_env.packaging import _zip_files  # what `ray job submit` packs
    from ray.runtime_env import RuntimeEnv

    env = load(RUNTIME_ENV)
    RuntimeEnv(**env)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    out = tmp_path / "upload.zip"
    _zip_files(str(REPO_ROOT), env["excludes"], str(out), include_gitignore=True)
    names = set(zipfile.ZipFile(out).namelist())
    assert {"opsd/config.py", "workers/learner.py", "launch/cli.py", "configs/qwen3-1.7b.yaml",
            "data/toy/train.jsonl", "pyproject.toml"} <= names
    for excluded in (".git/", ".venv/", "artifacts/", "runs/"):
        assert not any(n.startswith(excluded) for n in names), excluded
    assert not any(n.endswith((".arrow", ".safetensors", ".pyc")) for n in names)
    assert out.stat().st_size < 20 * 2**20


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_a_stopped_or_preempted_job_has_time_to_checkpoint(path):
    doc = load(path)
    stop_wait = int(yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"])
    hooks = {}
    for name, _, group in pods(doc):
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        # The driver's SIGTERM wait fits inside each pod's grace period, with a minute to spare.
        assert spec["terminationGracePeriodSeconds"] >= stop_wait + 60, name
        hooks[name] = container["lifecycle"]["preStop"]["exec"]["command"]
    # What pgrep -f would see: the hooks find the driver and the learner ranks by their command
    # lines (Ray titles an actor's process ray::Class), and never their own shell.
    driver = "/usr/bin/python3 /usr/local/bin/opsd train /app/configs/tiny.yaml run_dir=/checkpoints/x"
    shell = "/bin/sh -c opsd train /app/configs/tiny.yaml run_dir=/checkpoints/x"  # the job's own sh -c
    (head_hook,) = [h for n, h in hooks.items() if "head" in n]
    (worker_hook,) = [h for n, h in hooks.items() if "head" not in n]
    for hook, finds, misses in ((head_hook, [driver], [shell]), (worker_hook, ["ray::LearnerRank.train_step"], [])):
        patterns = re.findall(r"-f '([^']+)'", hook[-1])
        assert patterns
        for pattern in patterns:
            assert all(re.search(pattern, line) for line in finds), pattern
            assert not any(re.search(pattern, line) for line in [*misses, " ".join(hook)]), pattern


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_the_cluster_requires_a_token(path):
    """Ray's dashboard and job API run code for whoever reaches them: every manifest turns on
    KubeRay's token authentication (the README's `ray job submit` section does the same by hand)."""
    assert load(path)["spec"]["rayClusterSpec"].get("authOptions") == {"mode": "token"}
