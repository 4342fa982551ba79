"""Our draft heads in a vLLM *server* (TRL's server mode, the multi-node shape): push a head into the running
server's EAGLE-3 drafter, read its acceptance counters.

The server is vLLM's own (``trl vllm-serve`` only builds its command line) started with our head, our worker
extension and vLLM's dev endpoints::

    VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --speculative-config '{"method": "eagle3", "model": HEAD_DIR,
        "num_speculative_tokens": 4}' --worker-extension-cls atlas_rl.rollout.vllm_worker.AtlasWorkerExtension

(``trl vllm-serve --speculative_config ... --worker-extension-cls ...`` forwards both). TRL's client keeps pushing
the policy over NCCL (``/update_weights``); :class:`VllmServerDrafter` pushes the draft head through
``POST /collective_rpc`` (method ``atlas_reload_drafter``, the head's tensors as one base64 safetensors string:
10-60 MB for our heads, against the policy's GBs), then ``POST /reset_prefix_cache``; acceptance comes from the
``vllm:spec_decode_*`` counters of ``GET /metrics``. Standard library HTTP only.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.request
from typing import Any

from .vllm_worker import encode_tensors

logger = logging.getLogger(__name__)

__all__ = ["VllmServerDrafter", "parse_spec_counters"]

_COUNTER = re.compile(r"^vllm:spec_decode_(\w+?)(?:_total)?(\{[^}]*\})?\s+([0-9.eE+-]+)$")


def parse_spec_counters(text: str) -> dict[str, Any]:
    """vLLM's ``vllm:spec_decode_*`` counters from a Prometheus ``/metrics`` page, summed over label sets; the
    per-position counter as a list by its ``position`` label."""
    out: dict[str, Any] = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
    per_pos: dict[int, int] = {}
    for line in text.splitlines():
        m = _COUNTER.match(line.strip())
        if m is None:
            continue
        name, labels, value = m.group(1), m.group(2) or "", int(float(m.group(3)))
        if name == "num_accepted_tokens_per_pos":
            pos = re.search(r'position="(\d+)"', labels)
            if pos is not None:
                per_pos[int(pos.group(1))] = per_pos.get(int(pos.group(1)), 0) + value
        elif name in out:
            out[name] += value
    out["num_accepted_tokens_per_pos"] = [per_pos[i] for i in sorted(per_pos)]
    return out


class VllmServerDrafter:
    """The drafter of a running vLLM server (module docstring)."""

    def __init__(self, base_url: str, timeout_s: float = 300.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.push_s = 0.0

    def _request(self, path: str, body: dict[str, Any] | None = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path, data=data, headers={"Content-Type": "application/json"} if data else {}
        )
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - the user's server URL
            return resp.read()

    def push(self, head: Any) -> None:
        """Load a :class:`~atlas_rl.speculators.draft_head.DraftHead` (the shapes the server started with) into
        the server's drafter, then drop the prefix cache."""
        from atlas_rl.speculators.draft_head_io import vllm_tensors

        t0 = time.perf_counter()
        payload = encode_tensors(vllm_tensors(head))
        self._request("/collective_rpc", {"method": "atlas_reload_drafter", "args": [payload]})
        self._request("/reset_prefix_cache", {})
        self.push_s = time.perf_counter() - t0
        mb = len(payload) / 1e6
        logger.info("pushed the draft head into %s in %.2f s (%.1f MB)", self.base_url, self.push_s, mb)

    def drafter_norms(self) -> dict[str, list[float]]:
        """The drafter's norm weights as the server's (first) worker holds them."""
        reply = json.loads(self._request("/collective_rpc", {"method": "atlas_drafter_norms"}))
        return reply["results"][0]

    def spec_counters(self) -> dict[str, Any]:
        """The server's cumulative ``vllm:spec_decode_*`` counters."""
        return parse_spec_counters(self._request("/metrics").decode())
