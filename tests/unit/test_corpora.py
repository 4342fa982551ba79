"""Teacher-forced corpora of the static head: collection (exclusions), chunking, deduplication, chat labelling, the
deterministic mix, and the sharded cache (resumes, keyed by its settings). Tiny random Llama over the real
SmolLM2 tokenizer's vocabulary, so the chat template is the real one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from atlas_rl.models import load_target, tiny_llama
from atlas_rl.training import static_corpus as sc
from atlas_rl.training.corpora import (
    Chunk,
    CorpusItem,
    CorpusSettings,
    build_corpus,
    chunk_text,
    dedup_chunks,
    format_item,
    labelled_tokens,
    mix_items,
)
from atlas_rl.training.corpus_files import load_source_spec
from atlas_rl.training.offline import samples_from_sequences
from atlas_rl.training.static_config import StaticSpeculatorConfig

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon "
    "phi chi psi omega river mountain forest valley ocean desert island meadow canyon glacier"
).split()


@pytest.fixture(scope="module")
def tokenizer():
    return load_target()[1]


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama(vocab_size=49152, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=1)


def _code(seed: int, lines: int = 30) -> str:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(lines):
        a, b, c = (WORDS[int(j)] for j in torch.randint(len(WORDS), (3,), generator=g))
        out.append(f"def {a}_{i}({b}, {c}):\n    return {b} + {c}  # {a} {b} {c}\n")
    return "".join(out)


def _sources(tmp_path: Path) -> Path:
    """A source list over ``tmp_path/src``: two clean files, one whose path names HumanEval, one that quotes GSM8K."""
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "one.py").write_text(_code(1))
    (root / "pkg" / "two.py").write_text(_code(2))
    (root / "pkg" / "copy_of_one.py").write_text(_code(1))  # an exact duplicate
    (root / "human_eval").mkdir()
    (root / "human_eval" / "tasks.py").write_text(_code(3))
    (root / "pkg" / "loader.py").write_text(_code(4) + "\n# loads the gsm8k test split\n")
    spec = load_source_spec()
    spec["sources"] = [
        {
            "name": "tmp-python",
            "domain": "code_python",
            "language": "python",
            "license": "MIT",
            "root": str(root),
            "globs": ["**/*.py"],
            "kind": "text",
            "max_bytes": 10_000_000,
        }
    ]
    path = tmp_path / "sources.json"
    path.write_text(json.dumps(spec))
    return path


def _settings(**kw) -> CorpusSettings:
    base = dict(max_len=160, min_tokens=16, mix={"code_python": 1.0}, chat_share=0.5)
    base.update(kw)
    return CorpusSettings(**base)


def test_chunk_text_cuts_at_line_boundaries_within_max_tokens(tokenizer):
    text = _code(5, lines=40)
    pieces = chunk_text(text, tokenizer, max_tokens=64, min_tokens=8)
    assert len(pieces) > 3
    lines = set(text.splitlines())
    for p in pieces:
        assert len(tokenizer(p, add_special_tokens=False)["input_ids"]) <= 64 + 2  # line counts ~ the piece's
        assert all(ln in lines for ln in p.splitlines())


def test_dedup_drops_exact_and_near_duplicates_keeps_distinct():
    base = " ".join(WORDS[i % len(WORDS)] + str(i % 7) for i in range(300))
    near = base.replace("alpha0", "ALPHA_CHANGED", 1)  # one word of 300 changed
    spaced = "  " + base.replace(" ", "\n ") + "\n"  # same text up to whitespace and case
    other = " ".join(WORDS[(i * 7) % len(WORDS)] + str(i % 5) for i in range(300))

    def chunk(text: str, i: int) -> Chunk:
        return Chunk(text, "s", "docs", "markdown", "docs", f"f{i}.md", 0)

    kept, stats = dedup_chunks([chunk(base, 0), chunk(spaced.upper(), 1), chunk(near, 2), chunk(other, 3)])
    assert [c.rel for c in kept] == ["f0.md", "f3.md"]
    assert stats == {"exact": 1, "near": 1}


def test_build_corpus_is_deterministic_and_excludes_eval_sets(tokenizer, tmp_path):
    sources = _sources(tmp_path)
    items, record = build_corpus(tokenizer, _settings(), sources)
    again, record2 = build_corpus(tokenizer, _settings(), sources)
    assert [it.token_ids for it in items] == [it.token_ids for it in again]
    assert record == record2
    rels = {it.rel for it in items}
    assert rels <= {"pkg/one.py", "pkg/two.py", "pkg/copy_of_one.py"}
    assert not any("human_eval" in r or "loader" in r for r in rels)
    assert record["skipped_files"] == {"eval_path": 1, "eval_content": 1}
    assert record["dedup"]["exact"] >= 1  # copy_of_one.py's chunks are exact duplicates of one.py's
    assert not ({"pkg/one.py", "pkg/copy_of_one.py"} <= rels and record["dedup"]["exact"] == 0)
    assert all(len(it.token_ids) <= 160 for it in items)


def test_chat_item_labels_only_the_assistant_turn(tokenizer, tiny):
    chunk = Chunk(_code(6, lines=6), "s", "code_python", "python", "code", "pkg/mod.py", 0)
    spec = load_source_spec()
    item = format_item(chunk, tokenizer, _settings(max_len=400, chat_share=1.0, continue_share=0.0), spec, 2)
    assert item.chat
    prompt = tokenizer.decode(list(item.token_ids[: item.prompt_len]))
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in prompt
    assert item.token_ids[-1] == tokenizer.eos_token_id
    assert "def " in tokenizer.decode(list(item.token_ids[item.prompt_len :]))
    (s,) = samples_from_sequences(tiny, [list(item.token_ids)], [item.prompt_len], (1, 3), top_k=4)
    mask = s.label_mask.tolist()
    # a labelled position p predicts token p + 1: exactly the assistant's tokens (its content and the end token)
    assert mask == [item.prompt_len - 1 <= p < len(item.token_ids) - 1 for p in range(len(item.token_ids))]
    assert s.num_labels == labelled_tokens(item) == len(item.token_ids) - item.prompt_len
    raw = format_item(chunk, tokenizer, _settings(chat_share=0.0), spec, tokenizer.eos_token_id)
    assert not raw.chat and raw.prompt_len == 1 and labelled_tokens(raw) == len(raw.token_ids) - 1


def test_mix_keeps_domain_weights_in_every_prefix():
    def items(domain: str, n: int) -> list[CorpusItem]:
        return [CorpusItem(tuple(range(11)), 1, domain, "s", f"{domain}{i}", False) for i in range(n)]

    mixed = mix_items(items("a", 100) + items("b", 100) + items("c", 5), {"a": 0.75, "b": 0.25}, seed=3)
    assert {it.domain for it in mixed} == {"a", "b"}  # c has no weight
    for n in (8, 40, 100):
        share = sum(it.domain == "a" for it in mixed[:n]) / n
        assert abs(share - 0.75) <= 1 / n + 1e-9
    assert mixed == mix_items(items("a", 100) + items("b", 100), {"a": 0.75, "b": 0.25}, seed=3)


def _build(tiny, tokenizer, sources: Path, out: Path, tokens: int, **kw) -> Path:
    args = dict(settings=_settings(), fuse_layers=(1, 3), label_top_k=4, shard_tokens=300, batch_tokens=512)
    args.update(kw)
    return sc.build_corpus_cache(
        tiny,
        tokenizer,
        args["settings"],
        out,
        tokens,
        args["fuse_layers"],
        args["label_top_k"],
        sources=sources,
        batch_tokens=args["batch_tokens"],
        shard_tokens=args["shard_tokens"],
        progress=False,
    )


def test_corpus_cache_resumes_after_a_stop_and_extends(tokenizer, tiny, tmp_path, monkeypatch):
    sources = _sources(tmp_path)
    calls: list[int] = []
    real = sc.teacher_forced_samples

    def counted(model, items, *a, **k):
        calls.append(len(items))
        return real(model, items, *a, **k)

    monkeypatch.setattr(sc, "teacher_forced_samples", counted)
    d = _build(tiny, tokenizer, sources, tmp_path / "c", tokens=600)
    shards = sorted(d.glob("shard_*.safetensors"))
    assert len(shards) >= 2 and len(calls) == len(shards)
    first = sc.load_corpus_samples(tmp_path / "c")
    assert sum(s.num_labels for s in first) >= 600
    shards[-1].unlink()  # a stop during the last shard: it never got written
    calls.clear()
    assert _build(tiny, tokenizer, sources, tmp_path / "c", tokens=600) == d
    assert len(calls) == 1  # only the missing shard was computed again
    again = sc.load_corpus_samples(d)
    assert len(again) == len(first)
    assert all(torch.equal(a.feats, b.feats) and torch.equal(a.label_ids, b.label_ids) for a, b in zip(first, again))
    calls.clear()
    _build(tiny, tokenizer, sources, tmp_path / "c", tokens=1200)  # a larger budget extends the same cache
    assert len(sorted(d.glob("shard_*.safetensors"))) > len(shards) and len(calls) >= 1
    assert sum(s.num_labels for s in sc.load_corpus_samples(d, max_tokens=600)) < 1200
    stats = sc.corpus_cache_stats(d)
    assert stats["labelled_tokens"] == sum(s.num_labels for s in sc.load_corpus_samples(d))
    assert set(stats["labelled_by_domain"]) == {"code_python"}


def test_corpus_cache_key_changes_with_every_setting(tokenizer, tiny, tmp_path):
    sources = _sources(tmp_path)
    out = tmp_path / "c"
    base = _build(tiny, tokenizer, sources, out, tokens=100)
    assert _build(tiny, tokenizer, sources, out, tokens=100) == base
    changed = [
        _build(tiny, tokenizer, sources, out, 100, fuse_layers=(1, 2)),
        _build(tiny, tokenizer, sources, out, 100, label_top_k=5),
        _build(tiny, tokenizer, sources, out, 100, settings=_settings(max_len=200)),
        _build(tiny, tokenizer, sources, out, 100, settings=_settings(chat_share=0.9)),
        _build(
            tiny_llama(vocab_size=49152, hidden_size=16, num_layers=3, num_heads=2, num_kv_heads=1, seed=1),
            tokenizer,
            sources,
            out,
            100,
        ),
    ]
    (tmp_path / "src" / "pkg" / "two.py").write_text(_code(7))  # a source file changed
    changed.append(_build(tiny, tokenizer, sources, out, 100))
    assert len({base, *changed}) == len(changed) + 1
    with pytest.raises(ValueError, match="corpus caches"):
        sc.load_corpus_samples(out)  # several caches: the caller must name one


def test_config_corpus_fields_are_checked(tmp_path):
    cfg = StaticSpeculatorConfig(output_dir=str(tmp_path), corpus_tokens=1000, corpus_max_len=256)
    assert cfg.corpus_settings.max_len == 256
    assert cfg.corpus_cache_dir == tmp_path / "data" / "corpus"
    for bad in (
        dict(corpus_tokens=-1),
        dict(corpus_chat_share=1.5),
        dict(corpus_mix={"docs": -1.0}),
        dict(corpus_max_len=64),
        dict(corpus_batch_tokens=100),
    ):
        with pytest.raises(ValueError):
            StaticSpeculatorConfig(output_dir=str(tmp_path), **bad)


def test_coverage_curve_matches_vocab_coverage_and_grows_with_size(tiny):
    from atlas_rl.training.static_vocab import build_draft_vocab, coverage_curve, vocab_coverage

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (40,), generator=g).tolist() for _ in range(6)]
    samples = samples_from_sequences(tiny, seqs, [10] * 6, (1, 3), top_k=4)
    held = [torch.randint(0, 300, (50,), generator=g).tolist() for _ in range(3)]
    curve = coverage_curve(samples, 49152, [16, 64, 256], held)
    for n, cov in curve.items():
        assert cov == pytest.approx(vocab_coverage(build_draft_vocab(samples, 49152, n), held))
    assert curve[16] <= curve[64] <= curve[256]


def test_load_training_samples_joins_selfdistilled_and_corpus(tokenizer, tiny, tmp_path):
    from atlas_rl.training.static_data import save_samples

    d = _build(tiny, tokenizer, _sources(tmp_path), tmp_path / "c", tokens=200)
    corpus = sc.load_corpus_samples(d)
    sd = samples_from_sequences(tiny, [[5, 6, 7, 8], [9, 10, 11]], [2, 2], (1, 3), top_k=4)
    save_samples(tmp_path / "sd" / "samples_T0_abc.safetensors", sd[:1])
    save_samples(tmp_path / "sd" / "samples_T1_abc.safetensors", sd[1:])
    both = sc.load_training_samples(tmp_path / "sd", tmp_path / "c")
    assert [s.tokens.tolist() for s in both] == [[5, 6, 7, 8], [9, 10, 11]] + [s.tokens.tolist() for s in corpus]
    assert len(sc.load_training_samples(tmp_path / "sd", None, temperatures=[1.0])) == 1
    with pytest.raises(ValueError, match="no self-distilled samples"):
        sc.load_training_samples(tmp_path / "c", None)


def test_stage1_adds_the_corpus_to_the_selfdistilled_samples(tokenizer, tiny, tmp_path):
    from atlas_rl.training import static as static_mod
    from atlas_rl.training.static_card import data_section

    sources = _sources(tmp_path)
    cfg = StaticSpeculatorConfig(
        output_dir=str(tmp_path / "run"),
        gen_temperatures=(0.0,),
        gen_max_new_tokens=4,
        gen_max_rows=4,
        label_top_k=4,
        fuse_layers=(1, 3),
        corpus_tokens=300,
        corpus_sources=str(sources),
        corpus_max_len=160,
        corpus_mix={"code_python": 1.0},
        corpus_shard_tokens=300,
        corpus_batch_tokens=512,
    )
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="tokenizer"):
        static_mod._generate_data(tiny, prompts, cfg, progress=False)
    samples, runs = static_mod._generate_data(tiny, prompts, cfg, progress=False, tokenizer=tokenizer)
    assert [s.tokens[:3].tolist() for s in samples[:1]] == [[1, 2, 3]]
    corpus = runs[-1]
    assert corpus["source"] == "corpus" and corpus["used_labelled_tokens"] >= 300
    assert len(samples) == 2 + corpus["used_sequences"]
    assert (tmp_path / "run" / "data" / "corpus").is_dir()
    section = data_section(samples, cfg, (2, 0), runs, None)
    assert len(section["generation"]) == 1 and section["corpus"]["sources"]["tmp-python"]["license"] == "MIT"
