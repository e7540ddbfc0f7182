"""OpenELM's optimizer recipe in optax: AdamW, warmup + cosine, clipping,
and optional per-parameter learning-rate multipliers (muP, ``elmjax.mup``)."""

from __future__ import annotations

import jax
import optax

from elmjax.config import OptimizerConfig


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr``, then cosine decay to ``min_lr_ratio * lr``
    at ``total_steps``."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decay_mask(params) -> object:
    """Weight decay on matrices and embeddings (ndim >= 2), never on norm weights."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
    """Multiply each leaf's update by its constant in ``multipliers`` (a tree
    of Python floats shaped like the parameters). Stateless."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int, lr_multipliers=None) -> optax.GradientTransformation:
    """Clipping then AdamW. ``lr_multipliers`` (``elmjax.mup.lr_multipliers``;
    None under the standard parametrization) scales each parameter's final
    update, so its learning rate and its decoupled weight decay alike."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    if lr_multipliers is not None:
        parts.append(scale_by_multipliers(lr_multipliers))
    return optax.chain(*parts)
