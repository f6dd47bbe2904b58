"""04's peak host memory, measured on the CPU on an untrained model of the gpu profile's shape, where a Colab VM has 12.7 GB.

04's steps on 64 windows of 512 tokens (6 layers, 6 heads: one layer's attention pattern is
64 x 6 x 512 x 512 floats, 0.4 GB), each step as main() runs it: the super neuron, the mask
intervention (the baseline and the masked pass), the authors' mean value vectors over 50,000
random tokens, one pass of the main reading with its probes and one of the authors' reading.
Nothing is trained. The peak is the process's maximum resident set size (ru_maxrss), printed
after each step; it must stay within LIMIT_GB.

Usage: python tools/memory_04.py [--windows 64]   (minutes on 2 CPU cores)
Not a test: pytest does not collect it. Its numbers go in README.
"""
import argparse
import importlib.util
import math
import os
import resource
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import random_token_windows
from model import GPT, GPTConfig
from training import PROFILES

LIMIT_GB = 4.0


def load_04():
    """04_interventions.py as a module (its name starts with a digit, so `import` can't)."""
    spec = importlib.util.spec_from_file_location("interventions", os.path.join(ROOT, "04_interventions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_gb():
    """The process's maximum resident set size so far (Linux: ru_maxrss in KiB), in GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--windows", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    interventions = load_04()
    model = GPT(GPTConfig(**PROFILES["gpu"]["model"])).eval()  # untrained: only the shapes matter here
    T, n_layer, k = model.config.block_size, model.config.n_layer, 10
    x = torch.randint(256, (args.windows, T))  # (N, T)
    x_random = random_token_windows(math.ceil(interventions.RANDOM_TOKENS / T), T, False, torch.Generator().manual_seed(1))
    start = time.time()

    def step(name, run):
        result = run()
        print(f"{name:<40} peak so far {peak_gb():.2f} GB ({time.time() - start:.0f} s)", flush=True)
        return result

    print(f"gpu profile's shape, untrained: {n_layer} layers, {args.windows} windows of {T} tokens; "
          f"before any pass: {peak_gb():.2f} GB")
    neuron = step("super neuron", lambda: interventions.find_super_neuron(model, x))
    baseline, _, chain = step("mask intervention (2 passes)", lambda: interventions.mask_intervention(model, x, k, 0))
    observe, _ = interventions.observe_layer([s["to_token0"] for s in baseline])
    means = step(f"mean values, layers below {observe}", lambda: interventions.value_means(model, x_random, range(observe)))
    probes = {f"blocks.{neuron['layer']}.mlp.hook_hidden": lambda hidden: float(hidden[:, k, neuron["unit"]].mean()),
              f"blocks.{n_layer - 1}.hook_resid_in": lambda resid: interventions.residual_at_k(resid, k)}
    step("main reading, one λ", lambda: interventions.amplified_pass(
        model, x, k, interventions.amplified, 32, list(range(chain["layer"] + 1)), list(range(1, n_layer)), "windows",
        probes))
    step("authors' reading, one λ", lambda: interventions.amplified_pass(
        model, x, k, interventions.amplified, 30, list(range(observe)), [observe], means))
    verdict = "within" if peak_gb() <= LIMIT_GB else "OVER"
    print(f"04's peak host memory: {peak_gb():.2f} GB, {verdict} the limit of {LIMIT_GB:g} GB")
    sys.exit(0 if verdict == "within" else 1)


if __name__ == "__main__":
    main()
