#!/usr/bin/env python3
"""Train qnext's bundled demo model: a small Qwen3-Next (GDN + gated attention + MoE with a shared expert) on Python.

Steps: build the corpus (scripts/build_corpus.py), train a byte-level BPE tokenizer carrying Qwen's special tokens,
train HF transformers' Qwen3NextForCausalLM for a fixed wall-clock budget (AdamW, warm-up then cosine by elapsed
time, bf16 autocast on CUDA), measure held-out loss, and write an ordinary HF-layout checkpoint: config.json,
sharded bf16 safetensors with Qwen's per-expert tensor names, tokenizer.json, tokenizer_config.json,
generation_config.json (and chat_template.jinja when qnext/assets/chat_template.jinja exists).

The bundled demo (qnext/assets/demo) was made on one H200 (torch 2.11, transformers 5.17, Python 3.12) with
    python3 scripts/train_demo.py --out OUT/demo --site-packages --minutes 7.0 --cuda-graph
in 470 s end to end: corpus 7 s, tokenizer 2.5 s, tokenizing 13 s, model set-up 10 s, CUDA-graph capture 6 s,
1,729 steps of 32 x 2048 tokens (113 M tokens, 2.6 epochs, 270 k tokens/s), held-out loss 2.073, saving and
checks 10 s. chat_template.jinja is the copy of qnext/assets/chat_template.jinja that the script writes. The corpus
depends on the interpreter (its stdlib, test suite present or not, and with --site-packages the packages
installed), so another machine gives a similar, not an identical, model. `--extra-train FILE` adds the train.txt
(or .txt.gz) of `scripts/build_corpus.py --out DIR` run on another machine, e.g. one whose Python has the stdlib test
suite that the training machine's lacks (most held-out headers of `qnext eval complete` on such a machine are test
methods). A CPU smoke test of every step (about a
minute):
    .venv/bin/python scripts/train_demo.py --out /tmp/demo-tiny --tiny --minutes 0.3
Speed: eager training is launch bound (~10^4 kernels per 32 x 2048 step; 120-146 k tokens/s on an H100 through
HF's torch GDN fallback; fla-core's backward refuses this machine's Triton, see --gdn-kernels). --cuda-graph
replays the whole step (forward, backward, clipping, AdamW) as one CUDA graph: 270 k tokens/s on the H200, where
eager forward + backward alone ran at 197 k (whole eager steps on the H100: 122 k). Every op in the step must be
capturable: HF's routed experts sort tokens by expert with data-dependent shapes, so the graph uses
dense_experts_forward (same math), and HF's balance loss goes through its scatter_add branch
(capturable_balance_loss).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO)]
import build_corpus  # noqa: E402
# Qwen's 26 added tokens (order, special flags), its pre-tokenizer split and tokenizer_config.json: shared with
# `qnext synth`'s tokenizer, which learns its merges from a fixed file list instead of this corpus.
from qnext.weights.synth_tokenizer import build_tokenizer, tokenizer_config  # noqa: E402

T0 = time.time()

SYSTEM_PROMPTS = ("You are a helpful coding assistant.", "You are a Python expert. Answer with code.",
                  "You are qnext's demo model. You write Python.")


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ---- tokenizer --------------------------------------------------------------------------------------------------
def write_tokenizer_files(tok, out: Path, model_max_length: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    cfg = tokenizer_config(tok.get_vocab_size(), model_max_length)  # added tokens sit at the last 26 ids
    for i, entry in cfg["added_tokens_decoder"].items():
        if tok.token_to_id(entry["content"]) != int(i):
            raise RuntimeError(f"{entry['content']} has id {tok.token_to_id(entry['content'])}, config says {i}")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def render_chat(messages: list[dict], rng: random.Random) -> str:
    """The Qwen3-Coder turn format (model-facts.md): <|im_start|>{role}\\n{content}<|im_end|>\\n."""
    if rng.random() < 0.3:
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] + messages
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def encode_docs(tok, docs: list[str], eot: int) -> np.ndarray:
    ids = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.uint16)


# ---- model config ------------------------------------------------------------------------------------------------
def make_config(a: argparse.Namespace, tok) -> dict:
    layer_types = ["full_attention" if (i + 1) % a.full_attention_interval == 0 else "linear_attention"
                   for i in range(a.layers)]
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    return {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next",
        "vocab_size": a.vocab_size, "hidden_size": a.hidden, "num_hidden_layers": a.layers,
        "layer_types": layer_types, "full_attention_interval": a.full_attention_interval,
        "num_attention_heads": a.attn_heads, "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim,
        "partial_rotary_factor": 0.25, "rope_theta": a.rope_theta, "rope_scaling": None,
        "max_position_embeddings": a.max_position_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "linear_num_key_heads": a.gdn_key_heads, "linear_num_value_heads": a.gdn_value_heads,
        "linear_key_head_dim": a.gdn_head_dim, "linear_value_head_dim": a.gdn_head_dim,
        "linear_conv_kernel_dim": 4,
        "num_experts": a.experts, "num_experts_per_tok": a.top_k, "moe_intermediate_size": a.moe_intermediate,
        "shared_expert_intermediate_size": a.shared_intermediate, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "intermediate_size": a.shared_intermediate * 2,
        "output_router_logits": False, "router_aux_loss_coef": a.aux_loss,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "initializer_range": 0.02, "tie_word_embeddings": False,
        "use_cache": True, "bos_token_id": eot, "eos_token_id": [im_end, eot], "pad_token_id": eot,
        "torch_dtype": "bfloat16",
    }


def hf_model(cfg: dict):
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    hf_cfg = Qwen3NextConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type",
                                                                         "torch_dtype", "rope_scaling")})
    return Qwen3NextForCausalLM(hf_cfg)


# ---- checkpoint --------------------------------------------------------------------------------------------------
def checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """HF module state -> Qwen's checkpoint names in bf16: fused experts split into experts.E.{gate,up,down}_proj."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", torch.bfloat16)
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2I, H], gate rows first
            base, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                out[f"{base}{e}.up_proj.weight"] = t[e, inter:].contiguous()
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, I]
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].contiguous()
        elif name.endswith("mlp.gate.weight") or "mlp.gate." not in name:
            out[name] = t.contiguous()
        else:
            raise RuntimeError(f"unexpected tensor {name}")
    return out


def write_safetensors_sharded(tensors: dict[str, torch.Tensor], out: Path, shard_mb: float) -> list[str]:
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if cur and size + nbytes > shard_mb * 1e6:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = tensors[name]
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        names.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    return names


def write_checkpoint(model, cfg: dict, tok, out: Path, shard_mb: float) -> None:
    """Weights through qnext's checkpoint writer (the one `qnext synth` uses); the local writer above only if that
    fails, so a long training run never ends without a checkpoint. Either gives the same layout."""
    try:
        from qnext.weights.checkpoint_writer import write_checkpoint as qnext_write

        state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        qnext_write(out, dict(cfg), dtype="bfloat16", shard_size=int(shard_mb * 1e6), weights=state,
                    tokenizer=False)
    except Exception as e:  # noqa: BLE001
        log(f"qnext's checkpoint writer failed ({type(e).__name__}: {e}); writing with the local writer")
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        write_safetensors_sharded(checkpoint_tensors(model), out, shard_mb)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_tokenizer_files(tok, out, cfg["max_position_embeddings"])
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
           "pad_token_id": cfg["pad_token_id"], "do_sample": True, "temperature": 0.6, "top_p": 0.95,
           "top_k": 20}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    template = REPO / "qnext" / "assets" / "chat_template.jinja"
    if template.is_file():
        shutil.copy(template, out / "chat_template.jinja")
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    log(f"checkpoint {out}: {sum(sizes.values()) / 1e6:.2f} MB, " + ", ".join(
        f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()))


# ---- training ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, windows: torch.Tensor, batch: int, autocast) -> float:
    """Mean next-token NLL (nats) over fixed windows [N, L+1]; every window has the same number of targets."""
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]
        with autocast():
            out = model(input_ids=x, labels=x, output_router_logits=False, use_cache=False)
        total += out.loss.float().item() * len(x)
    model.train()
    return total / len(windows)


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def choose_experts_impl(model, batch, autocast) -> None:
    """Time a few forward+backward passes with each experts implementation (HF's two, and dense_experts_forward)
    and keep the fastest that runs (grouped_mm in fp32 under autocast is not available on every torch build)."""
    times = {}
    for impl in ("grouped_mm", "eager", "dense"):
        try:
            model.set_experts_implementation(impl)
            for i in range(5):
                if i == 2:
                    _sync()
                    t = time.time()
                with autocast():
                    out = model(input_ids=batch(), labels=None, use_cache=False)
                    loss = out.logits.float().logsumexp(-1).mean()
                loss.backward()
            _sync()
            times[impl] = (time.time() - t) / 3
        except Exception as e:  # noqa: BLE001
            log(f"experts implementation {impl} failed: {type(e).__name__}: {str(e)[:200]}")
        model.zero_grad(set_to_none=True)
    if not times:
        raise SystemExit("no experts implementation ran")
    best = min(times, key=times.get)
    model.set_experts_implementation(best)
    log("forward+backward per step: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items())
        + f"; using {best}")


def dense_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """HF experts implementation "dense": every expert on every token, each weighted by its routing weight (zero
    where the router did not pick it), as two dense matmuls. The same sum as the routed computation (an unpicked
    expert adds exactly 0 and gets a zero gradient), but with no sort and no data-dependent shapes, so the training
    step can be captured in a CUDA graph (HF's grouped_mm path cannot be); at 16 experts of width 64 the extra
    FLOPs cost less than the routed path's launches.
    hidden_states [T, H], top_k_index / top_k_weights [T, k]; gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    T, H = hidden_states.shape
    E, I = self.num_experts, self.intermediate_dim
    gate_up = (hidden_states @ self.gate_up_proj.reshape(E * 2 * I, H).t()).view(T, E, 2 * I)
    gate, up = gate_up.chunk(2, dim=-1)                                                        # [T, E, I] each
    weights = torch.zeros(T, E, dtype=top_k_weights.dtype, device=hidden_states.device)
    weights = weights.scatter(1, top_k_index, top_k_weights)                                   # [T, E]
    act = self.act_fn(gate) * up * weights.unsqueeze(-1).to(up.dtype)
    down = self.down_proj.transpose(1, 2).reshape(E * I, H)                                    # [E*I, H]
    return (act.reshape(T, E * I) @ down).to(hidden_states.dtype)


def register_dense_experts() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("dense", dense_experts_forward)


def gdn_kernels(cuda: bool, choice: str) -> str:
    """HF's Qwen3Next picks flash-linear-attention's chunked GDN kernels (forward and backward) when `fla` imports,
    else its torch fallback. "torch" hides fla from transformers (what the bundled demo was trained with). "fla"
    probes it with one small forward+backward first and falls back if that fails: fla-core 0.6.0 refuses its
    backward on Hopper with Triton < 3.7.1 (incorrect results, its issue #640), which is the GPU machine's
    H100 + Triton 3.6, and the probe's compiles cost ~75 s before that refusal."""
    if choice == "torch" or not cuda:
        sys.modules["fla"] = None
        return "torch fallback" + ("" if cuda else " (no CUDA)")
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        q, k, v = (torch.randn(1, 128, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.nn.functional.logsigmoid(torch.randn(1, 128, 2, device="cuda")).requires_grad_()
        beta = torch.rand(1, 128, 2, device="cuda", dtype=torch.bfloat16).requires_grad_()
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
        o.float().sum().backward()
        torch.cuda.synchronize()
        import fla
        return f"flash-linear-attention {getattr(fla, '__version__', '?')}"
    except Exception as e:  # noqa: BLE001
        sys.modules["fla"] = None  # transformers then falls back to its torch implementation
        return f"torch fallback (fla unavailable: {type(e).__name__}: {str(e)[:160]})"


class TrainStep:
    """One optimizer step on a batch [B, L+1] of ids: forward, backward, gradient clipping, AdamW; returns the
    cross-entropy part of the loss (a device scalar). Eager by default. capture() records the whole step as one
    CUDA graph that later calls replay: the model is so small that launching its ~10^4 kernels per step (the
    GDN torch fallback loops over chunks), not the math, bounds eager training. The graph needs static tensors:
    a fixed input the batch is copied into, gradients zeroed in place rather than freed, the learning rate in a
    tensor (AdamW capturable), autocast without its cache."""

    def __init__(self, model, opt, aux_loss: float, clip: float, autocast):
        self.model, self.opt, self.aux_loss, self.clip, self.autocast = model, opt, aux_loss, clip, autocast
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graph = self.x = self.ce = None

    def _body(self, x: torch.Tensor, keep_grads: bool) -> torch.Tensor:
        with self.autocast():
            out = self.model(input_ids=x, labels=x, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=not keep_grads)
        aux = self.aux_loss * out.aux_loss.detach() if self.aux_loss > 0 else 0.0
        return out.loss.detach() - aux

    def capture(self, x0: torch.Tensor, warmup: int = 2) -> None:
        """Warm-up steps on a side stream (real steps on x0: they allocate gradients and optimizer state), then
        the capture. Raises when something in the step cannot be captured (a host sync); the caller goes on
        eagerly."""
        self.x = x0.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._body(self.x, keep_grads=True)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.ce = self._body(self.x, keep_grads=True)
        self.graph = graph

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self._body(x, keep_grads=False)
        self.x.copy_(x)
        self.graph.replay()
        return self.ce                     # overwritten by the next replay, which stream order puts after its use


def capturable_balance_loss() -> None:
    """Make HF's router load-balancing loss capturable in a CUDA graph. Without an attention mask it counts expert
    picks with torch.bincount, which reads the ids' maximum back to the host (a sync, refused during capture); its
    masked branch counts with scatter_add instead. An all-ones mask gives the same loss through that branch."""
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    original = hf.load_balancing_loss_func

    def loss(gate_logits, num_experts=None, top_k=2, attention_mask=None):
        if attention_mask is None and isinstance(gate_logits, tuple):
            attention_mask = torch.ones(gate_logits[0].shape[0], device=gate_logits[0].device)
        return original(gate_logits, num_experts, top_k, attention_mask)

    hf.load_balancing_loss_func = loss


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(lr)              # the captured step reads it
        else:
            g["lr"] = lr


def train(a: argparse.Namespace) -> int:
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        log(f"device {torch.cuda.get_device_name(device)}, torch {torch.__version__}")

    corpus = build_corpus.collect(a.heldout_permille, a.site_packages, a.skip_tests, max_mb=a.max_mb)
    log(f"corpus: {json.dumps(corpus['stats'])}")
    train_docs = [t for _, t in corpus["train"]]
    for path in a.extra_train:
        # train.txt of scripts/build_corpus.py run elsewhere (e.g. an interpreter with the stdlib test suite): the
        # same held-out rule applied there; documents already here (same text) are not added twice
        have = {hashlib.sha1(t.encode()).digest() for t in train_docs}
        extra = [t for t in build_corpus.read_docs(path) if hashlib.sha1(t.encode()).digest() not in have]
        corpus["train"] += [("extra/" + str(i), t) for i, t in enumerate(extra)]
        train_docs += extra
        log(f"extra train documents from {path}: {len(extra)} new ({sum(map(len, extra)) / 1e6:.1f} MB)")
    chats = corpus["chats"]
    chat_budget = a.chat_share * sum(map(len, train_docs))
    chat_docs, used = [], 0
    for c in chats:
        if used > chat_budget:
            break
        chat_docs.append(render_chat(c["messages"], rng))
        used += len(chat_docs[-1])

    tok_texts, size = [], 0
    for t in train_docs + chat_docs[:2000]:
        if size > a.tokenizer_mb * 1e6:
            break
        tok_texts.append(t)
        size += len(t)
    tok = build_tokenizer(a.vocab_size, texts=tok_texts)
    eot = tok.token_to_id("<|endoftext|>")
    log(f"tokenizer: {tok.get_vocab_size()} tokens, trained on {size / 1e6:.1f} MB")

    stdlib_docs = [t for k, t in corpus["train"] if k.startswith("stdlib/")]
    train_ids = encode_docs(tok, train_docs + stdlib_docs * (a.stdlib_repeat - 1) + chat_docs, eot)
    held_ids = encode_docs(tok, [t for _, t in corpus["heldout"]], eot)
    chars = sum(map(len, train_docs + stdlib_docs * (a.stdlib_repeat - 1) + chat_docs))
    log(f"tokens: train {len(train_ids) / 1e6:.2f} M ({chars / len(train_ids):.2f} chars/token, "
        f"{len(chat_docs)} chat docs), held-out {len(held_ids) / 1e6:.3f} M")

    log(f"GDN kernels for training: {gdn_kernels(cuda, a.gdn_kernels)}")
    cfg = make_config(a, tok)
    model = hf_model(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    log(f"model: {n_params / 1e6:.2f} M params ({n_embed / 1e6:.2f} M embed + lm_head), "
        f"bf16 weights {2 * n_params / 1e6:.1f} MB, experts impl {model.config._experts_implementation}")
    if 2 * n_params / 1e6 > a.max_weights_mb:
        raise SystemExit(f"weights would be {2 * n_params / 1e6:.1f} MB > --max-weights-mb {a.max_weights_mb}")

    L, B = a.seq_len, a.batch
    stream = torch.from_numpy(train_ids.astype(np.int64)).to(device)
    n_win = min(a.eval_windows, len(held_ids) // (L + 1))
    held = torch.from_numpy(held_ids[: n_win * (L + 1)].astype(np.int64)).view(n_win, L + 1).to(device)
    offsets = torch.arange(L + 1, device=device)
    gen = torch.Generator(device=device)
    gen.manual_seed(a.seed)

    def batch() -> torch.Tensor:
        starts = torch.randint(0, len(stream) - L - 1, (B, 1), device=device, generator=gen)
        return stream[starts + offsets]

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    model.config.output_router_logits = a.aux_loss > 0
    graphed = a.cuda_graph and cuda
    register_dense_experts()
    if graphed:
        model.set_experts_implementation("dense")      # the one that captures
    elif cuda or a.tiny:
        choose_experts_impl(model, batch, autocast)
    opt = torch.optim.AdamW(param_groups(model, a.weight_decay), lr=torch.tensor(a.lr, device=device) if graphed
                            else a.lr, betas=(0.9, 0.95), eps=1e-8, fused=cuda, capturable=graphed)
    if graphed:
        capturable_balance_loss()
        step_fn = TrainStep(model, opt, a.aux_loss, a.clip,
                            lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False))
        try:
            t = time.time()
            set_lr(opt, a.lr / a.warmup)
            step_fn.capture(batch())
            log(f"training step (dense experts) captured as a CUDA graph in {time.time() - t:.1f} s "
                "(2 warm-up steps taken)")
        except Exception as e:  # noqa: BLE001
            step_fn.graph = None
            where = traceback.format_exc().strip().splitlines()[-12:]
            log(f"CUDA-graph capture failed, training eagerly: {type(e).__name__}: {str(e)[:300]}\n  "
                + "\n  ".join(where))
    else:
        step_fn = TrainStep(model, opt, a.aux_loss, a.clip, autocast)
    budget = a.minutes * 60
    log(f"training: {budget:.0f} s budget, batch {B} x {L + 1} tokens, peak lr {a.lr}, warm-up {a.warmup} steps")
    model.train()
    start = time.time()
    step, tokens, log_loss, log_n, last_log = 0, 0, torch.zeros((), device=device), 0, start
    curve = []
    while True:
        elapsed = time.time() - start
        if elapsed >= budget:
            break
        frac = elapsed / budget
        lr = a.lr * min(1.0, (step + 1) / a.warmup) * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * frac)))
        set_lr(opt, lr)
        log_loss += step_fn(batch())
        if step_fn.graph is not None:
            torch.cuda.synchronize()   # replays queue far ahead otherwise: the clock (budget, lr) would run early
        log_n += 1
        step += 1
        tokens += B * L
        now = time.time()
        if now - last_log >= a.log_every or step == 20:
            loss = (log_loss / log_n).item()
            now = time.time()
            curve.append({"step": step, "seconds": round(now - start, 1), "tokens": tokens, "loss": round(loss, 4)})
            log(f"step {step:6d}  {now - start:6.0f}s  train loss {loss:.4f}  lr {lr:.2e}  "
                f"{tokens / (now - start) / 1e3:.0f} k tokens/s  ({tokens / len(stream):.2f} epochs)")
            log_loss.zero_()
            log_n, last_log = 0, now
    if cuda:
        torch.cuda.synchronize()
    train_s = time.time() - start
    log(f"trained {step} steps, {tokens / 1e6:.1f} M tokens in {train_s:.0f} s ({tokens / train_s / 1e3:.0f} k tok/s)")

    held_loss = heldout_loss(model, held, max(1, B // 2), autocast)
    log(f"held-out loss {held_loss:.4f} nats/token (ppl {math.exp(held_loss):.2f}) over {n_win} windows of {L}")

    out_dir = Path(a.out)
    write_checkpoint(model, cfg, tok, out_dir, a.shard_mb)
    from transformers import AutoModelForCausalLM

    reloaded, info = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.bfloat16 if cuda else
                                                          torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"reloaded checkpoint does not match: {bad}")
    reloaded.to(device)
    re_loss = heldout_loss(reloaded, held, max(1, B // 2), autocast)
    log(f"reloaded checkpoint (bf16 weights): held-out loss {re_loss:.4f} (ppl {math.exp(re_loss):.2f})")

    try:
        from qnext.eval.complete import build_prompt

        for h in corpus["headers"][: a.samples]:
            ids = torch.tensor([tok.encode(build_prompt(h, 0)[0]).ids], device=device)
            with torch.no_grad(), autocast():
                gen_ids = reloaded.generate(ids, max_new_tokens=80, do_sample=False, pad_token_id=eot)
            print("----- " + h["file"] + "\n" + tok.decode(gen_ids[0].tolist(), skip_special_tokens=False),
                  flush=True)
    except Exception as e:  # noqa: BLE001
        log(f"sample generation failed: {type(e).__name__}: {e}")
    summary = {"params": n_params, "steps": step, "train_tokens": tokens, "train_seconds": round(train_s, 1),
               "train_stream_tokens": int(len(train_ids)), "heldout_loss": round(held_loss, 4),
               "heldout_loss_reloaded_bf16": round(re_loss, 4), "curve": curve, "corpus": corpus["stats"],
               "args": vars(a)}
    if a.log_json:
        Path(a.log_json).write_text(json.dumps(summary, indent=1) + "\n")
    log("done")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--log-json", default=None, help="write the loss curve and settings here")
    p.add_argument("--minutes", type=float, default=7.0, help="wall-clock training budget")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU smoke test")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each training step as one CUDA graph (TrainStep)")
    p.add_argument("--gdn-kernels", choices=("torch", "fla"), default="torch",
                   help="GDN kernels for training: transformers' torch fallback, or flash-linear-attention if it "
                        "runs (see gdn_kernels)")
    build_corpus.add_args(p)
    p.set_defaults(max_mb=120.0)
    p.add_argument("--stdlib-repeat", type=int, default=2, help="times the stdlib train files appear")
    p.add_argument("--extra-train", action="append", default=[], metavar="TRAIN_TXT",
                   help="more train documents: a train.txt written by scripts/build_corpus.py on another machine "
                        "(its Python's stdlib test suite, say); repeatable")
    p.add_argument("--chat-share", type=float, default=0.08, help="chat text as a share of train text")
    p.add_argument("--tokenizer-mb", type=float, default=40.0, help="text the tokenizer is trained on")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--full-attention-interval", type=int, default=4)
    p.add_argument("--attn-heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--gdn-key-heads", type=int, default=2)
    p.add_argument("--gdn-value-heads", type=int, default=4)
    p.add_argument("--gdn-head-dim", type=int, default=64)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=64)
    p.add_argument("--shared-intermediate", type=int, default=128)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--max-position-embeddings", type=int, default=4096)
    p.add_argument("--aux-loss", type=float, default=0.01, help="router load-balancing loss weight")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--log-every", type=float, default=20.0, help="seconds between loss lines")
    p.add_argument("--samples", type=int, default=3, help="greedy completions printed at the end")
    p.add_argument("--shard-mb", type=float, default=12.0)
    p.add_argument("--max-weights-mb", type=float, default=24.0)
    a = p.parse_args(argv)
    if a.tiny:
        a.skip_tests, a.max_mb, a.tokenizer_mb = True, min(a.max_mb, 2.0), 1.0
        a.vocab_size, a.hidden, a.layers, a.full_attention_interval = 512, 64, 4, 4
        a.attn_heads, a.kv_heads, a.head_dim = 2, 1, 32
        a.gdn_key_heads, a.gdn_value_heads, a.gdn_head_dim = 2, 4, 16
        a.experts, a.top_k, a.moe_intermediate, a.shared_intermediate = 8, 2, 32, 32
        a.seq_len, a.batch, a.warmup, a.eval_windows, a.log_every = 128, 4, 5, 4, 5.0
        a.max_position_embeddings, a.shard_mb = 512, 0.2
    return a


if __name__ == "__main__":
    sys.exit(train(parse_args()))
