"""LLMEngine: the synchronous core. add_request / step / abort_request; the offline LLM and AsyncEngine drive it.

One step: scheduler.schedule() -> runner.launch() (forward + sample queued) -> once its tokens are read, per
sampled request: append the token, stop checks and incremental detokenization (StopChecker), logprobs,
RequestOutput; finished requests free their KV pages and GDN slot at once. The next step is launched before
the tokens are read (see step). An engine request is one sequence: `params.n` is fanned out by its callers
(LLM, server), each with its own request id.

Outputs carry deltas: a running request's RequestOutput holds only this step's token, text and logprobs
(O(1) per token); the final one also holds the whole lists, handed over without a copy (the request is done
with them). See qnext/sampling_params.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from qnext.cache.block_pool import BlockPool
from qnext.cache.model_cache import ModelCache
from qnext.cache.state_slots import StateSlotPool
from qnext.config import EngineConfig, ModelConfig
from qnext.engine.cache_plan import (cache_dtypes, default_token_budget, plan_cache, resolve_device,
                                     resolve_dtype)
from qnext.engine.request import Request, RequestStatus
from qnext.engine.runner import ModelRunner
from qnext.engine.sampler import Sampler, SamplingRow, make_generator
from qnext.engine.scheduler import QueueFullError, Scheduler
from qnext.engine.stop_checker import StopChecker
from qnext.sampling_params import CompletionOutput, RequestMetrics, RequestOutput, SamplingParams
from qnext.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("qnext.engine")

__all__ = ["LLMEngine", "EngineStats", "QueueFullError"]

_STATUS = {"stop": RequestStatus.FINISHED_STOPPED, "length": RequestStatus.FINISHED_LENGTH,
           "abort": RequestStatus.FINISHED_ABORTED}


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_total: int
    state_slots_used: int
    state_slots_total: int
    num_preemptions: int        # since start
    num_prompt_tokens: int      # prompt tokens of requests that produced their first token, since start
    num_generation_tokens: int  # sampled tokens, since start

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0


class LLMEngine:
    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, engine_config: EngineConfig | None = None,
                 *, tokenizer: Tokenizer | None = None, chat_template=None, generation_config: dict | None = None,
                 model_path: str | Path | None = None):
        ec = engine_config or EngineConfig()
        param = next(model.parameters())
        self.device, self.dtype = param.device, getattr(model, "dtype", param.dtype)
        if ec.max_num_batched_tokens is None:
            ec = dataclasses.replace(ec, max_num_batched_tokens=default_token_budget(self.device))
        self.model, self.model_config, self.engine_config = model, model_config, ec
        if hasattr(model, "stack_projections"):
            model.stack_projections()   # fewer, larger GEMVs per decode step; the weights are final here
        if ec.max_num_seqs > 1 and hasattr(model, "tile_int4_experts"):
            model.tile_int4_experts()   # batched decodes read int4 experts faster from tiles; batch 1 from rows
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.generation_config = dict(generation_config or {})
        self.model_path = model_path

        use_graphs = self.device.type == "cuda" and not ec.enforce_eager
        plan = plan_cache(model_config, ec, self.device, self.dtype, reserve_dummy=use_graphs)
        self.max_model_len = plan.max_model_len
        kv_dtype, ssm_dtype = cache_dtypes(ec, self.dtype)
        self.cache = ModelCache(model_config, num_blocks=plan.cache_blocks, block_size=ec.block_size,
                                num_slots=plan.cache_slots, dtype=self.dtype, device=self.device, kv_dtype=kv_dtype,
                                ssm_dtype=ssm_dtype)
        self.scheduler = Scheduler(BlockPool(plan.num_blocks, ec.block_size), StateSlotPool(plan.num_slots),
                                   max_num_seqs=ec.max_num_seqs, max_num_batched_tokens=ec.max_num_batched_tokens,
                                   max_queue=ec.max_queue, max_model_len=plan.max_model_len)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(ec.seed)
        self.runner = ModelRunner(model, self.cache, Sampler(generator))
        self.overlap = not ec.no_overlap
        self._in_flight = None   # a launched step whose tokens are not read yet (see step)
        if use_graphs:
            from qnext.engine.cuda_graphs import DecodeGraphs
            # decode graphs capture a layer's independent work as parallel branches (SideBranch); eager steps
            # (prefill, mixed) stay on one stream: there the branch measured slower (docs/perf-notes.md)
            side = None if ec.no_side_stream else torch.cuda.Stream(self.device)
            graphs = DecodeGraphs(model, self.cache, max_num_seqs=ec.max_num_seqs, max_model_len=plan.max_model_len,
                                  dummy_page=plan.dummy_page, dummy_slot=plan.dummy_slot, side_stream=side)
            graphs.capture()
            self.runner.decode_forward = graphs
        eos = list(tokenizer.eos_token_ids) if tokenizer is not None else []
        self.eos_token_ids = tuple(eos + [i for i in model_config.eos_token_id if i not in eos])
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._token_text: dict[int, str] = {}  # token id -> its text, for logprob entries
        if self.device.type == "cuda" and not ec.no_warmup:
            t0 = time.perf_counter()
            self.warm_up()
            log.info("warm-up steps (kernel compiles of prefill, mixed and decode steps) took %.1f s",
                     time.perf_counter() - t0)
        log.info("engine on %s, %s: KV cache %d pages of %d tokens (%.2f GiB, %s), %d GDN state slots (%.2f GiB, "
                 "%s states), max_model_len %d, max_num_seqs %d, max_num_batched_tokens %d", self.device,
                 str(self.dtype).removeprefix("torch."), plan.num_blocks, ec.block_size, plan.kv_bytes / 2**30,
                 str(kv_dtype).removeprefix("torch."), plan.num_slots, plan.state_bytes / 2**30,
                 str(ssm_dtype).removeprefix("torch."), plan.max_model_len, ec.max_num_seqs,
                 ec.max_num_batched_tokens)

    # ---- construction from a checkpoint ---------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_path: str | Path | None, engine_config: EngineConfig | None = None, *,
                        synthetic: bool = False, progress: bool = False) -> "LLMEngine":
        """Load a checkpoint directory. synthetic=True: random weights made on the device; model_path is then a
        checkpoint directory (its config, tokenizer and template are used) or a preset name (no tokenizer)."""
        from qnext.chat_template import ChatTemplate, ChatTemplateError
        from qnext.model.qwen3_next import Qwen3NextForCausalLM

        ec = engine_config or EngineConfig()
        path = Path(model_path) if model_path is not None else None
        if synthetic and (path is None or not path.is_dir()):
            from qnext.weights.presets import preset_config
            hf, path = preset_config(str(model_path or "small")), None
        else:
            if path is None or not path.is_dir():
                raise FileNotFoundError(f"model directory {model_path} does not exist")
            hf = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else None
            if hf is None:
                raise FileNotFoundError(f"no config.json in {path}")
        cfg = ModelConfig.from_hf(hf)
        device = resolve_device(ec.device)
        dtype = resolve_dtype(ec.dtype, device)
        quantization = ec.quantization
        if quantization is None and cfg.quantization and device.type == "cuda":
            quantization = "fp8"   # an FP8 checkpoint stays FP8 resident where the fp8 kernels run
        model = Qwen3NextForCausalLM(cfg, dtype=dtype, device=device, quantization=quantization).eval()
        if synthetic:
            from qnext.weights.synthetic import fill_synthetic_
            fill_synthetic_(model, seed=0)  # the weights are the model: EngineConfig.seed is for sampling
        else:
            from qnext.weights.loader import load_weights
            report = load_weights(model, path, device, progress=progress)
            log.info("loaded %d tensors in %.1f s (quantization %s: %d quantized, %d FP8 kept, %d FP8 dequantized)",
                     report.loaded, report.seconds, quantization, report.quantized, report.fp8_kept,
                     report.fp8_dequantized)

        tokenizer = chat_template = None
        generation_config: dict = {}
        if path is not None:
            if (path / "tokenizer.json").is_file():
                tokenizer = Tokenizer.from_pretrained(path)
            try:
                chat_template = ChatTemplate.from_pretrained(path)
            except ChatTemplateError:
                chat_template = None
            gen_file = path / "generation_config.json"
            if gen_file.is_file():
                generation_config = json.loads(gen_file.read_text())
        return cls(model, cfg, ec, tokenizer=tokenizer, chat_template=chat_template,
                   generation_config=generation_config, model_path=path)

    def warm_up(self) -> None:
        """Run a few synthetic requests to completion, so that the kernels (and Triton's specialisations of them:
        it compiles a kernel again for integer arguments equal to 1 or divisible by 16) of the step shapes a server
        meets are compiled before its first request instead of inside it: a chunked long prompt, several prompts of
        odd and aligned lengths in one step, prefills beside running decodes, greedy and sampled rows. On the H200 a
        cold start otherwise stalled the first requests of serve-8k1k-c32 for 0.8-10.6 s each (docs/benchmarks.md).
        Leaves nothing behind: the requests finish, their pages and slots are free, the token counters are reset,
        and the sampled request has its own seed, so the engine's sampling stream is untouched."""
        ec, vocab = self.engine_config, self.model_config.vocab_size
        gen = torch.Generator().manual_seed(0)

        def add(tag: str, n: int, max_tokens: int, **kw) -> None:
            max_tokens = max(1, min(max_tokens, self.max_model_len // 2))
            n = max(1, min(n, self.max_model_len - max_tokens))
            ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
            params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)
            self.add_request(f"warmup-{tag}", ids, params)

        def run(steps: int | None = None) -> None:
            done = 0
            while self.has_unfinished_requests() and (steps is None or done < steps):
                self.step()
                done += 1

        budget = ec.max_num_batched_tokens
        add("chunked", 2 * budget + 37, 3, temperature=0.0)           # two full chunks and an odd one
        run()
        batch = (1, 16, 33, budget // 2 + 5)[:max(0, min(4, self.capacity - 2))]
        add("sampled", 48, 24, temperature=0.8, top_p=0.9, top_k=20, seed=1)
        for i, n in enumerate(batch):
            add(f"batch{i}", n, 24, temperature=0.0)
        run(steps=4)                                                   # several prompts, then decodes
        if self.capacity > 1 + len(batch):
            add("beside-decodes", budget + 129, 4, temperature=0.0)    # prefill chunks in decoding steps
        run()
        self._warm_up_full_house(add, run)
        self._num_prompt_tokens = self._num_generation_tokens = 0

    def _warm_up_full_house(self, add, run) -> None:
        """warm_up's last part, the steps of a loaded server: max_num_seqs - 4 decoders whose ends are staggered
        (their count falls by one per step) beside a new short prompt every step, after two steps in which a
        prompt straddles the budget, so that a chunk over cached context of fewer than 16 queries and one of more
        run beside them. With the earlier warm-up, which ran neither (a budget above max_model_len never chunks
        a lone prompt), serve-8k1k-c32's first measured wave stalled ~13 s on a cold Triton cache (docs/benchmarks.md,
        2026-12-03 sixth session)."""
        crowd = min(self.engine_config.max_num_seqs, self.capacity) - 4   # room for the prompts beside them
        if crowd < 1:
            return
        sched, budget = self.scheduler, self.engine_config.max_num_batched_tokens
        for i in range(crowd):
            add(f"crowd{i}", 8 + i, 3 + i, temperature=0.0)            # decoder i stops after 3 + i tokens
        while sched.waiting:
            self.step()
        for rest in (7, 40):                    # the straddling prompt's part left for the next step
            left = budget - len(sched.running)  # what the decodes leave of the next step's budget
            n = min(left + rest, self.max_model_len - 1)
            add(f"straddle{rest}", n, 1, temperature=0.0)
            if n < left + rest:                 # the context is too short to straddle alone: a second prompt does
                add(f"straddle{rest}b", min(left - n + rest, self.max_model_len - 1), 1, temperature=0.0)
            self.step()
        beside = 0
        while any(rid.startswith("warmup-crowd") for rid in sched.requests):
            add(f"beside{beside}", 20 + beside, 1, temperature=0.0)
            beside += 1
            self.step()
        run()

    # ---- requests -------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Unfinished requests accepted before QueueFullError: max_num_seqs + max_queue."""
        return self.scheduler.capacity

    def default_sampling_params(self, **overrides) -> SamplingParams:
        """The checkpoint's generation_config.json defaults, then overrides (None values ignored)."""
        return SamplingParams.from_generation_config(self.generation_config, **overrides)

    def _max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        if params.max_tokens is not None:
            return params.max_tokens
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"the prompt ({num_prompt_tokens} tokens) leaves no room to generate within "
                             f"max_model_len ({self.max_model_len})")
        return self.max_model_len - num_prompt_tokens

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming the problem when the request can never run (no engine state is touched)."""
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this checkpoint has none")
        self.scheduler.check_request(len(prompt_token_ids), self._max_tokens(len(prompt_token_ids), params))

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    *, arrival_time: float | None = None) -> None:
        """Queue a request. ValueError: can never run (names the limit); QueueFullError: retry later."""
        params = params if params is not None else SamplingParams()
        prompt = list(prompt_token_ids)
        self.check_request(prompt, params)
        req = Request(request_id, prompt, self._max_tokens(len(prompt), params), params,
                      **({"arrival_time": arrival_time} if arrival_time is not None else {}))
        detok = (IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
                 if self.tokenizer is not None else None)
        req.detokenizer = detok
        req.stop_checker = StopChecker(params, self.eos_token_ids, detok, req.max_tokens)
        req.sampling_row = SamplingRow(params, req.prompt_token_ids, output_token_ids=req.output_token_ids,
                                       generator=make_generator(params.seed, self.device))
        if params.logprobs is not None:
            req.logprobs = []
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None] * len(prompt)
            req.num_prompt_logprobs = 1  # the first prompt token has no logprob
        req.needs_sync = bool(params.logits_processors or params.min_tokens or params.prompt_logprobs is not None
                              or params.repetition_penalty != 1.0 or params.frequency_penalty
                              or params.presence_penalty)
        self.scheduler.add_request(req)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Finish a request now (its pages and slot are free on return); its final output, None if unknown."""
        req = self.scheduler.abort_request(request_id)
        if req is None:
            return None
        req.stop_checker.abort()
        req.finish_time = time.monotonic()
        return self._output(req, "", [], None)

    def abort_all(self) -> None:
        for request_id in list(self.scheduler.requests):
            self.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run and sample one step; one RequestOutput per request that got a token.

        Overlap (the default; `no_overlap` turns it off): once step n is queued on the device, step n+1 is
        scheduled, built and queued before step n's tokens are read, so the host's share of a step (scheduling,
        batch building, detokenizing, stop checks) runs while the device computes instead of between steps. Step
        n+1 feeds each request's step-n token from the device (ModelRunner.prepare). Requests that finish at step n
        (a stop token or string) then have one extra token computed and dropped; their pages and slot are freed
        at once all the same: every later step is queued behind that one on the same stream. A request whose
        sampling reads its previous token (Request.needs_sync) turns overlap off for the steps it is in."""
        pending, self._in_flight = self._in_flight or self._launch(None), None
        if pending is None:
            return []
        if self.overlap and not any(s.request.needs_sync for s in pending.scheduled):
            self._in_flight = self._launch(pending)
        return self._collect(pending)

    def _launch(self, previous):
        sched = self.scheduler.schedule()
        now = time.monotonic()
        for s in sched.scheduled:
            r = s.request
            if r.first_scheduled_time is None:
                r.first_scheduled_time = now
            if s.is_last_chunk:
                r.sampling_row.banned_token_ids = r.stop_checker.suppressed_token_ids()
        step = self.runner.launch(sched.scheduled, previous)
        if step is not None:
            for r in step.requests:
                r.num_inflight += 1
        return step

    def _collect(self, step) -> list[RequestOutput]:
        """Read a launched step's tokens (waiting for them) and apply them to its requests."""
        result = step.result()
        for r in result.requests:
            r.num_inflight -= 1
        for chunk in result.prompt_logprobs:
            self._store_prompt_logprobs(chunk)
        now = time.monotonic()
        outputs = []
        for i, req in enumerate(result.requests):
            if req.is_finished:      # finished (stop, abort) after this step was queued: its token is dropped
                continue
            token = result.sampler_output.token_ids[i]
            if not req.output_token_ids:
                self._num_prompt_tokens += req.num_prompt_tokens
            self._num_generation_tokens += 1
            req.append_token(token, now)
            delta_text, delta_ids = req.stop_checker.update([token])
            lp = result.sampler_output.logprobs[i]
            delta_lps = None
            if lp is not None and req.logprobs is not None:
                self._decode_logprobs(lp)
                req.logprobs.append(lp)
                req.cumulative_logprob += lp[token].logprob
                delta_lps = [lp]
            checker = req.stop_checker
            if checker.finished:
                req.stop_reason = checker.stop_reason
                req.finish_time = now
                self.scheduler.finish_request(req, _STATUS[checker.finish_reason])
            outputs.append(self._output(req, delta_text, delta_ids, delta_lps))
        return outputs

    def _decode_logprobs(self, lp: dict) -> None:
        if self.tokenizer is not None:
            cache = self._token_text  # at most vocab_size entries; a long prompt's top-N repeat a lot
            for tok_id, entry in lp.items():
                text = cache.get(tok_id)
                if text is None:
                    text = cache[tok_id] = self.tokenizer.decode([tok_id], skip_special_tokens=False)
                entry.decoded_token = text

    def _store_prompt_logprobs(self, chunk) -> None:
        req = chunk.request
        for k, lp in enumerate(chunk.entries):
            self._decode_logprobs(lp)
            req.prompt_logprobs[chunk.first + k] = lp
        req.num_prompt_logprobs = chunk.first + len(chunk.entries)

    def _output(self, req: Request, delta_text: str, delta_ids: list[int], delta_lps: list | None) -> RequestOutput:
        """A running request's output carries the step's deltas only; the final one also the whole lists, which
        it takes over without copying (nothing appends to a finished request)."""
        checker = req.stop_checker
        final = checker.finished
        completion = CompletionOutput(
            index=0, text=checker.released_text if final else "",
            token_ids=req.output_token_ids if final else [],
            cumulative_logprob=req.cumulative_logprob if req.logprobs is not None else None,
            logprobs=req.logprobs if final else None,
            finish_reason=checker.finish_reason, stop_reason=checker.stop_reason,
            delta_text=delta_text, delta_token_ids=delta_ids, delta_logprobs=delta_lps)
        metrics = RequestMetrics(arrival_time=req.arrival_time, first_scheduled_time=req.first_scheduled_time,
                                 first_token_time=req.first_token_time, last_token_time=req.last_token_time,
                                 finished_time=req.finish_time)
        # prompt logprobs travel with the first output (a streaming caller's first chunk) and the final one
        first = len(delta_ids) > 0 and req.num_output_tokens == len(delta_ids)
        prompt_lps = req.prompt_logprobs if final or first else None
        return RequestOutput(req.request_id, req.prompt_token_ids, [completion], final, metrics,
                             prompt_logprobs=prompt_lps)

    # ---- introspection --------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(num_running=len(s.running), num_waiting=len(s.waiting),
                           kv_pages_used=s.pool.num_used, kv_pages_total=s.pool.num_blocks,
                           state_slots_used=s.slots.num_used, state_slots_total=s.slots.num_slots,
                           num_preemptions=s.num_preemptions, num_prompt_tokens=self._num_prompt_tokens,
                           num_generation_tokens=self._num_generation_tokens)

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
