"""Write a complete checkpoint directory in the real Qwen3-Next layout (what `qnext synth` produces).

Files: config.json, model.safetensors or model-XXXXX-of-YYYYY.safetensors + model.safetensors.index.json,
tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json.
Tensors use Qwen's on-disk naming (per-expert `experts.E.{gate,up,down}_proj.weight`, interleaved in_proj_qkvz as
the model holds it). Shards are planned from the layout first; each file's header is written before its tensors,
which are then made and written one at a time, so host memory holds one tensor whatever the model size (the 80B
preset streams at its largest tensor, the 1.2 GB float32 embedding being generated).
"""

from __future__ import annotations

import copy
import json
import math
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from tqdm import tqdm

from qnext.config import ModelConfig
from qnext.weights import fp8 as fp8_mod
from qnext.weights.name_map import COPY, DOWN, GATE, MTP, UP, checkpoint_layout, map_name
from qnext.weights.presets import TOKENIZER_SIZES, preset_config
from qnext.weights.safetensors_reader import INDEX_FILE, SINGLE_FILE, WeightError
from qnext.weights.synth_tokenizer import MIN_SIZE, build_tokenizer, special_token_ids, tokenizer_config
from qnext.weights.synthetic import synthetic_tensor

CHAT_TEMPLATE = Path(__file__).resolve().parent.parent / "assets" / "chat_template.jinja"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Modules never quantized in Qwen's FP8 checkpoints (small or precision-critical), besides norms and vectors.
FP8_KEEP = ("in_proj_ba", "gate", "shared_expert_gate", "embed_tokens", "lm_head", "conv1d")
BLOCK = (128, 128)  # FP8 weight block
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "4GB", "500MB", "1GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"shard size {size!r} is not a size like 4GB, 500MB or 1GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def _quantized(name: str, shape: tuple[int, ...]) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and name.split(".")[-2] not in FP8_KEEP


def _state_dict_source(weights: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """Checkpoint tensor `name` cut from `weights` held in our naming (fused experts), e.g. an HF state_dict."""
    def get(name: str) -> torch.Tensor:
        t = map_name(name)
        key = name if t.kind in (MTP, COPY) else t.param
        if key not in weights:
            raise WeightError(f"weights lack {key} (needed for checkpoint tensor {name})")
        w = weights[key]
        if t.kind == DOWN:
            return w[t.expert]
        if t.kind in (GATE, UP):
            half = w.shape[1] // 2
            return w[t.expert, :half] if t.kind == GATE else w[t.expert, half:]
        return w
    return get


def write_checkpoint(out_dir: str | Path, config: str | dict | ModelConfig = "tiny", dtype: str = "bfloat16",
                     fp8: bool = False, seed: int = 0, shard_size: int | str = "4GB", *,
                     weights: Mapping[str, torch.Tensor] | None = None, mtp: bool = False,
                     tokenizer: bool = True, tensors: bool = True, progress: bool = False) -> Path:
    """Write a checkpoint of `config` (a preset name, a config.json dict or a ModelConfig) to `out_dir`.

    Values: synthetic (qnext.weights.synthetic, from `seed`) or cut from `weights` (our parameter names, fused
    experts). fp8: 2-D projection weights stored as block FP8 e4m3 + weight_scale_inv (128x128 blocks).
    mtp: also write a random MTP head (`mtp.*`). tensors=False: config and tokenizer files only (for runs that make
    the weights on the device: `--synthetic`). Returns the directory. The directory must be empty or absent.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; write a checkpoint into a new directory")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(config, str):
        hf, tok_size = preset_config(config), TOKENIZER_SIZES[config]
    else:
        hf = copy.deepcopy(config.raw if isinstance(config, ModelConfig) else dict(config))
        if not hf:
            raise ValueError("a ModelConfig without its config.json dict (raw) cannot be written")
        tok_size = hf["vocab_size"]
        if tokenizer and tok_size < MIN_SIZE:
            raise ValueError(f"vocab_size {tok_size} is too small for a synthetic tokenizer (needs >= {MIN_SIZE}); "
                             f"pass tokenizer=False")
    hf.pop("quantization_config", None)
    hf["torch_dtype"] = dtype
    if tokenizer:
        ids = special_token_ids(tok_size)
        hf["bos_token_id"], hf["eos_token_id"] = ids["<|endoftext|>"], ids["<|im_end|>"]
    layout = checkpoint_layout(ModelConfig.from_hf(hf), mtp=mtp)
    quant = {n for n, s in layout.items() if _quantized(n, s)} if fp8 else set()
    if fp8:
        keep = sorted({n.rsplit(".", 1)[0] for n, s in layout.items()
                       if n.endswith(".weight") and len(s) >= 2 and n not in quant})
        hf["quantization_config"] = fp8_mod.Fp8Format(block=BLOCK, modules_to_not_convert=tuple(keep)).to_config()
    cfg = ModelConfig.from_hf(hf)  # validates what we are about to write
    if tokenizer and tok_size > cfg.vocab_size:
        raise ValueError(f"the tokenizer would have {tok_size} entries but vocab_size is {cfg.vocab_size}")

    out.mkdir(parents=True, exist_ok=True)
    if tensors:
        source = _state_dict_source(weights) if weights is not None else None
        _write_tensors(out, layout, quant, DTYPES[dtype], seed, parse_size(shard_size), source, progress)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    if tokenizer:
        _write_tokenizer(out, tok_size, cfg)
    return out


@dataclass
class Shard:
    file: str
    names: list[str]                                   # layout names (an FP8 weight brings its scale along)
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)  # as stored, in order
    nbytes: int = 0


def plan_shards(layout: dict[str, tuple[int, ...]], quant: set[str], dtype: torch.dtype,
                shard_bytes: int) -> list[Shard]:
    """Greedy in layout order; no shard above `shard_bytes` unless one tensor alone is larger.
    One shard -> model.safetensors. Everything stored is known here, before any value exists."""
    shards = [Shard("", [])]
    for name, shape in layout.items():
        if name in quant:
            stored = [(name, fp8_mod.FP8_DTYPE, shape),
                      (fp8_mod.scale_names(name)[0], torch.float32, fp8_mod.scale_shape(shape, BLOCK))]
        else:
            stored = [(name, dtype, shape)]
        b = sum(math.prod(s) * d.itemsize for _, d, s in stored)
        if shards[-1].names and shards[-1].nbytes + b > shard_bytes:
            shards.append(Shard("", []))
        shards[-1].names.append(name)
        shards[-1].entries += stored
        shards[-1].nbytes += b
    n = len(shards)
    for i, sh in enumerate(shards):
        sh.file = SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    return shards


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    """safetensors header: u64 length + JSON {name: dtype, shape, data_offsets}, space-padded to 8 bytes."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dt, shape in entries:
        n = math.prod(shape) * dt.itemsize
        meta[name] = {"dtype": ST_DTYPES[dt], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_tensors(out: Path, layout: dict, quant: set, dtype: torch.dtype, seed: int, shard_bytes: int,
                   source: Callable[[str], torch.Tensor] | None, progress: bool) -> None:
    """Each shard's header is written first (shapes are known), then its tensors one by one as they are made:
    host memory holds one tensor at a time, whatever the model size."""
    plan = plan_shards(layout, quant, dtype, shard_bytes)
    bar = tqdm(total=len(layout), unit="tensor", desc="writing weights", disable=not progress)
    for shard in plan:
        with open(out / shard.file, "wb") as f:
            f.write(_header(shard.entries))
            for name in shard.names:
                if source is not None:
                    value = source(name).detach().to("cpu")
                    if tuple(value.shape) != layout[name]:
                        raise WeightError(f"weights give {name} the shape {list(value.shape)}, the config needs "
                                          f"{list(layout[name])}")
                else:
                    value = synthetic_tensor(name, layout[name], torch.float32, "cpu", seed)
                stored = fp8_mod.quantize(value, BLOCK) if name in quant else (value.to(dtype),)
                for t in stored:  # little-endian bytes, as safetensors stores them (x86/ARM hosts are LE)
                    f.write(t.contiguous().view(torch.uint8).numpy().data)
                bar.update(1)
    bar.close()
    if len(plan) > 1:
        weight_map = {name: sh.file for sh in plan for name, _, _ in sh.entries}
        index = {"metadata": {"total_size": sum(sh.nbytes for sh in plan)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_tokenizer(out: Path, size: int, cfg: ModelConfig) -> None:
    ids = special_token_ids(size)
    build_tokenizer(size).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(size, cfg.max_position_embeddings), indent=2) + "\n")
    shutil.copyfile(CHAT_TEMPLATE, out / "chat_template.jinja")
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
           "temperature": 1.0, "top_p": 0.95, "top_k": 40, "min_p": 0.01}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

