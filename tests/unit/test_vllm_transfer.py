"""The trainer's side of vLLM's weight-transfer engine (:mod:`atlas_rl.rollout.vllm_transfer`) without vLLM: which
backend a server runs, the transport errors a user can hit, and the gloo data plane against a receiver that joins
the group as a server's worker does (announce, then broadcast in order; mixed dtypes arrive bit-exactly). The real
server (our ``atlas_gloo`` engine inside vLLM) is tested in the vLLM venv: tests/integration/test_vllm_server_*.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from atlas_rl.rollout.vllm_transfer import (
    GlooTransport,
    ServerWeightTransfer,
    make_transport,
    server_transfer_backend,
)


@pytest.mark.parametrize(
    ("info", "backend"),
    [
        ({"vllm_config": {"weight_transfer_config": {"backend": "atlas_gloo"}}}, "atlas_gloo"),
        ({"vllm_config": {"weight_transfer_config": '{"backend": "nccl"}'}}, "nccl"),
        ({"weight_transfer_config": {"backend": "nccl"}}, "nccl"),
        ({"vllm_config": {"weight_transfer_config": None}}, None),
        ({"vllm_config": {}}, None),
    ],
)
def test_the_servers_backend_is_read_from_server_info(info, backend):
    assert server_transfer_backend(info) == backend


def test_transport_errors_name_the_fix():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="atlas_gloo"):
            make_transport("nccl", "http://127.0.0.1:8000", "127.0.0.1")
    with pytest.raises(ValueError, match="unsupported weight-transfer backend 'ipc'"):
        make_transport("ipc", "http://127.0.0.1:8000", "127.0.0.1")
    assert isinstance(make_transport("atlas_gloo", "http://127.0.0.1:8000"), GlooTransport)


class InProcessWorker:
    """The control plane answered in-process by one receiver that does what a server's worker does with our gloo
    backend: join the group at rank 1, then receive each announced tensor by broadcast."""

    def __init__(self) -> None:
        self.draft = False
        self.calls: list[str] = []
        self.received: dict[str, dict[str, torch.Tensor]] = {"target": {}, "drafter": {}}
        self.group = None
        self.session = "target"

    def world_size(self) -> int:
        return 1

    def init_weight_transfer_engine(self, info: dict) -> None:
        timeout = timedelta(seconds=info["timeout_s"])
        store = dist.TCPStore(info["master_address"], info["master_port"], info["world_size"], False, timeout=timeout)
        self.group = dist.ProcessGroupGloo(store, info["rank_offset"], info["world_size"], timeout)

    def start_weight_update(self) -> None:
        self.session = "drafter" if self.draft else "target"
        self.calls.append("start_" + self.session)

    def update_weights(self, info: dict) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        for name, dtype, shape in zip(info["names"], info["dtype_names"], info["shapes"]):
            t = torch.empty(shape, dtype=getattr(torch, dtype))
            self.group.broadcast([t], opts).wait()
            self.received[self.session][name] = t

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.calls.append(f"finish:{weight_version}")


def test_gloo_transfer_delivers_policy_and_draft_sessions_bit_exactly():
    g = torch.Generator().manual_seed(0)
    policy = {
        "embed.weight": torch.randn(7, 5, generator=g),
        "layer.weight": torch.randn(5, 4, generator=g).to(torch.bfloat16).t(),  # non-contiguous
        "positions": torch.arange(6, dtype=torch.int64),
    }
    head = {"midlayer.w": torch.randn(3, 3, generator=g), "t2d": torch.rand(9, generator=g) > 0.5}
    worker = InProcessWorker()
    transfer = ServerWeightTransfer(worker, GlooTransport("127.0.0.1", timeout_s=30))
    seconds = transfer.send(policy.items(), version=4)
    transfer.send(head.items(), draft=True, version=5)
    assert seconds > 0
    assert worker.calls == ["start_target", "finish:4", "start_drafter", "finish:None"]
    for sent, got in ((policy, worker.received["target"]), (head, worker.received["drafter"])):
        assert list(got) == list(sent)
        for k, v in sent.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
