"""Fine-tuning: LoRA / DoRA adapters on a base checkpoint, on text or chat data.

    python -m elmjax.finetune CONFIG.yaml [dotted.key=value ...] [--export-merged DIR]

``init_from`` names the base model (a Hugging Face OpenELM directory or a
training run directory). The run directory follows training's contract
(``elmjax.run_dir``: config.yaml, status.json, metrics.jsonl, final.json,
checkpoints/ and tb/) and resumes the same way, exactly; the checkpoints hold
the adapters and their optimizer state only. The step loop is training's
(``elmjax.train._Loop``). At the end the adapters are written to
``RUN_DIR/adapter/`` in the Hugging Face PEFT layout (``elmjax.peft_io``) and
final.json gets the adapter parameter count and, with ``eval.tasks``, each
task's scores before (base) and after (adapted) fine-tuning.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from elmjax import config_io, peft, run_dir as rd
from elmjax.checkpoint import Checkpointer, load_model
from elmjax.cli import cli_logging, run_exit, user_error_exit
from elmjax.config_io import ConfigError
from elmjax.distributed import maybe_initialize
from elmjax.errors import UserError
from elmjax.finetune_config import FinetuneConfig, identity
from elmjax.finetune_step import make_finetune_eval_step, make_finetune_step
from elmjax.layout import train_flops_per_token
from elmjax.optim import lr_schedule, make_optimizer
from elmjax.programs import eval_chunk
from elmjax.run_times import RunTimes
from elmjax.sharding import batch_sharding, make_mesh, param_shardings, replicated
from elmjax.state import TrainState, abstract_model
from elmjax.train import (Interrupted, RunResult, _check_shapes, _Loop, _prepare_run_dir, _Session,
                          _signals_to_flag, evaluate, setup_compilation_cache)

ADAPTER_DIR = "adapter"


def run(config: FinetuneConfig, *, progress_callback=None) -> RunResult:
    """Fine-tune ``config`` to completion (resuming if its run_dir has checkpoints)."""
    maybe_initialize()
    setup_compilation_cache(config.compilation_cache)
    if config.execution.grad_accum != 1:
        raise ConfigError("execution.grad_accum: fine-tuning runs one micro-batch per step (set it to 1)")
    path = _prepare_run_dir(config, identity_fn=identity)
    if path is None:
        return RunResult(Path(config.run_dir), "done", rd.read_final(config.run_dir))
    lead = jax.process_index() == 0
    if lead:
        path.mkdir(parents=True, exist_ok=True)
        config_io.atomic_write_text(path / "config.yaml", config_io.dump_yaml(config))
        rd.write_status(path, "running", total_steps=config.total_steps)
    try:
        with _signals_to_flag() as stop:
            ckpt = Checkpointer(path, config.checkpoint)
            try:
                loop = _FinetuneLoop(config, path, ckpt, stop, progress_callback, lead)
                return loop.run()
            finally:
                ckpt.close()
    except Interrupted:
        raise
    except BaseException as e:
        if lead:
            err = "".join(traceback.format_exception_only(type(e), e)).strip()
            rd.write_status(path, "failed", error=err, total_steps=config.total_steps)
        raise


class _FinetuneLoop(_Loop):
    """Training's loop over a session whose state holds adapters; the base
    weights ride along as a constant argument of the jitted steps."""

    def __init__(self, ft: FinetuneConfig, path: Path, ckpt: Checkpointer, stop, progress_callback, lead: bool):
        self.ft = ft
        self.base_model = load_model(ft.init_from)
        try:
            config = ft.training(self.base_model.cfg)
        except ValueError as e:
            raise ConfigError(f"{e} (the base model is {ft.init_from})") from None
        self.sft = None
        if ft.sft.paths:
            from elmjax.sft_data import load_sft

            self.sft = load_sft(ft.sft, ft.data)
        session = self._setup(config, ckpt)
        super().__init__(session, path, ckpt, stop, progress_callback, lead)

    def _setup(self, config, ckpt: Checkpointer) -> _Session:
        ft, cfg = self.ft, self.ft.peft
        mesh = make_mesh(config.mesh)
        if self.sft is None:
            _check_shapes(config, mesh)
        elif self.sft.vocab_size > config.model.vocab_size:
            raise ConfigError(f"sft: the tokenizer's vocabulary ({self.sft.vocab_size}) is larger than the base "
                              f"model's ({config.model.vocab_size}); set data.tokenizer to the base model's")
        try:
            cfg.layer_indices(config.model.num_layers)
        except ValueError as e:
            raise ConfigError(f"{e} (init_from: {ft.init_from})") from None
        _, abs_state = abstract_model(config.model)
        base_sh = param_shardings(abs_state, mesh)
        base = peft.cast_base(nnx.to_pure_dict(nnx.state(self.base_model, nnx.Param)), cfg)
        self.base = jax.device_put(base, base_sh)
        total = config.total_steps
        optimizer = make_optimizer(config.optimizer, total)
        rep = replicated(mesh)

        def create() -> TrainState:
            adapters = peft.init_adapters(self.base, cfg, config.model.num_layers)
            return TrainState(jnp.zeros((), jnp.int32), adapters, optimizer.init(adapters))

        abstract = jax.eval_shape(create)
        shardings = jax.tree.map(lambda _: rep, abstract)
        restored = ckpt.restore_latest(jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep),
                                                    abstract))
        if restored is None:
            state, data_state, start = jax.jit(create, out_shardings=shardings)(), None, 0
        else:
            state, data_state, start = restored
        rank = 2 if self.sft is None else 3
        bsh = batch_sharding(mesh, rank)
        graphdef, _ = abstract_model(config.model, **config.execution.model_kwargs)
        step = jax.jit(make_finetune_step(graphdef, cfg, optimizer, lr_schedule(config.optimizer, total),
                                          z_loss=config.optimizer.z_loss, mesh=mesh),
                       in_shardings=(shardings, base_sh, bsh), out_shardings=(shardings, rep), donate_argnums=0)
        eval_graphdef, _ = abstract_model(config.model, attention=config.execution.attention)
        ev = jax.jit(make_finetune_eval_step(eval_graphdef, cfg, mesh),
                     in_shardings=(shardings.params, base_sh, bsh, batch_sharding(mesh, 1)), out_shardings=rep)
        base_arr = self.base
        return _Session(config=config, mesh=mesh, state=state, start_step=start, data_state=data_state,
                        train_step=lambda st, b: step(st, base_arr, b),
                        eval_step=lambda ad, b, w: ev(ad, base_arr, b, w), batch_sharding=bsh,
                        eval_chunk=eval_chunk(config, mesh), times=RunTimes(),
                        flops_per_token=train_flops_per_token(config.model, config.data.seq_len))

    def _open_data(self):
        if self.sft is None:
            return super()._open_data()
        return self.sft.train_iterator(self.cfg.data.batch_size, self.cfg.data.seed)

    def _log_eval(self, step: int, emit: bool = True) -> dict:
        if self.sft is None:
            return super()._log_eval(step, emit)
        import time

        ev = evaluate(self.s, self.s.state.params, self.sft.validation)
        if emit:
            self._emit({"kind": "eval", "step": step, "tokens": step * self.cfg.tokens_per_step, **ev,
                        "time": time.time()})
        return ev

    def adapted_model(self):
        graphdef, state = nnx.split(self.base_model)
        nnx.replace_by_pure_dict(state, peft.effective_params(self.base, self.s.state.params, self.ft.peft))
        return nnx.merge(graphdef, state)

    def _final_extra(self, step: int) -> dict:
        from elmjax.peft_io import save_adapters

        adapters = jax.device_get(self.s.state.params)
        extra = {"peft_method": self.ft.peft.method, "adapter_params": peft.count_params(adapters),
                 "init_from": self.ft.init_from}
        if self.sft is not None:
            extra.update({f"sft_{k}": v for k, v in self.sft.stats.items()})
        if self.lead:
            save_adapters(self.path / ADAPTER_DIR, adapters, self.ft.peft, self.base_model.cfg,
                          base_name=self.ft.init_from)
        if self.ft.eval.tasks:
            from elmjax.evaluate import as_columns, evaluate_tasks
            from elmjax.tokenizer import load_tokenizer

            tok = load_tokenizer(self.cfg.data.tokenizer)
            kw = {"token_budget": self.ft.eval.token_budget}
            base_model = self.base_model
            extra["eval_before"] = as_columns(evaluate_tasks(base_model, tok, self.ft.eval.tasks, **kw))
            extra["eval_after"] = as_columns(evaluate_tasks(self.adapted_model(), tok, self.ft.eval.tasks, **kw))
        return extra


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m elmjax.finetune", description="Fine-tune an OpenELM checkpoint with LoRA/DoRA adapters.")
    parser.add_argument("config", help="fine-tuning config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. peft.rank=16 optimizer.lr=1e-4")
    parser.add_argument("--export-merged", metavar="DIR", help="also write the merged model (Hugging Face layout) here")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    args = parser.parse_args(argv)
    try:
        with cli_logging():
            config = config_io.load(FinetuneConfig, args.config, args.overrides)
            result = run(config)
            if args.export_merged and result.state == "done":
                from elmjax.peft_io import export_merged, load_adapters

                base = load_model(config.init_from)
                adapters, cfg = load_adapters(Path(config.run_dir) / ADAPTER_DIR, base.cfg)
                export_merged(base, adapters, cfg, args.export_merged, tokenizer=config.data.tokenizer)
    except Interrupted as e:
        print(f"interrupted ({e}); rerun the same command to resume", file=sys.stderr)
        return 130
    except UserError as e:
        return user_error_exit(e, args.debug)
    return run_exit(result, lambda f: f"done: {result.run_dir}  val_loss {f['val_loss']:.4f}  "
                                      f"adapter params {f['adapter_params']}  ({f['step']} steps, {f['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
