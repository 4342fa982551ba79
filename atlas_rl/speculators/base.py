"""The Speculator protocol and a small registry of speculator classes by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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

    Optional members (declared on :class:`SpeculatorExtras` with their defaults; the engine resolves them once,
    when the speculator is registered, with :func:`speculator_extras`):

    * ``expected_acceptance`` (float in (0, 1) or None): the per-token acceptance the speculator expects under
      sampling before any evidence (e.g. measured on held-out prompts when it was trained); the auto controller
      starts from it instead of its generic prior, so a speculator known to be weak is not explored at a loss;
    * ``draft_macs_per_token`` (int or None): multiply-accumulates to draft one token for one row (a draft head's
      layers and output rows); before the engine has timed the speculator, the auto controller prices its drafts
      at this share of a target forward (the target's MACs per token) instead of as free;
    * ``on_policy_update(version)``: the engine loaded policy weights ``version`` (e.g. reload a retrained head);
    * ``observe_hidden(...)``: see :class:`HiddenStateObserver` (required when ``hidden_layers`` is not empty).
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

        Called after the prefill (``num_new[i]`` = prompt length: every prompt position; each row once, possibly
        over several calls of disjoint rows: one per prefill chunk and sample of a group) and after every
        verification forward (``num_new[i]`` = accepted drafts + 1). Position j < ``num_new[i]`` of row i
        produced the token ``tokens[len(tokens) - num_new[i] + j]`` of that row (``tokens`` = prompt + emitted,
        the pending token last); a row that stopped in this step may have emitted fewer tokens. Tensors
        belong to the engine: copy what you keep.
        """
        ...


class SpeculatorExtras(Protocol):
    """The optional members of a :class:`Speculator`, with the defaults a speculator gets when it lacks them.

    A speculator class may subclass this Protocol explicitly to inherit the defaults; structural implementations
    get them from :func:`speculator_extras`.
    """

    expected_acceptance: float | None = None
    draft_macs_per_token: int | None = None

    def on_policy_update(self, version: int) -> None:
        """The engine now runs policy weights ``version`` (default: nothing to do)."""
        return None

    def observe_hidden(
        self,
        row_ids: list[int],
        hidden_states: dict[int, torch.Tensor],  # layer -> [n, m, hidden]
        num_new: list[int],
    ) -> None:
        """See :meth:`HiddenStateObserver.observe_hidden` (default: ignore the features)."""
        return None


@dataclass(frozen=True)
class ResolvedExtras:
    """A speculator's optional members, bound (its own where it has them, else the defaults)."""

    expected_acceptance: float | None
    draft_macs_per_token: int | None
    on_policy_update: Callable[[int], None]
    observe_hidden: Callable[[list[int], dict[int, torch.Tensor], list[int]], None]


class _Defaults(SpeculatorExtras):
    pass


_DEFAULTS = _Defaults()


def speculator_extras(spec: Speculator) -> ResolvedExtras:
    """The optional members of ``spec``, bound (defaults from :class:`SpeculatorExtras` where it lacks them).

    Raises:
        ValueError: ``spec`` needs hidden states (``hidden_layers``) but has no ``observe_hidden``, or states an
            ``expected_acceptance`` outside (0, 1) or a ``draft_macs_per_token`` that is not a positive int.
    """
    if spec.hidden_layers and not isinstance(spec, HiddenStateObserver):
        raise ValueError(f"speculator {spec.name!r} names hidden_layers but does not implement observe_hidden")
    # the one place that looks members up by name: everything after this calls the resolved ones
    p = getattr(spec, "expected_acceptance", _DEFAULTS.expected_acceptance)
    if p is not None and not (isinstance(p, (int, float)) and 0.0 < p < 1.0):
        raise ValueError(f"speculator {spec.name!r}: expected_acceptance must lie in (0, 1) or be None, got {p!r}")
    macs = getattr(spec, "draft_macs_per_token", _DEFAULTS.draft_macs_per_token)
    if macs is not None and (isinstance(macs, bool) or not isinstance(macs, int) or macs < 1):
        raise ValueError(
            f"speculator {spec.name!r}: draft_macs_per_token must be a positive int or None, got {macs!r}"
        )
    return ResolvedExtras(
        expected_acceptance=None if p is None else float(p),
        draft_macs_per_token=macs,
        on_policy_update=getattr(spec, "on_policy_update", _DEFAULTS.on_policy_update),
        observe_hidden=getattr(spec, "observe_hidden", _DEFAULTS.observe_hidden),
    )


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
