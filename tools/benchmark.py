"""Training throughput of a profile, in tokens/s, side by side in one process:

  reference   a nanoGPT-shaped GPT of the same width, depth, heads and window
              (LayerNorm, learned positions, GELU MLP of 4 * n_embd, fused SDPA attention)
  softmax     our model, hooks off (fast path)
  recording   our model recording every hook point at every step
  headwise    our model with head-wise RMSNorm, hooks off; --variants names others (any of training.ARMS),
              e.g. --variants headwise,sink_logit,softmax1,kv_bias for the slot fixes beside it
  ..., compiled   with --compile: the reference, softmax and each variant under torch.compile (on CUDA
              the training default), each compared with the compiled reference

Usage: python tools/benchmark.py [--profile cpu] [--steps 30] [--rounds 3] [--device cpu] [--compile] [--batch N]
                                 [--variants headwise]
       (the gpu shape on the CPU: --profile gpu --batch 4 --steps 3)
Not a test: pytest does not collect it. Its numbers go in docs/results.md ("Throughput").
"""
import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import pick_device
from model import GPT
from training import deterministic_kernels, profile_configs


class ReferenceBlock(nn.Module):
    """A nanoGPT-style block, written for this comparison only."""

    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class ReferenceGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok, self.pos = nn.Embedding(cfg.vocab_size, cfg.n_embd), nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(ReferenceBlock(cfg.n_embd, cfg.n_head) for _ in range(cfg.n_layer))
        self.ln_f, self.head = nn.LayerNorm(cfg.n_embd), nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def step_timer(model, x, y, record):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def one_step():
        with model.hooks(record="*") if record else contextlib.nullcontext():
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return one_step


def as_trained(one_step, device):
    """A compiled step as training runs it: on the CPU under torch's deterministic algorithms (see
    training.deterministic_kernels), which a compiled CPU training switches on."""
    if device.type != "cpu":
        return one_step

    def deterministic_step():
        with deterministic_kernels():
            one_step()
    return deterministic_step


def tokens_per_second(steps_by_name, n_tokens, steps, rounds=3):
    """Interleave the models round by round so machine noise hits them alike -> {name: [tokens/s of each round]}."""
    speeds = {name: [] for name in steps_by_name}
    for _ in range(rounds):
        for name, one_step in steps_by_name.items():
            for _ in range(3):  # warm up
                one_step()
            start = time.perf_counter()
            for _ in range(steps):
                one_step()
            speeds[name].append(n_tokens * steps / (time.perf_counter() - start))
    return speeds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=None, help="windows a step (default: the profile's)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --steps steps each model (default 3)")
    parser.add_argument("--variants", default="headwise",
                        help="comma-separated arms (training.ARMS) to time beside softmax (default: headwise)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also each model under torch.compile (compile time apart)")
    args = parser.parse_args()
    device = pick_device(args.device)
    torch.manual_seed(0)
    model_cfg, train_cfg = profile_configs(args.profile)
    batch = args.batch or train_cfg.batch_size
    x = torch.randint(256, (batch, model_cfg.block_size), device=device)
    y = torch.randint(256, (batch, model_cfg.block_size), device=device)
    variants = [v for v in args.variants.split(",") if v and v != "softmax"]
    models = {"reference": ReferenceGPT(model_cfg).to(device), "softmax": GPT(model_cfg).to(device),
              **{v: GPT(profile_configs(args.profile, v)[0]).to(device) for v in variants}}
    steps = {"reference": step_timer(models["reference"], x, y, False),
             "softmax": step_timer(models["softmax"], x, y, False),
             "recording": step_timer(models["softmax"], x, y, True),
             **{v: step_timer(models[v], x, y, False) for v in variants}}
    compile_seconds = {}
    if args.compile:
        for name, model in models.items():
            compiled = as_trained(step_timer(torch.compile(model), x, y, False), device)
            start = time.perf_counter()
            compiled()  # the first step compiles
            compile_seconds[name] = time.perf_counter() - start
            steps[f"{name}, compiled"] = compiled
    rounds = tokens_per_second(steps, x.numel(), args.steps, args.rounds)
    speed = {name: max(r) for name, r in rounds.items()}  # the best round: noise only ever slows a round down
    median = {name: sorted(r)[len(r) // 2] for name, r in rounds.items()}
    print(f"profile {args.profile}: batch {batch} x T {model_cfg.block_size}, "
          f"{sum(p.numel() for p in models['softmax'].parameters()) / 1e6:.2f}M parameters, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds of {args.steps} steps; best round (median round)")
    for name, tps in speed.items():
        base = "reference, compiled" if name.endswith("compiled") else "reference"
        softmax = "softmax, compiled" if name.endswith("compiled") else "softmax"
        print(f"{name:>22}  {tps:9.0f} tokens/s  {tps / speed[base]:.2f}x {base}  "
              f"{speed[softmax] / tps:.2f}x ({median[softmax] / median[name]:.2f}x) the time of {softmax}")
    for name, seconds in compile_seconds.items():
        print(f"compiling {name}: {seconds:.0f} s (its first step)")


if __name__ == "__main__":
    main()
