"""The documentation site (mkdocs.yml, docs/): it builds strictly, its command-line reference is the parser's,
the migration table names every ``dagster_pipes`` name, every code block marked as a program runs (against the
real engines and local emulators where it says so), and the built site works in a real browser (Debian's
headless Chromium over the DevTools protocol): every page renders without a console error, the navigation
reaches every page, and the search finds ``PipesDockerClient``.

Marks in the pages, an HTML comment on the line before a fenced block:
``<!-- doctest: file NAME -->`` writes the block to NAME in the page's scratch directory; ``<!-- doctest: python
[needs=X] -->`` runs it there as a Python program; ``<!-- doctest: sh [needs=X] -->`` runs it with bash (the
venv's ``bin`` first on PATH). X is one of docker, ray, slurm, s3, gcs, azure.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import inspect
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT
from tests.support.servers import blob_servers_for_default_clients

DOCS = REPO_ROOT / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"
# A bound that only catches a hang (a page, a program); never a timed assertion.
HANG_SECONDS = 300.0
SEARCH_TERM = "PipesDockerClient"

_MARK = re.compile(r"^<!-- doctest: (file|python|sh)(?: (?!needs=)([^ >]+))?(?: needs=(\w+))? -->$")
_FENCE = re.compile(r"^(`{3,})")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    kind: str  # file, python, sh
    name: str | None  # the file of a ``file`` block
    needs: str | None
    text: str


def doc_blocks(page: Path) -> list[Block]:
    """The marked blocks of ``page``, in order."""
    lines = page.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        mark = _MARK.match(lines[index].strip())
        if mark is None:
            index += 1
            continue
        fence = _FENCE.match(lines[index + 1]) if index + 1 < len(lines) else None
        assert fence is not None, f"{page}:{index + 1}: a doctest mark must be followed by a fenced block"
        end = next(i for i in range(index + 2, len(lines)) if lines[i].startswith(fence.group(1)))
        kind, name, needs = mark.groups()
        assert (kind == "file") == (name is not None), f"{page}:{index + 1}: file blocks (only) need a name"
        blocks.append(Block(str(page.relative_to(DOCS)), index + 1, kind, name, needs,
                            "\n".join(lines[index + 2:end]) + "\n"))
        index = end + 1
    return blocks


PAGES_WITH_PROGRAMS = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if doc_blocks(p))


def test_the_pages_hold_programs() -> None:
    programs = [b for page in PAGES_WITH_PROGRAMS for b in doc_blocks(DOCS / page) if b.kind != "file"]
    assert len(programs) >= 12, [f"{b.page}:{b.line}" for b in programs]
    assert {b.needs for b in programs} >= {None, "docker", "ray", "slurm", "s3", "gcs", "azure"}


# ------------------------------------------------------------------------------------------ the build

@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([str(MKDOCS), "build", "--strict", "--site-dir", str(out)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=HANG_SECONDS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNING" not in proc.stderr, proc.stderr
    return out


def site_pages(site: Path) -> set[str]:
    """Every page of the built site, as its path from the root ("" for the home page, "cli/" ...)."""
    return {"" if p.parent == site else f"{p.parent.relative_to(site).as_posix()}/" for p in site.rglob("index.html")}


def url_of(page: str) -> str:
    """The path of a Markdown page in the built site (``channels/s3.md`` -> ``channels/s3/``)."""
    stem = page.removesuffix(".md")
    stem = "" if stem == "index" else stem.removesuffix("/index") + "/"
    return stem


def test_every_markdown_page_is_in_the_navigation_and_built(site: Path) -> None:
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    nav = set(re.findall(r":\s*([\w/-]+\.md)\s*$", (REPO_ROOT / "mkdocs.yml").read_text(), re.MULTILINE))
    assert pages == nav
    assert {url_of(page) for page in pages} == site_pages(site)


def test_the_command_line_reference_is_the_parsers(site: Path) -> None:
    from pipes_core.cli.main import _build_parser, _option_strings

    sys.path.insert(0, str(DOCS / "_hooks"))
    try:
        import cli_reference
    finally:
        sys.path.remove(str(DOCS / "_hooks"))
    text = cli_reference.reference()
    flags = set(_option_strings(_build_parser())) - {"-h", "--help"}
    assert flags and all(f"`{flag}`" in text for flag in flags), sorted(f for f in flags if f"`{f}`" not in text)
    html = (site / "cli-reference" / "index.html").read_text(encoding="utf-8")
    for flag in ("--runtime-env", "--message-reader", "--bucket", "--container", "--prefix", "--docker-arg"):
        assert f"<code>{flag}</code>" in html, flag


def test_the_migration_table_names_every_dagster_pipes_name() -> None:
    import dagster_pipes

    import pipes_ext

    text = (DOCS / "migration.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| (.+?) \|", text, re.MULTILINE))
    def is_public(name: str) -> bool:
        if name.startswith(("_", "T_")) or name in {"ABC", "IO", "TYPE_CHECKING"}:
            return False
        value = getattr(dagster_pipes, name)
        return not inspect.ismodule(value) and (
            name.isupper() or str(getattr(value, "__module__", "")).startswith("dagster_pipes"))

    public = {name for name in dir(dagster_pipes) if is_public(name)}
    assert len(public) > 60
    assert public <= set(rows), sorted(public - set(rows))
    for name, ours in rows.items():
        if name in public and ours != "not provided":
            assert hasattr(pipes_ext, name), name  # the middle column's promise: the same name imports


# ----------------------------------------------------------------------------------- the programs

@pytest.fixture(scope="module")
def blob_env() -> Iterator[dict[str, dict[str, str]]]:
    with blob_servers_for_default_clients() as envs:
        yield envs


def engine_env(needs: str | None, request: pytest.FixtureRequest) -> dict[str, str]:
    """Start (through its fixture) what a program needs, and the environment that points it there."""
    if needs is None:
        return {}
    if needs in ("s3", "gcs", "azure"):
        env: dict[str, str] = request.getfixturevalue("blob_env")[needs]
        return env
    if needs == "docker":
        engine = request.getfixturevalue("docker_engine")
        client = engine.daemon.client()
        client.images.get(engine.images.test).tag("my-etl", "1.2")  # the image the page names
        return dict(engine.daemon.env())
    if needs == "ray":
        return {"RAY_ADDRESS": request.getfixturevalue("ray_head").address}
    if needs == "slurm":
        return dict(request.getfixturevalue("slurm_cluster").env)
    raise AssertionError(f"unknown needs={needs}")


@pytest.mark.parametrize("page", PAGES_WITH_PROGRAMS)
def test_the_programs_of_a_page_run(page: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    blocks = doc_blocks(DOCS / page)
    bin_dir = str(Path(sys.executable).parent)
    base = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
            "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    ran = 0
    for block in blocks:
        where = f"{block.page}:{block.line}"
        if block.kind == "file":
            assert block.name is not None
            path = tmp_path / block.name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.text, encoding="utf-8")
            continue
        env = {**base, **engine_env(block.needs, request)}
        command = [sys.executable, "-c", block.text] if block.kind == "python" else \
            ["bash", "-euo", "pipefail", "-c", block.text]
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=HANG_SECONDS, start_new_session=True)
        assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        ran += 1
    assert ran >= 1


# ---------------------------------------------------------------------------------- the browser

class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class DevTools:
    """One headless Chromium page, driven over the DevTools protocol; errors of every kind collected."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.errors: list[str] = []
        self.loaded = asyncio.Event()
        self.listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data:
                future = self.pending.pop(data["id"])
                if "error" in data:
                    future.set_exception(AssertionError(data["error"]))
                else:
                    future.set_result(data.get("result", {}))
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Page.loadEventFired":
                self.loaded.set()
            elif method == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.errors.append(json.dumps(params.get("args", []))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                self.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        return await asyncio.wait_for(future, HANG_SECONDS)

    async def open(self, url: str) -> None:
        self.loaded.clear()
        await self.call("Page.navigate", url=url)
        await asyncio.wait_for(self.loaded.wait(), HANG_SECONDS)

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")


NAV_LINKS = "Array.from(document.querySelectorAll('nav.md-nav--primary a.md-nav__link[href]')).map(a => a.href)"
SEARCH = """new Promise(resolve => {
  const input = document.querySelector('input.md-search__input');
  input.focus();
  input.value = %s;
  for (const kind of ['focus', 'input', 'keyup']) input.dispatchEvent(new Event(kind, {bubbles: true}));
  const done = () => {
    const items = document.querySelectorAll('.md-search-result__item');
    if (items.length) { resolve(Array.from(items).map(i => i.innerText).join('\\n')); return true; }
    return false;
  };
  if (!done()) new MutationObserver((_, observer) => { if (done()) observer.disconnect(); })
      .observe(document.body, {childList: true, subtree: true});
})"""


def test_the_site_in_a_real_browser(served: str, site: Path, chromium: str) -> None:
    import aiohttp

    async def browse() -> tuple[set[str], dict[str, list[str]], str]:
        async with aiohttp.ClientSession() as http_session, http_session.ws_connect(chromium, max_msg_size=0) as ws:
            tools = DevTools(ws)
            for domain in ("Page", "Runtime", "Log"):
                await tools.call(f"{domain}.enable")
            reached: set[str] = set()
            errors: dict[str, list[str]] = {}
            queue = [served]
            while queue:
                url = queue.pop()
                page = url.split("#")[0]
                if page in reached or not page.startswith(served):
                    continue
                reached.add(page)
                tools.errors.clear()
                await tools.open(page)
                await tools.evaluate("document.readyState")  # a round trip: what the load ran has reported
                errors[page] = list(tools.errors)
                queue.extend(await tools.evaluate(NAV_LINKS))
            await tools.open(served)
            found = await tools.evaluate(SEARCH % json.dumps(SEARCH_TERM))
            tools.listener.cancel()
            return reached, errors, found

    reached, errors, found = asyncio.run(asyncio.wait_for(browse(), HANG_SECONDS * 2))
    assert {url.removeprefix(served) for url in reached} == site_pages(site)
    assert {page: found for page, found in errors.items() if found} == {}
    assert SEARCH_TERM in found


def test_troubleshooting_covers_every_protocol_error_kind() -> None:
    from pipes_ext import PipesProtocolErrorKind

    text = (DOCS / "troubleshooting.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, re.MULTILINE))
    assert {kind.value for kind in PipesProtocolErrorKind} <= listed


# README lines at most: what it is, install, the two commands, a quick start and a map of the docs (issue 23).
README_MAX_LINES = 250


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert local and all((REPO_ROOT / t).exists() for t in local), [t for t in local if not (REPO_ROOT / t).exists()]
    mapped = {t.removeprefix("docs/") for t in local if t.startswith("docs/") and t.endswith(".md")}
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages <= mapped, sorted(pages - mapped)  # the map names every page
    assert "bash .ci/docs" in readme
