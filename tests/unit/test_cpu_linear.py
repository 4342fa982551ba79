"""The CPU small-batch linear kernels: the same product as F.linear by every kernel, used only where it is safe;
the tuned plan picks the fastest kernel per row count and is cached per machine."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atlas_rl.models import tiny_llama
from atlas_rl.rollout import cpu_linear, kernel_tune
from atlas_rl.rollout.cpu_linear import (
    drop_packed_weights,
    install_cpu_linear,
    kernel_plan,
    set_kernel_plan,
    small_linear,
)
from atlas_rl.rollout.kernel_tune import KERNELS, MAX_PLAN_ROWS, KernelPlan


@pytest.fixture(autouse=True)
def _restore_plan():
    before = kernel_plan()
    yield
    set_kernel_plan(before)


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_matches_f_linear_for_any_layout_and_row_count(kernel):
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    with torch.no_grad():
        for shape in [(1, 48), (2, 48), (3, 5, 48), (7, 48), (MAX_PLAN_ROWS, 48)]:
            x = torch.randn(*shape)
            ref = F.linear(x, lin.weight, lin.bias)
            torch.testing.assert_close(small_linear(x, lin.weight, lin.bias, kernel=kernel), ref)
            xt = torch.randn(shape[-1], *shape[:-1]).movedim(0, -1)  # a column-major (transposed-view) activation
            torch.testing.assert_close(small_linear(xt, lin.weight, None, kernel=kernel), F.linear(xt, lin.weight))


def test_installed_forward_follows_the_plan_and_uninstalls():
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    uninstall = install_cpu_linear(nn.Sequential(lin))  # tiny: not tuned, the active plan is kept
    assert "forward" in lin.__dict__
    set_kernel_plan(KernelPlan(("mm_pad", "mm", "onednn") + ("linear",) * (MAX_PLAN_ROWS - 3)))
    for shape in [(1, 48), (2, 48), (3, 48), (3, 5, 48), (MAX_PLAN_ROWS + 1, 48)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            got = lin(x)
        torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias))
    uninstall()
    assert "forward" not in lin.__dict__


def test_training_forward_keeps_autograd_path():
    lin = nn.Linear(8, 4)
    install_cpu_linear(nn.Sequential(lin))
    set_kernel_plan(KernelPlan(("mm",) * MAX_PLAN_ROWS))
    x = torch.randn(2, 8, requires_grad=True)
    lin(x).sum().backward()  # grad enabled: F.linear path, gradients flow as usual
    assert x.grad is not None and lin.weight.grad is not None


def test_not_installed_for_float64_models():
    m = tiny_llama(vocab_size=32, dtype=torch.float64)
    install_cpu_linear(m)
    assert not any("forward" in mod.__dict__ for mod in m.modules() if isinstance(mod, nn.Linear))


def test_onednn_copy_follows_in_place_updates_and_is_dropped():
    """oneDNN multiplies by a converted copy of the weight; an in-place update (a new _version) rebuilds it, so a
    policy update is never served from a stale copy."""
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(9, 24)
    with torch.no_grad():
        torch.testing.assert_close(small_linear(x, lin.weight, lin.bias, "onednn"), F.linear(x, lin.weight, lin.bias))
        if torch.backends.mkldnn.is_available():
            assert hasattr(lin.weight, "_atlas_onednn_weight")
        lin.weight.mul_(2.0)  # in place, as an optimizer step or update_weights does
        torch.testing.assert_close(small_linear(x, lin.weight, lin.bias, "onednn"), F.linear(x, lin.weight, lin.bias))
    drop_packed_weights(lin)
    assert not hasattr(lin.weight, "_atlas_onednn_weight")


def test_plan_picks_the_fastest_kernel_per_row_count_with_a_margin_for_the_reference():
    timings = {
        1: {"linear": 10.0, "mm": 12.0, "mm_pad": 7.0, "onednn": 11.0},
        2: {"linear": 10.0, "mm": 9.8, "onednn": 11.0},  # 2% faster: within the margin, the reference stays
        4: {"linear": 10.0, "mm": 6.0, "onednn": 8.0},
        16: {"linear": 10.0, "mm": 9.0, "onednn": 5.0},
    }
    plan = KernelPlan.from_timings(timings)
    assert [plan.kernel(r) for r in (1, 2, 3, 4, 15, 16, 64, 65)] == [
        "mm_pad", "linear", "linear", "mm", "mm", "onednn", "onednn", "linear"
    ]  # fmt: skip
    assert plan.summary() == "1: mm_pad, 2-3: linear, 4-15: mm, 16-64: onednn"
    assert KernelPlan.from_timings({}) == KernelPlan.reference()
    with pytest.raises(ValueError, match="one of"):
        KernelPlan(("fast",) * MAX_PLAN_ROWS)


def test_tuning_measures_the_models_weights_and_caches_the_plan(tmp_path, monkeypatch):
    """A model above the tuning threshold is timed once; the second engine start reuses the cached plan (no
    timing at all), and a corrupt cache file is re-tuned, not trusted."""
    monkeypatch.setattr(kernel_tune, "MIN_TUNE_BYTES", 0)
    monkeypatch.setattr(kernel_tune, "GRID", (1, 4))
    monkeypatch.setattr("atlas_rl.models.cache_dir", lambda: tmp_path)
    model = tiny_llama(seed=0)
    calls = []
    real = kernel_tune.time_kernels
    monkeypatch.setattr(kernel_tune, "time_kernels", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    plan = kernel_tune.load_or_tune(model)
    assert calls == [1, 4] and isinstance(plan, KernelPlan)
    files = list((tmp_path / "kernels").glob("kernel_plan_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["plan"] == list(plan.by_rows)
    assert kernel_tune.load_or_tune(model) == plan and calls == [1, 4]
    files[0].write_text("{not json")
    kernel_tune.load_or_tune(model)
    assert calls == [1, 4, 1, 4]


def test_a_shape_gets_its_own_kernel_only_where_it_gains_clearly(monkeypatch):
    """The whole chain's choice is the default; a shape whose own timings beat it by more than the shape margin
    (15%) keeps its own choice (a 49152-row LM head and a 576-row projection stream best with different kernels),
    a small per-shape gain does not override it (noise); small_linear follows the per-shape choice."""
    head, proj, down = (500, 48), (96, 48), (48, 96)
    timings = {
        1: {head: {"linear": 9.0, "onednn": 5.0}, proj: {"linear": 2.0, "onednn": 2.2}},
        4: {head: {"linear": 5.0, "onednn": 10.0}, proj: {"linear": 10.0, "onednn": 5.0}},
    }
    timings[1][down] = {"linear": 2.0, "onednn": 2.1}
    timings[4][down] = {"linear": 10.0, "onednn": 9.0}
    plan = KernelPlan.from_shape_timings(timings)
    assert [plan.kernel(r) for r in (1, 4)] == ["onednn", "onednn"]  # chain sums 13.0 vs 9.3 and 25.0 vs 24.0
    assert [plan.kernel(r, head) for r in (1, 3, 4, 64)] == ["onednn", "onednn", "linear", "linear"]
    assert [plan.kernel(r, proj) for r in (1, 4)] == ["onednn", "onednn"]  # 10% slower at 1 row: not overridden
    assert [plan.kernel(r, down) for r in (1, 4)] == ["onednn", "onednn"]
    assert plan.kernel(4, (7, 7)) == "onednn" and plan.kernel(MAX_PLAN_ROWS + 1, head) == "linear"
    assert plan.by_shape == ((head, ("onednn",) * 3 + ("linear",) * (MAX_PLAN_ROWS - 3)),)
    assert plan.uses("linear") and plan.digest() != KernelPlan(plan.by_rows).digest()
    used = []
    real = cpu_linear.run_kernel
    monkeypatch.setattr(cpu_linear, "run_kernel", lambda name, *a: used.append(name) or real(name, *a))
    set_kernel_plan(plan)
    with torch.no_grad():
        w_head, w_proj, x = torch.randn(*head), torch.randn(*proj), torch.randn(4, 48)
        torch.testing.assert_close(small_linear(x, w_head, None), F.linear(x, w_head))  # linear: no run_kernel
        torch.testing.assert_close(small_linear(x, w_proj, None), F.linear(x, w_proj))
    assert used == ["onednn"]


def test_engine_tunes_over_the_weights_its_forward_multiplies_by(tmp_path, monkeypatch):
    """With fused projections the forward multiplies by the concatenated q/k/v and gate/up weights, in layer order,
    then the LM head: those are the weights timed (and the shapes the plan can name)."""
    from atlas_rl.rollout import RolloutEngine

    monkeypatch.setattr(kernel_tune, "MIN_TUNE_BYTES", 0)
    monkeypatch.setattr(kernel_tune, "GRID", (1, 4))
    monkeypatch.setattr("atlas_rl.models.cache_dir", lambda: tmp_path)
    seen = []
    real = kernel_tune.time_kernels
    monkeypatch.setattr(kernel_tune, "time_kernels", lambda w, *a, **k: seen.append(list(w)) or real(w, *a, **k))
    model = tiny_llama(seed=0)
    RolloutEngine(model)
    mc, layer = model.config, model.model.layers[0]
    hd = mc.hidden_size // mc.num_attention_heads
    qkv = (hd * (mc.num_attention_heads + 2 * mc.num_key_value_heads), mc.hidden_size)
    per_layer = [qkv, tuple(layer.self_attn.o_proj.weight.shape), (2 * mc.intermediate_size, mc.hidden_size)]
    per_layer.append(tuple(layer.mlp.down_proj.weight.shape))
    expected = per_layer * mc.num_hidden_layers + [tuple(model.lm_head.weight.shape)]
    assert len(seen) == 2 and [tuple(w.shape) for w in seen[0]] == expected


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this PyTorch build")
def test_engine_prepares_the_onednn_copies_at_start_not_in_its_first_forward(monkeypatch):
    """Copies for every weight the plan runs through oneDNN exist once the engine is built (a reorder inside the
    first forward made the verification cost calibration look disturbed); none where the plan never uses it."""
    from atlas_rl.rollout import RolloutEngine

    plan = KernelPlan(("linear",) * MAX_PLAN_ROWS, (((64, 128), ("onednn",) * MAX_PLAN_ROWS),))
    monkeypatch.setattr(kernel_tune, "load_or_tune", lambda *a, **k: plan)
    monkeypatch.setattr(cpu_linear, "load_or_tune", lambda *a, **k: plan)
    model = tiny_llama(seed=0)
    eng = RolloutEngine(model)
    chain = eng._lean.weight_chain(model.lm_head.weight)
    packed = {tuple(w.shape): hasattr(w, "_atlas_onednn_weight") for w in chain}
    assert packed[(64, 128)] is True and not any(v for k, v in packed.items() if k != (64, 128))


def test_small_and_non_float32_models_are_not_tuned(monkeypatch):
    monkeypatch.setattr(kernel_tune, "tune", lambda *a, **k: pytest.fail("tuned a model that fits in cache"))
    assert kernel_tune.load_or_tune(tiny_llama(seed=0)) == KernelPlan.reference()
    assert kernel_tune.load_or_tune(tiny_llama(seed=0, dtype=torch.float64)) == KernelPlan.reference()


def test_engine_prepares_the_draft_heads_bfloat16_copies_at_start_not_in_their_first_draft():
    """A draft head's first propose made its bfloat16 oneDNN copies (40-150 ms for SmolLM2's head against 12 ms for a
    whole 4-token draft): the controller learned a drafting cost 3-13x too dear from it. The engine makes them (the
    oneDNN copies on a CPU with native bfloat16, the plain bfloat16 copies of ``linear_bf16w`` elsewhere)."""
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig
    from atlas_rl.speculators.head_speculator import DraftHeadSpeculator

    model = tiny_llama(seed=0)
    cfg = DraftHeadConfig.from_target(model, draft_vocab_size=48, fuse_layers=(1, 2), intermediate_size=64)
    head = DraftHead(cfg).bind_target(model, init_lm_head=True)
    weights = kernel_tune.linear_weights(head)
    attr = "_atlas_onednn_weight_bfloat16" if cpu_linear.bf16_matmul_available() else "_atlas_bf16_weight"
    assert weights and not any(hasattr(w, attr) for w in weights)
    RolloutEngine(model, speculators=[DraftHeadSpeculator(head)])
    assert all(hasattr(w, attr) for w in weights)


@pytest.mark.skipif(cpu_linear.glue_kernels() is None, reason="no C++ compiler: the decode glue could not be built")
def test_draft_matmul_over_a_bfloat16_weight_copy_follows_in_place_updates():
    """A draft head on a CPU without native bfloat16 multiplies by a bfloat16 copy of its weight (half the bytes to
    stream): the copy is made once per version of the weight, so a published (in-place) update is seen at once;
    autograd and many rows keep float32 ``F.linear``; ``drop_packed_weights`` frees the copies."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(40, 70, bias=True)
    x = torch.randn(2, 3, 40, generator=g)  # 6 rows
    with torch.no_grad():
        y = cpu_linear._bf16_weight_linear(x, lin.weight) + lin.bias
        torch.testing.assert_close(y, F.linear(x, lin.weight.to(torch.bfloat16).float(), lin.bias))
        assert not torch.equal(y, F.linear(x, lin.weight, lin.bias))  # the rounding is real: the copy was used
        lin.weight.mul_(2.0)
        torch.testing.assert_close(
            cpu_linear._bf16_weight_linear(x, lin.weight), F.linear(x, lin.weight.to(torch.bfloat16).float())
        )
        many = torch.randn(cpu_linear.BF16_WEIGHT_MAX_ROWS + 1, 40, generator=g)
        assert cpu_linear._bf16_weight_linear(many, lin.weight) is None
    assert cpu_linear._bf16_weight_linear(x, lin.weight) is None  # grad enabled: training keeps float32
    cpu_linear.drop_packed_weights(lin)
    assert "_atlas_bf16_weight" not in lin.weight.__dict__
