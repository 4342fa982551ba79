"""Issue 15, server mode (the multi-node shape): a stock vLLM server started as ``trl vllm-serve`` starts it, with
our static head as its EAGLE-3 drafter and our worker extension, takes a draft head pushed by
:class:`~atlas_rl.rollout.vllm_server.VllmServerDrafter` — through vLLM's weight-transfer engine (a draft session,
our gloo backend standing in for TRL's NCCL one on this CPU) or, on a server started without one, through
``/collective_rpc``: a perturbed head makes the server's measured acceptance collapse, pushing the static head back
restores it, and greedy outputs stay identical throughout (lossless). Slow (~2 min per server on 2 cores); skipped
when the vLLM venv (``make vllm-env``) is absent."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from vllm_venv import NEEDS_VLLM_VENV, vllm_server

pytestmark = NEEDS_VLLM_VENV


@pytest.fixture(scope="module", params=[True, False], ids=["weight-transfer", "collective-rpc"])
def server(request, tmp_path_factory):
    from atlas_rl.models import default_model_dir, load_target
    from atlas_rl.speculators.defaults import static_head_path

    model, tok = load_target(None, dtype=torch.float32)
    head_dir = static_head_path(model)
    log = tmp_path_factory.mktemp("server") / "server.log"
    with vllm_server(str(default_model_dir()), log, head_dir=str(head_dir), transfer=request.param) as url:
        yield url, model, tok, head_dir, request.param


def _greedy(url: str, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    for p in prompts:
        body = {"prompt": p, "max_tokens": 48, "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=300) as r:
            choice = json.loads(r.read())["choices"][0]
        out.append(choice.get("token_ids") or choice["text"])
    return out


def test_a_pushed_head_drafts_in_the_server(server):
    from atlas_rl.rollout.vllm_server import VllmServerDrafter
    from atlas_rl.speculators.draft_head import DraftHead

    url, model, tok, head_dir, transfer = server
    texts = ["Write a Python function that reverses a list.", "List three colours as a JSON array."]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                            return_dict=False)) for t in texts]  # fmt: skip
    drafter = VllmServerDrafter(url)

    def tau_and_outputs():
        before = drafter.spec_counters()
        outs = _greedy(url, prompts)
        after = drafter.spec_counters()
        drafts = after["num_drafts"] - before["num_drafts"]
        return 1 + (after["num_accepted_tokens"] - before["num_accepted_tokens"]) / max(drafts, 1), outs

    static = DraftHead.from_pretrained(head_dir, target=model)
    tau0, out0 = tau_and_outputs()
    norms0 = drafter.drafter_norms()
    broken = DraftHead.from_pretrained(head_dir, target=model)
    with torch.no_grad():
        for p in broken.parameters():
            p.add_(torch.randn_like(p) * 0.5, alpha=1.0)
    drafter.push(broken)
    assert (drafter.transfer() is not None) == transfer  # the weight-transfer engine carries the head when it runs
    tau1, out1 = tau_and_outputs()
    assert drafter.drafter_norms() != norms0
    drafter.push(static)
    tau2, out2 = tau_and_outputs()
    route = "weight transfer" if transfer else "collective_rpc"
    print(f"server tau ({route}): static {tau0:.3f}, perturbed head pushed {tau1:.3f}, static pushed back {tau2:.3f}")
    assert out0 == out1 == out2  # greedy: lossless whichever head drafts
    assert tau0 > 1.3 and tau1 < 1.1 and abs(tau2 - tau0) < 1e-9
