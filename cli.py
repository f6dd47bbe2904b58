"""
The command line shared by the numbered scripts: the common options, the studied model (trained
here and cached, or pretrained), printing tables, writing metrics and figures, and bad input as
one `error:` line with exit code 2.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only, no window: every script imports this module before pyplot
import matplotlib.pyplot as plt
import numpy as np
import torch

from data import ByteData, held_out_tokens, load_corpus
from model import GPT, InputError
from pretrained import load_pretrained, smollm2_path
from measures import LINKS, PAPER_ORDER, chain_links, crossings, paper_order
from training import DEFAULT_SNAPSHOTS, PROFILES, device_precision, profile_configs, trained_model, trained_snapshots


N_WINDOWS = 64  # held-out windows that every script measures on (PRETRAINED_N_WINDOWS for a pretrained model)
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
    parser.add_argument("--micro_batch", type=int, default=None,
                        help="windows per forward and backward pass when a model trains, the gradients accumulated "
                             "over the profile's batch (the same training within float tolerance); default: the "
                             "largest that fits on CUDA, found before training; elsewhere the whole batch")
    parser.add_argument("--no_compile", action="store_true",
                        help="train without torch.compile (by default it compiles on CUDA, and on the CPU for runs of 10M tokens "
                             "or more: the cpu and cpu_bos profiles)")
    parser.add_argument("--snapshots", type=int, default=DEFAULT_SNAPSHOTS,
                        help=f"models kept along a training, step 0 and log-spaced steps to the last, each measured "
                             f"link by link (default {DEFAULT_SNAPSHOTS}; 0: none)")
    if pretrained:
        parser.add_argument("--model", default="trained",
                            help="trained (the profile's model, trained here and cached; default), smollm2-135m, or "
                                 "the path of a Llama-architecture .gguf file or Hugging Face folder")
    return parser


@dataclass
class Run:
    """What setup resolved from the command line: the studied subject, where it runs, where results go."""
    argv: list  # the command line as given
    script: str  # e.g. "01_variance"
    device: torch.device
    seed: int
    model: str  # "trained", or the pretrained model's name or path (--model)
    profile: str  # the trained model's profile (with a pretrained model: unused)
    subject: str  # how results name the studied model: "cpu model", "smollm2-135m"
    dataset: object  # ByteData for a trained model, the held-out token windows for a pretrained one
    folder: str  # where metrics.json and the figures go
    out_dir: str  # --out_dir: the checkpoint cache lives in out_dir/checkpoints
    micro_batch: int | None  # --micro_batch
    compile: bool | None  # None: training's default (training.compiles); False: --no_compile
    snapshots: int  # --snapshots: models kept along a training (training.snapshot_steps)
    pretrained: GPT | None = None  # the pretrained model, loaded once by setup

    def path(self, name):
        """A file of this run's folder."""
        return os.path.join(self.folder, name)

    def record(self):
        """What metrics.json says about the run that made it."""
        if self.pretrained is None:
            subject = {"profile": self.profile}
            precision = device_precision(self.device)
        else:
            path = smollm2_path() if self.model == "smollm2-135m" else self.model
            files = [os.path.join(root, f) for root, _, names in os.walk(path) for f in names] if os.path.isdir(path) else [path]
            subject = {"pretrained": os.path.basename(os.path.normpath(path)), "bytes": sum(map(os.path.getsize, files))}
            precision = str(next(self.pretrained.parameters()).dtype).removeprefix("torch.")
        return {"argv": self.argv, "script": self.script, "seed": self.seed, "subject": self.subject, **subject,
                "device": str(self.device), "precision": precision, "torch": str(torch.__version__),
                "commit": git_commit()}


def git_commit():
    """The repository's commit (with "+changes" when files differ from it), or None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                 capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+changes" if changed.stdout.strip() else "")


def setup(args, script_file, cpu_profile="cpu", torchrun=False, argv=None):
    """Resolve the common options into a Run: device, profile, data, output folder; seeds torch.
    The default profile is gpu on CUDA, else cpu_profile. torchrun: the script trains under torchrun
    (05); the others stop there, before any model loads, rather than run once per process.
    argv: the command line main() was given (default: sys.argv's), kept in metrics.json."""
    processes = int(os.environ.get("WORLD_SIZE", 1))
    script = os.path.splitext(os.path.basename(script_file))[0]
    if processes > 1 and not torchrun:
        raise InputError(f"{script}.py runs in one process, not under torchrun ({processes} processes here): of the "
                         f"scripts, only 05_pretrain_headwise.py trains under torchrun; run python {script}.py alone")
    device = pick_device(args.device)
    model = getattr(args, "model", "trained")
    if model != "trained" and (args.quick or args.profile is not None):
        raise InputError("--quick and --profile choose the model we train; they cannot be combined with --model")
    if args.quick and args.profile not in (None, "tiny"):
        raise InputError(f"--quick is the tiny profile; it cannot be combined with --profile {args.profile}")
    profile = "tiny" if args.quick else args.profile or ("gpu" if device.type == "cuda" else cpu_profile)
    model_cfg, train_cfg = profile_configs(profile)
    folder, pretrained = os.path.join(args.out_dir, script), None
    if model == "trained":
        name = train_cfg.corpus if args.data is None else os.path.basename(args.data)
        dataset = ByteData(load_corpus(args.data, train_cfg.corpus), model_cfg.block_size, name)
        subject = f"{profile} model"
    else:  # a pretrained model: loaded once here, its held-out windows in its own tokens
        pretrained, tokenizer = load_pretrained(model, device)
        window = min(PRETRAINED_WINDOW, pretrained.config.block_size)
        dataset = held_out_tokens(tokenizer, window, None if args.data is None else load_corpus(args.data))
        subject = os.path.basename(os.path.normpath(model)).removesuffix(".gguf")
        folder = os.path.join(folder, subject)
    if args.snapshots < 0:
        raise InputError(f"--snapshots {args.snapshots}: give 0 (none) or more")
    make_folder(folder, args.out_dir)
    torch.manual_seed(args.seed)
    return Run(argv=list(sys.argv[1:] if argv is None else argv), script=script, device=device, seed=args.seed,
               model=model, profile=profile, subject=subject, dataset=dataset, folder=folder, out_dir=args.out_dir,
               micro_batch=args.micro_batch, compile=False if args.no_compile else None, snapshots=args.snapshots,
               pretrained=pretrained)


def make_folder(folder, out_dir):
    """Create the folder and check that it can be written to: fail now, not after minutes of training."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"cannot write to --out_dir {out_dir}: {e.strerror}") from None


def studied_model(run, n_windows, seed_offset=0):
    """The model a script studies (eval mode) and n_windows of its held-out windows on the device:
    (model, x (n_windows, T), bos). The trained model comes from the cache, or is trained now."""
    if run.pretrained is None:
        model, _ = trained_model(run.profile, "softmax", run.seed, run.dataset, run.device, run.out_dir,
                                 micro_batch=run.micro_batch, compile=run.compile, snapshots=run.snapshots)
        bos = profile_configs(run.profile)[1].bos
    else:
        model, bos, n_windows = run.pretrained, False, min(n_windows, PRETRAINED_N_WINDOWS)
    x, _ = run.dataset.windows("val", n_windows, bos, torch.Generator().manual_seed(run.seed + seed_offset))
    return model.eval(), x.to(run.device), bos


def layer_ticks(layers):
    """At most about 15 layer numbers on a plot's axis (SmolLM2 has 30 layers)."""
    return layers[::max(1, len(layers) // 15)]


def save_figure(fig, path):
    """Lay out, write as a PNG and close the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_head_entropy(names, entropy, variance, uniform_entropy, title, path):
    """Fig. 13: heads (named by `names`) sorted by attention entropy (bars), their output variance beside them."""
    entropy, variance = np.asarray(entropy), np.asarray(variance)  # (heads,) each
    order = np.argsort(entropy)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(order)), 4))
    ax.bar(range(len(order)), entropy[order], color="tab:blue", alpha=0.7)
    ax.axhline(uniform_entropy, color="tab:blue", linestyle=":", label="uniform causal attention")
    ax.set(xlabel="head, sorted by entropy", ylabel="attention entropy (nats)", title=title)
    ax.set_xticks(range(len(order)), [names[j] for j in order], rotation=90)
    ax.legend(loc="lower right", fontsize=8)
    twin = ax.twinx()
    twin.plot(range(len(order)), variance[order], "o-", color="tab:red")
    twin.set(yscale="log")
    twin.set_ylabel("head output variance", color="tab:red")
    save_figure(fig, path)


# ----------------------------------------------------------------------------- the chain as it grows (01, 05)

def emergence(run, arm, seed, x, bos, steps=None):
    """Every link of the chain (measures.chain_links) at each snapshot that training kept of this model, on the
    held-out windows x (N, T) -> ({"snapshots": [{"step", "tokens", **links}], "crossings": the step each link
    formed at, "order": measures.paper_order's}, what keeping and measuring the snapshots took: cost_text's).
    The cost is kept apart: metrics.json holds only what the same seed measures again."""
    began, series = time.time(), []
    snapshots, history = trained_snapshots(run.profile, arm, seed, run.dataset, run.device, run.out_dir, steps,
                                           run.compile, run.snapshots)
    for snapshot in snapshots:
        series.append({"step": snapshot["step"], "tokens": snapshot["tokens"],
                       **chain_links(snapshot["model"].eval(), x, bos)})
    crossed = crossings(series)
    formed, never, in_order = paper_order(crossed)
    measured = time.time() - began
    return ({"snapshots": series, "crossings": crossed,
             "order": {"formed": formed, "never_formed": never, "paper_order": in_order}},
            {"save_s": history.get("snapshot_seconds"), "measure_s": measured, "train_s": history.get("seconds")})


def cost_text(costs):
    """The snapshots' cost over several trainings, as a share of their training time."""
    costs = [c for c in costs if c["train_s"] is not None]  # None: trained before snapshots were timed
    if not costs:
        return "the snapshots' cost is unknown (the models were trained before it was timed)"
    save, measure = sum(c["save_s"] for c in costs), sum(c["measure_s"] for c in costs)
    train = sum(c["train_s"] for c in costs)
    return (f"keeping the snapshots took {save:.1f} s during training and measuring them {measure:.1f} s, "
            f"{(save + measure) / train:.1%} of the {train / 60:.1f} min of training")


LINK_COLUMNS = {"variance_ratio": "var 0", "norm_ratio": "norm 0", "token0_unit_ratio": "unit", "token0_unit_z": "unit z",
                "massive_ratio": "massive", "dominance_ratio": "dominance", "direction_cosine": "cosine",
                "sink_rate": "sink rate", "mask_attention_gain": "mask: attn", "mask_unit_gain": "mask: unit"}


def print_link_bars():
    """What each column of the emergence table is, and its bar with the bar's source."""
    print("\nThe chain's links (measures.LINKS), each formed at its bar:")
    for name, link in LINKS.items():
        print(f"  {LINK_COLUMNS[name]:>10}  {link['label']}; bar {link['bar']:g} ({link['source']})"
              + (f"; the paper's step: {link['step']}" if link["step"] else ""))


def print_emergence_table(name, result):
    """One model's chain at each snapshot; * marks a link from the snapshot where it first formed on."""
    crossed = result["crossings"]
    print(f"\n{name}: the chain at each snapshot (* formed)")
    print_table([[s["step"], f"{s['tokens']:,}"] + ["-" if s[n] is None else f"{s[n]:.3g}" + (
                  "*" if crossed[n] is not None and s["step"] >= crossed[n] else "") for n in LINKS]
                 for s in result["snapshots"]], ["step", "tokens"] + [LINK_COLUMNS[n] for n in LINKS])


def order_text(name, result):
    """The step at which each link formed, and whether the paper's four steps came in the paper's order."""
    crossed, order = result["crossings"], result["order"]
    steps = {LINKS[n]["step"]: crossed[n] for n in LINKS if LINKS[n]["step"]}
    formed = ", ".join(f"{LINK_COLUMNS[n]} at {crossed[n]}" for n in sorted(
        (n for n in LINKS if crossed[n] is not None), key=lambda n: crossed[n])) or "none"
    verdict = ("the paper's order" if order["paper_order"] else "not the paper's order" if not order["never_formed"]
               else "incomplete")
    return (f"{name}: formed (step): {formed}. The paper's {' -> '.join(PAPER_ORDER)}: here "
            + (" -> ".join(f"{s} ({steps[s]})" for s in order["formed"]) or "none")
            + (f", never {', '.join(order['never_formed'])}" if order["never_formed"] else "") + f" -> {verdict}")


def plot_emergence(results, colors, title, path):
    """fig_emergence: one panel per link, training tokens on a log axis (step 0 at 0), one line per model
    (results: {label: [emergence's result, one per seed]}; colors: {label: color}), each link's bar dashed."""
    fig, axes = plt.subplots(2, (len(LINKS) + 1) // 2, figsize=(4 * ((len(LINKS) + 1) // 2), 7.5))
    after_init = [s["tokens"] for by_seed in results.values() for r in by_seed for s in r["snapshots"] if s["tokens"] > 0]
    first = min(after_init, default=1)  # the log axis is linear up to the first snapshot after step 0
    for ax, (name, link) in zip(axes.flat, LINKS.items()):
        for label, by_seed in results.items():
            for j, result in enumerate(by_seed):
                tokens = [s["tokens"] for s in result["snapshots"]]
                values = [np.nan if s[name] is None else s[name] for s in result["snapshots"]]
                ax.plot(tokens, values, "o-", markersize=3, color=colors[label], alpha=0.7,
                        label=f"{label} ({len(by_seed)} seed{'s' * (len(by_seed) > 1)})" if j == 0 else None)
        ax.axhline(link["bar"], color="gray", linestyle="--", linewidth=1, label="the link's bar (formed at or above)")
        ax.set_xscale("symlog", linthresh=first)
        ax.set_xlim(left=0)
        if name in ("variance_ratio", "norm_ratio", "token0_unit_ratio", "massive_ratio", "dominance_ratio",
                    "mask_attention_gain", "mask_unit_gain"):
            ax.set_yscale("log")
        ax.set_title(f"{link['label']}\nbar {link['bar']:g} ({link['source']})", fontsize=7)
        ax.set_xlabel("training tokens (log; step 0 at 0)", fontsize=8)
    for ax in list(axes.flat)[len(LINKS):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def write_metrics(metrics, run):
    """metrics.json in the run's folder, its first entry `run`: what made it (Run.record)."""
    metrics = {"run": run.record(), **metrics}
    with open(run.path("metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


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
