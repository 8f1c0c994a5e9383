"""Gated DeltaNet (linear attention) layer.

in_proj_qkvz rows are grouped per key head g: [q_g (Dk) | k_g (Dk) | v of its r = Hv/Hk value heads (r*Dv) |
z of the same heads (r*Dv)]; in_proj_ba per key head: [b (r) | a (r)]. Forward splits that layout, runs the causal
conv + SiLU over cat(all q, all k, all v), then the gated delta rule with
beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias) (float32), q and k L2-normalised, q scaled by Dk^-0.5,
and finally the gated RMSNorm with silu(z) per value head and out_proj. Engines regroup in_proj_ba's rows once
(stack_projections) so that b and a come out as views.
State lives in the cache slots batch.state_slots (zeros where has_initial_state is false) and is written back:
the causal_conv1d_*_ ops read q, k, v straight out of in_proj_qkvz's output (a column map) with the conv state in
place, the gdn_prefill_ / gdn_decode_ ops do gates, L2 norm and the rule with the state in place, and the gated
norm reads z where it lies: with in_proj_ba regrouped, a decode step copies nothing between the ops.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qnext.config import ModelConfig
from qnext.model.layers.linear import Linear, QuantScheme, empty_param, fusable_weight, make_linear, project_pair
from qnext.model.layers.norm import GatedRMSNorm
from qnext.model.side_stream import SideBranch
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
        self.in_proj_ba = Linear(cfg.hidden_size, 2 * self.hv, ops_backend=ops_backend, **kw)  # plain (gates)
        object.__setattr__(self, "ba_proj", None)   # stack_projections(): not a submodule (see there)
        self.conv1d = DepthwiseConv(cfg.conv_dim, cfg.linear_conv_kernel_dim, **kw)
        self.A_log = empty_param(self.hv, dtype=torch.float32, device=device)    # gating stays float32
        self.dt_bias = empty_param(self.hv, dtype=torch.float32, device=device)
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps, ops_backend=ops_backend, **kw)
        self.out_proj = make_linear(value_dim, cfg.hidden_size, **dense)
        self._qkv_cols: torch.Tensor | None = None
        self._qkv_chans: torch.Tensor | None = None
        # qkv_columns() maps aligned runs of this many channels (a power of two dividing Dk and r * Dv) to
        # consecutive columns: the conv kernel then reads whole channel blocks as contiguous row segments
        run = math.gcd(self.dk, self.r * self.dv)
        self.qkv_run = run & -run

    def stack_projections(self) -> None:
        """For inference engines, once the weights are final: a copy of in_proj_ba with its rows regrouped from
        per key head [b (r) | a (r)] to [all b (Hv) | all a (Hv)], so that its output splits into b and a as views
        (the checkpoint's order costs a copy per step and layer). The weight is small (2 Hv x hidden); state_dict
        keeps the original."""
        if self.ba_proj is None:                    # once: a captured CUDA graph keeps reading the first copy
            w = self.in_proj_ba.weight
            rows = torch.arange(2 * self.hv, device=w.device).view(self.hk, 2, self.r).transpose(0, 1).reshape(-1)
            proj = Linear(self.in_proj_ba.in_features, 2 * self.hv, dtype=w.dtype, device="meta",
                          ops_backend=self.ops_backend)
            proj.weight = nn.Parameter(w.data[rows].contiguous(), requires_grad=False)
            object.__setattr__(self, "ba_proj", proj)

    def qkv_columns(self, device: torch.device) -> torch.Tensor:
        """[conv_dim] int32: the in_proj_qkvz output column feeding each conv channel (all q | all k | all v), so
        the conv reads q, k, v out of the interleaved layout without a gathering copy. Made once per device (at
        the first forward, before any CUDA-graph capture)."""
        if self._qkv_cols is None or self._qkv_cols.device != device:
            hk, dk, rdv = self.hk, self.dk, self.r * self.dv
            group = 2 * dk + 2 * rdv                                    # columns per key head
            head = torch.arange(hk)[:, None] * group
            q, k = head + torch.arange(dk), head + dk + torch.arange(dk)
            v = head + 2 * dk + torch.arange(rdv)
            self._qkv_cols = torch.cat((q.flatten(), k.flatten(), v.flatten())).to(device, torch.int32)
        return self._qkv_cols

    def qkv_channels(self, device: torch.device) -> torch.Tensor:
        """[in_proj_qkvz outputs] int32: the conv channel each output column feeds (the inverse of qkv_columns), -1
        for the z columns. Made once per device, like qkv_columns."""
        cols = self.qkv_columns(device)
        if self._qkv_chans is None or self._qkv_chans.device != device:
            chans = torch.full((self.in_proj_qkvz.out_features,), -1, dtype=torch.int32, device=device)
            chans[cols.long()] = torch.arange(cols.numel(), dtype=torch.int32, device=device)
            self._qkv_chans = chans
        return self._qkv_chans

    def forward(self, x: torch.Tensor, batch, cache, rope=None) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]."""
        t, dev, be = x.shape[0], x.device, self.ops_backend
        hk, r, dk, dv = self.hk, self.r, self.dk, self.dv
        slots, decode, has_init = batch.state_slots, batch.is_decode, batch.has_initial_state
        conv_cache, cols = cache.conv[self.layer_id], self.qkv_columns(dev)            # [S, C, K-1]
        weight = self.conv1d.weight[:, 0, :]                                            # [C, K]
        # one launch (no side stream to overlap): both projections, and in decode the conv of q, k, v too
        conv = (weight, conv_cache, slots, has_init, cols, self.qkv_channels(dev)) if decode else None
        pair = (project_pair(x, self.in_proj_qkvz, self.ba_proj, conv)
                if batch.side_stream is None and self.ba_proj is not None else None)
        with SideBranch(None if pair else batch.side_stream) as side:                   # beside in_proj_qkvz
            if pair:
                qkvz, ba = pair[0], pair[1].view(t, 2, self.hv)
            elif self.ba_proj is not None:
                ba = self.ba_proj(x).view(t, 2, self.hv)                                # [T, b|a, Hv]
            else:
                ba = self.in_proj_ba(x).view(t, hk, 2, r).transpose(1, 2).reshape(t, 2, self.hv)  # a copy
        if not pair:
            qkvz = self.in_proj_qkvz(x)                                                 # [T, Hk * (2Dk + 2rDv)]
        z = qkvz.view(t, hk, -1)[..., 2 * dk + r * dv:].unflatten(-1, (r, dv))         # [T, Hk, r, Dv] view
        kd = hk * dk
        if decode:
            mixed = pair[2] if pair else get_op("causal_conv1d_update_", be, dev)(qkvz, weight, conv_cache, slots,
                                                                                 has_init, x_cols=cols)
            q, k, v = mixed.split([kd, kd, self.hv * dv], dim=-1)
        else:       # q, k, v each contiguous, as the chunked kernel wants them
            q, k, v = get_op("causal_conv1d_prefill_", be, dev)(qkvz, weight, conv_cache, slots, has_init,
                                                                batch.cu_query_lens, x_cols=cols,
                                                                x_cols_run=self.qkv_run, split=(kd, kd))
        q, k, v = q.view(t, hk, dk), k.view(t, hk, dk), v.view(t, self.hv, dv)
        ssm_cache = cache.ssm[self.layer_id]                                            # [S, Hv, Dk, Dv] float32
        side.join()
        b, a = ba[:, 0], ba[:, 1]
        w_out = fusable_weight(self.out_proj, be) if decode and self.norm.ops_backend == be else None
        if w_out is not None:       # recurrence, norm and out_proj: two launches on CUDA
            return get_op("gdn_decode_project_", be, dev)(q, k, v, a, b, self.A_log, self.dt_bias, ssm_cache, slots,
                                                          has_init, z, self.norm.weight, self.norm.eps, w_out)
        if decode:
            out = get_op("gdn_decode_", be, dev)(q, k, v, a, b, self.A_log, self.dt_bias, ssm_cache, slots, has_init)
        else:
            out = get_op("gdn_prefill_", be, dev)(q, k, v, a, b, self.A_log, self.dt_bias, ssm_cache, slots,
                                                  has_init, batch.cu_query_lens)
        out = self.norm(out.view(t, hk, r, dv), z)                                      # [T, Hk, r, Dv]
        return self.out_proj(out.reshape(t, -1))
