"""Every code example of README.md runs exactly as printed (extracted from the README, nothing substituted).

The API example runs on the embedded default model. The TRL example reads ``ATLAS_RL_MODEL`` (documented next to
it): the default suite points it at a tiny random model saved to a directory, the slow suite runs it on the
embedded model. ``python -c`` of the TRL example exits 0; with a reward that raises it exits 1 and prints the
reward's error (no abort from background retraining).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples() -> dict[str, str]:
    """The ```python blocks of README.md, keyed by the heading of their section."""
    text = README.read_text()
    out: dict[str, str] = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        for i, block in enumerate(re.findall(r"```python\n(.*?)```", section, re.S)):
            out[title if i == 0 else f"{title} #{i + 1}"] = block
    return out


def test_readme_has_exactly_the_two_examples_this_file_runs():
    assert sorted(_examples()) == ["API", "Drop it into TRL"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    tiny_llama(vocab_size=len(tok), hidden_size=64, seed=0, **tiny_token_ids(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _env(model_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("ATLAS_RL_MODEL", None)
    if model_dir is not None:
        env["ATLAS_RL_MODEL"] = str(model_dir)
    return env


def _python_c(code: str, cwd: Path, model_dir: Path | None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=_env(model_dir), capture_output=True, text=True, timeout=900
    )


def test_api_example_runs_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "readme_api_example"}
    exec(compile(_examples()["API"], str(README), "exec"), namespace)
    batch, engine = namespace["batch"], namespace["engine"]
    assert len(batch.completion_ids) == 4 and all(len(c) >= 1 for c in batch.completion_ids)
    assert [len(lp) for lp in batch.logprobs] == [len(c) for c in batch.completion_ids]
    assert engine.policy_version == 1


def test_trl_example_exits_zero_as_printed(tmp_path, tiny_model_dir):
    proc = _python_c(_examples()["Drop it into TRL"], tmp_path, tiny_model_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr


def test_trl_example_with_a_raising_reward_exits_one_with_its_error(tmp_path, tiny_model_dir):
    code = _examples()["Drop it into TRL"]
    body = '    return [arithmetic_reward(c[0]["content"], a) for c, a in zip(completions, answer)]\n'
    assert body in code, "README example changed: update the reward line this test replaces"
    code = code.replace(body, '    raise ValueError("my reward is broken")\n')
    proc = _python_c(code, tmp_path, tiny_model_dir)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "ValueError: my reward is broken" in proc.stderr and "terminate called" not in proc.stderr


@pytest.mark.slow
def test_trl_example_exits_zero_on_the_embedded_model(tmp_path):
    proc = _python_c(_examples()["Drop it into TRL"], tmp_path, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
