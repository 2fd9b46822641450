"""A real ComfyUI server with this pack loaded, for end-to-end tests (HTTP API, later the browser).

    with ComfyServer(comfy_root, sys.executable, models_dir=tmp / "models") as srv:
        status, body = srv.post_prompt(api_workflow)
        entry = srv.wait_history(body["prompt_id"])

Isolation: everything the server writes goes to a temp work dir (--base-directory, output, input,
temp, user, database), so it never touches the ComfyUI tree and never loads that tree's
custom_nodes (where run.sh may have linked another copy of the pack). The pack is loaded the way a
user's yaml would do it: an --extra-model-paths-config yaml whose `custom_nodes:` names a temp dir
holding a symlink to this repo, next to the model folders.

Lifetime: the server runs in its own process group (start_new_session); stop() kills the group,
waits, and checks that the port is free and no process of the group is left.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
PACK_NAME = "ComfyUI-LLMDiff"  # the folder name users get from git clone; python_module = custom_nodes.<it>
MODEL_FOLDERS = ("checkpoints", "vae", "loras", "text_encoders", "diffusion_models", "embeddings",
                 "controlnet", "LLM", "llmdiff")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class ServerError(RuntimeError):
    """The server failed to start, answered wrongly or timed out; the message ends with its log."""


class ComfyServer:
    """Context manager running `main.py` from `comfy_root` with `python` on a free loopback port.

    models_dir:       folder whose subfolders (MODEL_FOLDERS) are registered; default <work>/models.
    extra_yaml_paths: more yaml entries, {folder name: path or [paths]} (e.g. {"llm": "/x"}).
    extra_args:       more ComfyUI command-line arguments.
    """

    def __init__(self, comfy_root: str | os.PathLike[str], python: str,
                 extra_yaml_paths: Mapping[str, str | os.PathLike[str] | Sequence[str | os.PathLike[str]]] | None = None,
                 models_dir: str | os.PathLike[str] | None = None, extra_args: Sequence[str] = (),
                 startup_timeout: float = 180.0, work_dir: str | os.PathLike[str] | None = None,
                 keep_work_dir: bool = False) -> None:
        self.comfy_root = Path(comfy_root).resolve()
        if not (self.comfy_root / "main.py").is_file():
            raise ServerError(f"{self.comfy_root} is not a ComfyUI root (no main.py)")
        self.python = python
        self.extra_yaml_paths = dict(extra_yaml_paths or {})
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self._own_work = work_dir is None
        self.work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="llmdiff-server-"))
        self.keep_work_dir = keep_work_dir
        self.models_dir = Path(models_dir) if models_dir else self.work / "models"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.work / "server.log"
        self.client_id = uuid.uuid4().hex
        self.startup_seconds: float | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _write_layout(self) -> Path:
        packs = self.work / "custom_nodes"
        packs.mkdir(parents=True, exist_ok=True)
        link = packs / PACK_NAME
        if not link.is_symlink():
            link.symlink_to(REPO, target_is_directory=True)
        for sub in ("base/custom_nodes", "input", "output", "temp", "user/default"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        # Skip the frontend's first-run "Templates" dialog (matters for browser tests).
        (self.work / "user/default/comfy.settings.json").write_text('{"Comfy.TutorialCompleted": true}')
        for folder in MODEL_FOLDERS:
            (self.models_dir / folder).mkdir(parents=True, exist_ok=True)
        entries: dict[str, list[str]] = {"custom_nodes": [str(packs)]}
        for folder in MODEL_FOLDERS:
            entries.setdefault(folder, []).append(str(self.models_dir / folder))
        for name, value in self.extra_yaml_paths.items():
            values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
            entries.setdefault(name, []).extend(str(v) for v in values)
        # JSON is valid YAML; "|" blocks are how ComfyUI's loader takes several paths per key.
        yaml_path = self.work / "extra_model_paths.yaml"
        section = {k: "\n".join(v) for k, v in entries.items()}
        yaml_path.write_text(json.dumps({"llmdiff_test": section}, indent=1))
        return yaml_path

    def start(self) -> "ComfyServer":
        if self.proc is not None:
            raise ServerError("server already started")
        yaml_path = self._write_layout()
        self.port = free_port()
        cmd = [self.python, "main.py", "--listen", "127.0.0.1", "--port", str(self.port),
               "--cpu", "--use-pytorch-cross-attention", "--disable-auto-launch",
               "--base-directory", str(self.work / "base"),
               "--extra-model-paths-config", str(yaml_path),
               "--output-directory", str(self.work / "output"), "--input-directory", str(self.work / "input"),
               "--temp-directory", str(self.work / "temp"), "--user-directory", str(self.work / "user"),
               "--database-url", f"sqlite:///{self.work / 'comfyui.db'}", *self.extra_args]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            # cwd= rather than `cd X && ...`: Popen's pid is python itself (the PID trap, test-environment §4).
            self.proc = subprocess.Popen(cmd, cwd=self.comfy_root, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = t0 + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                self._fail(f"ComfyUI exited with code {self.proc.returncode} during startup")
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self._fail(f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f} s")
            time.sleep(0.25)
        self.startup_seconds = time.monotonic() - t0
        return self

    def _fail(self, what: str) -> None:
        log = self.log_tail()
        self.stop()
        raise ServerError(f"{what}.\n--- server log ({self.log_path}) ---\n{log}")

    def stop(self, timeout: float = 20.0) -> None:
        """Kill the whole process group, wait for it, verify nothing is left. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None:
            pgid = proc.pid  # start_new_session: the group id is the leader's pid
            for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    continue
                if not self._group_alive(pgid):
                    break
                time.sleep(0.5)  # children of the leader may outlive it by a moment
            if self._group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
                time.sleep(0.5)
            if self._group_alive(pgid):
                raise ServerError(f"processes of group {pgid} survived SIGKILL")
            for _ in range(40):
                if port_is_free(self.port):
                    break
                time.sleep(0.25)
            else:
                raise ServerError(f"port {self.port} still in use after the server stopped")
        if self._own_work and not self.keep_work_dir and self.work.exists():
            shutil.rmtree(self.work, ignore_errors=True)

    @staticmethod
    def _group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    # ---- HTTP helpers -----------------------------------------------------------------------
    def _request(self, path: str, data: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:  # 4xx/5xx still carry a JSON body worth returning
            return e.code, e.read()

    def get_json(self, path: str) -> Any:
        status, body = self._request(path)
        if status != 200:
            raise ServerError(f"GET {path} -> {status}: {body[:500]!r}\n--- server log ---\n{self.log_tail()}")
        return json.loads(body)

    def post_prompt(self, api_workflow: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """POST /prompt. Returns (HTTP status, JSON body); 200 may still carry node_errors: check them."""
        payload = json.dumps({"prompt": api_workflow, "client_id": self.client_id}).encode()
        status, body = self._request("/prompt", payload)
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = {"raw": body.decode(errors="replace")}
        return status, parsed

    def wait_history(self, prompt_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Poll /history/<id> until the prompt completed (or failed); return its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry:  # ComfyUI writes the history entry once the prompt finished (success or error)
                return entry
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError(f"server died while running {prompt_id}\n{self.log_tail()}")
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} not finished after {timeout:.0f} s\n"
                          f"queue: {self.get_json('/queue')}\n--- server log ---\n{self.log_tail()}")

    def fetch_image(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, body = self._request(f"/view?{query}")
        if status != 200:
            raise ServerError(f"GET /view {filename!r} ({type}/{subfolder}) -> {status}")
        return body
