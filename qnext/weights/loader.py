"""Streaming weight loading: checkpoint tensors go one at a time to the device and into preallocated parameters.

Host memory holds at most one checkpoint tensor (memory-mapped read) at a time, so a checkpoint larger than host RAM
loads onto a device that holds the model. Per tensor: name map (name_map.map_name) -> shape check against the
destination (a whole parameter or one expert slot of a fused expert tensor) -> read -> to device -> into the
parameter's resident format there:
  plain parameter   FP8 blocks dequantized, then copy_ (casting to the parameter dtype);
  FP8 parameter     (a `<name>_scale_inv` sibling) FP8 128x128 tensors copied as they are, others quantized;
  int4 parameter    (uint8 with a `<name>_scale` sibling) quantized group-wise (qnext.ops.quant).
Quantizing one tensor at a time keeps peak device memory near the quantized model's size. Per-expert gate and up
halves of a quantized expert are held on the device until both arrived, then quantized together (an FP8 block may
straddle them). The load ends by checking that every parameter (every expert slot) was written and that no tensor
was left over; `mtp.*` tensors are reported, not loaded. Scale parameters travel with their weight.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from qnext.ops import quant as q
from qnext.weights import fp8
from qnext.weights.name_map import COPY, DOWN, GATE, MTP, UP, Target, map_name
from qnext.weights.safetensors_reader import SafetensorsCheckpoint, WeightError

__all__ = ["LoadReport", "WeightError", "load_weights"]

PLAIN_DTYPES = ("F32", "BF16", "F16")
_LIST_AT_MOST = 20


@dataclass
class LoadReport:
    loaded: int = 0                                   # checkpoint tensors written into parameters
    bytes_read: int = 0                               # as stored (FP8 weights + scales count at their size)
    fp8_dequantized: int = 0                          # FP8 block tensors dequantized to the model dtype
    fp8_kept: int = 0                                 # FP8 block tensors kept as they are (FP8 parameters)
    quantized: int = 0                                # tensors quantized at load time (fp8 / int4 parameters)
    mtp: list[str] = field(default_factory=list)      # MTP head tensors kept aside (speculative decoding, later)
    ignored: list[str] = field(default_factory=list)  # lm_head.weight of a tied-embedding checkpoint
    seconds: float = 0.0


def _read_config(path: Path) -> dict:
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_file.is_file():
        return {}
    cfg = json.loads(cfg_file.read_text())
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "quantization_config": cfg.get("quantization_config")}
    return cfg


def _listing(title: str, names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_AT_MOST])
    more = f" ... and {len(names) - _LIST_AT_MOST} more" if len(names) > _LIST_AT_MOST else ""
    return f"{title} ({len(names)}): {shown}{more}"


@dataclass
class _Param:
    """A parameter in its resident format: plain, or quantized with its scale parameter."""
    data: torch.Tensor
    fmt: str = "plain"                     # plain | fp8 | int4
    scale: torch.Tensor | None = None
    group: int = 0                         # int4 group along K

    @property
    def shape(self) -> tuple[int, ...]:    # logical [..., N, K]
        s = tuple(self.data.shape)
        return (*s[:-1], 2 * s[-1]) if self.fmt == "int4" else s


def _resident(params: dict[str, torch.Tensor]) -> tuple[dict[str, _Param], set[str]]:
    """Weights in their resident format, and the names of the scale parameters travelling with them."""
    out, scales = {}, set()
    for pname, p in params.items():
        if p.dtype == q.FP8_DTYPE and pname + "_scale_inv" in params:
            out[pname] = _Param(p, "fp8", params[pname + "_scale_inv"])
            scales.add(pname + "_scale_inv")
        elif p.dtype == torch.uint8 and pname + "_scale" in params:
            s = params[pname + "_scale"]
            out[pname] = _Param(p, "int4", s, 2 * p.shape[-1] // s.shape[-1])
            scales.add(pname + "_scale")
    for pname, p in params.items():
        if pname not in out and pname not in scales:
            out[pname] = _Param(p)
    return out, scales


def _slot(p: _Param, e: int | None) -> _Param:
    return p if e is None else _Param(p.data[e], p.fmt, None if p.scale is None else p.scale[e], p.group)


def _destination(t: Target, param: _Param, name: str) -> tuple[_Param, tuple[int, ...], str]:
    """(what checkpoint tensor `name` fills: the parameter or one expert slot, the shape it must have, its
    description for error messages). A gate/up half fills rows of the slot (plain parameters write them directly;
    quantized ones collect both halves first)."""
    if t.kind == COPY:
        return param, param.shape, t.param
    shape = param.shape
    if len(shape) != 3 or t.expert >= shape[0]:
        raise WeightError(f"checkpoint tensor {name} is expert {t.expert}, but {t.param} has shape "
                          f"{list(shape)} ({shape[0] if len(shape) == 3 else 0} expert slots)")
    if t.kind == DOWN:
        return _slot(param, t.expert), shape[1:], f"{t.param}[{t.expert}]"
    half = shape[1] // 2
    rows = slice(0, half) if t.kind == GATE else slice(half, 2 * half)
    return _slot(param, t.expert), (half, shape[2]), f"{t.param}[{t.expert}, {rows.start}:{rows.stop}] ({t.kind} half)"


def _same_place(have: torch.device, want: torch.device) -> bool:
    return have.type == want.type and (want.index is None or have.index == want.index)


def _missing(params: dict[str, torch.Tensor], done: set[tuple]) -> list[str]:
    out = []
    for pname, p in params.items():
        if (pname, COPY, None) in done:
            continue
        kinds = (GATE, UP) if pname.endswith("experts.gate_up_proj") else (DOWN,) if pname.endswith(
            "experts.down_proj") else ()
        if kinds and p.dim() == 3:
            lacking = [e for e in range(p.shape[0]) if any((pname, k, e) not in done for k in kinds)]
            if len(lacking) == p.shape[0]:
                out.append(pname)
            elif lacking:
                out.append(f"{pname} (experts {', '.join(map(str, lacking[:8]))}{' ...' if len(lacking) > 8 else ''})")
        else:
            out.append(pname)
    return out


@torch.no_grad()
def load_weights(model: torch.nn.Module, checkpoint_dir: str | Path, device: str | torch.device | None = None,
                 *, progress: bool = False) -> LoadReport:
    """Fill every parameter of `model` from the safetensors checkpoint at `checkpoint_dir`.

    The model must already be allocated where it will run (`device`, when given, must be that place: a mismatch is
    an error rather than a silent double copy). Raises WeightError naming the tensors at fault.
    """
    start = time.perf_counter()
    path = Path(checkpoint_dir)
    all_params = dict(model.named_parameters())
    params, _ = _resident(all_params)
    for pname, p in all_params.items():
        if p.is_meta:
            raise WeightError(f"parameter {pname} is on the meta device; allocate the model on its device first")
        if device is not None and not _same_place(p.device, torch.device(device)):
            raise WeightError(f"parameter {pname} is on {p.device} but loading to {device} was asked")
    hf = _read_config(path)
    fmt = fp8.Fp8Format.from_config(hf.get("quantization_config"))
    block = fmt.block if fmt else (128, 128)
    tied = bool(hf.get("tie_word_embeddings", False))

    report = LoadReport()
    unexpected: list[str] = []
    done: set[tuple] = set()   # (param, kind, expert) written
    split: set[str] = set()    # fused expert params written per expert
    halves: dict[tuple, dict[str, object]] = {}   # (param, expert) -> gate/up values of a quantized expert
    with SafetensorsCheckpoint(path) as ckpt:
        scale_of = {}
        for name in ckpt.names:
            found = next((s for s in fp8.scale_names(name) if s in ckpt), None)
            if found is not None:
                scale_of[name] = found
        scales = set(scale_of.values())
        todo = [n for n in ckpt.names if n not in scales]
        total = sum(ckpt.info(n).nbytes for n in ckpt.names)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress)
        for name in todo:
            info = ckpt.info(name)
            t = map_name(name)
            if t.kind == MTP:
                report.mtp.append(name)
            elif t.param not in params:
                (report.ignored if name == "lm_head.weight" and tied else unexpected).append(name)
            else:
                key = (t.param, t.kind, t.expert)
                fused_and_split = (t.param, COPY, None) in done if t.kind != COPY else t.param in split
                if key in done or fused_and_split:
                    raise WeightError(f"checkpoint tensor {name} writes {t.param} a second time "
                                      f"(the checkpoint stores it both per expert and fused, or twice)")
                _load_one(ckpt, name, t, params[t.param], scale_of.get(name), block, report, halves)
                done.add(key)
                if t.kind != COPY:
                    split.add(t.param)
            bar.update(info.nbytes + (ckpt.info(scale_of[name]).nbytes if name in scale_of else 0))
        bar.close()

    missing = _missing({n: p.data for n, p in params.items()}, done)
    if missing or unexpected:
        parts = [_listing("missing parameters", missing)] if missing else []
        parts += [_listing("unexpected checkpoint tensors", unexpected)] if unexpected else []
        raise WeightError(f"checkpoint {path} does not match the model: " + "; ".join(parts))
    report.seconds = time.perf_counter() - start
    return report


def _load_one(ckpt: SafetensorsCheckpoint, name: str, t: Target, param: _Param, scale_name: str | None,
              block: tuple[int, int], report: LoadReport, halves: dict) -> None:
    info = ckpt.info(name)
    dst, shape, where = _destination(t, param, name)
    if tuple(info.shape) != tuple(shape):
        raise WeightError(f"checkpoint tensor {name} has shape {list(info.shape)}, but {where} expects "
                          f"{list(shape)}")
    device = dst.data.device
    if info.dtype == "F8_E4M3":
        if scale_name is None:
            raise WeightError(f"FP8 tensor {name} has no scale tensor (looked for {', '.join(fp8.scale_names(name))})")
        s_info = ckpt.info(scale_name)
        fp8.check_scale(name, info.shape, s_info.shape, block)
        if s_info.dtype not in PLAIN_DTYPES:
            raise WeightError(f"scale tensor {scale_name} has dtype {s_info.dtype} (expected F32/BF16/F16)")
        raw, scale = ckpt.get(name).to(device), ckpt.get(scale_name).to(device)
        if dst.fmt == "fp8" and block == (q.FP8_BLOCK, q.FP8_BLOCK):
            value = q.Fp8BlockWeight(raw, scale.float())                  # stays FP8 (same blocks)
        else:
            value = fp8.dequantize(raw, scale, block, dst.data.dtype if dst.fmt == "plain" else torch.bfloat16)
            report.fp8_dequantized += 1
        report.bytes_read += s_info.nbytes
    elif info.dtype in PLAIN_DTYPES:
        if scale_name is not None:
            raise WeightError(f"tensor {name} has a scale tensor {scale_name} but is stored as {info.dtype}, "
                              f"not FP8 e4m3")
        value = ckpt.get(name)  # a plain destination's copy_ moves it host -> device and casts in one step
    else:
        raise WeightError(f"tensor {name} has dtype {info.dtype}; qnext loads F32/BF16/F16 weights and block-FP8 "
                          f"(F8_E4M3 with weight_scale_inv) weights")
    report.loaded += 1
    report.bytes_read += info.nbytes
    if t.kind in (GATE, UP) and dst.fmt != "plain":
        pair = halves.setdefault((t.param, t.expert), {})
        pair[t.kind] = value if isinstance(value, q.Fp8BlockWeight) else value.to(device)
        if len(pair) < 2:
            return                                                         # quantized once both halves are in
        value = _join(halves.pop((t.param, t.expert)))
    elif t.kind in (GATE, UP):
        half = dst.data.shape[0] // 2
        rows = slice(0, half) if t.kind == GATE else slice(half, 2 * half)
        dst = _Param(dst.data[rows])
    _store(dst, value, report)


def _join(pair: dict) -> object:
    """Gate rows then up rows of one expert: raw FP8 when both are FP8 on whole blocks, else float."""
    gate, up = pair[GATE], pair[UP]
    if isinstance(gate, q.Fp8BlockWeight) and isinstance(up, q.Fp8BlockWeight) and gate.w.shape[0] % gate.block == 0:
        return q.Fp8BlockWeight(torch.cat((gate.w, up.w)), torch.cat((gate.scale_inv, up.scale_inv)))
    deq = [q.dequantize(h, torch.bfloat16) if isinstance(h, q.Fp8BlockWeight) else h for h in (gate, up)]
    return torch.cat(deq)


def _store(dst: _Param, value, report: LoadReport) -> None:
    """Write one value (a host/device tensor or raw FP8 blocks) into its destination's format."""
    if dst.fmt == "plain":
        dst.data.copy_(q.dequantize(value, dst.data.dtype) if isinstance(value, q.Fp8BlockWeight) else value)
        return
    if dst.fmt == "fp8" and isinstance(value, q.Fp8BlockWeight):
        report.fp8_kept += 1
    else:
        w = q.dequantize(value, torch.float32) if isinstance(value, q.Fp8BlockWeight) else value
        w = w.to(dst.data.device)
        value = q.quantize_fp8_block(w) if dst.fmt == "fp8" else q.quantize_int4_group(w, dst.group)
        report.quantized += 1
    if dst.fmt == "fp8":
        dst.data.copy_(value.w)
        dst.scale.copy_(value.scale_inv)
    else:
        dst.data.copy_(value.qweight)
        dst.scale.copy_(value.scale)
