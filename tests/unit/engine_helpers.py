"""Speculators used by the engine tests: real (if simple) draft models, not mocks of the target.

* ``BigramSpeculator``: a fixed random bigram LM as draft model; one-hot (argmax chain) or soft (tokens sampled
  from its processed distribution, with ``draft_probs``) — cheap enough for thousands of rows.
* ``NoisyOracleSpeculator``: drafts the target's own greedy continuation with random corruptions, so that
  acceptance stops at varied positions (ragged acceptance) in greedy tests.
"""

from __future__ import annotations

import torch

from atlas_rl.types import Draft, ProposeInput
from atlas_rl.verification import processed_probs


class BigramSpeculator:
    hidden_layers: tuple[int, ...] = ()

    def __init__(self, vocab_size: int, soft: bool, seed: int = 0, scale: float = 3.0, name: str = "bigram") -> None:
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.randn(vocab_size, vocab_size, generator=g, dtype=torch.float64) * scale  # [V, V]
        self.soft = soft
        self.name = name
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.observed: dict[int, list[int]] = {}
        self.started: list[int] = []
        self.stopped: list[int] = []

    def start(self, group_id: int, prompt_ids: list[int], row_ids: list[int]) -> None:
        self.started.append(group_id)
        for r in row_ids:
            self.observed[r] = []

    def observe(self, row_id: int, emitted_ids: list[int]) -> None:
        self.observed[row_id].extend(emitted_ids)

    def stop(self, group_id: int) -> None:
        self.stopped.append(group_id)

    def propose(self, rows: ProposeInput, max_tokens: list[int]) -> list[Draft]:
        out = []
        for toks, k in zip(rows.token_ids, max_tokens):
            last = toks[-1]
            ids: list[int] = []
            probs = []
            for _ in range(k):
                if self.soft:
                    p = processed_probs(self.logits[last], rows.sampling)  # [V]
                    t = int(torch.multinomial(p, 1, generator=self.gen))
                    probs.append(p)
                else:
                    t = int(self.logits[last].argmax())
                ids.append(t)
                last = t
            out.append(Draft(ids, torch.stack(probs) if (self.soft and probs) else None, speculator=self.name))
        return out


class StatelessSpeculator:
    """The lifecycle of a speculator that keeps no per-row state (start/observe/stop do nothing)."""

    hidden_layers: tuple[int, ...] = ()

    def start(self, group_id: int, prompt_ids: list[int], row_ids: list[int]) -> None:
        pass

    def observe(self, row_id: int, emitted_ids: list[int]) -> None:
        pass

    def stop(self, group_id: int) -> None:
        pass


class NoisyOracleSpeculator(StatelessSpeculator):
    """Greedy continuation of the target (teacher-forced, no cache), each token replaced with prob ``noise``."""

    name = "oracle"

    def __init__(self, model: torch.nn.Module, noise: float = 0.3, seed: int = 0) -> None:
        self.model = model
        self.noise = noise
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab = model.config.vocab_size
        self._greedy_next: dict[tuple[int, ...], int] = {}  # memo: prefix -> target argmax

    def _next(self, seq: list[int]) -> int:
        key = tuple(seq)
        if key not in self._greedy_next:
            ids = torch.tensor([seq], device=next(self.model.parameters()).device)
            self._greedy_next[key] = int(self.model(ids).logits[0, -1].argmax())
        return self._greedy_next[key]

    @torch.no_grad()
    def propose(self, rows: ProposeInput, max_tokens: list[int]) -> list[Draft]:
        out = []
        for toks, k in zip(rows.token_ids, max_tokens):
            d: list[int] = []
            for _ in range(k):
                nxt = self._next(toks + d)
                if float(torch.rand(1, generator=self.gen)) < self.noise:
                    nxt = int(torch.randint(0, self.vocab, (1,), generator=self.gen))
                d.append(nxt)
            out.append(Draft(d, None, speculator=self.name))
        return out


@torch.no_grad()
def teacher_forced_logprobs(model, prompt: list[int], completion: list[int], sampling) -> torch.Tensor:
    """Processed logprobs of ``completion`` under ``model`` recomputed from scratch over prompt+completion."""
    from atlas_rl.verification import processed_logprobs

    full = torch.tensor([prompt + completion])
    logits = model(full).logits[0, len(prompt) - 1 : -1]  # [T, V]
    lp = processed_logprobs(logits, sampling)
    return lp[torch.arange(len(completion)), torch.tensor(completion)]


class RerunGraph:
    """A CUDA-graph stand-in (``atlas_rl.graph_capture.Graph``) for tests on any device: it replays by re-running
    the captured function and copying its outputs into the tensors it returned at capture, which is what a CUDA
    graph's replay computes (same static input buffers, outputs rewritten in place). The model, the caches and the
    math are the real ones."""

    def __init__(self) -> None:
        self.fn = None
        self.out = None

    def capture(self, fn):
        self.fn, self.out = fn, fn()
        return self.out

    def replay(self) -> None:
        for dst, src in zip(self.out, self.fn()):
            if dst is not None:
                dst.copy_(src)


class FailingGraph(RerunGraph):
    """A graph whose capture fails as CUDA's does when a captured op syncs with the host."""

    def capture(self, fn):
        raise RuntimeError("operation not permitted when stream is capturing")
