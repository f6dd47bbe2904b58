"""04's peak host memory, measured on the CPU on an untrained model of the gpu profile's shape, where a Colab VM has 12.7 GB.

04 runs as a person runs it, `python 04_interventions.py --profile gpu` (on the CPU, its own process):
its corpus, 64 held-out windows of 512 tokens (6 layers, 6 heads: one layer's attention pattern is
64 x 6 x 512 x 512 floats, 0.4 GB) and every step of its main(). Only the model differs: this tool
puts an untrained model of the profile's shape in the checkpoint cache of a temporary --out_dir,
where 04 finds it as the trained model, for only the shapes matter here. The peak is the maximum
resident set size (ru_maxrss) of 04's process; it must stay within LIMIT_GB.

Usage: python tools/memory_04.py [--profile gpu]   (minutes on 2 CPU cores; --profile tiny: seconds)
Not a test: pytest does not collect it. Its numbers go in docs/gpu.md.
"""
import argparse
import os
import resource
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data import ByteData, load_corpus  # noqa: E402
from model import GPT  # noqa: E402
from training import checkpoint_path, profile_configs, save_checkpoint  # noqa: E402

LIMIT_GB = 4.0


def cache_untrained_model(profile, out_dir):
    """Save a freshly initialised model of the profile where 04 looks for its trained model: the cache of
    out_dir, for the profile's own corpus, seed 0, the CPU and no torch.compile (04's --no_compile)."""
    model_cfg, train_cfg = profile_configs(profile)
    data = ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)  # as cli.setup has it
    path, expect = checkpoint_path(profile, "softmax", 0, data, "cpu", out_dir, compile=False)
    torch.manual_seed(0)
    save_checkpoint(path, GPT(model_cfg), train_cfg, {}, data.fingerprint, expect["environment"])
    return model_cfg


def children_peak_gb():
    """The largest maximum resident set size of the processes this one has waited for (Linux: KiB), in GB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--profile", default="gpu", help="the model's shape (tiny: a first check in seconds)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out_dir:
        model_cfg = cache_untrained_model(args.profile, out_dir)
        print(f"{args.profile} profile's shape, untrained: {model_cfg.n_layer} layers, windows of "
              f"{model_cfg.block_size} tokens; 04 runs now", flush=True)
        done = subprocess.run([sys.executable, "04_interventions.py", "--profile", args.profile, "--device", "cpu",
                               "--no_compile", "--out_dir", out_dir], cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"04_interventions.py failed (exit code {done.returncode}): no peak to report")
    verdict = "within" if children_peak_gb() <= LIMIT_GB else "OVER"
    print(f"04's peak host memory: {children_peak_gb():.2f} GB, {verdict} the limit of {LIMIT_GB:g} GB")
    sys.exit(0 if verdict == "within" else 1)


if __name__ == "__main__":
    main()
