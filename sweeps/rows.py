"""The planned (static) columns of a run's row in results.parquet.

Everything here follows from the resolved config alone, so it is computed
once at planning time and stored in ``plan.json``; ``results`` adds the
state and final metrics read from each run directory. Pure Python.
"""

from __future__ import annotations

import json

from elmjax.config import Config
from elmjax.layout import layer_layout, param_counts, train_flops_per_token
from sweeps.arms import multiplier_range

# Column order of results.parquet (axis.* columns follow, then any eval.* columns).
PLAN_COLUMNS = (
    "run", "run_dir", "arm", "is_uniform", "twin", "budget_kind", "budget", "budget_rel_error", "seed",
    "num_layers", "model_dim", "head_dim", "num_gqa_groups", "qkv_schedule", "ffn_schedule",
    "alpha_min", "alpha_max", "beta_min", "beta_max", "q_heads", "kv_heads", "ffn_dims",
    "params", "non_embedding_params", "flops_per_token", "tokens", "train_flops", "lr", "seq_len", "batch_size",
)
RUN_COLUMNS = ("status", "error", "val_loss", "val_ppl", "val_bpb", "val_acc", "train_loss",
               "final_step", "tokens_seen", "wall_time_s", "compile_s", "train_s", "eval_s", "checkpoint_s",
               "other_s")
# final.json's test-split metrics (empty without data.test_sequences) and the fingerprints of both
# held-out splits, which must be the same for every run of a sweep (analysis.splits checks).
HELD_OUT_COLUMNS = ("test_loss", "test_bpb", "val_fingerprint", "test_fingerprint")


def model_columns(cfg: Config) -> dict:
    """Architecture, size and compute columns of a resolved config."""
    m = cfg.model
    layout = layer_layout(m)
    counts = param_counts(m)
    fpt = train_flops_per_token(m, cfg.data.seq_len)
    tokens = cfg.total_steps * cfg.tokens_per_step
    a_min, a_max = multiplier_range(m.qkv_multipliers, m.qkv_schedule, m.num_layers)
    b_min, b_max = multiplier_range(m.ffn_multipliers, m.ffn_schedule, m.num_layers)
    return {
        "num_layers": m.num_layers, "model_dim": m.model_dim, "head_dim": m.head_dim,
        "num_gqa_groups": m.num_gqa_groups, "qkv_schedule": m.qkv_schedule, "ffn_schedule": m.ffn_schedule,
        "alpha_min": a_min, "alpha_max": a_max, "beta_min": b_min, "beta_max": b_max,
        "q_heads": json.dumps([x.q_heads for x in layout]),
        "kv_heads": json.dumps([x.kv_heads for x in layout]),
        "ffn_dims": json.dumps([x.ffn_dim for x in layout]),
        "params": counts.total, "non_embedding_params": counts.non_embedding,
        "flops_per_token": fpt, "tokens": tokens, "train_flops": float(fpt) * tokens,
        "lr": cfg.optimizer.lr, "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size,
    }
