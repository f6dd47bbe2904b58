"""
A small Llama-style GPT with seven attention variants and hook points to record and edit it.

  GPTConfig     the shape, and which attention: softmax | sigmoid | headwise | gated, the paper's four;
                or one of the fixes the field ships, an extra slot in each head's softmax (SLOT_VARIANTS):
                sink_logit (a learnable logit per head, gpt-oss) | softmax1 (that logit fixed at 0, E. Miller)
                | kv_bias (a learnable key and value per head, Sun et al. 2024)
  RMSNorm, RoPE, CausalSelfAttention, SwiGLU, Block, GPT: the model, top to bottom
  GPT.hooks     record or edit any intermediate tensor: `with model.hooks(record=...) as cache`
  GPT.run_with_cache  one pass without gradients under those hooks -> (logits, cache)
  self_only_mask  the mask under which token k attends only to itself (04's intervention)

The data, the training loop, the paper's measures and the pretrained loaders live in their own
modules (data.py, training.py, measures.py, pretrained.py); this file imports none of them.

Paper: Li et al., "The Structural Origin of Attention Sink" (arXiv 2605.06611).
Style after karpathy/nanoGPT and karpathy/llama2.c (https://github.com/karpathy).
"""
import contextlib
import fnmatch
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

SLOT_VARIANTS = ("sink_logit", "softmax1", "kv_bias")  # each head's softmax gets one extra slot (see CausalSelfAttention)
ATTENTION_VARIANTS = ("softmax", "sigmoid", "headwise", "gated") + SLOT_VARIANTS
HEAD_NORM_INITS = ("calibrated", "ones")


class InputError(ValueError):
    """Something the user asked for cannot be done; scripts print it as one line and exit 2."""


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
    head_norm_init: str = "calibrated"  # head-wise RMSNorm's initial gain: "calibrated" (the authors') or "ones"

    def __post_init__(self):
        if self.attn not in ATTENTION_VARIANTS:
            raise InputError(f"unknown attention variant {self.attn!r}; valid: {', '.join(ATTENTION_VARIANTS)}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise InputError(f"n_embd={self.n_embd} must split into {self.n_head} heads of even size")
        if self.head_norm_init not in HEAD_NORM_INITS:
            raise InputError(f"unknown head_norm_init {self.head_norm_init!r}; valid: {', '.join(HEAD_NORM_INITS)}")
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
    """Identity at a point worth observing. `GPT.hooks` switches recording or editing on.
    Unlike a torch forward hook, it is switched on by name for one `with` block, and it can replace
    the value it sees. It skips nn.Module.__call__, so `register_forward_hook` on it never fires."""

    def __init__(self):
        super().__init__()
        self.name, self.store, self.edit, self.reduce = "", None, None, None

    @property
    def active(self):
        return self.store is not None or self.edit is not None

    def __call__(self, x):  # skip nn.Module's call machinery: dozens of these run every step
        return self.forward(x)

    def forward(self, x):
        if self.edit is not None:
            x = self.edit(x)
        if self.store is not None:
            copy = x.detach().float().cpu()
            self.store[self.name] = copy if self.reduce is None else self.reduce(copy)
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
        if self.variant == "headwise":  # one learnable gain per head and dimension; GPT calibrates it (below)
            self.head_norm_gain = nn.Parameter(torch.ones(config.n_head, 1, self.head_dim))
        if self.variant == "gated":
            self.gate = nn.Linear(config.n_embd, config.n_embd, bias=False)
        if self.variant in SLOT_VARIANTS:  # the slot's key k', value v' and logit bias b, one each per (query) head
            learnable = {"slot_key": self.variant == "kv_bias", "slot_value": self.variant == "kv_bias",
                         "slot_logit": self.variant == "sink_logit"}
            for name, shape in (("slot_key", (config.n_head, 1, self.head_dim)),
                                ("slot_value", (config.n_head, 1, self.head_dim)), ("slot_logit", (config.n_head, 1, 1))):
                # Zeros, learnable or not: at init all three variants are softmax1 exactly (k' = 0 gives the
                # logit 0, v' = 0 adds nothing), so the arms differ only by what training makes of the slot.
                # Zeros still learn from the first step: dL/dv' = sum_t share_t dL/dy_t, and the slot's logit
                # gets dL/dz_t = share_t (v' - y_t) . dL/dy_t, not 0 at init, which reaches b and k'.
                if learnable[name]:
                    setattr(self, name, nn.Parameter(torch.zeros(shape)))
                else:  # fixed at 0: a buffer, not a parameter, and not saved in checkpoints
                    self.register_buffer(name, torch.zeros(shape), persistent=False)
        # Sigmoid attention's fixed bias b = -log(T) (Ramapuram et al. 2024): at init each weight is about 1/T.
        self.sigmoid_bias = -math.log(config.block_size)
        self.custom_mask = None  # (T, T) bool, True where a query may attend; set by GPT.hooks
        self.hook_q = HookPoint()  # (B, H, T, hd) queries after RoPE
        self.hook_k = HookPoint()  # (B, H, T, hd) keys after RoPE (grouped-query: repeated to H heads)
        self.hook_v = HookPoint()  # (B, H, T, hd) values
        self.hook_pattern = HookPoint()  # (B, H, T, T) attention weights A[t, s] over the real keys
        self.hook_slot = HookPoint()  # (B, H, T) the slot's share of query t's weight (SLOT_VARIANTS only)
        # (recording either takes the explicit path, which computes them)
        self.hook_head_out = HookPoint()  # (B, H, T, hd) o_{t,h}: each head's value aggregation
        self.hook_head_out_post = HookPoint()  # (B, H, T, hd) after head-wise RMSNorm or the gate: W_O's input
        self.hook_out = HookPoint()  # (B, T, C) the attention branch's output, W_O o

    def forward(self, x, cos, sin):  # x: the block's normalised input (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).split((C, self.kv_dim, self.kv_dim), dim=-1)  # (B, T, C), (B, T, kv), (B, T, kv)
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # the compute dtype: fp32 tables would promote q and k (bf16 on a GPU)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k.shape[1] < self.n_head:  # grouped-query attention: key/value head j serves query heads j*g .. j*g + g-1
            k, v = (t.repeat_interleave(self.n_head // t.shape[1], dim=1) for t in (k, v))  # (B, H, T, hd)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        slot = self.variant in SLOT_VARIANTS
        # The slot (SLOT_VARIANTS): one more entry in query t's softmax, seen by every query, that is no token:
        #   z_t = q_t . k' / sqrt(d) + b                          the slot's logit
        #   A[t, s] = exp(x_ts) / (exp(z_t) + sum_{s' <= t} exp(x_ts')),   x_ts = q_t . k_s / sqrt(d)
        #   share_t = exp(z_t) / (the same sum),  so  sum_s A[t, s] + share_t = 1
        #   y_t = sum_s A[t, s] v_s + share_t v'
        # sink_logit: b learnable, k' = v' = 0 (v' = 0: the share the slot takes goes nowhere); softmax1:
        # b = k' = v' = 0, so A[t, s] = exp(x_ts) / (1 + sum_s' exp(x_ts')); kv_bias: b = 0, k' and v' learnable.
        explicit = (self.variant == "sigmoid" or self.custom_mask is not None or self.hook_pattern.active
                    or self.hook_slot.active)
        if explicit:  # the path that exposes the attention weights
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # made per call: no (block, block) buffer
            # the slot stays visible under a custom mask: under 04's self-only mask, k attends to itself and the slot
            allowed = causal if self.custom_mask is None else self.custom_mask[:T, :T]
            # (B, H, T, T) in float32 whatever the compute dtype: in bf16 sigmoid's bias and the slot's logit
            # would be rounded, and rows would sum to 1 +- 2e-3
            scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(self.head_dim)
            if self.variant == "sigmoid":  # A = sigmoid(q.k / sqrt(d) + b), rows not normalised
                weights = torch.sigmoid(scores + self.sigmoid_bias).masked_fill(~allowed, 0.0)
            elif slot:
                z = (q @ self.slot_key.to(q.dtype).transpose(-2, -1)).float() / math.sqrt(self.head_dim)
                z = z + self.slot_logit  # (B, H, T, 1): the slot's logit z_t
                with_slot = torch.cat((z, scores.masked_fill(~allowed, float("-inf"))), dim=-1).softmax(dim=-1)
                share, weights = self.hook_slot(with_slot[..., 0]), with_slot[..., 1:]  # (B, H, T), (B, H, T, T)
            else:
                weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
            y = self.hook_pattern(weights).to(v.dtype) @ v  # (B, H, T, hd)
            if slot:
                y = y + share.unsqueeze(-1).to(v.dtype) * self.slot_value.to(v.dtype)
        elif slot:  # fast path: the slot as key 0 of scaled_dot_product_attention, its b in the mask
            # SDPA adds attn_mask to q . k / sqrt(d): key 0 is k', so column 0 scores q_t . k' / sqrt(d) + b = z_t;
            # the causal columns follow, shifted by one: (H, T, 1 + T). Under bf16 autocast the mask is bf16, b too.
            k_slot, v_slot = (t.to(k.dtype).expand(B, -1, -1, -1) for t in (self.slot_key, self.slot_value))
            k, v = torch.cat((k_slot, k), dim=2), torch.cat((v_slot, v), dim=2)  # (B, H, 1 + T, hd)
            causal = torch.full((T, T), float("-inf"), device=x.device).triu(1)  # (T, T): 0 where s <= t, else -inf
            mask = torch.cat((self.slot_logit.expand(-1, T, -1), causal.expand(self.n_head, -1, -1)), dim=-1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype).unsqueeze(0))  # (B, H, T, hd)
        else:  # fast path, same numbers
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        y = self.hook_head_out(y)  # o_{t,h}: each head's value aggregation
        if self.variant == "headwise":  # the paper's fix: o_{t,h} <- g_h * o_{t,h} / RMS(o_{t,h})
            y = rms_normalize(y.float()).type_as(y) * self.head_norm_gain
        elif self.variant == "gated":  # Qiu et al. 2025: o_{t,h} <- o_{t,h} * sigmoid(W_g x_t)
            y = y * torch.sigmoid(self.gate(x)).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        y = self.hook_head_out_post(y).transpose(1, 2).reshape(B, T, C)  # heads side by side
        return self.hook_out(self.wo(y))


@torch.no_grad()
def calibrate_head_norm_gain(attn):
    """Head-wise RMSNorm's initial gain as the paper's authors set it (their init_headnorm_stats):
    on one standard-normal input x_0, token 0 attends only to itself, so head h's output is its
    value v_{0,h} = (W_V x_0)_h, and

        g_{h,d} = std_d (W_V x_0)_{h,d}     (the same for every d; population std over head_dim)

    so the normalised output starts at the scale token 0's output has, instead of RMS 1."""
    w_v = attn.qkv.weight[-attn.kv_dim:]  # (kv_dim, C): W_V, the last rows of qkv
    x0 = torch.randn(w_v.shape[1], device=w_v.device, dtype=w_v.dtype)  # (C,)
    v0 = (w_v @ x0).view(-1, attn.head_dim)  # (n_kv_head, hd)
    v0 = v0.repeat_interleave(attn.n_head // v0.shape[0], dim=0)  # (H, hd): grouped-query heads share a value
    attn.head_norm_gain.copy_(v0.std(dim=-1, correction=0).view(-1, 1, 1).expand_as(attn.head_norm_gain))


class SwiGLU(nn.Module):
    """FFN(x) = W_down (silu(W_gate x) * W_up x); a row of W_gate and W_up is one hidden unit."""

    def __init__(self, config):
        super().__init__()
        self.w_gate = nn.Linear(config.n_embd, config.ffn_dim, bias=False)
        self.w_up = nn.Linear(config.n_embd, config.ffn_dim, bias=False)
        self.w_down = nn.Linear(config.ffn_dim, config.n_embd, bias=False)
        self.w_down.is_residual_projection = True
        self.hook_gate = HookPoint()  # (B, T, ffn_dim) W_gate x
        self.hook_up = HookPoint()  # (B, T, ffn_dim) W_up x
        self.hook_hidden = HookPoint()  # (B, T, ffn_dim) silu(W_gate x) * W_up x: one column per hidden unit
        self.hook_out = HookPoint()  # (B, T, C) the FFN's output, W_down hidden

    def forward(self, x):  # (B, T, C)
        gate, up = self.hook_gate(self.w_gate(x)), self.hook_up(self.w_up(x))  # (B, T, ffn_dim)
        hidden = self.hook_hidden(F.silu(gate) * up)  # (B, T, ffn_dim)
        return self.hook_out(self.w_down(hidden))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(config.n_embd, config.norm_eps), CausalSelfAttention(config)
        self.mlp_norm, self.mlp = RMSNorm(config.n_embd, config.norm_eps), SwiGLU(config)
        self.hook_resid_in = HookPoint()  # (B, T, C) the residual stream entering the block
        self.hook_attn_in = HookPoint()  # (B, T, C) the attention's input: after RMSNorm, gain included

    def forward(self, x, cos, sin):
        x = self.hook_resid_in(x)
        x = x + self.attn(self.hook_attn_in(self.attn_norm(x)), cos, sin)
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
        if config.attn == "headwise" and config.head_norm_init == "calibrated":
            for block in self.blocks:  # after the weights: one random input per block (the authors' order)
                calibrate_head_norm_gain(block.attn)

    def forward(self, idx, targets=None):  # idx (B, T) token ids
        x = self.residual_stream(idx)  # (B, T, C)
        logits = self.lm_head(self.final_norm(self.hook_resid_final(x))).float()  # (B, T, vocab)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def residual_stream(self, idx, n_blocks=None):
        """The residual stream (B, T, C) of idx (B, T) after the first n_blocks blocks (default: all)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise InputError(f"sequence of {T} tokens is longer than the model's window of {self.config.block_size}")
        x = self.tok_emb(idx)  # (B, T, C)
        for block in self.blocks[:n_blocks]:
            x = block(x, self.rope_cos[:T], self.rope_sin[:T])
        return x

    @torch.no_grad()
    def run_with_cache(self, idx, record=(), reduce=None, last_layer=None, **hooks):
        """One forward pass of idx (B, T) without gradients -> (logits (B, T, vocab), cache).
        record: hook names or patterns, as `hooks` takes them; cache[name] is a float32 CPU copy.
        reduce: {hook name or pattern: function}: cache[name] is function(that copy) instead, so that
                a big value (a (B, H, T, T) pattern, say) is reduced as the pass goes and not kept.
        last_layer: stop after this block (logits None): nothing later changes what it recorded.
        hooks: edit, mask, mask_layers, as `hooks` takes them."""
        record = [record] if isinstance(record, str) else list(record)
        with self.hooks(record=record + list(reduce or {}), reduce=reduce, **hooks) as cache:
            if last_layer is None:
                logits, _ = self(idx)
            else:
                logits, _ = None, self.residual_stream(idx, last_layer + 1)
        return logits, cache

    @contextlib.contextmanager
    def hooks(self, record=(), edit=None, mask=None, mask_layers=None, reduce=None):
        """Record and edit the model for the forward passes inside the `with` block.
        (run_with_cache does this for one pass without gradients, the usual case.)

        record: hook names or glob patterns, e.g. "blocks.*.attn.hook_pattern"; the yielded dict
                maps each name to a float32 CPU copy of its last value.
        edit:   {hook name or glob pattern: function}; the value of each hook it matches is
                replaced by function(value) (the first matching pattern wins).
        reduce: {recorded name or pattern: function}: record function(copy) instead of the copy.
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
            point.reduce = next((f for p, f in (reduce or {}).items() if fnmatch.fnmatch(name, p)), None)
        layers = range(self.config.n_layer) if mask_layers is None else mask_layers
        for i in layers:
            self.blocks[i].attn.custom_mask = None if mask is None else mask.to(self.rope_cos.device)
        try:
            yield cache
        finally:
            for point in self.hook_points.values():
                point.store = point.edit = point.reduce = None
            for block in self.blocks:
                block.attn.custom_mask = None


def self_only_mask(block_size, k, device=None):
    """The causal mask, except that query k may attend only to itself: k cannot aggregate."""
    mask = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool, device=device))
    mask[k, :] = False
    mask[k, k] = True
    return mask
