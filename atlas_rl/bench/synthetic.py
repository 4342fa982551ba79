"""A synthetic speculator of known quality, for controller benchmarks and tests.

:class:`ReplayOracleSpeculator` knows the continuation of every row in advance (the completions of a reference
run, e.g. greedy decoding without speculation) and drafts it with each token right with probability ``alpha``
(else a token that is certainly wrong). Under greedy verification its per-token acceptance is then exactly
``alpha`` for as long as the row follows the reference (a row that diverged gets empty drafts). ``alpha`` can be
changed between or during calls, which makes *drift* scenarios: a speculator that degrades while another one
improves, as a draft model trained once degrades while the RL policy moves.
"""

from __future__ import annotations

import time

import numpy as np

from atlas_rl.types import Draft, ProposeInput


class ReplayOracleSpeculator:
    """Drafts the reference continuation of each row with per-token accuracy ``alpha``.

    Args:
        references: completion token ids per row id (row ids as the engine numbers them in a call).
        alpha: probability that each draft token is the reference token, in [0, 1].
        vocab_size: wrong tokens are ``(reference + 1) % vocab_size``.
        name: the speculator's name.
        confidence: the confidence reported for every token (None: ``alpha``, i.e. well calibrated).
        seconds_per_token: simulated drafting cost (busy-waits), e.g. to stand in for a draft head.
        seed: seeds the token corruption.
    """

    hidden_layers: tuple[int, ...] = ()

    def __init__(
        self,
        references: dict[int, list[int]] | list[list[int]],
        alpha: float,
        vocab_size: int,
        name: str = "oracle",
        confidence: float | None = None,
        seconds_per_token: float = 0.0,
        seed: int = 0,
    ) -> None:
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.references = dict(enumerate(references)) if isinstance(references, list) else dict(references)
        self.alpha = alpha
        self.vocab_size = vocab_size
        self.name = name
        self.confidence = confidence
        self.seconds_per_token = seconds_per_token
        self.rng = np.random.default_rng(seed)
        self._prompt_len: dict[int, int] = {}

    def start(self, group_id: int, prompt_ids: list[int], row_ids: list[int]) -> None:
        for r in row_ids:
            self._prompt_len[r] = len(prompt_ids)

    def observe(self, row_id: int, emitted_ids: list[int]) -> None:
        pass

    def stop(self, group_id: int) -> None:
        pass

    def propose(self, rows: ProposeInput, max_tokens: list[int]) -> list[Draft]:
        out = []
        t0 = time.perf_counter()
        work = 0
        for r, toks, k in zip(rows.row_ids, rows.token_ids, max_tokens):
            ref = self.references.get(r)
            p = self._prompt_len.get(r)
            if ref is None or p is None or k <= 0:
                out.append(Draft([], None, [], self.name))
                continue
            done = len(toks) - p  # completion tokens so far, the pending one included
            if toks[p:] != ref[:done]:
                out.append(Draft([], None, [], self.name))  # the row left the reference: nothing to replay
                continue
            nxt = ref[done : done + k]
            ok = self.rng.random(len(nxt)) < self.alpha
            ids = [t if o else (t + 1) % self.vocab_size for t, o in zip(nxt, ok)]
            conf = self.alpha if self.confidence is None else self.confidence
            out.append(Draft(ids, None, [conf] * len(ids), self.name))
            work += len(ids)
        if self.seconds_per_token > 0:
            while time.perf_counter() - t0 < self.seconds_per_token * work:
                pass
        return out
