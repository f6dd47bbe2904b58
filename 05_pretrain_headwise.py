"""
05 - The fix: pretrain with head-wise RMSNorm, sigmoid and gated attention (paper §5; Fig. 2, 13, 14, 15, 16, 23).

Claim. Token 0 becomes a sink because its aggregation output o_{0,h} = v_0 has a larger
variance than the averages o_{t,h} of later tokens (01), which the FFN turns into dimension
disparity (02, 03). Normalise each head's output right after value aggregation,
o_{t,h} <- g_h * o_{t,h} / RMS(o_{t,h}) before W_O ("head-wise RMSNorm"), and the
discrepancy, across positions and across heads (Fig. 13: low-entropy heads give
high-variance outputs), is gone before W_O sees it. Trained this way, a model has no sink
(Fig. 2), no token-0 dominance ratio spike (Fig. 14), a higher effective rank (Fig. 15),
and its validation loss falls faster, over several seeds (Fig. 16). Sigmoid attention (no
sum-to-one constraint) and gated attention (o_{t,h} * sigmoid(W_g x_t), Fig. 23) are the
comparisons.

What this script does. It trains the four variants of model.py with the profile's recipe
(on the CPU by default `cpu_bos`: the series' own cpu recipe grows no full sink without a BOS
token, so 05 takes the recipe with a BOS token whose layer-0 sink a fix can remove; README),
the same token budget and the same data order, for each of --seeds seeds (seed --seed,
--seed + 1, ...). The checkpoint cache keeps every
run, so a second call only analyses. It prints the expected training time first: the time
of 3 training steps measured here, times the profile's steps (an estimate; validation and
progress bars add a little). Then, on 64 held-out windows, per variant (mean over seeds):
  - validation loss every eval_interval steps, mean and min-max band over seeds (Fig. 16);
    the final loss, and the first evaluated step at which the variant's mean curve reaches
    the baseline's mean final loss (resolution: eval_interval steps);
  - mean attention to token 0 per layer, over heads and queries t >= 1 (Fig. 2); sigmoid
    rows are first divided by their sum of |A| (Gu et al.'s convention);
  - token 0's dominance ratio max|x_i| / mean|x_i| after each block's RMSNorm, gain included,
    as the paper measures it (Fig. 14), and the effective rank of each window's (T, C) hidden
    states (Fig. 15), per residual stream: entering block i, and for i = n_layer the stream
    leaving the last block;
  - the variance at each position of layer 0's aggregation output, across the head
    dimensions within one token (Fig. 23; the paper's "Layer 1", counting from 1), measured
    on the value aggregation itself (hook_head_out), before the head-wise norm or the gate.
    After the head-wise norm (hook_head_out_post, plotted beside it) every head vector has
    RMS 1 times its gain, so that curve is flat by construction and shows only the gains:
    it cannot tell whether the model still aggregates into a discrepancy; the left panel can.
    (Why within a token and not per dimension across sequences: Exercise 2.)
  - for the baseline (seed --seed): each head's attention entropy and the variance of its
    output, heads sorted by entropy (Fig. 13), with their Spearman rank correlation.
At our scale the baseline may have no sink to remove: the script prints the numbers and
says whether each of the paper's claims holds here.

Run:  python 05_pretrain_headwise.py [--quick] [--variants softmax,headwise] [--seeds 3]
      (figures and metrics.json in out/05_pretrain_headwise/; checkpoints in out/checkpoints/)

Exercises (cpu_bos profile; a new training takes 6 to 10 minutes on 2 cores, analysis seconds)
  1. Reading, then changing code. `steps_to_reach` only looks at evaluated steps, so
     `steps_to_baseline_loss` moves in jumps of eval_interval (500). Predict how far off it
     can be, then make `steps_to_reach` interpolate linearly between the two evaluations
     around the crossing (return a float). Watch `steps_to_baseline_loss`.
  2. Predicting. In `analyse`, `var_by_position` uses the second reading of
     `variance_by_position` (within one token). Predict entry 0 of the first reading (across
     sequences) for every variant, switch both `variance_by_position(...)[1]` to `[0]`, run,
     and check `var_by_position`.
  3. Changing code. Make head-wise RMSNorm a head-wise LayerNorm: in
     `CausalSelfAttention.forward` (model.py) subtract each head vector's mean over its
     head_dim before `rms_normalize`. The cache keys on configs, not code, so run in a fresh
     folder that holds only the baseline:
       mkdir -p out_ln/checkpoints && cp out/checkpoints/cpu_bos-softmax-seed0-*.pt out_ln/checkpoints/
       python 05_pretrain_headwise.py --variants softmax,headwise --out_dir out_ln
     Compare `val_loss_final["headwise"]` and `first_token_attention_by_layer` with out/.
  4. Changing code. A first trial without a sink (1500 steps) found head-wise 0.09 nats
     worse than softmax and suspected the gain's initial value: with g_h = 1 the normalised
     head output starts far larger than the baseline's. Measure the RMS of a fresh softmax
     model's blocks.0.attn.hook_head_out, initialise `head_norm_gain` (model.py) at that
     value, and rerun as in 3 (--out_dir out_gain). Does the gap in `val_loss_final` between
     headwise and softmax close?
  5. Predicting. Gu et al. find that a larger weight decay makes sinks stronger. Add
     weight_decay=0.5 to PROFILES["cpu_bos"]["train"] (model.py; a new config retrains by itself)
     and run `--variants softmax` (then weight_decay=0.0, if you have another 10 minutes).
     Predict, then compare with the default 0.1, the maxima of
     `first_token_attention_by_layer["softmax"]` and `dominance_ratio_token0_by_layer["softmax"]`.
Checks for 1-4: `python -m pytest -m exercises tests/`.
"""
import matplotlib

matplotlib.use("Agg")
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from cli import print_table, run_script, script_parser, setup, write_metrics
from measures import dominance_ratio, effective_rank, first_token_attention, variance_by_position
from model import ATTENTION_VARIANTS, GPT, InputError
from training import autocast, checkpoint_path, profile_configs, trained_model

N_WINDOWS = 64  # held-out windows for every measure
DEFAULT_PROFILE = "cpu_bos"  # on the CPU: the recipe with a BOS sink for the fixes to remove (README, 05)
AGGREGATION_LAYER = 0  # the layer whose aggregation output Fig. 23 shows
LABELS = {"softmax": "baseline (softmax)", "sigmoid": "sigmoid", "headwise": "head-wise RMSNorm", "gated": "gated"}
COLORS = {"softmax": "tab:red", "sigmoid": "tab:green", "headwise": "tab:blue", "gated": "tab:purple"}


# ----------------------------------------------------------------------------- measures

def attention_entropy_by_head(pattern):
    """(B, H, T, T) softmax attention -> (H,): mean entropy (nats) of the rows of queries t >= 1."""
    rows = pattern[:, :, 1:]  # (B, H, T-1, T); row 0 has one key, entropy 0
    return -(rows * rows.clamp_min(1e-30).log()).sum(-1).mean(dim=(0, 2))


def head_output_variance(head_out):
    """(B, H, T, hd) head outputs -> (H,): variance over the head dimensions, mean over windows and positions."""
    return head_out.var(dim=-1).mean(dim=(0, 2))


def rank_correlation(a, b):
    """Spearman's rho: the Pearson correlation of the ranks (float measures have no ties)."""
    ranks_a, ranks_b = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def steps_to_reach(steps, losses, target):
    """The first evaluated step whose loss is at most target; None if the curve never gets there."""
    return next((step for step, loss in zip(steps, losses) if loss <= target), None)


def analyse(model, x):
    """One forward pass over the windows x (N, T) -> this model's measures, as lists of floats."""
    n_layer = model.config.n_layer
    with torch.no_grad(), model.hooks(record=["blocks.*.attn.hook_pattern", "blocks.*.attn.hook_head_out*",
                                              "blocks.*.hook_resid_in", "blocks.*.hook_attn_in", "hook_resid_final"]) as cache:
        model(x)
    resid = [cache[f"blocks.{i}.hook_resid_in"] for i in range(n_layer)] + [cache["hook_resid_final"]]  # (N, T, C) each
    normalised = [cache[f"blocks.{i}.hook_attn_in"] for i in range(n_layer)]  # after each block's RMSNorm, gain included
    patterns = [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(n_layer)]  # (N, H, T, T) each
    head_outs = [cache[f"blocks.{i}.attn.hook_head_out"] for i in range(n_layer)]  # (N, H, T, hd) each
    to_output_projection = cache[f"blocks.{AGGREGATION_LAYER}.attn.hook_head_out_post"]  # (N, H, T, hd): what W_O gets
    return {
        "first_token_attention": [float(first_token_attention(p).mean()) for p in patterns],
        "dominance_ratio_token0": [float(dominance_ratio(r[:, 0]).mean()) for r in normalised],  # as the paper
        "effective_rank": [float(np.mean([effective_rank(window) for window in r])) for r in resid],
        # within one token; before the head-wise norm or gate, since after it the head-wise curve is flat by construction
        "var_by_position": variance_by_position(head_outs[AGGREGATION_LAYER])[1].tolist(),
        "var_by_position_after_norm": variance_by_position(to_output_projection)[1].tolist(),
        "head_entropy": [attention_entropy_by_head(p).tolist() for p in patterns],
        "head_output_variance": [head_output_variance(h).tolist() for h in head_outs],
    }


def mean_over_seeds(per_seed):
    """A list (over seeds) of equally long lists -> their elementwise mean, as a list."""
    return np.mean(per_seed, axis=0).tolist()


# ----------------------------------------------------------------------------- the time it will take

def is_cached(profile, attn, seed, data, device, out_dir):
    """This very run (its configs, data and environment) is in the cache; an older recipe's file is not."""
    return os.path.exists(checkpoint_path(profile, attn, seed, data, device, out_dir)[0])


def seconds_per_step(attn, profile, data, device, n_steps=3):
    """Time n_steps training steps of a fresh model after one untimed warm-up step."""
    model_cfg, train_cfg = profile_configs(profile, attn)
    model = GPT(model_cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_cfg.lr)
    x, y = data.windows("train", train_cfg.batch_size, train_cfg.bos, torch.Generator().manual_seed(0))
    x, y = x.to(device), y.to(device)
    for step in range(n_steps + 1):
        if step == 1:
            start = time.time()
        with autocast(device):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # waits for the GPU
    return (time.time() - start) / n_steps


# ----------------------------------------------------------------------------- figures

def save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_val_loss(val_steps, curves, target, path):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, by_seed in curves.items():
        losses = np.array(list(by_seed.values()))  # (seeds, evaluations)
        ax.plot(val_steps, losses.mean(0), color=COLORS[variant], label=f"{LABELS[variant]} (mean of {len(losses)})")
        ax.fill_between(val_steps, losses.min(0), losses.max(0), color=COLORS[variant], alpha=0.2)
    ax.axhline(target, color="gray", linestyle=":", label="baseline's final loss")
    top = max(np.array(list(c.values()))[:, 1:].max() for c in curves.values())  # leave out step 0 (about ln 257)
    ax.set(ylim=(None, top * 1.02), xlabel="training step", ylabel="validation loss (nats per byte)",
           title="Fig. 16: validation loss, mean and min-max over seeds")
    ax.legend()
    save(fig, path)


def plot_by_layer(values, ylabel, title, path, reference=None, first_label="layer"):
    """One line per variant over layers; reference: (y, label) drawn dotted."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, by_layer in values.items():
        ax.plot(range(len(by_layer)), by_layer, "o-", color=COLORS[variant], label=LABELS[variant])
    if reference is not None:
        ax.axhline(reference[0], color="gray", linestyle=":", label=reference[1])
    ax.set(xlabel=first_label, ylabel=ylabel, title=title, xticks=range(len(next(iter(values.values())))))
    ax.set_ylim(bottom=0)
    ax.legend()
    save(fig, path)


def plot_variance_by_position(after, before, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, values, where in ((axes[0], before, "value aggregation o_t (hook_head_out)"),
                              (axes[1], after, "after head-wise norm / gate: W_O's input (hook_head_out_post)")):
        for variant, by_position in values.items():
            ax.plot(by_position, color=COLORS[variant], label=LABELS[variant])
        ax.set(yscale="log", xlabel="position t", title=where)
    axes[0].set_ylabel(f"variance within a token, layer {AGGREGATION_LAYER}")
    axes[0].legend()
    fig.suptitle("Fig. 23: position-wise variance of the aggregation output")
    save(fig, path)


def plot_head_entropy(entropy, variance, uniform_entropy, path):
    names = [f"L{i}H{h}" for i, layer in enumerate(entropy) for h in range(len(layer))]
    entropy, variance = np.concatenate(entropy), np.concatenate(variance)
    order = np.argsort(entropy)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    ax.bar(range(len(order)), entropy[order], color="tab:blue", alpha=0.7)
    ax.axhline(uniform_entropy, color="tab:blue", linestyle=":", label="uniform causal attention")
    ax.set(xticks=range(len(order)), xlabel="baseline head (layer, head), sorted by entropy",
           ylabel="attention entropy (nats)", title="Fig. 13: head entropy vs output variance (baseline)")
    ax.set_xticklabels([names[j] for j in order], rotation=90)
    ax.legend(loc="upper left")
    twin = ax.twinx()
    twin.plot(range(len(order)), variance[order], "o-", color="tab:red")
    twin.set(yscale="log")
    twin.set_ylabel("head output variance", color="tab:red")
    save(fig, path)


# ----------------------------------------------------------------------------- main

def parse_variants(text):
    variants = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ATTENTION_VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {', '.join(unknown)} in --variants; "
                         f"valid: {', '.join(ATTENTION_VARIANTS)}")
    if "softmax" not in variants:
        raise InputError("--variants must include softmax: the baseline every comparison is made against")
    return [v for v in ATTENTION_VARIANTS if v in variants]  # the usual order, each once


def mean_std_text(values):
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def print_claims(metrics, variants):
    """One line per claim of the paper: the numbers, and whether the claim holds here."""
    final, attention = metrics["val_loss_final"], metrics["first_token_attention_by_layer"]
    dominance, rank = metrics["dominance_ratio_token0_by_layer"], metrics["effective_rank_by_layer"]
    print("\nThe paper's claims at this scale:")
    sink = max(attention["softmax"])
    print(f"  baseline: max attention to token 0 {sink:.3f} "
          + ("(a sink: over 0.3)" if sink > 0.3 else "(no sink: never over 0.3), so the fix has no sink to remove"))
    if "headwise" in variants:
        wins = sum(h < b for h, b in zip(final["headwise"], final["softmax"]))
        print(f"  head-wise final val loss {np.mean(final['headwise']):.3f} vs baseline "
              f"{np.mean(final['softmax']):.3f}: lower in {wins} of {len(final['softmax'])} seed(s) -> "
              + ("holds" if 2 * wins > len(final["softmax"]) else "does not hold") + " here")
        lower_dominance = max(dominance["headwise"]) < max(dominance["softmax"])
        higher_rank = min(rank["headwise"]) > min(rank["softmax"])
        print(f"  head-wise max dominance {max(dominance['headwise']):.2f} vs baseline "
              f"{max(dominance['softmax']):.2f}, min effective rank {min(rank['headwise']):.1f} vs "
              f"{min(rank['softmax']):.1f} -> "
              + ("holds" if lower_dominance and higher_rank else "does not hold") + " here")
    for v in (v for v in ("headwise", "sigmoid") if v in variants):
        print(f"  {LABELS[v]}: attention to token 0 <= 0.1 in every layer: "
              f"{'yes' if max(attention[v]) <= 0.1 else 'no'} (max {max(attention[v]):.3f})")
    print(f"  Fig. 13, baseline heads: Spearman rank correlation of entropy and output variance "
          f"{metrics['head_entropy_variance_spearman']:+.2f} (paper: negative, low entropy gives high variance)")


def main(argv=None) -> dict:
    parser = script_parser(__doc__, cpu_profile=DEFAULT_PROFILE, pretrained=False)
    parser.add_argument("--variants", default=",".join(ATTENTION_VARIANTS),
                        help=f"comma-separated, softmax included (default: {','.join(ATTENTION_VARIANTS)})")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per variant (default: 3 on the gpu profile, else 1)")
    args = parser.parse_args(argv)
    variants = parse_variants(args.variants)
    if args.seeds is not None and args.seeds < 1:
        raise InputError(f"--seeds {args.seeds}: train at least one seed")
    args = setup(args, __file__, cpu_profile=DEFAULT_PROFILE)
    seeds = [args.seed + i for i in range(args.seeds or (3 if args.profile == "gpu" else 1))]
    model_cfg, train_cfg = profile_configs(args.profile)

    to_train = [(v, s) for v in variants for s in seeds if not is_cached(args.profile, v, s, args.dataset, args.device, args.out_dir)]
    step_time = {v: seconds_per_step(v, args.profile, args.dataset, args.device) for v in {v for v, _ in to_train}}
    expected = sum(step_time[v] * train_cfg.steps for v, _ in to_train)
    print(f"{len(variants) * len(seeds)} runs ({args.profile} profile, {train_cfg.steps} steps x "
          f"{train_cfg.batch_size} x {model_cfg.block_size} tokens each), {len(to_train)} to train: "
          f"expected time about "
          + (f"{expected / 60:.0f} min" if expected >= 60 else f"{expected:.0f} s")
          + " (3 steps timed here; an estimate)")

    x, _ = args.dataset.windows("val", N_WINDOWS, train_cfg.bos, torch.Generator().manual_seed(args.seed))  # (N, T)
    curves, analyses = {}, {}
    for variant in variants:
        curves[variant], analyses[variant] = {}, []
        for seed in seeds:
            model, history = trained_model(args.profile, variant, seed, args.dataset, args.device, args.out_dir)
            model.eval()
            curves[variant][str(seed)] = history["val_loss"]
            analyses[variant].append(analyse(model, x.to(args.device)))
    val_steps = history["val_step"]  # the same for every run of a profile

    final = {v: [curve[-1] for curve in curves[v].values()] for v in variants}
    target = float(np.mean(final["softmax"]))
    mean_curves = {v: mean_over_seeds(list(curves[v].values())) for v in variants}
    by_variant = {key: {v: mean_over_seeds([a[key] for a in analyses[v]]) for v in variants}
                  for key in ("first_token_attention", "dominance_ratio_token0", "effective_rank",
                              "var_by_position", "var_by_position_after_norm")}
    baseline = analyses["softmax"][0]  # seed --seed: heads of different seeds do not correspond
    entropy_flat = np.concatenate(baseline["head_entropy"])  # (n_layer * n_head,)
    variance_flat = np.concatenate(baseline["head_output_variance"])
    metrics = {
        "n_windows": N_WINDOWS, "profile": args.profile, "variants": variants, "seeds": seeds, "val_steps": val_steps,
        "val_loss_curves": curves,
        "val_loss_final": final,
        "baseline_final_val_loss": target,
        "steps_to_baseline_loss": {v: steps_to_reach(val_steps, mean_curves[v], target) for v in variants},
        "first_token_attention_by_layer": by_variant["first_token_attention"],
        "dominance_ratio_token0_by_layer": by_variant["dominance_ratio_token0"],
        "effective_rank_by_layer": by_variant["effective_rank"],
        "var_by_position": by_variant["var_by_position"],
        "var_by_position_after_norm": by_variant["var_by_position_after_norm"],
        "head_entropy": baseline["head_entropy"],
        "head_output_variance": baseline["head_output_variance"],
        "head_entropy_variance_spearman": rank_correlation(entropy_flat, variance_flat),
    }
    write_metrics(metrics, args.script_dir)

    T = model_cfg.block_size
    uniform_attention = float(np.mean([1 / (t + 1) for t in range(1, T)]))  # key 0's share under uniform attention
    stream = "residual stream entering block i (i = n_layer: leaving the last)"
    path = lambda name: os.path.join(args.script_dir, name)
    plot_val_loss(val_steps, curves, target, path("fig16_val_loss.png"))
    plot_by_layer(metrics["first_token_attention_by_layer"], "mean attention to token 0",
                  "Fig. 2: attention to the first token by layer", path("fig02_first_token_attention.png"),
                  reference=(uniform_attention, "uniform causal attention"))
    plot_by_layer(metrics["dominance_ratio_token0_by_layer"], "token 0's dominance ratio max|x| / mean|x|",
                  "Fig. 14: token 0's dominance ratio after RMSNorm", path("fig14_dominance_ratio.png"),
                  first_label="layer (input of block i, after its RMSNorm)")
    plot_by_layer(metrics["effective_rank_by_layer"], "effective rank of (T, C) hidden states",
                  "Fig. 15: effective rank", path("fig15_effective_rank.png"),
                  reference=(model_cfg.n_embd, f"n_embd = {model_cfg.n_embd}"), first_label=stream)
    plot_variance_by_position(metrics["var_by_position_after_norm"], metrics["var_by_position"],
                              path("fig23_variance_by_position.png"))
    plot_head_entropy(baseline["head_entropy"], baseline["head_output_variance"],
                      float(np.mean([np.log(t + 1) for t in range(1, T)])), path("fig13_head_entropy_variance.png"))

    steps = metrics["steps_to_baseline_loss"]
    print(f"\n{args.profile} profile, {len(seeds)} seed(s) {seeds}, {train_cfg.steps} steps; measures on {N_WINDOWS} "
          f"held-out windows, mean over seeds (uniform attention to token 0: {uniform_attention:.3f})")
    print_table([[LABELS[v], mean_std_text(final[v]), "never" if steps[v] is None else steps[v],
                  max(by_variant["first_token_attention"][v]), max(by_variant["dominance_ratio_token0"][v]),
                  min(by_variant["effective_rank"][v])] for v in variants],
                ["variant", "final val loss", "steps to baseline loss", "max attn to token 0",
                 "max dominance 0", "min eff. rank"])

    print_claims(metrics, variants)
    return metrics


if __name__ == "__main__":
    run_script(main)
