"""The sweep-level progress display: runs done/total, the current run's step, ETA.

One tqdm bar measured in planned training FLOPs, so its ETA weighs big runs
more than small ones; runs that are skipped (finished earlier, or taken by
another driver) leave the total instead of counting as instant progress.
Per-run start/finish lines are printed through ``tqdm.write`` so they stay
readable in batch logs, where the bar itself is off (stderr is not a terminal).
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class SweepProgress:
    def __init__(self, runs, enabled: bool = True):
        self.total_runs = len(runs)
        self.finished = 0
        self.current = None
        self.current_flops = 0.0
        self.base = 0.0  # FLOPs of finished runs
        self.started = 0.0
        total = sum(r.row["train_flops"] for r in runs) or 1.0
        # disable=None: no bar when stderr is not a terminal (batch logs get the per-run lines only).
        self.bar = tqdm(total=total, disable=None if enabled else True, dynamic_ncols=True, file=sys.stderr,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]{postfix}")
        self._describe()

    def _describe(self) -> None:
        self.bar.set_description_str(f"sweep {self.finished}/{self.total_runs} runs", refresh=False)

    def skip(self, run, reason: str) -> None:
        self.bar.total = max(self.bar.total - run.row["train_flops"], 1.0)
        self.finished += 1
        self._describe()
        self.bar.refresh()
        self.write(f"[{self.finished}/{self.total_runs}] {run.name}: {reason}")

    def start(self, run) -> None:
        self.current, self.current_flops, self.started = run, run.row["train_flops"], time.time()
        self.write(f"[{self.finished + 1}/{self.total_runs}] {run.name}: training "
                   f"({run.row['params']:,} params, {run.row['tokens']:,} tokens)")
        self.bar.set_postfix_str(f"{run.name}: starting", refresh=True)

    def callback(self, step: int, total_steps: int, metrics: dict) -> None:
        """``progress_callback`` for ``elmjax.train.run``."""
        frac = step / max(total_steps, 1)
        self.bar.n = self.base + frac * self.current_flops
        loss = metrics.get("loss")
        loss_text = f" loss {loss:.3f}" if isinstance(loss, float) else ""
        self.bar.set_postfix_str(f"{self.current.name}: step {step}/{total_steps}{loss_text}", refresh=False)
        self.bar.refresh()

    def finish(self, run, state: str, detail: str = "") -> None:
        self.base += self.current_flops if self.current is run else 0.0
        self.bar.n = self.base
        self.finished += 1
        self.current = None
        self._describe()
        self.bar.set_postfix_str("", refresh=True)
        took = time.time() - self.started
        self.write(f"[{self.finished}/{self.total_runs}] {run.name}: {state}{detail} ({took:.0f} s)")

    def write(self, text: str) -> None:
        tqdm.write(text, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()
