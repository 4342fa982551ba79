"""The full demo on the embedded default, and the report rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from atlas_rl.cli import main


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    # the test setup installs Debian's chromium package when it is missing
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=1200)
    return shutil.which("chromium")


@pytest.mark.slow
def test_report_plots_render_in_headless_chromium(tmp_path):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--tiny",
                "--steps",
                "2",
                "--prompts",
                "2",
                "--generations",
                "2",
                "--max-new-tokens",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    browser = _chromium()
    if browser is None:
        pytest.fail("chromium could not be installed (apt-get install chromium)")
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (out / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r'data-plots="(\d+)/(\d+)"', proc.stdout)
    assert found and found.group(1) == found.group(2) == "7", proc.stdout[-2000:] + proc.stderr[-2000:]


@pytest.mark.slow
def test_full_demo_on_the_embedded_default(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    h = rep["headline"]
    assert h["steps"] == 8 and h["rollout_tokens_per_s"] > 0 and h["baseline_rollout_tokens_per_s"] > 0
    assert h["speedup"] > 0 and "CI of the median" in h["speedup_ci"]
    # The policy learns the answer format within the demo's steps. Measured on the format reward, not the sum: each
    # step draws new prompts, and the correctness part's step-to-step spread (their difficulty) is larger than what
    # 8 steps teach a 135M model; in 9 recorded runs the sum fell once (0.21 -> 0.20) while the format reward rose in
    # all 9 (0.04 -> 0.27 in that one). docs/results/onpolicy_check.md.
    formatted = [r for r in rep["series"]["rewards/formatted/mean"] if r is not None]
    assert len(formatted) == 8
    assert sum(formatted[-3:]) / 3 > sum(formatted[:3]) / 3
