"""
The recipe search of docs/recipe_search.md: train one recipe, and at snapshots along its training
measure every link of the chain (measures.chain_links, the scripts' own measures) on held-out text
windows. One run at a time, alone on the cores, e.g.

    nohup python tools/recipe_search.py L1 '{"n_embd": 128, "n_layer": 4, "block_size": 256}' \
        '{"steps": 30000, "batch_size": 16, "random_prob": 0.0}' > out/search/L1.log 2>&1 &

The first JSON overrides the model of the base recipe, the second its training. The base: no BOS,
half the windows random bytes, a copied span in every window, 3 layers of d 64, T 64, lr 1e-2
constant. Each snapshot appends one JSON line to out/search/<name>.jsonl as training goes (a killed
run keeps what it measured); the end writes out/search/<name>.json (the crossings and the order)
and the model, out/search/<name>.pt. Gu et al. score a head on a window's first 64 tokens: the
links are measured there, and the sink rate by layer also at the full context. Not a test: pytest
does not collect it. `python tools/recipe_search.py --table NAME` prints a run's rows for the docs, the
trend of its sink rate and the order its links formed in; `--plot NAME ...` draws every link of the named
runs against their tokens (assets/search_long_runs.png); `--profile cpu` measures a cached profile's model.
"""
import json
import os
import sys
import time
from dataclasses import asdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import plot_emergence  # noqa: E402
from data import ByteData, load_corpus  # noqa: E402
from measures import LINKS, MASK_UNIT_GAIN, SINK_THRESHOLD, chain_links, crossings, first_token_attention, paper_order, sink_rate  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from training import TrainConfig, profile_configs, snapshot_steps, train, trained_model  # noqa: E402

BASE_MODEL = dict(block_size=64, n_layer=3, n_head=4, n_embd=64)
BASE_TRAIN = dict(steps=8000, batch_size=32, lr=1e-2, warmup_steps=100, schedule="constant", bos=False,
                  repeat_prob=1.0, random_prob=0.5, eval_interval=1000)
SNAPSHOTS = 12  # log-spaced along a long run (training.snapshot_steps), step 0 included
GU_WINDOW = 64  # Gu et al. score each head on the first 64 tokens of a window
MEASURE_WINDOWS = 64  # held-out text windows, drawn by data.py's sampler
# The search's rule for a sink grown without BOS: some layer's Gu et al. sink rate at least their 0.3, and the mask
# intervention moving it to k, k's attention at least 5x its unmasked value (the bar of 04's unit at k).


def grew_a_sink(links):
    """A snapshot's links (measure's) -> whether it has a sink by the search's rule."""
    return max(links["sink_rate_by_layer"]) >= SINK_THRESHOLD and links["mask_attention_gain"] >= MASK_UNIT_GAIN


def measure(model, x, bos=False):
    """Every link on the windows' first GU_WINDOW tokens, the strongest head's mean attention to token 0 per
    layer there, and Gu et al.'s sink rate per layer at the full context of x (N, T)."""
    n_layer = model.config.n_layer
    patterns = [f"blocks.{i}.attn.hook_pattern" for i in range(n_layer)]
    was_training = model.training
    model.eval()
    short = x[:, :GU_WINDOW]
    links = chain_links(model, short, bos)
    _, heads = model.run_with_cache(short, reduce={p: lambda a: first_token_attention(a).tolist() for p in patterns},
                                    last_layer=n_layer - 1)
    _, full = model.run_with_cache(x, reduce={p: lambda a: sink_rate([a])[0][0] for p in patterns},
                                   last_layer=n_layer - 1)
    model.train(was_training)
    return {**links, "strongest_head_attention_to_0_by_layer": [max(heads[p]) for p in patterns],
            "sink_rate_full_context_by_layer": [full[p] for p in patterns]}


def main(name, model_overrides="{}", train_overrides="{}"):
    torch.set_num_threads(2)
    model_cfg = GPTConfig(**{**BASE_MODEL, **json.loads(model_overrides)})
    train_cfg = TrainConfig(**{**BASE_TRAIN, **json.loads(train_overrides)})
    data = ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)
    x, _ = data.windows("val", MEASURE_WINDOWS, train_cfg.bos, torch.Generator().manual_seed(0))  # text only
    os.makedirs("out/search", exist_ok=True)
    lines_path, start = f"out/search/{name}.jsonl", time.time()
    open(lines_path, "w").close()
    series = []

    def snapshot(step, model, history):
        line = {"step": step, "tokens": step * train_cfg.batch_size * model_cfg.block_size,
                "minutes": (time.time() - start) / 60,
                "val_loss": history["val_loss"][-1] if history["val_loss"] else None, **measure(model, x, train_cfg.bos)}
        series.append(line)
        with open(lines_path, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"\n{name} step {step}: sink rate (first {GU_WINDOW}) {line['sink_rate_by_layer']}, full context "
              f"{line['sink_rate_full_context_by_layer']}, strongest head {line['strongest_head_attention_to_0_by_layer']}",
              flush=True)

    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg)
    history = train(model, data, train_cfg, desc=name, snapshot=snapshot,
                    snapshot_at=snapshot_steps(train_cfg.steps, SNAPSHOTS))
    crossed = crossings(series)
    formed, never, in_order = paper_order(crossed)
    result = {"name": name, "model": asdict(model_cfg), "train": asdict(train_cfg), "minutes": history["seconds"] / 60,
              "snapshot_minutes": history["snapshot_seconds"] / 60, "tokens": train_cfg.steps * train_cfg.batch_size *
              model_cfg.block_size, "val_loss": history["val_loss"][-1], "crossings": crossed,
              "order": {"formed": formed, "never": never, "paper_order": in_order}, "end": series[-1]}
    torch.save({"model_config": asdict(model_cfg), "state_dict": model.state_dict()}, f"out/search/{name}.pt")
    with open(f"out/search/{name}.json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("name", "minutes", "tokens", "val_loss", "crossings", "order")}))


def tokens_to_reach(tokens, rates, target=SINK_THRESHOLD, last=4):
    """A rising rate's trend: the line through the last `last` snapshots of rate against log10(tokens) ->
    (rise per decade of tokens, the tokens at which the line reaches target, or None if it does not rise)."""
    slope, intercept = np.polyfit(np.log10(tokens[-last:]), rates[-last:], 1)
    return float(slope), (float(10 ** ((target - intercept) / slope)) if slope > 0 else None)


def recipe_text(model, train):
    """A run's model and training (its .json's) -> the recipe in words, as docs/recipe_search.md gives it."""
    return (f"{model['n_layer']}L d{model['n_embd']} {model['n_head']}h, T {model['block_size']}, batch "
            f"{train['batch_size']}, {train['random_prob']:.0%} random windows, lr {train['lr']:g} {train['schedule']}, "
            f"decay {train['weight_decay']:g}")


def link_text(value, step, tokens_at):
    """A link's value at the end, and the tokens at which it first passed its bar (crossings' step)."""
    value = "-" if value is None else f"{value:.2f}"
    return f"{value} ({'never' if step is None else f'{tokens_at[step] / 1e6:.3g}M'})"


def snapshots(name):
    """A run's snapshots, one dict per JSON line of out/search/<name>.jsonl, in training order."""
    return [json.loads(line) for line in open(f"out/search/{name}.jsonl")]


def table(name):
    """Print a run's snapshots (out/search/<name>.jsonl) as the rows of docs/recipe_search.md."""
    series = snapshots(name)

    def layers(values):
        return " / ".join(f"{v:.2f}" for v in values)
    print("| step | tokens | min | sink rate by layer, first 64 | at full context | strongest head's attention to 0 |")
    print("|---|---|---|---|---|---|")
    for s in series:
        print(f"| {s['step']} | {s['tokens'] / 1e6:.1f}M | {s['minutes']:.0f} | {layers(s['sink_rate_by_layer'])} | "
              f"{layers(s['sink_rate_full_context_by_layer'])} | {layers(s['strongest_head_attention_to_0_by_layer'])} |")
    crossed, end = crossings(series), series[-1]
    tokens_at = {s["step"]: s["tokens"] for s in series}
    if os.path.exists(f"out/search/{name}.json"):  # a finished run: its row of the runs' table
        run = json.load(open(f"out/search/{name}.json"))
        print(f"| {name} | {recipe_text(run['model'], run['train'])} | {run['tokens'] / 1e6:.0f}M | "
              f"{run['train']['steps']} | {run['minutes']:.0f} | {run['val_loss']:.3f} |")
    print(f"| {name} | " + " | ".join(link_text(end[link], crossed[link], tokens_at) for link in LINKS) + " |")
    grown = [s for s in series if s["tokens"] > 0]
    for key in ("sink_rate", "strongest_head") if len(grown) >= 2 else ():  # a trend needs two snapshots
        rates = [s["sink_rate"] if key == "sink_rate" else max(s["strongest_head_attention_to_0_by_layer"]) for s in grown]
        slope, reach = tokens_to_reach([s["tokens"] for s in grown], rates)
        print(f"{key} trend over the last 4 snapshots: {slope:+.3f} a decade of tokens, "
              + ("not rising" if reach is None else f"0.3 at {reach:.2g} tokens"))
    formed, never, in_order = paper_order(crossed)
    print(f"order: {formed}, never: {never}, the paper's: {in_order}")
    print(f"a sink by the search's rule (a layer's sink rate >= {SINK_THRESHOLD}, the mask >= {MASK_UNIT_GAIN}x at k):",
          grew_a_sink(end))


def plot(names, path="assets/search_long_runs.png"):
    """Every link of the named runs' snapshots against their training tokens: 01's emergence figure, one line a run."""
    results = {name: [{"snapshots": snapshots(name)}] for name in names}  # plot_emergence's shape: one seed a run
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    plot_emergence(results, colors, "The long search without BOS: every link at each snapshot (seed 0, one line a run)", path)


def measure_profile(profile):
    """The same measures on a profile's cached model (out/checkpoints), e.g. the chosen cpu recipe."""
    model_cfg, train_cfg = profile_configs(profile)
    data = ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)
    model, history = trained_model(profile, data=data)
    x, _ = data.windows("val", MEASURE_WINDOWS, train_cfg.bos, torch.Generator().manual_seed(0))
    print(json.dumps({"name": profile, "val_loss": history["val_loss"][-1], **measure(model, x, train_cfg.bos)}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--profile"]:
        measure_profile(sys.argv[2])
    elif sys.argv[1:2] == ["--table"]:
        table(sys.argv[2])
    elif sys.argv[1:2] == ["--plot"]:
        plot(sys.argv[2:])
    else:
        main(*sys.argv[1:])
