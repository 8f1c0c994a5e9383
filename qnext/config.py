"""Model facts (ModelConfig, read once from a HF config.json) and engine settings (EngineConfig).

Both are frozen: built and validated in one place, never written afterwards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("qwen3_next",)
LAYER_TYPES = ("linear_attention", "full_attention")


class ConfigError(ValueError):
    """A config.json that qnext cannot serve; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    partial_rotary_factor: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    # gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # MoE
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    intermediate_size: int
    # misc
    rms_norm_eps: float
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    torch_dtype: str
    quantization: dict | None = None
    has_mtp: bool = False
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: dict | str | Path) -> "ModelConfig":
        """From a config.json dict, a config.json path or a checkpoint directory."""
        if not isinstance(source, dict):
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"no config.json at {path}")
            try:
                source = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from e
        d = dict(source)
        if "text_config" in d and "hidden_size" not in d:  # multimodal wrappers nest the text model
            d = {**d["text_config"], "quantization_config": d.get("quantization_config")}
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def req(name: str) -> Any:
            if d.get(name) is None:
                raise ConfigError(f"config.json lacks the required field {name!r}")
            return d[name]

        num_layers = int(req("num_hidden_layers"))
        layer_types = d.get("layer_types")
        if layer_types is None:
            interval = int(d.get("full_attention_interval", 4))
            if interval < 1:
                raise ConfigError(f"full_attention_interval must be >= 1, got {interval}")
            layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(num_layers)
            ]
        rope = d.get("rope_parameters") or {}
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") not in ("default", None):
            rope_scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        eos = d.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
        num_attention_heads = int(req("num_attention_heads"))
        hidden = int(req("hidden_size"))
        cfg = cls(
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            layer_types=tuple(layer_types),
            num_attention_heads=num_attention_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or num_attention_heads),
            head_dim=int(d.get("head_dim") or hidden // num_attention_heads),
            partial_rotary_factor=float(d.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.25))),
            rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rope_scaling=dict(rope_scaling) if rope_scaling else None,
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            linear_num_key_heads=int(req("linear_num_key_heads")),
            linear_num_value_heads=int(req("linear_num_value_heads")),
            linear_key_head_dim=int(req("linear_key_head_dim")),
            linear_value_head_dim=int(req("linear_value_head_dim")),
            linear_conv_kernel_dim=int(d.get("linear_conv_kernel_dim", 4)),
            num_experts=int(d.get("num_experts", 0)),
            num_experts_per_tok=int(d.get("num_experts_per_tok", 0)),
            moe_intermediate_size=int(d.get("moe_intermediate_size", 0)),
            shared_expert_intermediate_size=int(d.get("shared_expert_intermediate_size", 0)),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            decoder_sparse_step=int(d.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            intermediate_size=int(d.get("intermediate_size", 0)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            quantization=d.get("quantization_config"),
            has_mtp=int(d.get("num_nextn_predict_layers", 0) or 0) > 0,
            raw=source if isinstance(source, dict) else {},
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                     "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                     "linear_value_head_dim", "linear_conv_kernel_dim"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(len(self.layer_types) == self.num_hidden_layers,
              f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        check(not bad, f"layer_types has unsupported entries {bad} (supported: {LAYER_TYPES})")
        check(self.num_attention_heads % self.num_key_value_heads == 0,
              f"num_attention_heads {self.num_attention_heads} is not a multiple of "
              f"num_key_value_heads {self.num_key_value_heads}")
        check(self.linear_num_value_heads % self.linear_num_key_heads == 0,
              f"linear_num_value_heads {self.linear_num_value_heads} is not a multiple of "
              f"linear_num_key_heads {self.linear_num_key_heads}")
        rd = self.rotary_dim
        check(0 < rd <= self.head_dim and rd % 2 == 0,
              f"partial_rotary_factor {self.partial_rotary_factor} gives rotary dim {rd}, "
              f"which must be even and within head_dim {self.head_dim}")
        if self.num_experts > 0:
            check(0 < self.num_experts_per_tok <= self.num_experts,
                  f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..num_experts {self.num_experts}")
            check(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive when num_experts > 0")
        if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            check(self.intermediate_size > 0, "intermediate_size must be positive for dense MLP layers")
        if self.rope_scaling:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            check(kind in ("yarn", "linear", "default"),
                  f"rope_scaling type {kind!r} is not supported (supported: yarn, linear)")
        if self.quantization:
            method = self.quantization.get("quant_method")
            check(method == "fp8", f"quantization_config.quant_method {method!r} is not supported (supported: fp8)")
            fmt = self.quantization.get("fmt", "e4m3")
            check(fmt == "e4m3", f"quantization_config.fmt {fmt!r} is not supported (supported: e4m3)")
            block = self.quantization.get("weight_block_size")
            check(block is not None and len(block) == 2,
                  "quantization_config.weight_block_size must be [rows, cols] (per-tensor FP8 is not supported)")

    # ---- derived facts ------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    @property
    def linear_layer_ids(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "linear_attention")

    @property
    def conv_dim(self) -> int:
        """Channels of the GDN causal conv: all q, all k, all v."""
        return (2 * self.linear_num_key_heads * self.linear_key_head_dim
                + self.linear_num_value_heads * self.linear_value_head_dim)

    def is_moe_layer(self, layer_id: int) -> bool:
        return (layer_id not in self.mlp_only_layers and self.num_experts > 0
                and (layer_id + 1) % self.decoder_sparse_step == 0)


@dataclass(frozen=True)
class EngineConfig:
    """Engine settings (not model facts). Validated once; CLI flags map one to one."""

    device: str = "auto"                 # auto = cuda when available, else cpu
    dtype: str = "auto"                  # auto = bfloat16 on cuda, float32 on cpu
    block_size: int = 16                 # tokens per KV page
    max_model_len: int | None = None     # default: min(max_position_embeddings, what the KV pool holds)
    max_num_seqs: int = 64               # running sequences (= GDN state slots in use)
    # per-step token budget (prefill chunks + decodes); None: default_token_budget (qnext/engine/cache_plan.py)
    max_num_batched_tokens: int | None = None
    max_queue: int = 256                 # waiting requests before 429
    num_kv_blocks: int | None = None     # default: from memory budget
    kv_cache_memory_gb: float | None = None  # memory for KV pages + GDN slots; default: from free memory
    gpu_memory_utilization: float = 0.90
    quantization: str | None = None      # None | "fp8" | "int4": quantize at load time
    kv_cache_dtype: str = "auto"         # auto = the model dtype | fp8 (e4m3, values clamped to +-448, no scale)
    ssm_state_dtype: str = "float32"     # GDN recurrent state storage: float32 | bfloat16 (math stays float32)
    seed: int = 0
    enforce_eager: bool = False          # no CUDA graphs for decode steps
    no_overlap: bool = False             # schedule a step only after the previous one's tokens are read
    no_side_stream: bool = False         # decode graphs on one stream (no shared-expert / in_proj_ba branches)
    no_warmup: bool = False              # CUDA: skip the start-up warm-up requests (LLMEngine.warm_up)

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
              f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        check(self.dtype in ("auto", "float32", "bfloat16", "float16"),
              f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
              f"block_size must be a power of two, got {self.block_size}")
        check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
              f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        check(self.max_queue >= 0, f"max_queue must be >= 0, got {self.max_queue}")
        check(0.0 < self.gpu_memory_utilization <= 1.0,
              f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        check(self.quantization in (None, "fp8", "int4"),
              f"quantization must be fp8 or int4, got {self.quantization!r}")
        check(self.kv_cache_dtype in ("auto", "fp8"),
              f"kv_cache_dtype must be auto or fp8, got {self.kv_cache_dtype!r}")
        check(self.ssm_state_dtype in ("float32", "bfloat16"),
              f"ssm_state_dtype must be float32 or bfloat16, got {self.ssm_state_dtype!r}")
        if self.max_model_len is not None:
            check(self.max_model_len >= 1, f"max_model_len must be >= 1, got {self.max_model_len}")
