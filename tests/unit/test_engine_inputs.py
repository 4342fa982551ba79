"""What ``RolloutEngine.generate`` and ``update_weights`` accept (issue 17): a tokenizer's output as prompts, and a
full ``state_dict()`` of a tied-embedding model as weights, loaded all or nothing."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchEncoding

from atlas_rl import SamplingParams
from atlas_rl.models import cache_dir, tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.types import as_token_lists

PROMPTS = [[1, 5, 7], [2, 9, 11, 13, 4]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    return RolloutEngine(tiny_llama(vocab_size=64, dtype=torch.float64, seed=0))


def _left_padded(prompts: list[list[int]], pad: int = 63) -> dict[str, torch.Tensor]:
    """What a tokenizer returns for a batch with ``padding=True, return_tensors="pt"`` and left padding."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # [n, width]
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [n, width]
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    "given, expected",
    [
        (BatchEncoding({"input_ids": [1, 5, 7], "attention_mask": [1, 1, 1]}), [[1, 5, 7]]),  # one conversation
        (BatchEncoding({"input_ids": PROMPTS, "attention_mask": [[1] * 3, [1] * 5]}), PROMPTS),  # a batch
        (BatchEncoding(_left_padded(PROMPTS)), PROMPTS),  # padded tensors: the mask drops the padding
        ({"input_ids": torch.tensor([[1, 5, 7]])}, [[1, 5, 7]]),  # return_tensors="pt", one prompt
        ([1, 5, 7], [[1, 5, 7]]),  # one prompt as a flat list
        (torch.tensor([1, 5, 7]), [[1, 5, 7]]),  # ... or a 1-D tensor
        ([torch.tensor([1, 5, 7]), [2, 9]], [[1, 5, 7], [2, 9]]),
    ],
)
def test_as_token_lists_accepts_tokenizer_outputs(given, expected):
    assert as_token_lists(given) == expected


def test_generate_accepts_a_batch_encoding_like_list_prompts(engine):
    expected = engine.generate(PROMPTS, GREEDY).completion_ids
    assert engine.generate(BatchEncoding(_left_padded(PROMPTS)), GREEDY).completion_ids == expected
    single = BatchEncoding({"input_ids": PROMPTS[0], "attention_mask": [1] * len(PROMPTS[0])})
    assert engine.generate(single, GREEDY).completion_ids == expected[:1]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"attention_mask": [[1]]}, "input_ids"),
        ({"input_ids": [[1, 2]], "attention_mask": [[1]]}, "attention_mask"),
        (torch.zeros(2, 2, 2, dtype=torch.long), "2-D"),
        (torch.zeros(2, 3), "integer"),
        ([[1, "x"]], "non-integer"),
    ],
)
def test_as_token_lists_errors_are_actionable(bad, match):
    with pytest.raises(ValueError, match=match):
        as_token_lists(bad)


@pytest.mark.skipif(
    not (cache_dir() / "smollm2-135m-instruct" / "tokenizer.json").is_file(), reason="embedded model not converted"
)
def test_generate_accepts_apply_chat_template_output():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cache_dir() / "smollm2-135m-instruct")
    messages = [{"role": "user", "content": "hi"}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = as_token_lists(enc)
    assert ids == [list(enc["input_ids"])] and len(ids[0]) > 3
    assert as_token_lists(tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")) == ids
    batch = tok.apply_chat_template([messages, messages], add_generation_prompt=True)
    assert as_token_lists(batch) == ids * 2


def _tied(seed: int) -> torch.nn.Module:
    return tiny_llama(vocab_size=64, dtype=torch.float64, seed=seed, tie_word_embeddings=True)


def test_update_weights_loads_a_full_state_dict_of_a_tied_model():
    m, other = _tied(0), _tied(5)
    assert "lm_head.weight" in other.state_dict() and m.lm_head.weight is m.model.embed_tokens.weight
    eng = RolloutEngine(m)
    assert eng.update_weights(other.state_dict(), version=1) == 1
    assert m.lm_head.weight is m.model.embed_tokens.weight  # still tied
    assert torch.equal(m.lm_head.weight, other.lm_head.weight)
    assert (
        eng.generate(PROMPTS, GREEDY).completion_ids == RolloutEngine(other).generate(PROMPTS, GREEDY).completion_ids
    )


def test_update_weights_is_all_or_nothing():
    m, other = _tied(0), _tied(5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    eng = RolloutEngine(m)
    bad = dict(other.state_dict())  # every entry valid ...
    bad["model.norm.weight"] = torch.zeros(3)  # ... but one, late in the order
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights(bad, version=1)
    with pytest.raises(ValueError, match="no parameter named"):
        eng.update_weights(list(other.state_dict().items()) + [("nope.weight", torch.zeros(1))], version=1)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # nothing was copied
    assert eng.policy_version == 0
