"""`make lab`: the JupyterLab server starts, serves the .md notebooks as notebooks, and runs them on the
project's kernel.

The test starts the command `make lab` runs (:func:`shrink.lab.command`) on 127.0.0.1 with a free port and a
token, on a temporary copy of the tour (so saving through the server never touches the checkout), then through
the Jupyter server's REST API and the kernel websocket:

1. ``/api/status`` answers; the app-level settings make jupytext's notebook view the default for markdown;
2. ``/api/contents/00-start/00-tour.md?type=notebook`` returns the tour as a notebook (jupytext);
3. a ``python3`` kernel runs the tour's first code cells with ``scale = "tiny"`` injected after the
   parameters cell (what papermill does), without error, and its ``sys.executable`` / ``sys.prefix`` are the
   project's ``.venv`` (the interpreter running this test); an explorer displays as a live ipywidgets view;
4. saving the notebook back writes MyST markdown paired with an ``.ipynb`` (the repository's jupytext.toml
   applies although the server's root is the notebooks folder);

then shuts the kernel and the server down. Everything is bounded by timeouts (a slow shared machine needs
~10-30 s to start the server and ~10-20 s for the kernel's imports).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from shrink import env, lab

try:  # a missing extra is a failure, not a skip: `make test` installs it
    import jupyterlab  # noqa: F401
    import websocket
except ImportError as exc:
    raise ImportError(f"{exc}: the `lab` extra is not installed; run `make env` (or pip install -e '.[lab]')") from exc

ROOT = env.repo_root()
N_CODE_CELLS = 4  # imports, parameters, setup + preset, model load
START_TIMEOUT = 90
CELL_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, log: Path):
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = lab.command(port=self.port, token=self.token, notebook_dir=root, browser=False)
        self.log = log
        environ = lab.kernel_env()
        environ.pop("PYTEST_CURRENT_TEST", None)  # the kernels must see what `make lab` gives them: interactive
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environ,
                                     start_new_session=True)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode()
        return json.loads(text) if text else None

    def wait(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                self.request("GET", "/api/status", timeout=5)
                return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        pytest.fail(f"jupyter lab did not answer /api/status within {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self):
        try:
            self.request("POST", "/api/shutdown", timeout=10)
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001 - fall back to signals on our own process group
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)


def execute(ws, code: str, timeout: float) -> dict:
    """Run ``code`` through the kernel websocket; returns {"status", "stdout", "error"} once the kernel is idle."""
    msg_id = uuid.uuid4().hex
    ws.send(json.dumps({
        "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex, "msg_type": "execute_request",
                   "version": "5.3", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    out = {"status": None, "stdout": "", "error": None, "mime": []}
    idle = False
    deadline = time.monotonic() + timeout
    while out["status"] is None or not idle:
        if time.monotonic() > deadline:
            raise TimeoutError(f"cell did not finish within {timeout} s:\n{code}")
        ws.settimeout(max(1.0, deadline - time.monotonic()))
        msg = json.loads(ws.recv())
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "execute_reply":
            out["status"] = content["status"]
        elif kind == "stream" and content.get("name") == "stdout":
            out["stdout"] += content["text"]
        elif kind in ("display_data", "execute_result"):
            out["mime"] += list(content.get("data", {}))
        elif kind == "error":
            out["error"] = f"{content['ename']}: {content['evalue']}\n" + "\n".join(content.get("traceback", []))
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
    return out


def test_lab_serves_md_notebooks_and_runs_them_on_the_project_kernel(tmp_path):
    t_start = time.monotonic()
    nb_root = tmp_path / "notebooks"
    (nb_root / "00-start").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / "00-start" / "00-tour.md", nb_root / "00-start" / "00-tour.md")
    lab.configure()  # what `make lab` does first (idempotent)
    server = Server(nb_root, tmp_path / "lab.log")
    kernel = None
    try:
        startup = server.wait(START_TIMEOUT)

        # 1. .md opens as a notebook by default (app-level settings override, merged into the schema default)
        plugin = server.request("GET", "/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
        viewers = plugin["schema"]["properties"]["defaultViewers"]["default"]
        assert viewers.get("markdown") == "Jupytext Notebook" and viewers.get("myst") == "Jupytext Notebook", viewers

        # 2. the .md notebook through the contents API, as a notebook
        model = server.request("GET", "/api/contents/00-start/00-tour.md?type=notebook&content=1")
        assert model["type"] == "notebook"
        cells = model["content"]["cells"]
        assert model["content"]["metadata"]["kernelspec"]["name"] == "python3"
        code = [c for c in cells if c["cell_type"] == "code"]
        src = lambda c: c["source"] if isinstance(c["source"], str) else "".join(c["source"])  # noqa: E731
        i_par = next(i for i, c in enumerate(code) if "parameters" in c["metadata"].get("tags", []))
        assert i_par < N_CODE_CELLS, "the tour's parameters cell moved below its first cells"

        # 3. a kernel runs the first code cells at tiny scale (injected after the parameters cell, as papermill)
        kernel = server.request("POST", "/api/kernels", {"name": "python3", "path": "00-start"})
        ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/api/kernels/{kernel['id']}/channels",
                                         header=[f"Authorization: token {server.token}"], timeout=CELL_TIMEOUT)
        try:
            plan = [src(c) for c in code[: i_par + 1]] + ['scale = "tiny"'] + \
                   [src(c) for c in code[i_par + 1: N_CODE_CELLS]]
            for cell in plan:
                r = execute(ws, cell, CELL_TIMEOUT)
                assert r["status"] == "ok" and r["error"] is None, f"cell failed:\n{cell}\n{r['error']}"
            r = execute(ws, "import sys, json; print(json.dumps([sys.executable, sys.prefix, scale, cfg.model]))",
                        CELL_TIMEOUT)
            assert r["status"] == "ok", r["error"]
            executable, prefix, scale, model_name = json.loads(r["stdout"].strip().splitlines()[-1])
            assert executable == sys.executable and prefix == sys.prefix, (executable, prefix)
            assert scale == "tiny" and model_name.startswith("tiny"), (scale, model_name)
            assert "model" in execute(ws, "print('model' if 'model' in dir() else '')", 30)["stdout"]
            # in the Lab kernel an explorer is a live ipywidgets UI (headless runs get the static figure)
            r = execute(ws, "shrink.explore.explore([{'a': 'x', 'b': 1, 'v': 1.0}, {'a': 'y', 'b': 1, 'v': 2.0}], "
                            "['a', 'b'], metric='v')", CELL_TIMEOUT)
            assert r["status"] == "ok", r["error"]
            assert "application/vnd.jupyter.widget-view+json" in r["mime"], r["mime"]
        finally:
            ws.close()

        # 4. saving through the server writes MyST markdown and its paired .ipynb (jupytext.toml applies)
        server.request("PUT", "/api/contents/00-start/00-tour.md", {"type": "notebook", "format": "json",
                                                                    "content": model["content"]})
        saved = (nb_root / "00-start" / "00-tour.md").read_text()
        assert "format_name: myst" in saved and "```{code-cell} ipython3" in saved
        assert (nb_root / "00-start" / "00-tour.ipynb").exists()
    finally:
        if kernel is not None:
            try:
                server.request("DELETE", f"/api/kernels/{kernel['id']}", timeout=20)
            except Exception:  # noqa: BLE001 - the server shutdown below ends it anyway
                pass
        server.stop()
    assert server.proc.poll() is not None
    print(f"server up in {startup:.1f} s, whole check {time.monotonic() - t_start:.1f} s")


def test_configure_merges_default_viewers_and_keeps_other_settings(tmp_path):
    path = lab.settings_overrides_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"@jupyterlab/apputils-extension:themes": {"theme": "JupyterLab Dark"},
                                "@jupyterlab/docmanager-extension:plugin": {"defaultViewers": {"csv": "CSVTable"},
                                                                            "autosave": False}}))
    assert lab.configure(tmp_path) == path
    lab.configure(tmp_path)  # idempotent
    data = json.loads(path.read_text())
    assert data["@jupyterlab/apputils-extension:themes"] == {"theme": "JupyterLab Dark"}
    dm = data["@jupyterlab/docmanager-extension:plugin"]
    assert dm["autosave"] is False
    assert dm["defaultViewers"] == {"csv": "CSVTable", "markdown": "Jupytext Notebook", "myst": "Jupytext Notebook"}
    path.write_text("{not json")
    with pytest.raises(lab.ShrinkError, match="not valid JSON"):
        lab.configure(tmp_path)


def test_command_is_loopback_with_the_repository_jupytext_settings():
    import tomllib

    cmd = lab.command(port=1234, token="t", browser=False)
    assert "--ServerApp.ip=127.0.0.1" in cmd and "--ServerApp.port=1234" in cmd and "--no-browser" in cmd
    assert f"--notebook-dir={ROOT / 'notebooks'}" in cmd and "--IdentityProvider.token=t" in cmd
    cfg = tomllib.loads((ROOT / "jupytext.toml").read_text())
    assert f"--JupytextConfiguration.formats={cfg['formats']}" in cmd
    assert "SHRINK_HEADLESS" not in lab.kernel_env({"SHRINK_HEADLESS": "1", "SHRINK_DATA": "/d"})
    assert lab.kernel_env({"SHRINK_HEADLESS": "1", "SHRINK_DATA": "/d"})["SHRINK_DATA"] == "/d"
