"""The two distributions built from this repository, and the image recipe for external scripts.

* ``pipes-ext`` (``./pipes_ext/pyproject.toml``): only ``pipes_ext``, no dependencies, extras ``s3``/``gcs``/
  ``azure``; ``pipes-sdk`` (``./pyproject.toml``): ``pipes_core``, ``conformance`` and the ``pipes`` command,
  depending on ``pipes-ext`` of the same version.
* Both are built as wheels with the standard front-end (``python -m build``) from a copy of the checkout (so no
  build output lands in it), then installed into fresh virtual environments with ``--no-index``: nothing comes
  from a package index.
* ``docs/recipes/docker/Dockerfile`` is built unchanged on the tests' own base image and a script runs in it
  through ``PipesDockerClient``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

from pipes_core import PipesRunContext
from pipes_core.docker import PipesDockerClient
from tests.support.engines_docker import DockerEngine
from tests.support.helpers import REPO_ROOT

RECIPE = REPO_ROOT / "docs" / "recipes" / "docker" / "Dockerfile"
# What a copy of the checkout leaves out: environments, caches, build output, VCS data.
_NOT_SOURCES = shutil.ignore_patterns(".venv", ".git", "node", "cache", "__pycache__", "*.egg-info", "build",
                                      "dist", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".coverage*")
# A fresh environment sees none of this process's Python settings (PYTHONPATH points at a checkout in
# development; coverage's start-up hook is not installed there).
_CLEAN_ENV = {key: value for key, value in os.environ.items()
              if not key.startswith(("PYTHON", "COVERAGE", "VIRTUAL_ENV"))}


@dataclass
class Wheels:
    folder: Path
    ext: Path
    sdk: Path


def _version(pyproject: Path) -> str:
    with pyproject.open("rb") as file:
        return str(tomllib.load(file)["project"]["version"])


def _build(source: Path, outdir: Path) -> Path:
    before = set(outdir.glob("*.whl"))
    done = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(outdir),
                           str(source)], capture_output=True, text=True, env=_CLEAN_ENV, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (wheel,) = set(outdir.glob("*.whl")) - before
    return wheel


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheels:
    root = tmp_path_factory.mktemp("dist")
    source = root / "src"
    shutil.copytree(REPO_ROOT, source, ignore=_NOT_SOURCES)
    folder = root / "wheels"
    folder.mkdir()
    return Wheels(folder, _build(source / "pipes_ext", folder), _build(source, folder))


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, env=_CLEAN_ENV,
                   timeout=120)
    return path / "bin" / "python"


def _pip_install(python: Path, *args: str) -> None:
    # This environment's pip installs into the fresh one (--python), so the fresh one needs no pip of its own.
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-index",
                           *args], capture_output=True, text=True, env=_CLEAN_ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def _run(python: Path, code: str) -> str:
    # From the environment's own folder: `python -c` puts the working directory first on sys.path.
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=_CLEAN_ENV, timeout=120,
                          cwd=python.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout


_INSTALLED = ("import importlib.metadata as m, json; "
              "print(json.dumps(sorted(d.metadata['Name'] for d in m.distributions())))")


def test_both_distributions_have_the_same_version() -> None:
    assert _version(REPO_ROOT / "pipes_ext" / "pyproject.toml") == _version(REPO_ROOT / "pyproject.toml")


def test_the_wheels_hold_their_own_packages_only(wheels: Wheels) -> None:
    version = _version(REPO_ROOT / "pyproject.toml")
    assert wheels.ext.name == f"pipes_ext-{version}-py3-none-any.whl"
    assert wheels.sdk.name == f"pipes_sdk-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheels.ext) as ext:
        top = {name.split("/")[0] for name in ext.namelist()}
        assert top == {"pipes_ext", f"pipes_ext-{version}.dist-info"}
        assert "pipes_ext/py.typed" in ext.namelist()
        assert "pipes_ext/pyproject.toml" not in ext.namelist()
        metadata = ext.read(f"pipes_ext-{version}.dist-info/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert requires and all("extra ==" in line for line in requires), requires  # no dependency but the extras
    assert {line.split("extra == ")[1].strip("'\"") for line in requires} == {"s3", "gcs", "azure"}
    with zipfile.ZipFile(wheels.sdk) as sdk:
        top = {name.split("/")[0] for name in sdk.namelist()}
        assert top == {"pipes_core", "conformance", f"pipes_sdk-{version}.dist-info"}
        metadata = sdk.read(f"pipes_sdk-{version}.dist-info/METADATA").decode()
        entry_points = sdk.read(f"pipes_sdk-{version}.dist-info/entry_points.txt").decode()
    assert f"Requires-Dist: pipes-ext=={version}" in metadata.splitlines()
    assert "pipes = pipes_core.cli.main:main" in entry_points


def test_pipes_ext_installs_alone(wheels: Wheels, tmp_path: Path) -> None:
    python = _venv(tmp_path / "venv")
    _pip_install(python, str(wheels.ext))
    assert json.loads(_run(python, _INSTALLED)) == ["pipes-ext"]  # nothing else came with it
    assert _run(python, "import pipes_ext; print(pipes_ext.open_pipes.__name__)").strip() == "open_pipes"
    done = subprocess.run([str(python), "-c", "import pipes_core"], capture_output=True, text=True,
                          env=_CLEAN_ENV, timeout=60, cwd=tmp_path)
    assert done.returncode == 1 and "No module named 'pipes_core'" in done.stderr


def test_pipes_sdk_installs_from_the_two_wheels_and_runs_a_script(wheels: Wheels, tmp_path: Path) -> None:
    python = _venv(tmp_path / "venv")
    _pip_install(python, "--find-links", str(wheels.folder), "pipes-sdk")
    assert json.loads(_run(python, _INSTALLED)) == ["pipes-ext", "pipes-sdk"]
    script = tmp_path / "job.py"
    script.write_text("from pipes_ext import open_pipes\n"
                      "with open_pipes() as pipes:\n"
                      "    pipes.report_asset_materialization(metadata={'rows': pipes.get_extra('rows')})\n")
    pipes = python.parent / "pipes"
    done = subprocess.run([str(pipes), "run", "--json", "--asset", "a", "--extras", '{"rows": 3}', "--",
                           str(python), str(script)], capture_output=True, text=True, env=_CLEAN_ENV, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    (materialization,) = [event for event in events if event["event"] == "materialization"]
    assert materialization["asset_key"] == "a" and materialization["metadata"]["rows"]["value"] == 3


# ------------------------------------------------------------------------------------------ the image recipe


@pytest.fixture
def recipe_base(docker_engine: DockerEngine, tmp_path: Path) -> Iterator[str]:
    """The tests' image with pip (copied from this environment) and without the ``pipes_ext`` it carries."""
    import pip

    context = tmp_path / "base"
    shutil.copytree(Path(pip.__file__).parent, context / "pip", ignore=shutil.ignore_patterns("__pycache__"))
    (context / "Dockerfile").write_text("\n".join([
        f"FROM {docker_engine.images.test}",
        "RUN rm -r /opt/pipes/pipes_ext",
        "ENV PYTHONPATH=/opt/pip",
        "COPY pip /opt/pip/pip",
        "",
    ]))
    tag = "pipes-test-recipe-base:latest"
    docker_engine.client.images.build(path=str(context), tag=tag, rm=True, forcerm=True, network_mode="none",
                                      pull=False)
    try:
        yield tag
    finally:
        docker_engine.client.images.remove(tag, force=True)


def test_the_image_recipe_builds_and_runs_a_script(docker_engine: DockerEngine, recipe_base: str, wheels: Wheels,
                                                  tmp_path: Path) -> None:
    context = tmp_path / "image"
    (context / "wheels").mkdir(parents=True)
    (context / "scripts").mkdir()
    shutil.copy(RECIPE, context / "Dockerfile")
    shutil.copy(wheels.ext, context / "wheels")
    (context / "scripts" / "job.py").write_text(
        "import pipes_ext\n"
        "from pipes_ext import open_pipes\n"
        "with open_pipes() as pipes:\n"
        "    pipes.report_asset_materialization(metadata={'where': pipes_ext.__file__})\n")
    tag = "pipes-test-recipe:latest"
    docker_engine.client.images.build(path=str(context), tag=tag, buildargs={"BASE": recipe_base}, rm=True,
                                      forcerm=True, network_mode="none", pull=False)
    try:
        invocation = PipesDockerClient(client=docker_engine.client).run(
            context=PipesRunContext(asset_keys=["a"]), image=tag, command=["python3", "job.py"], network="none")
    finally:
        docker_engine.client.images.remove(tag, force=True)
    (materialization,) = invocation.get_results()
    where = materialization.metadata["where"].value
    assert "site-packages/pipes_ext/" in where  # installed from the wheel, not the tests' copy
