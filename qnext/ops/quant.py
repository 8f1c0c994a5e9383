"""Weight quantization formats for the fast paths, their torch reference (de)quantizers, and the torch reference MoE.

Two formats, both stored as "weight + scales travelling together":

FP8 block (the Qwen3-Next-FP8 checkpoint format):
    w [..., N, K] float8_e4m3fn, scale_inv [..., ceil(N/128), ceil(K/128)] float32,
    W_real[n, k] = float(w[n, k]) * scale_inv[n // 128, k // 128].
    Quantizing here picks scale_inv = amax(block) / 448 (e4m3's largest finite value), like the checkpoint.

INT4 group (our own load-time format for `--quantization int4`; symmetric, no zero point):
    qweight [..., N, K // 2] uint8, packed per group of G columns ("half-split"): byte j of group g (j < G/2) holds
    k = g*G + j in its low nibble and k = g*G + G/2 + j in its high nibble, each an unsigned code q in 0..15 standing
    for q - 8 (so a kernel reads the activations of both halves as contiguous runs, never with stride 2);
    scale [..., N, K // group] bfloat16, W_real[n, k] = (q[n, k] - 8) * scale[n, k // group].
    Quantizing picks scale = amax(group) / 7 and q = clamp(round(w / scale), -8, 7) + 8 (code 0 = -8 stays unused
    by rounding but is legal). Symmetric keeps the kernels' dequant to one subtract and one multiply; groups of 128
    (default) or 32 along K (the reduction dimension), so a kernel's K tile sees one scale per row per group.
    Tiled storage (tile_rows = T > 0; what the GPU kernels read, see tile_int4): the same arrays, shapes and codes,
    but each block of T rows stores its group g contiguously: byte j of row n's group g sits at
    ((n // T) * K/G + g) * (T * G/2) + (n % T) * G/2 + j of the matrix, scale (n, g) at ((n // T) * K/G + g) * T +
    n % T. A kernel's K step over a block of rows then reads runs of T * G/2 bytes, not runs of G/2 bytes 1 KB
    apart (H100: the grouped decode MoE's loads alone run at 85% of the copy rate from 64-row tiles, 61% from rows);
    a batch-1 GEMV reading one row's whole K pays for it (its row is no longer contiguous), so the engine tiles
    only when it batches (LLMEngine).

Everything here is plain torch (runs on CPU and GPU); the Triton kernels in triton_moe.py / triton_linear_fp8.py read
exactly these layouts and are tested against dequantize() + the float32 reference below.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_BLOCK = 128
INT4_GROUPS = (32, 64, 128)


@dataclass
class Fp8BlockWeight:
    """W_real = w.float() * scale_inv (each scale covering a block x block tile)."""
    w: Tensor              # [..., N, K] float8_e4m3fn
    scale_inv: Tensor      # [..., ceil(N/block), ceil(K/block)] float32
    block: int = FP8_BLOCK

    @property
    def shape(self) -> torch.Size:         # logical [..., N, K]
        return self.w.shape

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size() + self.scale_inv.numel() * self.scale_inv.element_size()


@dataclass
class Int4GroupWeight:
    """W_real[n, k] = (nibble(n, k) - 8) * scale[n, k // group_size]; see the module docstring for the packing."""
    qweight: Tensor        # [..., N, K // 2] uint8
    scale: Tensor          # [..., N, K // group_size] bfloat16
    group_size: int = 128
    tile_rows: int = 0     # 0: rows as above; T > 0: tiles of T rows (module docstring, tile_int4)

    @property
    def shape(self) -> torch.Size:         # logical [..., N, K]
        return torch.Size((*self.qweight.shape[:-1], self.qweight.shape[-1] * 2))

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() + self.scale.numel() * self.scale.element_size()


QuantWeight = Tensor | Fp8BlockWeight | Int4GroupWeight


# ---- FP8 block ---------------------------------------------------------------------------------------------------

def _pad_to(w: Tensor, rows: int, cols: int) -> Tensor:
    pr, pc = (-w.shape[-2]) % rows, (-w.shape[-1]) % cols
    return F.pad(w, (0, pc, 0, pr)) if pr or pc else w


def _chunks(w: Tensor, chunk: int):
    """Split a stacked [E, N, K] weight along E (bounds the float32 temporaries on big expert stacks)."""
    if w.dim() == 3 and w.shape[0] > chunk:
        return list(w.split(chunk, dim=0))
    return [w]


def quantize_fp8_block(w: Tensor, block: int = FP8_BLOCK, chunk: int = 32) -> Fp8BlockWeight:
    """w [..., N, K] (any float dtype) -> Fp8BlockWeight with scale_inv = amax(block) / 448."""
    ws, ss = [], []
    for part in _chunks(w, chunk):
        n, k = part.shape[-2:]
        x = _pad_to(part.float(), block, block)
        nb, kb = x.shape[-2] // block, x.shape[-1] // block
        tiles = x.unflatten(-1, (kb, block)).unflatten(-3, (nb, block))        # [..., nb, B, kb, B]
        amax = tiles.abs().amax(dim=(-3, -1))                                  # [..., nb, kb]
        scale = (amax / FP8_MAX).clamp(min=1e-12)
        q = (tiles / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        ws.append(q.flatten(-2).flatten(-3, -2)[..., :n, :k].contiguous())
        ss.append(scale.float())
    return Fp8BlockWeight(torch.cat(ws) if len(ws) > 1 else ws[0], torch.cat(ss) if len(ss) > 1 else ss[0], block)


def dequantize_fp8_block(q: Fp8BlockWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    n, k = q.w.shape[-2:]
    s = q.scale_inv.float().repeat_interleave(q.block, dim=-2)[..., :n, :]
    s = s.repeat_interleave(q.block, dim=-1)[..., :k]
    return (q.w.float() * s).to(dtype)


# ---- INT4 group --------------------------------------------------------------------------------------------------

def pack_int4(codes: Tensor, group_size: int) -> Tensor:
    """codes [..., K] integers in 0..15 -> [..., K // 2] uint8, half-split per group (see the module docstring)."""
    c = codes.to(torch.uint8).unflatten(-1, (-1, 2, group_size // 2))          # [..., G, 2, group/2]
    return (c[..., 0, :] | (c[..., 1, :] << 4)).flatten(-2).contiguous()


def unpack_int4(packed: Tensor, group_size: int) -> Tensor:
    """[..., K // 2] uint8 -> codes [..., K] uint8 in 0..15."""
    p = packed.unflatten(-1, (-1, group_size // 2))                             # [..., G, group/2]
    return torch.stack((p & 0xF, p >> 4), dim=-2).flatten(-3)


def quantize_int4_group(w: Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.bfloat16,
                        chunk: int = 32) -> Int4GroupWeight:
    """w [..., N, K] -> Int4GroupWeight; K must be a multiple of group_size (and group_size even)."""
    k = w.shape[-1]
    if group_size not in INT4_GROUPS or k % group_size:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUPS} and divide K={k}, got {group_size}")
    qs, ss = [], []
    for part in _chunks(w, chunk):
        g = part.float().unflatten(-1, (k // group_size, group_size))          # [..., N, G, group]
        scale = (g.abs().amax(-1) / 7.0).to(scale_dtype)                       # rounded first: codes match it
        s = scale.float().clamp(min=1e-12)
        codes = (g / s[..., None]).round().clamp(-8, 7) + 8
        qs.append(pack_int4(codes.flatten(-2), group_size))
        ss.append(scale)
    return Int4GroupWeight(torch.cat(qs) if len(qs) > 1 else qs[0], torch.cat(ss) if len(ss) > 1 else ss[0],
                           group_size)


# Rows per tile of the tiled int4 storage the engine uses (H100, scripts/gpu_grouped_probe.py --tile-rows: the
# grouped decode MoE at 32 tokens 161.9 us over tiles of 4 rows, 166.1 / 167.5 / 166.8 over 8 / 16 / 64, 213.6 over
# rows; 256-byte runs are enough for the memory system).
INT4_TILE_ROWS = 4


def _retile(q: Int4GroupWeight, tile_rows: int, to_tiles: bool) -> Int4GroupWeight:
    """Rows [..., N/T, T, groups, G/2] <-> tiles [..., N/T, groups, T, G/2] (scales likewise without G/2): one swap
    of the two middle axes either way, read from the layout q is in."""
    t, lead = tile_rows, q.qweight.shape[:-2]
    n, groups, gb = q.qweight.shape[-2], q.scale.shape[-1], q.group_size // 2
    d_src, s_src = ((n // t, t, groups, gb), (n // t, t, groups)) if to_tiles else \
        ((n // t, groups, t, gb), (n // t, groups, t))
    d = q.qweight.reshape(*lead, *d_src).transpose(-3, -2).contiguous().view(q.qweight.shape)
    s = q.scale.reshape(*lead, *s_src).transpose(-2, -1).contiguous().view(q.scale.shape)
    return Int4GroupWeight(d, s, q.group_size, t if to_tiles else 0)


def tile_int4(q: Int4GroupWeight, tile_rows: int) -> Int4GroupWeight:
    """A copy of a rows-layout weight [..., N, K/2] in tiles of tile_rows rows (N % tile_rows == 0)."""
    if q.tile_rows or q.qweight.shape[-2] % tile_rows:
        raise ValueError(f"tile_int4 takes a rows-layout weight with N divisible by {tile_rows}, got "
                         f"N = {q.qweight.shape[-2]}, tile_rows = {q.tile_rows}")
    return _retile(q, tile_rows, True)


def untile_int4(q: Int4GroupWeight) -> Int4GroupWeight:
    """The rows layout of a weight (itself when it is in rows)."""
    return _retile(q, q.tile_rows, False) if q.tile_rows else q


def dequantize_int4_group(q: Int4GroupWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    q = untile_int4(q)
    codes = unpack_int4(q.qweight, q.group_size).float() - 8.0                 # [..., N, K]
    s = q.scale.float().repeat_interleave(q.group_size, dim=-1)
    return (codes * s).to(dtype)


# ---- generic -----------------------------------------------------------------------------------------------------

def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> Tensor:
    if isinstance(w, Fp8BlockWeight):
        return dequantize_fp8_block(w, dtype)
    if isinstance(w, Int4GroupWeight):
        return dequantize_int4_group(w, dtype)
    return w.to(dtype)


def quantize(w: Tensor, method: str | None, group_size: int = 128) -> QuantWeight:
    """method None / "bf16" (unchanged), "fp8" (128x128 blocks) or "int4" (group-wise, symmetric)."""
    if method in (None, "none", "bf16"):
        return w
    if method == "fp8":
        return quantize_fp8_block(w)
    if method == "int4":
        return quantize_int4_group(w, group_size)
    raise ValueError(f"unknown quantization {method!r} (fp8, int4)")


# ---- reference MoE -----------------------------------------------------------------------------------------------

def select_experts(router_logits: Tensor, top_k: int, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """router_logits [M, E] -> (topk_weights [M, k] float32, topk_ids [M, k] int32); softmax in float32."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32)


def moe_forward_ref(x: Tensor, w13: QuantWeight, w2: QuantWeight, topk_weights: Tensor, topk_ids: Tensor,
                    h_dtype: torch.dtype | None = None) -> Tensor:
    """Routed experts in float32 over dequantized weights: sum_k w_k * down_e(silu(gate_e x) * up_e x).

    x [M, H]; w13 [E, 2I, H] (gate rows first); w2 [E, H, I]; topk_weights [M, k]; topk_ids [M, k] -> [M, H] x.dtype.
    h_dtype rounds the intermediate silu(gate)*up (the kernels keep it in bf16) when given.
    """
    m, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    weights = topk_weights.reshape(-1).float()
    out = torch.zeros(m, x.shape[1], dtype=torch.float32, device=x.device)
    xf = x.float()
    for e in flat.unique().tolist():
        pairs = (flat == e).nonzero()[:, 0]
        tokens = pairs // top_k
        w_gu = dequantize(_select(w13, e))                                     # [2I, H]
        w_d = dequantize(_select(w2, e))                                       # [H, I]
        gate, up = (xf[tokens] @ w_gu.t()).chunk(2, dim=-1)
        h = F.silu(gate) * up
        if h_dtype is not None:
            h = h.to(h_dtype).float()
        out.index_add_(0, tokens, (h @ w_d.t()) * weights[pairs, None])
    return out.to(x.dtype)


def _select(w: QuantWeight, e: int) -> QuantWeight:
    """Expert e of a stacked [E, N, K] weight in any format."""
    if isinstance(w, Fp8BlockWeight):
        return Fp8BlockWeight(w.w[e], w.scale_inv[e], w.block)
    if isinstance(w, Int4GroupWeight):
        return Int4GroupWeight(w.qweight[e], w.scale[e], w.group_size, w.tile_rows)
    return w[e]
