"""What runs inside vLLM's workers: pushing our draft head into vLLM's EAGLE-3 drafter and the policy into the
target, by vLLM's own in-place reloads.

:class:`AtlasWorkerExtension` is mixed into vLLM's worker class (``LLM(worker_extension_cls=EXTENSION)``, or
``vllm serve --worker-extension-cls atlas_rl.rollout.vllm_worker.AtlasWorkerExtension`` for a server), so the
same methods are reached in-process (``llm.collective_rpc("atlas_reload_drafter", args=(tensors,))``) and over
HTTP (a server started with ``VLLM_SERVER_DEV_MODE=1``, as ``trl vllm-serve`` does, exposes ``POST
/collective_rpc``; its arguments are strings, so tensors travel as base64 safetensors, :func:`encode_tensors`).
Imports only torch and safetensors at module level: vLLM imports it in every worker.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

EXTENSION = "atlas_rl.rollout.vllm_worker.AtlasWorkerExtension"

Tensors = list[tuple[str, torch.Tensor]]


def encode_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """Tensors as one base64 string of safetensors bytes (what ``/collective_rpc`` can carry)."""
    from safetensors.torch import save

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in tensors.items():
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v  # tied weights (embedding = LM head) share storage: copy once more
        seen.add(ptr)
    return base64.b64encode(save(out)).decode("ascii")


def decode_tensors(payload: str | Tensors) -> Tensors:
    """The inverse of :func:`encode_tensors`; a list of ``(name, tensor)`` passes through (in-process calls)."""
    if not isinstance(payload, str):
        return list(payload)
    from safetensors.torch import load

    return list(load(base64.b64decode(payload)).items())


class AtlasWorkerExtension:
    """Methods vLLM adds to its worker (``self`` is the worker: ``model_runner``, ``vllm_config``)."""

    model_runner: Any
    vllm_config: Any

    def atlas_reload_drafter(self, payload: str | Tensors) -> None:
        """Replace the EAGLE-3 drafter's weights in place (vLLM's names: ``midlayer.*``, ``d2t``, ``t2d``, ...)
        through vLLM's layerwise reload (CPU linear layers are repacked after loading; a plain ``load_weights``
        into them fails)."""
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        model = self.model_runner.drafter.model
        initialize_layerwise_reload(model)
        model.load_weights(iter(decode_tensors(payload)))
        finalize_layerwise_reload(model, self.vllm_config.speculative_config.draft_model_config)

    def atlas_reload_policy(self, payload: str | Tensors) -> None:
        """Replace the target's weights in place (Hugging Face checkpoint names)."""
        self.model_runner.reload_weights(weights_iterator=iter(decode_tensors(payload)), is_checkpoint_format=True)

    def atlas_server_info(self) -> dict[str, Any]:
        """What a remote trainer needs to know: the device type, the model's dtype, whether a drafter runs."""
        spec = self.vllm_config.speculative_config
        return {
            "device": str(self.vllm_config.device_config.device_type),
            "dtype": str(self.vllm_config.model_config.dtype).removeprefix("torch."),
            "speculative": spec is not None,
            "num_speculative_tokens": int(spec.num_speculative_tokens) if spec is not None else 0,
        }

    def atlas_drafter_norms(self) -> dict[str, list[float]]:
        """The drafter's norm weights as vLLM holds them (its repacked linear layers are out of view): a cheap
        fingerprint that tells which head's weights the drafter runs."""
        st = self.model_runner.drafter.model.state_dict()
        return {k: v.float().tolist() for k, v in sorted(st.items()) if k.endswith("norm.weight")}


def _register_transfer_engine() -> None:
    """Register our gloo weight-transfer backend in vLLM's processes: a worker imports this module (its extension)
    before it builds the weight-transfer engine. Without vLLM (the trainer's side) there is nothing to register."""
    try:
        from .vllm_gloo_engine import register
    except ImportError:
        return
    register()


_register_transfer_engine()
