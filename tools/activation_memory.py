"""What a training step of a profile holds in memory, measured on the CPU, and what follows for a GPU.

For each attention variant: the bytes that autograd saves for the backward pass of one window
(torch.autograd.graph.saved_tensors_hooks counts every tensor a forward pass keeps, each storage
once), under the autocast a GPU would use (bf16, or fp16 below compute capability 8.0: the same
sizes). Then, for each GPU memory size, the micro-batch that the probe in training.plan_training
would settle on (the global batch halved until it fits) and the time of a model, both estimates:

  memory  = 16 bytes a parameter (fp32 weights, gradients, AdamW's two moments) + what a pass saves once
            (the bf16 copies of the weights) + micro-batch x saved bytes a window
  minutes = the step's FLOPs (6 x parameters + 12 x layers x T x n_embd per token) / (a tenth of the GPU's dense peak)

A tenth of the peak is an assumption for a model this small, whose step is bound by elementwise
memory traffic more than by matmuls; tools/gpu_check.py-style measurements replace it.

Usage: python tools/activation_memory.py [--profile gpu]
Not a test: pytest does not collect it. Its numbers go in docs/gpu.md.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ATTENTION_VARIANTS, GPT
from training import profile_configs

# name, memory (GB), precision, dense bf16/fp16 peak (TFLOP/s; NVIDIA's data sheets, without sparsity)
GPUS = [("T4", 16, "fp16", 65), ("A10 / RTX 4090 class", 24, "bf16", 125), ("A100 40GB", 40, "bf16", 312),
        ("A100 80GB", 80, "bf16", 312), ("H100", 80, "bf16", 989)]
ASSUMED_UTILISATION = 0.1
USABLE_SHARE = 0.9  # of a card's memory: the CUDA context, the allocator's fragmentation and cuBLAS workspaces take the rest


def saved_bytes(model, n_windows, block_size, dtype):
    """Bytes saved for backward by one forward pass of n_windows windows under autocast to dtype."""
    storages = {}

    def keep(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(model.config.vocab_size, (n_windows, block_size))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=dtype):
        _, loss = model(x, x)
    del loss
    return sum(storages.values())


def saved_bytes_per_window(model, block_size, dtype):
    """(bytes a window, bytes once a pass): a pass saves the autocast copies of the weights once,
    whatever its number of windows, so a window's share is the difference of 2 windows and 1."""
    one, two = saved_bytes(model, 1, block_size, dtype), saved_bytes(model, 2, block_size, dtype)
    return two - one, 2 * one - two


def largest_fitting_micro_batch(batch, fixed_bytes, window_bytes, memory_bytes):
    """The probe's answer, estimated: batch, halved until fixed + micro-batch x window fits (None: not even 1)."""
    size = batch
    while size >= 1 and fixed_bytes + size * window_bytes > USABLE_SHARE * memory_bytes:
        size //= 2
    return size or None


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--profile", default="gpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    GiB = 2**30
    rows = {}
    for variant in ATTENTION_VARIANTS:
        model_cfg, train_cfg = profile_configs(args.profile, variant)
        model = GPT(model_cfg)
        n_params = sum(p.numel() for p in model.parameters())
        window, once = saved_bytes_per_window(model, model_cfg.block_size, torch.bfloat16)
        rows[variant] = (n_params, window, once)
        print(f"{variant:9s} {n_params / 1e6:6.2f}M parameters, state {16 * n_params / GiB:.2f} GiB; saved for backward: "
              f"{window / 2**20:6.1f} MiB a window of {model_cfg.block_size} tokens (+ {once / 2**20:.0f} MiB a pass), "
              f"{train_cfg.batch_size * window / GiB:6.1f} GiB for the global batch of {train_cfg.batch_size}")
    n_params = rows["softmax"][0]
    tokens = train_cfg.steps * train_cfg.batch_size * model_cfg.block_size
    flops = tokens * (6 * n_params + 12 * model_cfg.n_layer * model_cfg.block_size * model_cfg.n_embd)
    print(f"\n{args.profile}: {train_cfg.steps} steps x {train_cfg.batch_size} x {model_cfg.block_size} tokens, "
          f"{flops:.2g} FLOPs a model (softmax). Estimates, not measured on a GPU:\n")
    print(f"| GPU | memory | precision | micro-batch x accumulation ({' / '.join(ATTENTION_VARIANTS)}) "
          "| minutes a model | minutes for 05's default (4 models) |")
    print("|---|---|---|---|---|---|")
    for name, memory_gb, precision, peak_tflops in GPUS:
        plans = []
        for variant in ATTENTION_VARIANTS:
            n, window, once = rows[variant]
            size = largest_fitting_micro_batch(train_cfg.batch_size, 16 * n + once, window, memory_gb * 1e9)
            plans.append("does not fit" if size is None else f"{size} x {train_cfg.batch_size // size}")
        minutes = flops / (ASSUMED_UTILISATION * peak_tflops * 1e12) / 60
        print(f"| {name} | {memory_gb} GB | {precision} | {' / '.join(plans)} | about {minutes:.0f} (estimate) "
              f"| about {4 * minutes:.0f} (estimate) |")


if __name__ == "__main__":
    main()
