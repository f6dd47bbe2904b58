"""
The one shared module of the series: a small Llama-style GPT with four attention variants,
hook points to record and edit it from outside, the offline byte-level data, the training
loop with its checkpoint cache, the measures used by several scripts, and the command-line
plumbing of the numbered scripts. Sections, in reading order:

  1. model        RMSNorm, RoPE, attention (softmax | sigmoid | headwise | gated), SwiGLU, GPT
  2. hook points  record or edit any intermediate tensor: `with model.hooks(record=...) as cache`
  3. data         bytes of Python's standard library (or --data FILE), windows, random tokens
  4. training     AdamW, warmup + cosine, progress bar, validation, checkpoint cache, profiles
  5. measures     attention to token 0, dominance ratio, effective rank, variance by position
  6. scripts      the options and error handling shared by 01-05

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

    def __post_init__(self):
        if self.attn not in ATTENTION_VARIANTS:
            raise InputError(f"unknown attention variant {self.attn!r}; valid: {', '.join(ATTENTION_VARIANTS)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise InputError(f"n_embd={self.n_embd} must split into {self.n_head} heads of even size")
        if self.ffn_dim == 0:
            self.ffn_dim = 8 * math.ceil(8 * self.n_embd / 3 / 8)


def rms_normalize(x, eps=None):
    """x / sqrt(mean(x^2) + eps) over the last dimension: every vector comes out with RMS 1.
    The default eps is float32's machine epsilon, small beside the tiny head outputs at init."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_normalize(x.float(), eps=1e-6).type_as(x) * self.weight


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
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.wo = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.wo.is_residual_projection = True
        if self.variant == "headwise":  # one learnable gain per head and dimension
            self.head_norm_gain = nn.Parameter(torch.ones(config.n_head, 1, self.head_dim))
        if self.variant == "gated":
            self.gate = nn.Linear(config.n_embd, config.n_embd, bias=False)
        # Sigmoid attention's fixed bias b = -log(T) (Ramapuram et al. 2024): at init each weight is about 1/T.
        self.sigmoid_bias = -math.log(config.block_size)
        causal = torch.tril(torch.ones(config.block_size, config.block_size, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)
        self.custom_mask = None  # (T, T) bool, True where a query may attend; set by GPT.hooks
        for name in ("q", "k", "v", "pattern", "head_out", "head_out_post", "out"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x, cos, sin):  # x: the block's normalised input (B, T, C)
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        q, k = apply_rope(qkv[:2], cos, sin)  # rotate q and k in one go
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(qkv[2])
        explicit = self.variant == "sigmoid" or self.custom_mask is not None or self.hook_pattern.active
        if explicit:  # the path that exposes the attention weights
            allowed = self.causal_mask[:T, :T] if self.custom_mask is None else self.custom_mask[:T, :T]
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
        self.attn_norm, self.attn = RMSNorm(config.n_embd), CausalSelfAttention(config)
        self.mlp_norm, self.mlp = RMSNorm(config.n_embd), SwiGLU(config)
        self.hook_resid_in = HookPoint()

    def forward(self, x, cos, sin):
        x = self.hook_resid_in(x)  # the residual stream entering the block (B, T, C)
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.hook_resid_final = HookPoint()  # the residual stream leaving the last block
        self.final_norm = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        edit:   {hook name: function}; the hook's value is replaced by function(value).
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
            point.edit = (edit or {}).get(name)
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

def stdlib_source_files():
    """The .py files of Python's standard library, without tests and site-packages, sorted."""
    root, files = sysconfig.get_paths()["stdlib"], []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(s for s in subfolders if s not in ("site-packages", "test", "tests", "__pycache__", "idle_test"))
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def load_corpus(path=None):
    """The training text as bytes: a UTF-8 file, or by default the standard library's source."""
    if path is None:
        return b"".join(open(f, "rb").read() for f in stdlib_source_files())
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


class ByteData:
    """A corpus as byte tokens, split 95/5 into train and validation, served as windows."""

    def __init__(self, text, block_size, name="corpus"):
        n_val = max(len(text) // 20, block_size + 1)
        if len(text) - n_val < block_size + 1:
            raise InputError(f"{name} has {len(text)} bytes: too short for a train and a validation window of {block_size + 1}")
        tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        self.train, self.val = tokens[:-n_val], tokens[-n_val:]
        self.block_size = block_size
        self.fingerprint = f"{name}:{len(text)}:{hashlib.sha1(text).hexdigest()[:12]}"

    def windows(self, split, n, bos, generator, repeat_prob=0.0):
        """n windows (x, y), each (n, T) int64 on the CPU; y is x shifted by one.
        With bos, x[:, 0] is the BOS token and the text starts at position 1.
        With repeat_prob, that share of windows gets a span copied to a later place."""
        tokens, T = (self.train if split == "train" else self.val), self.block_size
        n_text = T if bos else T + 1
        starts = torch.randint(len(tokens) - n_text + 1, (n,), generator=generator)
        text = torch.stack([tokens[s:s + n_text] for s in starts.tolist()]).long()  # (n, n_text)
        for i in torch.nonzero(torch.rand(n, generator=generator) < repeat_prob).flatten().tolist():
            repeat_span(text[i], generator)  # text[i] is a view: copied in place
        if bos:
            return torch.cat([torch.full((n, 1), BOS), text[:, :-1]], dim=1), text
        return text[:, :-1], text[:, 1:]


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


def random_token_windows(n, block_size, bos, generator):
    """(n, T) uniformly random bytes, with BOS at position 0 if the model was trained with it."""
    x = torch.randint(256, (n, block_size), generator=generator)
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
    eval_interval: int = 100
    eval_windows: int = 64
    seed: int = 0


# Named profiles: the model's shape and its training recipe (see README, "The recipe search").
PROFILES = {
    "tiny": dict(model=dict(block_size=32, n_layer=2, n_head=2, n_embd=32),
                 train=dict(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, eval_interval=20, eval_windows=16,
                            repeat_prob=1.0)),
    "cpu": dict(model=dict(block_size=64, n_layer=3, n_head=4, n_embd=64),
                train=dict(steps=8000, batch_size=32, lr=1e-2, warmup_steps=100, schedule="constant",
                           repeat_prob=1.0, eval_interval=500)),
    # Extrapolated from the cpu recipe (wider, more tokens, a smaller learning rate for the
    # wider model); not yet run on a GPU.
    "gpu": dict(model=dict(block_size=64, n_layer=3, n_head=8, n_embd=256),
                train=dict(steps=20000, batch_size=128, lr=3e-3, warmup_steps=200, schedule="constant",
                           repeat_prob=1.0, eval_interval=1000)),
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


def train(model, data, cfg, desc="train"):
    """Train in place; returns the history {"step", "train_loss", "val_step", "val_loss"}."""
    device = next(model.parameters()).device
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    batches = torch.Generator().manual_seed(cfg.seed)  # the data order depends only on the seed
    val_x, val_y = data.windows("val", cfg.eval_windows, cfg.bos, torch.Generator().manual_seed(1234))
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    tokens_per_step, start = cfg.batch_size * data.block_size, time.time()
    bar = tqdm(range(cfg.steps), desc=desc, dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        if step % cfg.eval_interval == 0:
            history["val_step"].append(step)
            history["val_loss"].append(evaluate(model, val_x, val_y))
        x, y = data.windows("train", cfg.batch_size, cfg.bos, batches, cfg.repeat_prob)
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


def save_checkpoint(path, model, train_cfg, history, data_fingerprint):
    """Write atomically: a temp file, then a rename, so an interrupted run never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = {"model_config": asdict(model.config), "train_config": asdict(train_cfg), "data": data_fingerprint,
               "history": history, "state_dict": model.state_dict()}
    torch.save(payload, path + ".tmp")
    os.replace(path + ".tmp", path)


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


def trained_model(profile, attn="softmax", seed=0, data=None, device="cpu", out_dir="out"):
    """The model of this profile, variant and seed: from the cache in out_dir/checkpoints, or trained now."""
    model_cfg, train_cfg = profile_configs(profile, attn, seed)
    data = data if data is not None else ByteData(load_corpus(), model_cfg.block_size, "stdlib")
    expect = {"model_config": asdict(model_cfg), "train_config": asdict(train_cfg), "data": data.fingerprint}
    key = hashlib.sha1(json.dumps(expect, sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(out_dir, "checkpoints", f"{profile}-{attn}-seed{seed}-{key}.pt")
    if os.path.exists(path):
        return load_checkpoint(path, device, expect)
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(device)
    history = train(model, data, train_cfg, desc=f"{profile}/{attn}/seed {seed}")
    save_checkpoint(path, model, train_cfg, history, data.fingerprint)
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


def top_super_neuron(model):
    """(layer, unit): the FFN unit of layer 0 or 1 with the largest z(W_gate row) + z(W_up row)."""
    def best(layer):
        z_gate, z_up = row_norm_zscores(model.blocks[layer].mlp)
        return float((z_gate + z_up).max()), layer, int((z_gate + z_up).argmax())
    _, layer, unit = max(best(layer) for layer in range(min(2, model.config.n_layer)))
    return layer, unit


def variance_by_position(head_out):
    """(B, H, T, hd) head outputs -> two (T,) readings of their variance at each position:
    per dimension across sequences (var over B, mean over H, hd), and
    across dimensions within one token (var over hd, mean over B, H)."""
    across_sequences = head_out.var(dim=0).mean(dim=(0, 2))
    within_token = head_out.var(dim=-1).mean(dim=(0, 1))
    return across_sequences, within_token


# ----------------------------------------------------------------------------- 6. scripts

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


def script_parser(doc):
    """The options every numbered script takes; a script adds its own to the returned parser."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    parser.add_argument("--profile", default=None, help="gpu, cpu or tiny (default: gpu on CUDA, else cpu)")
    parser.add_argument("--data", default=None, help="a UTF-8 text file to train on (default: Python's standard library)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out_dir", default="out")
    parser.add_argument("--quick", action="store_true", help="the tiny profile: a first look in seconds")
    return parser


def setup(args, script_file):
    """Resolve the common options: device, profile, data, output folder; seeds torch."""
    args.device = pick_device(args.device)
    args.profile = "tiny" if args.quick else args.profile or ("gpu" if args.device.type == "cuda" else "cpu")
    model_cfg, _ = profile_configs(args.profile)
    name = "stdlib" if args.data is None else os.path.basename(args.data)
    args.dataset = ByteData(load_corpus(args.data), model_cfg.block_size, name)
    args.script_dir = os.path.join(args.out_dir, os.path.splitext(os.path.basename(script_file))[0])
    os.makedirs(args.script_dir, exist_ok=True)
    torch.manual_seed(args.seed)
    return args


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
