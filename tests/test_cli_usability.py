"""``pipes run`` as a user expects it (issue 23): hints in flags, "did you mean", blob channels by name,
``--runtime-env`` for Ray, a missing ``closed`` in the summary, the child's traceback once, and failure headlines
naming the script for every launcher. Real ``pipes`` processes, real local blob servers and the real engines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipes_core.cli.words import CLI_WORDS, in_cli_words
from tests.conftest import REPO_ROOT, cli_json_events
from tests.support.engines_docker import DockerEngine
from tests.support.engines_ray import RayHead
from tests.support.engines_slurm import SlurmCluster
from tests.support.servers import blob_servers_for_default_clients

PIPES = [sys.executable, "-m", "pipes_core"]
PY = sys.executable


def pipes(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT,
          timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PIPES, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})


def script(tmp_path: Path, source: str, name: str = "child.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------- hints in flags

# Each entry of the table: a message as the library words it (a fragment of it is in the library's source, so the
# table cannot drift from what the library says unnoticed), and the flag the command line names instead.
LIBRARY_SAYS = [
    ("exited 0 but never opened the Pipes channel. ...; pass strict=False for a command that is not Pipes-aware.",
     "pass strict=False", "pass --no-strict"),
    ("reported 1 failed check(s) of severity ERROR (fail_on_check_error)", "(fail_on_check_error)",
     "(--fail-on-check-error)"),
    ("message line of 900 bytes is longer than max_line_bytes=100; it was skipped", "longer than max_line_bytes=",
     "longer than --max-line-bytes 100"),
    ("the image 'x' is not on the Docker daemon at d; no pull was attempted (pass pull=True, or build or load it "
     "first)", "pass pull=True", "pass --docker-arg=--pull=always"),
    ("cannot submit 'a.py': 'sbatch' cannot run (x); install Slurm's client commands or give their paths in "
     "SlurmCommands", "give their paths in SlurmCommands", "(sbatch, squeue, scontrol, scancel) on PATH"),
    ("Without shared_dir the file is on this machine: a job running on another node cannot write it; pass a "
     "directory the nodes share.", "Without shared_dir", "Without --shared-dir"),
    ("Without shared_dir the file is on this machine: a job running on another node cannot write it; pass a "
     "directory the nodes share.", "pass a directory the nodes share", "pass --shared-dir DIR"),
    ("no Azure client given and AZURE_STORAGE_CONNECTION_STRING is not set: pass client= (a BlobServiceClient) or "
     "set the connection string", "pass client= (a BlobServiceClient)", "(or Azurite's) connection string"),
    ("asset_keys: this step has no assets in scope (it is not an asset step)", "this step has no assets in scope",
     "--asset KEY"),
    ("report_asset_materialization: no asset_key given and this step has no asset in scope",
     "this step has no asset in scope", "--asset KEY"),
]


def _library_source() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for folder in ("pipes_core", "pipes_ext")
                     for path in sorted((REPO_ROOT / folder).rglob("*.py")) if path.name != "words.py")


@pytest.mark.parametrize(("said", "fragment", "cli"), LIBRARY_SAYS)
def test_each_python_hint_has_its_flag(said: str, fragment: str, cli: str) -> None:
    assert fragment in re.sub(r'"\s*\n\s*f?"', "", _library_source()), fragment  # still said
    assert fragment in said
    translated = in_cli_words(said)
    assert cli in translated
    assert fragment not in translated or translated.startswith(said)  # replaced, or a hint added after it


def test_every_table_entry_is_exercised() -> None:
    used = {pattern.pattern for pattern, _ in CLI_WORDS if any(pattern.search(said) for said, _, _ in LIBRARY_SAYS)}
    assert used == {pattern.pattern for pattern, _ in CLI_WORDS}


def test_a_command_that_never_opens_is_told_about_no_strict(tmp_path: Path) -> None:
    proc = pipes("run", "--", PY, "-c", "pass")
    assert proc.returncode == 1
    assert "pass --no-strict for a command that is not Pipes-aware" in proc.stdout
    assert "strict=False" not in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_reporting_without_an_asset_names_the_asset_flag(tmp_path: Path) -> None:
    child = script(tmp_path, """
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_asset_materialization(metadata={"rows": 1})
    """)
    proc = pipes("run", "--", PY, child)
    assert proc.returncode == 1
    assert "[pipes] closed with exception: " in proc.stdout
    assert "no asset in scope (pipes run: select one with --asset KEY)" in proc.stdout
    fixed = pipes("run", "--asset", "a/b", "--", PY, child)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "[pipes] materialized a/b" in fixed.stdout


def test_a_skipped_long_line_names_the_max_line_bytes_flag(tmp_path: Path) -> None:
    child = script(tmp_path, """
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.log.info("x" * 500)
    """)
    proc = pipes("run", "--no-strict", "--max-line-bytes", "200", "--", PY, child)
    assert "longer than --max-line-bytes 200" in proc.stdout
    assert "max_line_bytes=" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ did you mean

@pytest.mark.parametrize(("args", "expected"), [
    (["run", "--asest", "a", "--", "true"], "unrecognized arguments: --asest (did you mean --asset?)"),
    (["run", "--no-strikt", "--", "true"], "(did you mean --no-strict?)"),
    (["run", "--jsn", "--tmeout=3", "--", "true"], "(did you mean --json for --jsn, --timeout for --tmeout?)"),
    (["run", "--message-reder", "s3", "--", "true"], "(did you mean --message-reader?)"),
])
def test_a_mistyped_flag_gets_a_suggestion(args: list[str], expected: str) -> None:
    proc = pipes(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("pipes: error: ") and expected in proc.stderr, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


def test_a_flag_like_no_other_gets_no_guess() -> None:
    proc = pipes("run", "--zzzzqqqq", "--", "true")
    assert proc.returncode == 2
    assert "unrecognized arguments: --zzzzqqqq" in proc.stderr and "did you mean" not in proc.stderr


# ----------------------------------------------------------------------------------- blob channels by name

BLOB_CHILD = """
    import json, os
    from pipes_ext import open_pipes
    from pipes_ext._context import PipesEnvVarParamsLoader
    from pipes_ext.{module} import {loader}, {writer}
    params = PipesEnvVarParamsLoader()
    where = {{"context": params.load_context_params(), "messages": params.load_messages_params()}}
    with open_pipes(context_loader={loader}(), message_writer={writer}()) as pipes:
        pipes.log.info("over the blob store")
        pipes.report_asset_materialization(metadata={{"rows": pipes.get_extra("rows")}})
        pipes.report_custom_message(where)
"""
CHILDREN = {
    "s3": ("s3", "PipesS3ContextLoader", "PipesS3MessageWriter"),
    "gcs": ("gcs", "PipesGCSContextLoader", "PipesGCSMessageWriter"),
    "azure": ("azure", "PipesAzureBlobStorageContextLoader", "PipesAzureBlobStorageMessageWriter"),
}


@pytest.fixture(scope="module")
def blob_stores() -> Iterator[dict[str, dict[str, str]]]:
    """The three local servers, and the environment each SDK's default client reads."""
    with blob_servers_for_default_clients() as envs:
        yield envs


def make_bucket(kind: str, env: dict[str, str]) -> str:
    name = f"pipes-{uuid.uuid4().hex[:16]}"
    if kind == "s3":
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket=name)
    elif kind == "gcs":
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        storage.Client(project="test", credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                       client_options={"api_endpoint": env["STORAGE_EMULATOR_HOST"]}).create_bucket(name)
    else:
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(env["AZURE_STORAGE_CONNECTION_STRING"]).create_container(name)
    return name


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
def test_blob_channels_chosen_by_name(kind: str, blob_stores: dict[str, dict[str, str]], tmp_path: Path) -> None:
    env = blob_stores[kind]
    bucket = make_bucket(kind, env)
    module, loader, writer = CHILDREN[kind]
    child = script(tmp_path, BLOB_CHILD.format(module=module, loader=loader, writer=writer))
    where = "--container" if kind == "azure" else "--bucket"
    proc = pipes("run", "--json", "--context-injector", kind, "--message-reader", kind, where, bucket,
                 "--prefix", "runs/", "--asset", "blob", "--extras", '{"rows": 3}', "--", PY, child, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = cli_json_events(proc.stdout)
    assert [e["event"] for e in events] == ["opened", "log", "materialization", "custom_message", "closed",
                                            "summary"]
    assert events[2]["metadata"] == {"rows": {"type": "int", "value": 3}}
    payload = events[3]["payload"]
    assert isinstance(payload, dict)
    assert payload["context"]["bucket"] == bucket and payload["context"]["key"].startswith("runs/")
    assert payload["messages"]["bucket"] == bucket and payload["messages"]["key_prefix"].startswith("runs/")


@pytest.mark.parametrize(("args", "expected"), [
    (["--message-reader", "s3", "--", "true"], "--message-reader s3 needs --bucket NAME"),
    (["--context-injector", "azure", "--bucket", "b", "--", "true"],
     "--context-injector azure needs --container NAME (not --bucket: that is for s3, gcs)"),
    (["--message-reader", "gcs", "--container", "c", "--", "true"], "needs --bucket NAME (not --container"),
    (["--bucket", "b", "--", "true"], "--bucket is for --context-injector or --message-reader s3|gcs|azure"),
    (["--prefix", "p/", "--", "true"], "--prefix is for --context-injector or --message-reader"),
    (["--message-reader", "s3", "--context-injector", "azure", "--bucket", "b", "--container", "c", "--", "true"],
     "give --bucket (S3, GCS) or --container (Azure), not both"),
])
def test_bad_blob_invocations_give_one_line_and_exit_2(args: list[str], expected: str) -> None:
    proc = pipes("run", *args)
    assert proc.returncode == 2
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_azure_without_a_connection_string_says_which_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    proc = pipes("run", "--message-reader", "azure", "--container", "c", "--", "true")
    assert proc.returncode == 2
    assert "AZURE_STORAGE_CONNECTION_STRING is not set: set it to" in proc.stderr
    assert "client=" not in proc.stderr


def test_a_missing_sdk_is_a_usage_error_with_the_install_hint(tmp_path: Path) -> None:
    # boto3 made unimportable for the `pipes` process: a package of that name on PYTHONPATH that raises as a
    # missing one does (the venv itself has boto3, as the tests need it).
    shadow = tmp_path / "shadow" / "boto3"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'boto3'\", name='boto3')\n")
    path = os.pathsep.join([str(tmp_path / "shadow"), str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    proc = pipes("run", "--message-reader", "s3", "--bucket", "b", "--", "true", env={"PYTHONPATH": path})
    assert proc.returncode == 2
    assert proc.stderr.startswith("pipes: error: --message-reader s3: this channel needs the 'boto3' package: "
                                  "pip install 'boto3' (it is the 's3' extra of"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# ------------------------------------------------------------------------------- missing closed, traceback

NO_CLOSE = """
    import os
    from pipes_ext import open_pipes
    pipes = open_pipes()
    pipes.log.info("leaving without closed")
    os._exit(0)
"""


def test_a_missing_closed_is_in_the_summary_and_the_json_summary(tmp_path: Path) -> None:
    child = script(tmp_path, NO_CLOSE)
    human = pipes("run", "--", PY, child)
    assert human.returncode == 0
    assert "status    succeeded" in human.stdout
    assert "warning   the command opened the Pipes channel but never sent closed" in human.stdout
    assert "never sent closed" not in human.stderr  # said once, in the summary
    as_json = pipes("run", "--json", "--", PY, child)
    summary = cli_json_events(as_json.stdout)[-1]
    assert summary["closed"] is False and summary["opened"] is True
    warnings = summary["warnings"]
    assert isinstance(warnings, list) and len(warnings) == 1 and "never sent closed" in warnings[0]
    fine = cli_json_events(pipes("run", "--json", "--", PY, str(REPO_ROOT / "examples" / "hello_pipes.py"),
                                 env={}).stdout)[-1]
    assert fine["warnings"] == []


def test_the_childs_traceback_is_shown_once_in_human_mode(tmp_path: Path) -> None:
    child = script(tmp_path, """
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            raise ValueError("outer boom")
    """)
    proc = pipes("run", "--", PY, child)
    assert proc.returncode == 1
    both = proc.stdout + proc.stderr
    assert both.count("Traceback (most recent call last):") == 1, both
    assert "[pipes] closed with exception: ValueError: outer boom" in proc.stdout
    assert 'raise ValueError("outer boom")' in proc.stderr  # the child's own printout


def test_a_traceback_the_child_does_not_print_is_shown_by_pipes(tmp_path: Path) -> None:
    child = script(tmp_path, """
        import sys
        from pipes_ext import open_pipes
        try:
            with open_pipes() as pipes:
                raise ValueError("quiet boom")
        except ValueError:
            sys.exit(3)
    """)
    proc = pipes("run", "--", PY, child)
    assert proc.returncode == 3
    both = proc.stdout + proc.stderr
    assert both.count("Traceback (most recent call last):") == 1, both
    assert "[pipes] the traceback it reported:" in proc.stdout
    assert 'raise ValueError("quiet boom")' in proc.stdout
    assert proc.stdout.index("the traceback it reported") < proc.stdout.index("── summary")


# ---------------------------------------------------------------- failure headlines name the script

FAIL = """
    from pipes_ext import open_pipes
    with open_pipes() as pipes:
        raise SystemExit(4)
"""


def test_slurm_headline_names_the_script(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    child = script(tmp_path, FAIL, "etl_job.py")
    proc = pipes("run", "--slurm", "--shared-dir", str(tmp_path), "--", PY, child, env=slurm_cluster.env)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert f"({child!r}) failed with exit code 4" in proc.stdout
    assert f"({os.path.basename(PY)!r})" not in proc.stdout and f"({PY!r})" not in proc.stdout


@pytest.mark.docker
def test_docker_headline_names_the_script(docker_engine: DockerEngine, tmp_path: Path) -> None:
    script(tmp_path, FAIL, "etl_job.py")
    tmp_path.chmod(0o755)  # readable by the container user
    proc = pipes("run", "--docker", docker_engine.images.test, "--docker-arg=--network=none",
                 f"--docker-arg=-v={tmp_path}:/w:ro", "--", docker_engine.images.python, "/w/etl_job.py",
                 env=docker_engine.daemon.env())
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "running '/w/etl_job.py' failed with exit code 4" in proc.stdout


@pytest.mark.docker
def test_a_missing_image_names_the_pull_flag(docker_engine: DockerEngine) -> None:
    proc = pipes("run", "--docker", "no-such-image:0", "--", "true", env=docker_engine.daemon.env())
    assert proc.returncode == 127
    assert "pass --docker-arg=--pull=always" in proc.stdout and "pull=True" not in proc.stdout


def test_ray_runtime_env_and_headline(ray_head: RayHead, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "rows.txt").write_text("7\n")
    (project / "scratch").mkdir()
    (project / "scratch" / "big.bin").write_bytes(b"x" * 1024)
    script(project, """
        import os
        from pipes_ext import open_pipes
        with open_pipes() as pipes:
            pipes.report_custom_message({
                "rows": open("data/rows.txt").read().strip(),
                "scratch": os.path.exists("scratch"),
                "greeting": os.environ.get("GREETING"),
            })
    """, "job.py")
    script(project, FAIL, "etl_job.py")
    runtime_env = {"working_dir": ".", "excludes": ["scratch/"], "env_vars": {"GREETING": "hi"}}
    (tmp_path / "env.json").write_text(json.dumps(runtime_env))
    proc = pipes("run", "--json", "--ray", ray_head.address, "--runtime-env", f"@{tmp_path / 'env.json'}", "--",
                 PY, "job.py", cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    message = next(e for e in cli_json_events(proc.stdout) if e["event"] == "custom_message")
    assert message["payload"] == {"rows": "7", "scratch": False, "greeting": "hi"}
    failed = pipes("run", "--ray", ray_head.address, "--runtime-env", json.dumps(runtime_env), "--", PY,
                   "etl_job.py", cwd=project)
    assert failed.returncode == 4, failed.stdout + failed.stderr
    assert "running 'etl_job.py' failed with exit code 4" in failed.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["--runtime-env", "{}", "--", "true"], "--runtime-env needs --ray ADDRESS"),
    (["--ray", "http://127.0.0.1:1", "--runtime-env", "[1]", "--", "true"], "--runtime-env must be a JSON object"),
    (["--ray", "http://127.0.0.1:1", "--runtime-env", "{", "--", "true"], "--runtime-env is not valid JSON"),
    (["--ray", "http://127.0.0.1:1", "--runtime-env", "@/no/such.json", "--", "true"],
     "cannot read --runtime-env @/no/such.json"),
])
def test_bad_runtime_env_gives_one_line_and_exit_2(args: list[str], expected: str) -> None:
    proc = pipes("run", *args)
    assert proc.returncode == 2
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
