"""Qwen3-Next causal LM: hybrid Gated DeltaNet / gated full attention decoder layers with sparse MoE.

    h = x + mixer(input_layernorm(x));  out = h + mlp(post_attention_layernorm(h))
    (carried as a residual stream: each norm adds its input to the stream in the same fused op)
    hidden = norm(last layer);  logits = lm_head(hidden)

Module names mirror the checkpoint (model.layers.N.linear_attn.*, .self_attn.*, .mlp.*, model.norm, lm_head).
Parameters are created uninitialised (torch.empty, no grad) on the target device, "meta" included; a loader or a
test fills them. The model has no buffers. `quantization` (a QuantScheme or its name: None, "fp8", "int4") picks the
resident format of the projections and experts (qnext/model/layers/linear.py); lm_head and embeddings stay plain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qnext.config import ModelConfig
from qnext.model.layers.attention import GatedAttention
from qnext.model.layers.gdn import GatedDeltaNet
from qnext.model.layers.linear import Linear, QuantScheme, empty_param
from qnext.model.layers.moe import MLP, SparseMoeBlock
from qnext.model.layers.norm import RMSNorm
from qnext.model.layers.rotary import RotaryEmbedding
from qnext.model.state import as_dtype


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, *, ops_backend: str, quant: QuantScheme, **kw):
        super().__init__()
        self.layer_type = cfg.layer_types[layer_id]
        if self.layer_type == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg, layer_id, ops_backend=ops_backend, quant=quant, **kw)
        else:
            self.self_attn = GatedAttention(cfg, layer_id, ops_backend=ops_backend, quant=quant, **kw)
        self.mlp = (SparseMoeBlock(cfg, quant=quant, ops_backend=ops_backend, **kw) if cfg.is_moe_layer(layer_id)
                    else MLP(cfg.hidden_size, cfg.intermediate_size, quant=quant.dense, ops_backend=ops_backend, **kw))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops_backend=ops_backend, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops_backend=ops_backend, **kw)

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.layer_type == "linear_attention" else self.self_attn

    def forward(self, x, residual, batch, cache, rope):
        """x [T, hidden]: the previous layer's MLP output (the embeddings at layer 0, residual None; a MoeCombine,
        still to be summed, after a MoE layer); residual: the stream before it. Returns (this layer's MLP output,
        the stream before it); their sum is the layer's output, formed by the next norm's fused residual add (the
        same rounding as h = x + mixer(norm(x)) etc.)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.mixer(h, batch, cache, rope), residual)
        return self.mlp(h, batch.side_stream, defer_combine=True), residual


class Embedding(nn.Module):
    def __init__(self, vocab: int, hidden: int, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = empty_param(vocab, hidden, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        return F.embedding(ids, self.weight)


class Qwen3NextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, **kw):
        super().__init__()
        plain = {k: v for k, v in kw.items() if k in ("dtype", "device")}
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, **plain)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, **kw) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops_backend=kw["ops_backend"], **plain)
        self.rotary_emb = RotaryEmbedding(cfg, ops_backend=kw["ops_backend"])

    def forward(self, batch, cache) -> torch.Tensor:
        x, residual = self.embed_tokens(batch.input_ids), None
        rope = self.rotary_emb(batch.positions)
        for layer in self.layers:
            x, residual = layer(x, residual, batch, cache, rope)
        return self.norm(x, residual)[0]


class Qwen3NextForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype | str = torch.bfloat16,
                 device: torch.device | str | None = None, ops_backend: str = "auto",
                 quantization: QuantScheme | str | None = None):
        super().__init__()
        self.config, self.dtype = cfg, as_dtype(dtype)
        self.quant = (quantization if isinstance(quantization, QuantScheme)
                      else QuantScheme.named(quantization, cfg))
        kw = dict(dtype=self.dtype, device=device)
        self.model = Qwen3NextModel(cfg, ops_backend=ops_backend, quant=self.quant, **kw)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ops_backend=ops_backend, **kw)
        self.tie_weights()

    def stack_projections(self) -> None:
        """For inference engines, once the weights are final: projections that read the same input run as one
        (the shared expert's gate and up, the router and the shared-expert gate, attention's q, k and v); see
        stack_projections in
        qnext/model/layers/linear.py. Later calls change nothing (CUDA graphs captured by one engine keep reading
        the tensors stacked first, also when a second engine is built on the same model)."""
        for m in self.modules():
            if m is not self and hasattr(m, "stack_projections"):
                m.stack_projections()

    def tile_int4_experts(self) -> None:
        """int4 routed experts in tiled storage (Experts.tile_storage), for an engine that batches decodes; once
        (an engine built later on the same model keeps the layout the first one chose)."""
        for m in self.modules():
            if hasattr(m, "tile_storage"):
                m.tile_storage()

    def tie_weights(self) -> None:
        """tie_word_embeddings: one parameter under both names (named_parameters() lists only the embedding)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _apply(self, fn, recurse=True):
        # .to() / .to_empty() from meta replace parameters module by module, which would untie them
        out = super()._apply(fn, recurse)
        self.tie_weights()
        return out

    def forward(self, batch, cache) -> torch.Tensor:
        """One step over a ForwardBatch -> final-normed hidden states [T, hidden]; updates the cache in place."""
        return self.model(batch, cache)

    def compute_logits(self, hidden: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """hidden [B, hidden] (already normed) -> logits [B, vocab] in dtype (None: lm_head's own, which saves the
        float32 copy where the sampler takes the raw logits)."""
        logits = self.lm_head(hidden)
        return logits if dtype is None else logits.to(dtype)
