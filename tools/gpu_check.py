"""One command for a person with a GPU: does the series fit and how fast does it train here?

For each attention variant, on the `gpu` profile: the micro-batch probe that training runs first
(training.plan_training), then 50 training steps through training.train, reporting tokens/s
(steps 10 to 50, the device synchronised at both ends), peak memory, and the model FLOP
utilisation (MFU): FLOPs of a step (6 x parameters + 12 x layers x T x n_embd per token, as
nanoGPT and PaLM count them) over the GPU's dense bf16 or fp16 peak, looked up by its name. Then
01-05 with --quick on the same device, each timed. It prints a table and writes a JSON; the table
goes in docs/gpu.md.

On a machine without CUDA it runs the same code at the `tiny` shape on the CPU and says so (the
fast suite runs it that way): the numbers then say nothing about a GPU.

Usage: python tools/gpu_check.py [--steps 50] [--scripts 01,02,03,04,05] [--out out/gpu_check.json]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import ByteData, load_corpus
from model import ATTENTION_VARIANTS, GPT
from training import device_precision, profile_configs, synchronize, train

# Dense peak TFLOP/s in the precision the series trains in (bf16, or fp16 below compute capability
# 8.0), from NVIDIA's data sheets, without sparsity; the first name found in the GPU's name wins.
PEAK_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "A100": 312, "A10G": 70, "A10": 125, "L40S": 362,
               "L4": 121, "RTX 4090": 165, "RTX 3090": 71, "V100": 125, "T4": 65}
SCRIPTS = {"01": "01_variance.py", "02": "02_super_neurons.py", "03": "03_dimension_disparity.py",
           "04": "04_interventions.py", "05": "05_pretrain_headwise.py"}


def peak_tflops(device_name):
    return next((peak for name, peak in PEAK_TFLOPS.items() if name in device_name), None)


def flops_per_token(model):
    c = model.config
    return 6 * sum(p.numel() for p in model.parameters()) + 12 * c.n_layer * c.block_size * c.n_embd


def measure_variant(variant, profile, data, device, steps):
    """Train `steps` steps of a fresh model -> its row: micro-batch, tokens/s, peak memory, MFU."""
    model_cfg, train_cfg = profile_configs(profile, variant)
    train_cfg = replace(train_cfg, steps=steps, eval_interval=steps, eval_windows=train_cfg.batch_size)
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    times = {}

    def clock(step, _model):  # after backward: steps 10..steps-1 are timed, the first ones warm up
        if step in (10, steps - 1):
            synchronize(device)
            times[step] = time.perf_counter()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = train(model, data, train_cfg, desc=f"{profile}/{variant}", after_backward=clock)
    tokens_per_s = (steps - 11) * train_cfg.batch_size * model_cfg.block_size / (times[steps - 1] - times[10])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name)
    return {"variant": variant, "device": name, "precision": device_precision(device),
            "tokens_per_s": tokens_per_s, "final_train_loss": history["train_loss"][-1],
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "mfu": None if peak is None else tokens_per_s * flops_per_token(model) / (peak * 1e12),
            "minutes_per_model": profile_configs(profile, variant)[1].steps * train_cfg.batch_size
                                 * model_cfg.block_size / tokens_per_s / 60}


def run_scripts(keys, device, out_dir):
    """Each script with --quick on the device -> {key: (exit code, seconds)}."""
    results = {}
    for key in keys:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, SCRIPTS[key], "--quick", "--device", device.type, "--out_dir", out_dir],
                              cwd=ROOT, capture_output=True, text=True)
        results[key] = {"exit_code": done.returncode, "seconds": time.perf_counter() - start,
                        "last_line": (done.stdout if done.returncode == 0 else done.stderr).strip().splitlines()[-1:]}
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--scripts", default=",".join(SCRIPTS), help="which of 01-05 to run with --quick ('' for none)")
    parser.add_argument("--out", default=os.path.join("out", "gpu_check.json"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    profile = "gpu" if device.type == "cuda" else "tiny"
    if device.type != "cuda":
        print("no CUDA here: the same code at the tiny shape on the CPU; its numbers say nothing about a GPU")
    model_cfg, train_cfg = profile_configs(profile)
    data = ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)
    rows = [measure_variant(v, profile, data, device, max(args.steps, 12)) for v in ATTENTION_VARIANTS]
    scripts = run_scripts([k for k in args.scripts.split(",") if k], device, os.path.join(os.path.dirname(args.out) or ".", "gpu_check_runs"))

    print(f"\n{rows[0]['device']}, {rows[0]['precision']}, profile {profile}, {args.steps} steps each")
    print("| variant | tokens/s | peak memory (GiB) | MFU | minutes for the profile's steps |")
    print("|---|---|---|---|---|")
    for r in rows:
        memory = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {memory} | {mfu} | {r['minutes_per_model']:.1f} |")
    for key, s in scripts.items():
        print(f"{SCRIPTS[key]} --quick: exit {s['exit_code']}, {s['seconds']:.0f} s")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"profile": profile, "steps": args.steps, "torch": torch.__version__, "variants": rows,
                   "scripts": scripts}, f, indent=1)
    return rows, scripts


if __name__ == "__main__":
    main()
