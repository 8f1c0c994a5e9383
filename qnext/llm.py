"""LLM: the offline API, shaped like vLLM's.

    llm = LLM(model="path/to/checkpoint", device="cpu", dtype="float32")   # model=None: the default model
    outs = llm.generate(["def fib(n):", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text; outs[1].outputs[0].token_ids
    llm.chat([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=64))   # or a list of conversations

Outputs come back in input order, one RequestOutput per prompt with `n` CompletionOutputs (index 0..n-1). n > 1
becomes n engine requests; with a seed, completion i uses seed + i. Without sampling params, the checkpoint's
generation_config.json defaults apply. A checkpoint without a tokenizer takes only prompt_token_ids.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any, Union

from tqdm import tqdm

from qnext.config import EngineConfig
from qnext.engine.llm_engine import LLMEngine
from qnext.sampling_params import RequestOutput, SamplingParams

PromptType = Union[str, dict, Sequence[int]]


class LLM:
    def __init__(self, model: str | None = None, *, device: str = "auto", dtype: str = "auto",
                 synthetic: bool = False, **engine_kwargs: Any):
        """engine_kwargs: any EngineConfig field (max_model_len, max_num_seqs, num_kv_blocks, seed, ...)."""
        if model is None and not synthetic:
            from qnext.default_model import default_model_path
            model = default_model_path()
        config = EngineConfig(device=device, dtype=dtype, **engine_kwargs)
        self.engine = LLMEngine.from_pretrained(model, config, synthetic=synthetic)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    # ---- generate -------------------------------------------------------------------------------
    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        items = self._as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.engine.default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(f"got {len(params_list)} SamplingParams for {len(items)} prompts")
        encoded = [self._encode(p) for p in items]
        return self._run(encoded, params_list, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             tools: list[dict] | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation (a list of message dicts) or a list of them; rendered with the checkpoint's template."""
        if self.engine.chat_template is None or self.engine.tokenizer is None:
            raise ValueError("chat needs a tokenizer and a chat template, and this checkpoint lacks them")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        texts = [self.engine.chat_template.render(conv, tools=tools, add_generation_prompt=add_generation_prompt,
                                                  **(chat_template_kwargs or {}))
                 for conv in conversations]
        return self.generate(texts, sampling_params, use_tqdm=use_tqdm)

    # ---- internals ------------------------------------------------------------------------------
    @staticmethod
    def _as_prompt_list(prompts) -> list:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):  # one prompt given as token ids
            return [{"prompt_token_ids": prompts}]
        return prompts

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise ValueError(f"a prompt must be a str, a dict or a list of token ids, got {type(prompt).__name__}")
        if self.engine.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer (no tokenizer.json): give prompts as "
                             "{'prompt_token_ids': [...]}")
        return prompt, self.engine.tokenizer.encode(prompt)

    def _run(self, encoded: list[tuple[str | None, list[int]]], params_list: list[SamplingParams],
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        jobs: list[tuple[str, int, int, list[int], SamplingParams]] = []   # (engine id, prompt #, index, ids, params)
        for i, ((_, ids), params) in enumerate(zip(encoded, params_list)):
            base = f"llm-{next(self._ids)}"
            for j in range(params.n):
                p = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + j)
                engine.check_request(ids, p)   # fail before anything runs
                jobs.append((base if params.n == 1 else f"{base}-{j}", i, j, ids, p))
        results: dict[str, RequestOutput] = {}
        pending = list(reversed(jobs))
        where = {rid: (i, j) for rid, i, j, _, _ in jobs}
        bar = tqdm(total=len(jobs), desc="generating", unit="req", disable=not use_tqdm or None)
        try:
            while pending or engine.has_unfinished_requests():
                while pending and len(engine.scheduler.requests) < engine.capacity:
                    rid, _, _, ids, p = pending.pop()
                    engine.add_request(rid, ids, p)
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in where:
                engine.abort_request(rid)
            raise
        finally:
            bar.close()

        merged: list[RequestOutput | None] = [None] * len(encoded)
        for rid, _, j, _, _ in jobs:
            out = results[rid]
            i = where[rid][0]
            completion = dataclasses.replace(out.outputs[0], index=j, delta_text="", delta_token_ids=[],
                                             delta_logprobs=None)
            if merged[i] is None:
                merged[i] = dataclasses.replace(out, request_id=rid.rsplit("-", 1)[0] if params_list[i].n > 1
                                                else rid, outputs=[completion], prompt=encoded[i][0])
            else:
                merged[i].outputs.append(completion)
        return merged  # type: ignore[return-value]
