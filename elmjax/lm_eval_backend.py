"""An ``elmjax`` model type for the LM Evaluation Harness (``pip install 'elmjax[eval]'``).

Importing this module registers ``elmjax`` with ``lm_eval``'s model
registry. ``lm_eval`` (0.4.x) discovers models only by import, not by entry
point, so run it through the wrapper, which imports this module first::

    python -m elmjax.lm_eval_cli --model elmjax \
        --model_args checkpoint=PATH[,tokenizer=SPEC,dtype=bfloat16,max_gen_toks=256] \
        --tasks arc_easy,arc_challenge,boolq,hellaswag,piqa,sciq,winogrande --batch_size 16

``checkpoint`` is a training run directory or a Hugging Face OpenELM
directory; ``tokenizer`` defaults to the checkpoint's. Log-likelihoods use
``elmjax.scoring`` (the same code as ``python -m elmjax.evaluate``) and
generation uses ``elmjax.generate``. In Python, pass a model directly:
``ElmjaxLM(model=model, tokenizer=tok)`` to ``lm_eval.simple_evaluate``.
"""

from __future__ import annotations

import json
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from elmjax.generate import generate, load_for_inference
from elmjax.scoring import DEFAULT_TOKEN_BUDGET, encode_pair, loglikelihood, loglikelihood_rolling
from elmjax.tokenizer import load_tokenizer


@register_model("elmjax")
class ElmjaxLM(LM):
    def __init__(self, checkpoint: str | None = None, tokenizer=None, dtype: str | None = None, *, model=None,
                 max_length: int | None = None, token_budget: int = DEFAULT_TOKEN_BUDGET, max_gen_toks: int = 256,
                 prefix_token: int | None = None, seed: int = 1234, batch_size: Any = None,
                 max_batch_size: Any = None, device: Any = None):
        """``batch_size`` (from ``--batch_size``) is the generation batch;
        log-likelihood batches are sized by ``token_budget`` tokens instead.
        ``device``/``max_batch_size`` from the harness are accepted and ignored
        (JAX places the model on its default device). Unknown model_args are
        an error, so a misspelt option is not silently dropped."""
        super().__init__()
        if model is None:
            if checkpoint is None:
                raise ValueError("elmjax: give model_args checkpoint=PATH (a training run or Hugging Face directory)")
            model, tokenizer = load_for_inference(checkpoint, tokenizer, dtype)
        elif tokenizer is None:
            raise ValueError("elmjax: a model passed directly needs its tokenizer")
        self.model = model
        self.tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.max_length = int(max_length or model.cfg.max_context_length)
        self.token_budget = int(token_budget)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_token = self.tok.eos_id if prefix_token is None else int(prefix_token)
        self.seed = int(seed)
        self.gen_batch = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 16

    # -------------------------------------------------------- log-likelihood

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, ctx, cont, self.prefix_token) for ctx, cont in (r.args for r in requests)]
        results = loglikelihood(self.model, pairs, max_length=self.max_length, token_budget=self.token_budget,
                                progress=not disable_tqdm)
        out = [(r.logprob, r.is_greedy) for r in results]
        for req, answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        docs = [self.tok.encode(r.args[0]) for r in requests]
        out = loglikelihood_rolling(self.model, docs, self.prefix_token, max_length=self.max_length,
                                    token_budget=self.token_budget, progress=not disable_tqdm)
        for req, answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, answer)
        return out

    # ------------------------------------------------------------ generation

    def _sampling(self, kwargs: dict) -> dict:
        """The harness's generation kwargs as ``generate`` options (greedy unless do_sample with temperature > 0)."""
        temperature = float(kwargs.get("temperature", 0.0) or 0.0)
        if not kwargs.get("do_sample", False) or temperature == 0.0:
            return {}
        return {"temperature": temperature, "top_k": kwargs.get("top_k"), "top_p": kwargs.get("top_p"), "seed": self.seed}

    def _generate_group(self, contexts: list[str], kwargs: dict) -> list[str]:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
        if not 0 < max_new < self.max_length:
            raise ValueError(f"elmjax: max_gen_toks {max_new} must be in [1, max_length {self.max_length})")
        # Keep each context's last (max_length - max_new) tokens so prompt + generation fit, as the harness does.
        prompts = [(self.tok.encode(c) or [self.prefix_token])[-(self.max_length - max_new):] for c in contexts]
        texts = []
        for start in range(0, len(prompts), self.gen_batch):
            batch = prompts[start : start + self.gen_batch]
            # Pad the batch to a fixed size so its last, smaller part does not compile again.
            padded = batch + [batch[0]] * (self.gen_batch - len(batch))
            outs = generate(self.model, padded, max_new, stop_tokens=[self.tok.eos_id], **self._sampling(kwargs))
            for ids in outs[: len(batch)]:
                text = self.tok.decode(ids)
                cut = min([text.find(s) for s in until if s and s in text] + [len(text)])
                texts.append(text[:cut])
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for key, idxs in groups.items():
            texts = self._generate_group([requests[i].args[0] for i in idxs], dict(requests[idxs[0]].args[1]))
            for i, text in zip(idxs, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out
