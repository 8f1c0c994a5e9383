"""Gated DeltaNet (linear attention) layer.

in_proj_qkvz rows are grouped per key head g: [q_g (Dk) | k_g (Dk) | v of its r = Hv/Hk value heads (r*Dv) |
z of the same heads (r*Dv)]; in_proj_ba per key head: [b (r) | a (r)]. Forward splits that layout, runs the causal
conv + SiLU over cat(all q, all k, all v), then the gated delta rule with
beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias) (float32), q and k L2-normalised, q scaled by Dk^-0.5,
and finally the gated RMSNorm with silu(z) per value head and out_proj.
State lives in the cache slots batch.state_slots (zeros where has_initial_state is false) and is written back:
the gdn_prefill_ / gdn_decode_ ops do gates, L2 norm and the rule with the state in place.
"""

from __future__ import annotations

import torch
from torch import nn

from qnext.config import ModelConfig
from qnext.model.layers.linear import Linear, QuantScheme, empty_param, make_linear
from qnext.model.layers.norm import GatedRMSNorm
from qnext.ops.registry import get_op


class DepthwiseConv(nn.Module):
    """Holds conv1d.weight [conv_dim, 1, K] as in the checkpoint; the conv itself is an op."""

    def __init__(self, channels: int, kernel: int, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = empty_param(channels, 1, kernel, dtype=dtype, device=device)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, *, dtype: torch.dtype, device=None,
                 ops_backend: str = "auto", quant: QuantScheme | None = None):
        super().__init__()
        self.layer_id, self.ops_backend = layer_id, ops_backend
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.r = self.hv // self.hk
        key_dim, value_dim = self.hk * self.dk, self.hv * self.dv
        kw = dict(dtype=dtype, device=device)
        dense = dict(kw, quant=quant.dense if quant else None, ops_backend=ops_backend)
        self.in_proj_qkvz = make_linear(cfg.hidden_size, 2 * key_dim + 2 * value_dim, **dense)
        self.in_proj_ba = Linear(cfg.hidden_size, 2 * self.hv, **kw)                      # kept plain (gates)
        self.conv1d = DepthwiseConv(cfg.conv_dim, cfg.linear_conv_kernel_dim, **kw)
        self.A_log = empty_param(self.hv, dtype=torch.float32, device=device)    # gating stays float32
        self.dt_bias = empty_param(self.hv, dtype=torch.float32, device=device)
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps, **kw)
        self.out_proj = make_linear(value_dim, cfg.hidden_size, **dense)

    def _split(self, qkvz: torch.Tensor, ba: torch.Tensor):
        """Checkpoint layout -> mixed [T, conv_dim] (all q | all k | all v), z [T, Hv, Dv], b, a [T, Hv]."""
        t, r = qkvz.shape[0], self.r
        q, k, v, z = qkvz.view(t, self.hk, -1).split([self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        b, a = ba.view(t, self.hk, 2 * r).split([r, r], dim=-1)
        mixed = torch.cat((q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)), dim=-1)
        return mixed, z.reshape(t, self.hv, self.dv), b.reshape(t, self.hv), a.reshape(t, self.hv)

    def forward(self, x: torch.Tensor, batch, cache, rope=None) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        t, dev, be = x.shape[0], x.device, self.ops_backend
        mixed, z, b, a = self._split(self.in_proj_qkvz(x), self.in_proj_ba(x))
        slots, decode = batch.state_slots, batch.is_decode

        conv_cache = cache.conv[self.layer_id]                                          # [S, C, K-1]
        conv_state = conv_cache[slots].masked_fill(~batch.has_initial_state[:, None, None], 0)
        weight = self.conv1d.weight[:, 0, :]                                            # [C, K]
        if decode:
            mixed, conv_state = get_op("causal_conv1d_update", be, dev)(mixed, conv_state, weight)
        else:
            mixed, conv_state = get_op("causal_conv1d", be, dev)(mixed, weight, conv_state, batch.cu_query_lens)
        conv_cache.index_copy_(0, slots, conv_state.to(conv_cache.dtype))

        kd = self.hk * self.dk
        q, k, v = mixed.split([kd, kd, self.hv * self.dv], dim=-1)
        q, k, v = q.view(t, self.hk, self.dk), k.view(t, self.hk, self.dk), v.view(t, self.hv, self.dv)
        ssm_cache = cache.ssm[self.layer_id]                                            # [S, Hv, Dk, Dv] float32
        if decode:
            out = get_op("gdn_decode_", be, dev)(q, k, v, a, b, self.A_log, self.dt_bias, ssm_cache, slots,
                                                 batch.has_initial_state)
        else:
            out = get_op("gdn_prefill_", be, dev)(q, k, v, a, b, self.A_log, self.dt_bias, ssm_cache, slots,
                                                  batch.has_initial_state, batch.cu_query_lens)
        out = self.norm(out, z)                                                         # [T, Hv, Dv]
        return self.out_proj(out.reshape(t, -1))
