"""A vLLM weight-transfer engine over gloo: vLLM's RL weight-sync routes (``/init_weight_transfer_engine``,
``/start_weight_update``, ``/start_draft_weight_update``, ``/update_weights``, ``/finish_weight_update``) on
machines without NCCL (CPU servers), so the trainer drives a server the same way whatever the transport
(``docs/decisions/vllm_engine.md``).

The worker side of :mod:`atlas_rl.rollout.vllm_transfer`'s :class:`~atlas_rl.rollout.vllm_transfer.GlooTransport`:
joins the trainer's gloo group (a plain ``torch.distributed`` TCPStore + ``ProcessGroupGloo``, the trainer at rank 0),
receives each announced tensor by broadcast and loads it through vLLM's layerwise reload, into the target or, in
a draft session, into the EAGLE-3 drafter (vLLM's worker retargets the engine). Registered as backend
``"atlas_gloo"`` when :mod:`atlas_rl.rollout.vllm_worker` is imported in a worker (``--worker-extension-cls``), so
a server is started with ``--weight-transfer-config '{"backend": "atlas_gloo"}'``. Imports vLLM: only vLLM's
processes load this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

BACKEND = "atlas_gloo"


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    """Where the trainer's store listens, this server's first rank in the group, and the group's size."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    """The tensors that follow, in broadcast order (vLLM's NCCL update info, same fields)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(
                f"names, dtype_names and shapes must have one entry per tensor: got {len(self.names)}, "
                f"{len(self.dtype_names)} and {len(self.shapes)}"
            )


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receives weights by gloo broadcast from the trainer (rank 0) and reloads them layerwise."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group: Any = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        timeout = timedelta(seconds=init_info.timeout_s)
        store = dist.TCPStore(
            init_info.master_address, init_info.master_port, init_info.world_size, is_master=False, timeout=timeout
        )
        self.group = dist.ProcessGroupGloo(store, rank, init_info.world_size, timeout)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class synchronises an accelerator afterwards; a CPU worker has none and gloo is synchronous
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: POST /init_weight_transfer_engine first")
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        error: Exception | None = None
        for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
            weight = torch.empty(shape, dtype=getattr(torch, dtype_name))
            self.group.broadcast([weight], opts).wait()
            if error is None:  # after a failed load keep receiving: the trainer's broadcasts must not hang
                try:
                    self.model.load_weights([(name, weight)])
                except Exception as e:  # noqa: BLE001 - re-raised below, after the last broadcast
                    error = e
        if error is not None:
            raise error

    def shutdown(self) -> None:
        self.group = None


def register() -> None:
    """Make ``"atlas_gloo"`` a weight-transfer backend in this process (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "GlooWeightTransferEngine")
    except ValueError:  # registered already (the module was imported before)
        pass
