"""
The recipe search of docs/recipe_search.md: train one recipe, measure the
chain on held-out text windows, write out/search/<name>.json. One run at a time, e.g.

    nohup python tools/recipe_search.py K1 '{"n_layer": 4}' '{"steps": 8000}' > out/search/K1.log &

The first JSON overrides the model of the base recipe, the second its training. The base: no BOS,
half the windows random bytes, a copied span in every window, 3 layers of d 64, T 64. Not a test:
pytest does not collect it. `python tools/recipe_search.py --profile cpu` measures the cached
cpu model the same way.
"""
import json
import os
import sys
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import ByteData, load_corpus  # noqa: E402
from measures import first_token_attention, massive_activation_ratio, unit_most_selective_for_token0  # noqa: E402
from model import GPT, GPTConfig, self_only_mask  # noqa: E402
from training import TrainConfig, profile_configs, train, trained_model  # noqa: E402

BASE_MODEL = dict(block_size=64, n_layer=3, n_head=4, n_embd=64)
BASE_TRAIN = dict(steps=8000, batch_size=32, lr=1e-2, warmup_steps=100, schedule="constant", bos=False,
                  repeat_prob=1.0, random_prob=0.5, eval_interval=1000)
K = 10  # the position of the mask intervention


def measure_chain(model, x, k=K):
    """The links of the chain on windows x (N, T), each as plain numbers."""
    T, L = x.shape[1], model.config.n_layer
    _, cache = model.run_with_cache(x, record=["blocks.*.attn.hook_pattern", "blocks.*.mlp.hook_hidden",
                                               "blocks.*.hook_resid_in", "hook_resid_final"])
    resid = [cache[f"blocks.{i}.hook_resid_in"] for i in range(1, L)] + [cache["hook_resid_final"]]  # after each layer
    heads = [first_token_attention(cache[f"blocks.{i}.attn.hook_pattern"]) for i in range(L)]  # (H,) each
    unit_layer, unit, unit_ratio = unit_most_selective_for_token0({i: cache[f"blocks.{i}.mlp.hook_hidden"]
                                                                   for i in range(L)})  # in any layer
    unit_unmasked = cache[f"blocks.{unit_layer}.mlp.hook_hidden"][:, :, unit].abs().mean(0)  # (T,)
    pattern_unmasked = [cache[f"blocks.{i}.attn.hook_pattern"] for i in range(L)]
    _, masked = model.run_with_cache(x, record=["blocks.*.attn.hook_pattern", f"blocks.{unit_layer}.mlp.hook_hidden"],
                                     mask=self_only_mask(T, k, x.device))
    unit_masked = masked[f"blocks.{unit_layer}.mlp.hook_hidden"][:, :, unit].abs().mean(0)

    def received_from_later(pattern):  # (N, H, T, T) -> mean weight on key k over queries t > k
        return float(pattern[:, :, k + 1:, k].mean())
    return {
        "attention_to_0": [float(h.mean()) for h in heads],
        "heads_over_0.3_on_window_mean": [float((h > 0.3).float().mean()) for h in heads],
        "massive_ratio_0_over_others": [float(massive_activation_ratio(r[:, 0]).mean() /
                                              massive_activation_ratio(r[:, 1:]).mean()) for r in resid],
        "norm_ratio_0_over_others": [float(r[:, 0].norm(dim=-1).mean() / r[:, 1:].norm(dim=-1).mean()) for r in resid],
        "unit": [unit_layer, unit], "unit_ratio": unit_ratio,
        "unit_at_k_unmasked": float(unit_unmasked[k]), "unit_at_k_masked": float(unit_masked[k]),
        "unit_at_0": float(unit_unmasked[0]),
        "k_receives_unmasked": [received_from_later(p) for p in pattern_unmasked],
        "k_receives_masked": [received_from_later(masked[f"blocks.{i}.attn.hook_pattern"]) for i in range(L)],
    }


def main(name, model_overrides="{}", train_overrides="{}"):
    torch.set_num_threads(2)
    model_cfg = GPTConfig(**{**BASE_MODEL, **json.loads(model_overrides)})
    train_cfg = TrainConfig(**{**BASE_TRAIN, **json.loads(train_overrides)})
    data = ByteData(load_corpus(), model_cfg.block_size, "stdlib")
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg)
    start = time.time()
    history = train(model, data, train_cfg, desc=name)
    minutes = (time.time() - start) / 60
    model.eval()
    x, _ = data.windows("val", 64, train_cfg.bos, torch.Generator().manual_seed(0))
    result = {"name": name, "model": asdict(model_cfg), "train": asdict(train_cfg), "minutes": minutes,
              "val_loss": history["val_loss"][-1], **measure_chain(model, x)}
    os.makedirs("out/search", exist_ok=True)
    torch.save({"model_config": asdict(model_cfg), "state_dict": model.state_dict()}, f"out/search/{name}.pt")
    with open(f"out/search/{name}.json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


def measure_profile(profile):
    """The same measures on a profile's cached model (out/checkpoints), e.g. the chosen cpu recipe."""
    model_cfg, train_cfg = profile_configs(profile)
    data = ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)
    model, history = trained_model(profile, data=data)
    x, _ = data.windows("val", 64, train_cfg.bos, torch.Generator().manual_seed(0))
    print(json.dumps({"name": profile, "val_loss": history["val_loss"][-1], **measure_chain(model.eval(), x)}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--profile"]:
        measure_profile(sys.argv[2])
    else:
        main(*sys.argv[1:])
