"""Engine flags shared by every command that runs the model (serve, generate, chat, bench latency).

Each EngineConfig field is one flag, defined here once; defaults come from EngineConfig itself.
"""

from __future__ import annotations

import argparse
import dataclasses

from qnext.config import EngineConfig

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}

# field -> (type, help); the flag is --field-with-dashes
_FLAGS: dict[str, tuple[type, str]] = {
    "device": (str, "auto | cpu | cuda | cuda:N"),
    "dtype": (str, "auto (bfloat16 on cuda, float32 on cpu) | bfloat16 | float16 | float32"),
    "block_size": (int, "tokens per KV page"),
    "max_model_len": (int, "longest prompt + output (default: min(max_position_embeddings, KV pool))"),
    "max_num_seqs": (int, "most sequences running at once (= GDN state slots); above 1, int4 experts are stored "
                          "for batched decodes (faster from batch 2, ~3%% slower at batch 1)"),
    "max_num_batched_tokens": (int, "token budget of one step (decodes + prefill chunks)"),
    "max_queue": (int, "requests accepted beyond the running ones before answering 429"),
    "num_kv_blocks": (int, "KV pages (default: from --kv-cache-memory-gb or free memory)"),
    "kv_cache_memory_gb": (float, "memory for KV pages + GDN state slots (default: from free memory)"),
    "gpu_memory_utilization": (float, "fraction of GPU memory qnext may use (weights + cache)"),
    "quantization": (str, "resident weight format: fp8 (FP8 block-scaled) | int4 (4-bit experts, FP8 elsewhere); "
                          "default: the checkpoint's (an FP8 checkpoint stays FP8 on CUDA)"),
    "kv_cache_dtype": (str, "KV page format: auto (the model dtype) | fp8 (e4m3, half the bytes: twice the "
                            "context per GiB; values clamped to +-448, no scales; decode a little slower)"),
    "ssm_state_dtype": (str, "GDN recurrent state storage: float32 | bfloat16 (half the bytes per sequence and "
                             "faster batched decode; rounded after every token, as vLLM stores it by default)"),
    "seed": (int, "seed of sampling for requests without their own seed (reproducible runs)"),
    "enforce_eager": (bool, "run decode steps eagerly (no CUDA graphs)"),
    "no_overlap": (bool, "prepare each step only after the previous one's tokens are read (by default the host "
                         "prepares step n+1 while the device runs step n)"),
    "no_side_stream": (bool, "capture decode CUDA graphs on one stream (by default the shared expert and GDN's "
                             "in_proj_ba run as graph branches beside the routed experts and in_proj_qkvz)"),
    "no_warmup": (bool, "CUDA: start without the warm-up requests that compile the kernels of prefill, mixed and "
                        "decode steps (the first real requests then wait for those compiles)"),
}


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    for name, (typ, help_text) in _FLAGS.items():
        default = _DEFAULTS[name]
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            g.add_argument(flag, dest=name, action="store_true", default=default, help=help_text)
            continue
        shown = "" if default is None else f" (default: {default})"
        g.add_argument(flag, dest=name, type=typ, default=default, help=help_text + shown)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{name: getattr(args, name, _DEFAULTS[name]) for name in _FLAGS})


def build_engine(args: argparse.Namespace, *, synthetic: bool = False):
    """LLMEngine for args.model (None: the default model), with a loading progress bar."""
    from qnext.engine.llm_engine import LLMEngine

    model = getattr(args, "model", None)
    if model is None and not synthetic:
        from qnext.default_model import default_model_path
        model = default_model_path()
    return LLMEngine.from_pretrained(model, engine_config_from_args(args), synthetic=synthetic, progress=True)
