"""Checkpoint tensor names -> our parameters, and the parameter / checkpoint layouts of a ModelConfig.

Our parameter names are the checkpoint names (docs/architecture.md), except routed experts, which we hold fused:
  model.layers.N.mlp.experts.gate_up_proj  [E, 2I, H]  rows [0, I) = gate_proj of expert e, rows [I, 2I) = up_proj
  model.layers.N.mlp.experts.down_proj     [E, H, I]
Qwen's checkpoints store them per expert (`experts.E.{gate,up,down}_proj.weight`); HF-saved ones may store them
fused. Both map here. `mtp.*` (the multi-token-prediction head) maps to MTP: kept aside, not an error.
FP8 scale tensors are paired with their weight by qnext.weights.fp8, not by this map.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

from qnext.config import ModelConfig

Shape = tuple[int, ...]

COPY, GATE, UP, DOWN, MTP = "copy", "gate", "up", "down", "mtp"


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: `param` whole (copy) or one expert slot of a fused expert tensor."""

    kind: str                 # COPY | GATE (rows [0, I) of slot e) | UP (rows [I, 2I)) | DOWN (slot e) | MTP
    param: str | None         # our parameter name (None for MTP)
    expert: int | None = None


# Declarative map, first match wins: (pattern, kind, our parameter name as a template of the groups).
_EXPERT = r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\."
RULES: tuple[tuple[re.Pattern, str, str | None], ...] = (
    (re.compile(r"^mtp\."), MTP, None),
    (re.compile(_EXPERT + r"gate_proj\.weight$"), GATE, r"\1.gate_up_proj"),
    (re.compile(_EXPERT + r"up_proj\.weight$"), UP, r"\1.gate_up_proj"),
    (re.compile(_EXPERT + r"down_proj\.weight$"), DOWN, r"\1.down_proj"),
    (re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.(?:gate_up_proj|down_proj))(?:\.weight)?$"), COPY, r"\1"),
    (re.compile(r"^(.+)$"), COPY, r"\1"),  # everything else is named as in the checkpoint
)


def map_name(name: str) -> Target:
    """The target of checkpoint tensor `name` (whether our model has that parameter is the loader's check)."""
    for pattern, kind, template in RULES:
        m = pattern.match(name)
        if m:
            expert = int(m.group(2)) if kind in (GATE, UP, DOWN) else None
            return Target(kind, m.expand(template) if template else None, expert)
    raise AssertionError("the last rule matches every name")


# ---- layouts -----------------------------------------------------------------------------------------------------
def _mixer(cfg: ModelConfig, p: str, layer_type: str) -> Iterator[tuple[str, Shape]]:
    H = cfg.hidden_size
    if layer_type == "linear_attention":
        hk, hv, dk, dv = (cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                          cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        yield f"{p}.linear_attn.in_proj_qkvz.weight", (2 * hk * dk + 2 * hv * dv, H)  # interleaved per key head
        yield f"{p}.linear_attn.in_proj_ba.weight", (2 * hv, H)
        yield f"{p}.linear_attn.conv1d.weight", (cfg.conv_dim, 1, cfg.linear_conv_kernel_dim)
        yield f"{p}.linear_attn.A_log", (hv,)
        yield f"{p}.linear_attn.dt_bias", (hv,)
        yield f"{p}.linear_attn.norm.weight", (dv,)
        yield f"{p}.linear_attn.out_proj.weight", (H, hv * dv)
    else:
        nq, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        yield f"{p}.self_attn.q_proj.weight", (2 * nq * hd, H)  # per head [query | gate]
        yield f"{p}.self_attn.k_proj.weight", (nkv * hd, H)
        yield f"{p}.self_attn.v_proj.weight", (nkv * hd, H)
        yield f"{p}.self_attn.o_proj.weight", (H, nq * hd)
        yield f"{p}.self_attn.q_norm.weight", (hd,)
        yield f"{p}.self_attn.k_norm.weight", (hd,)


def _mlp(cfg: ModelConfig, p: str, moe: bool, per_expert: bool) -> Iterator[tuple[str, Shape]]:
    H = cfg.hidden_size
    if not moe:
        I = cfg.intermediate_size
        yield f"{p}.mlp.gate_proj.weight", (I, H)
        yield f"{p}.mlp.up_proj.weight", (I, H)
        yield f"{p}.mlp.down_proj.weight", (H, I)
        return
    E, I, Is = cfg.num_experts, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    yield f"{p}.mlp.gate.weight", (E, H)
    if per_expert:
        for e in range(E):
            yield f"{p}.mlp.experts.{e}.gate_proj.weight", (I, H)
            yield f"{p}.mlp.experts.{e}.up_proj.weight", (I, H)
            yield f"{p}.mlp.experts.{e}.down_proj.weight", (H, I)
    else:
        yield f"{p}.mlp.experts.gate_up_proj", (E, 2 * I, H)
        yield f"{p}.mlp.experts.down_proj", (E, H, I)
    if Is > 0:
        yield f"{p}.mlp.shared_expert.gate_proj.weight", (Is, H)
        yield f"{p}.mlp.shared_expert.up_proj.weight", (Is, H)
        yield f"{p}.mlp.shared_expert.down_proj.weight", (H, Is)
        yield f"{p}.mlp.shared_expert_gate.weight", (1, H)


def _layout(cfg: ModelConfig, per_expert: bool, mtp: bool) -> Iterator[tuple[str, Shape]]:
    H, V = cfg.hidden_size, cfg.vocab_size
    yield "model.embed_tokens.weight", (V, H)
    for i, layer_type in enumerate(cfg.layer_types):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (H,)
        yield from _mixer(cfg, p, layer_type)
        yield f"{p}.post_attention_layernorm.weight", (H,)
        yield from _mlp(cfg, p, cfg.is_moe_layer(i), per_expert)
    yield "model.norm.weight", (H,)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (V, H)
    if mtp:  # one full-attention MoE layer after fc(cat(norm(embed), norm(hidden))); embed/lm_head shared
        yield "mtp.fc.weight", (H, 2 * H)
        yield "mtp.pre_fc_norm_embedding.weight", (H,)
        yield "mtp.pre_fc_norm_hidden.weight", (H,)
        yield "mtp.layers.0.input_layernorm.weight", (H,)
        yield from _mixer(cfg, "mtp.layers.0", "full_attention")
        yield "mtp.layers.0.post_attention_layernorm.weight", (H,)
        yield from _mlp(cfg, "mtp.layers.0", cfg.num_experts > 0, per_expert)
        yield "mtp.norm.weight", (H,)


def expected_parameters(cfg: ModelConfig) -> dict[str, Shape]:
    """Every parameter of Qwen3NextForCausalLM(cfg) -> shape (the model's named_parameters() must equal this)."""
    return dict(_layout(cfg, per_expert=False, mtp=False))


def checkpoint_layout(cfg: ModelConfig, mtp: bool = False) -> dict[str, Shape]:
    """Tensor names and shapes of a checkpoint in Qwen's on-disk naming (per-expert), in writing order."""
    return dict(_layout(cfg, per_expert=True, mtp=mtp))
