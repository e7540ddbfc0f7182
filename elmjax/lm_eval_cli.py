"""``lm_eval``'s command line with the ``elmjax`` model type registered.

The harness (0.4.x) finds models only in its own registry, filled by import;
this wrapper imports ``elmjax.lm_eval_backend`` and hands the arguments to
``lm_eval``'s CLI unchanged::

    python -m elmjax.lm_eval_cli --model elmjax --model_args checkpoint=PATH --tasks arc_easy
    python -m elmjax.lm_eval_cli --model elmjax --model_args checkpoint=PATH \
        --include_path my_tasks/ --tasks my_local_task
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"error: the LM Evaluation Harness is not installed ({e}): pip install 'elmjax[eval]'") from None
    import elmjax.lm_eval_backend  # noqa: F401  (registers --model elmjax)

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
