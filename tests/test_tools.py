"""The tools a person runs by hand, run on the CPU: tools/gpu_check.py (at the tiny shape), the
memory arithmetic of tools/activation_memory.py, and tools/recipe_search.py on a tiny recipe."""
import json
import math
import os
import sys

import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import activation_memory  # noqa: E402
import gpu_check  # noqa: E402
import recipe_search  # noqa: E402
from measures import LINKS, crossings  # noqa: E402
from model import ATTENTION_VARIANTS, GPT, GPTConfig  # noqa: E402
from training import snapshot_steps  # noqa: E402


def test_gpu_check_runs_on_the_cpu_at_the_tiny_shape(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    rows, scripts = gpu_check.main(["--steps", "12", "--scripts", "01", "--out", str(out)])
    assert "no CUDA here" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["profile"] == "tiny" and [r["variant"] for r in saved["variants"]] == list(ATTENTION_VARIANTS)
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["final_train_loss"]) for r in rows)
    assert scripts["01"]["exit_code"] == 0


def test_gpu_peaks_are_found_by_name():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756
    assert gpu_check.peak_tflops("Tesla T4") == 65
    assert gpu_check.peak_tflops("NVIDIA A10G") == 70
    assert gpu_check.peak_tflops("cpu") is None


def test_saved_bytes_grow_with_the_window_and_the_probe_halves_to_fit():
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32))
    (short, once), (long, _) = (activation_memory.saved_bytes_per_window(model, T, torch.bfloat16) for T in (16, 64))
    assert 4 * short <= long  # at least linear in T
    assert once >= 2 * sum(p.numel() for p in model.parameters() if p.dim() == 2) - 2 * model.tok_emb.weight.numel()  # bf16 weights
    fit = activation_memory.largest_fitting_micro_batch
    assert fit(512, 0, 1e9, 600e9) == 512
    assert fit(512, 0, 1e9, 100e9) == 64  # 0.9 x 100 GB holds 90 windows: the halving stops at 64
    assert fit(512, 10e9, 1e9, 10e9) is None


def test_the_recipe_search_measures_every_snapshot_as_it_goes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe_search.main("t", '{"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}',
                       '{"steps": 20, "batch_size": 4, "eval_interval": 10}')
    lines = [json.loads(line) for line in open("out/search/t.jsonl")]
    assert [s["step"] for s in lines] == snapshot_steps(20, recipe_search.SNAPSHOTS)
    assert all(set(LINKS) <= set(s) and len(s["sink_rate_full_context_by_layer"]) == 2 for s in lines)
    assert [s["tokens"] for s in lines] == [s["step"] * 4 * 32 for s in lines]
    result = json.load(open("out/search/t.json"))
    assert result["crossings"] == crossings(lines) and result["end"] == lines[-1]
    recipe_search.table("t")
    printed = capsys.readouterr().out
    assert "| 20 | 0.0M |" in printed and "| t | 2L d32 2h, T 32, batch 4," in printed  # a snapshot, the recipe
    links_row = [line for line in printed.splitlines() if line.startswith("| t | ")][-1]  # after the recipe's row
    assert links_row.count("M)") + links_row.count("(never)") == len(LINKS)  # every link's end, and when it crossed
    recipe_search.plot(["t"], path="links.png")
    assert os.path.getsize("links.png") > 0


def test_the_search_trend_and_its_sink_rule():
    tokens = [1e6, 1e7, 1e8, 1e9]
    slope, reach = recipe_search.tokens_to_reach(tokens, [0.0, 0.1, 0.2, 0.25])
    assert 0.08 < slope < 0.09 and 1e9 < reach < 1e10
    assert recipe_search.tokens_to_reach(tokens, [0.3, 0.2, 0.1, 0.0])[1] is None  # falling: never
    sink = {"sink_rate_by_layer": [0.0, 0.3], "mask_attention_gain": 5.0}
    assert recipe_search.grew_a_sink(sink)
    assert not recipe_search.grew_a_sink({**sink, "mask_attention_gain": 4.9})
    assert not recipe_search.grew_a_sink({**sink, "sink_rate_by_layer": [0.29, 0.0]})
