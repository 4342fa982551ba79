"""The Speculator protocol and a small registry of speculator classes by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch

from atlas_rl.types import Draft, ProposeInput


@runtime_checkable
class Speculator(Protocol):
    """Proposes draft tokens for the rows of a rollout batch.

    Lifecycle inside one ``RolloutEngine.generate`` call:

    * ``start(group_id, prompt_ids, row_ids)`` once per prompt group, before its first step
      (``row_ids`` are the rows that sample that prompt);
    * ``propose(rows, max_tokens)`` each step for the rows the controller gave this speculator;
      ``max_tokens[i]`` bounds the length of row i's draft (may be 0); an empty draft is allowed;
    * ``observe(row_id, emitted_ids)`` after each step with the tokens row ``row_id`` emitted
      (accepted drafts + the recovered/bonus token, truncated at a stop token);
    * ``stop(group_id)`` when every row of the group has finished.

    ``hidden_layers`` names the target layers whose hidden states the speculator needs (HF ``hidden_states``
    index: 0 = embeddings, l = after decoder layer l, -1 = the final normed output); empty for model-free
    speculators, which then cost the engine nothing extra. Speculators with ``hidden_layers`` must also
    implement :class:`HiddenStateObserver`.

    Optionally, ``expected_acceptance`` (float in (0, 1)) is the per-token acceptance the speculator expects
    under sampling before any evidence (e.g. measured on held-out prompts when it was trained); the auto
    controller starts from it instead of its generic prior, so a speculator known to be weak is not explored at
    a loss.
    """

    name: str
    hidden_layers: tuple[int, ...]

    def start(self, group_id: int, prompt_ids: list[int], row_ids: list[int]) -> None: ...

    def propose(self, rows: ProposeInput, max_tokens: list[int]) -> list[Draft]: ...

    def observe(self, row_id: int, emitted_ids: list[int]) -> None: ...

    def stop(self, group_id: int) -> None: ...


@runtime_checkable
class HiddenStateObserver(Protocol):
    def observe_hidden(
        self,
        row_ids: list[int],
        hidden_states: dict[int, torch.Tensor],  # layer -> [n, m, hidden]
        num_new: list[int],
    ) -> None:
        """Target features of positions that now lie on the sequences, for every active row.

        Called once after the prefill (``num_new[i]`` = prompt length: every prompt position) and after every
        verification forward (``num_new[i]`` = accepted drafts + 1). Position j < ``num_new[i]`` of row i
        produced the token ``tokens[len(tokens) - num_new[i] + j]`` of that row (``tokens`` = prompt + emitted,
        the pending token last); a row that stopped in this step may have emitted fewer tokens. Tensors
        belong to the engine: copy what you keep.
        """
        ...


_REGISTRY: dict[str, Callable[..., Speculator]] = {}


def register_speculator(name: str) -> Callable[[type], type]:
    """Class decorator: make a speculator constructible by name (``build_speculator(name, **kw)``)."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        return cls

    return deco


def build_speculator(name: str, **kwargs: object) -> Speculator:
    if name not in _REGISTRY:
        raise ValueError(f"unknown speculator {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def registered_speculators() -> list[str]:
    return sorted(_REGISTRY)
