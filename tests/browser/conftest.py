"""Fixtures for the browser tests: one Chromium per session, one server per front end.

Set ``CNNWIDGETS_REQUIRE_BROWSER=1`` (``.ci/run`` does) to turn "playwright / chromium / a
front end / a widget is not installed" from a skip into a failure, so a broken install cannot
pass silently.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import browserkit as bk  # noqa: E402

FRONTENDS = ["lab", "notebook", "voila"]
PACKAGES = {"lab": "jupyterlab", "notebook": "notebook", "voila": "voila"}


unavailable = bk.unavailable


@pytest.fixture(scope="module")  # module: playwright's event loop must not outlive the browser tests
def browser():
    if importlib.util.find_spec("playwright") is None:
        unavailable("playwright is not installed: pip install -e '.[browser]'")
    if bk.chromium_path() is None:
        unavailable("no chromium found: run .ci/install-browser (or set CNNWIDGETS_CHROMIUM)")
    tmp = Path(tempfile.mkdtemp(prefix="cw-chromium-"))
    try:
        with bk.chromium(tmp) as chromium:
            yield chromium
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Frontend:
    kind: str
    server: bk.Server
    page: object
    watch: bk.PageWatch
    browser: object
    seconds_to_open: float


@pytest.fixture(scope="module")
def servers(request, browser, tmp_path_factory):
    """Every installed front end's server, launched side by side on 127.0.0.1 (each serves a
    copy of the generated ``widgets.ipynb`` and of ``notebooks/``); all killed at the end."""
    launched = {}
    try:
        for kind in FRONTENDS:
            if importlib.util.find_spec(PACKAGES[kind]) is None:
                continue
            tmp = tmp_path_factory.mktemp(f"cw-{kind}")
            root = tmp / "root"
            root.mkdir()
            bk.write_notebook(root / "widgets.ipynb", request.module.notebook_cells())
            if (bk.ROOT / "notebooks").is_dir():  # the tutorials, as a user has them
                shutil.copytree(bk.ROOT / "notebooks", root / "notebooks",
                                ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
            launched[kind] = bk.launch_server(kind, root, tmp)
        yield launched
    finally:
        for server in launched.values():
            bk.stop_server(server)
            bk.ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy2(server.log, bk.ARTIFACTS / server.log.name)


@pytest.fixture(scope="module", params=FRONTENDS)
def frontend(request, browser, servers):
    """A server of one kind (JupyterLab 4, Notebook 7, Voila) with ``widgets.ipynb`` opened
    and run in a page; the server and every kernel it started are killed afterwards."""
    kind = request.param
    if kind not in servers:
        unavailable(f"{PACKAGES[kind]} is not installed: pip install -e '.[browser]'")
    server = servers[kind]
    try:
        bk.wait_ready(server)
        page = bk.new_page(browser)
        watch = bk.PageWatch(page)
        try:
            start = time.monotonic()
            bk.open_notebook(page, server, "widgets.ipynb")
            if kind == "lab":  # the notebook at full width, as one presents it
                bk.collapse_left_sidebar(page)
            yield Frontend(kind, server, page, watch, browser, time.monotonic() - start)
        finally:
            try:
                bk.save_png(page.screenshot(full_page=True), f"{kind}-page.png")
            except Exception:  # noqa: BLE001 - best effort artefact
                pass
            page.context.close()
    finally:
        bk.stop_server(server)  # early: its kernels free the CPU for the next front end
