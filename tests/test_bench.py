from elmjax.bench import bench, uniform_twin
from elmjax.config import ExecutionConfig
from elmjax.layout import layer_layout, param_counts
from elmjax.model_config import ModelConfig, preset


def test_bench_twin_is_the_twin_a_sweep_trains(tmp_path):
    from sweeps.grid import load_grid
    from sweeps.plan import build_plan
    from sweep_helpers import TINY_BASE, write_grid

    base = dict(TINY_BASE, model={**TINY_BASE["model"], "num_layers": 4})
    arm = build_plan(load_grid(write_grid(tmp_path / "a.yaml", {"budget": {"kind": "params", "values": [4e5]}},
                                          base)))[0].config.model
    # A sweep whose budget is exactly the arm's size plans that arm and, next to it, the bench's twin.
    runs = build_plan(load_grid(write_grid(tmp_path / "b.yaml", {
        "budget": {"kind": "params", "values": [param_counts(arm).total]}}, base)))
    (planned_arm,), (planned_twin,) = [r for r in runs if not r.is_twin], [r for r in runs if r.is_twin]
    assert planned_arm.config.model == arm
    assert planned_twin.config.model == uniform_twin(arm)
    assert len(set(layer_layout(uniform_twin(arm)))) == 1


def test_uniform_twin_is_uniform_and_matches_size():
    for cfg in (preset("OpenELM-270M"), preset("OpenELM-1_1B")):
        twin = uniform_twin(cfg)
        assert len(set(layer_layout(twin))) == 1
        assert len(set(layer_layout(cfg))) > 1
        assert abs(param_counts(twin).total / param_counts(cfg).total - 1) < 0.01


def test_bench_measures_both_arms():
    cfg = ModelConfig(num_layers=2, model_dim=64, head_dim=16, ffn_dim_divisor=16)
    res = bench(cfg, ExecutionConfig(), batch=8, seq_len=16, steps=1, rounds=1)
    assert set(res) == {"layer-wise", "uniform"}
    for r in res.values():
        assert r["tokens_per_s"] > 0 and r["compile_s"] > 0


def test_breakdown_times_every_component_forward_and_backward():
    from elmjax.breakdown import COMPONENTS, component_times, format_breakdown
    from elmjax.config import OptimizerConfig
    from elmjax.optim import make_optimizer

    cfg = ModelConfig(num_layers=2, model_dim=64, head_dim=16, ffn_dim_divisor=16, vocab_size=128)
    times = component_times(cfg, make_optimizer(OptimizerConfig(), 10), batch=2, seq_len=16, reps=1)
    assert set(times) == set(COMPONENTS)
    for name, (fwd, both) in times.items():
        assert fwd > 0
        assert (both is None) == (name == "optimizer")
    text = format_breakdown(times, step_s=1.0)
    assert all(name in text for name in COMPONENTS)
