"""The five numbered scripts through main(["--quick"]): what each writes (metrics.json with its keys and
finite numbers, its figures) and that the same seed gives the same metrics. Each script's own tests are in
test_01_02.py, test_03_04.py and test_05.py; the paper's claims on the trained models in test_claims.py."""
import json
import math
import re

import pytest
import torch

from conftest import SCRIPT_NAMES, load_script, numbers_in
from training import device_precision

SCRIPTS = {name: load_script(f"{name}.py") for name in SCRIPT_NAMES}

# The keys each script's metrics.json must hold, "run" (what made it) first.
KEYS = {
    "01_variance": ["run", "var_by_position_init", "var_by_position_trained", "var_by_position_random_tokens",
                    "var_ratio_token0", "first_token_attention_by_layer", "first_token_norm_by_layer",
                    "other_token_norm_by_layer", "wo_kendall_tau_by_layer", "wo_kendall_tau_across_windows_by_layer",
                    "post_wo_var_ratio_by_layer", "head_entropy_variance_spearman_by_layer", "sink_rate_by_layer",
                    "sink_rate", "sink_layer", "emergence"],
    "02_super_neurons": ["run", "super_neurons", "top_super_neuron", "wdown_column_kurtosis", "massive_dims",
                         "massive_dims_match"],
    "03_dimension_disparity": ["run", "dominance_ratio_token0_by_layer", "dominance_ratio_others_by_layer",
                               "token0_direction_cosine_by_layer", "qk_alignment_by_head",
                               "positive_score_ratio_by_head", "effective_rank_by_layer"],
    "04_interventions": ["run", "attention_received_baseline", "attention_received_masked", "k", "sink_moved_to_k",
                         "lambdas", "attention_to_k_variance", "attention_to_k_scale_control",
                         "attention_to_k_shift_control", "amplification_readings", "amplification_main",
                         "entropy_by_layer_baseline", "entropy_by_layer_masked",
                         "superneuron_activation_at_k", "dominance_ratio_at_k", "amplification_authors",
                         "first_token_attention_by_layer", "sink_rate_by_layer"],
    "05_pretrain_headwise": ["run", "val_loss_curves", "val_loss_final", "steps_to_baseline_loss",
                             "first_token_attention_by_layer", "dominance_ratio_token0_by_layer",
                             "effective_rank_by_layer", "var_by_position", "head_entropy", "head_output_variance",
                             "emergence"],
}
# The figures each script writes, every one of them.
FIGURES = {
    "01_variance": {"fig1_variance_by_position.png", "fig3_attention_and_norm.png", "fig7_wo_keeps_variance.png",
                    "fig13_head_entropy_variance.png", "fig_emergence.png"},
    "02_super_neurons": {"fig8_row_norms.png", "fig9_selective_activation.png", "fig10_wdown_column.png"},
    "03_dimension_disparity": {"fig11_dominance_ratio.png", "fig12_qk_locking.png", "fig15_effective_rank.png"},
    "04_interventions": {"fig5_mask_intervention.png", "fig6_variance_amplification.png", "fig6_authors_reading.png"},
    "05_pretrain_headwise": {"fig16_val_loss.png", "fig02_first_token_attention.png", "fig14_dominance_ratio.png",
                             "fig15_effective_rank.png", "fig23_variance_by_position.png",
                             "fig13_head_entropy_variance.png", "fig02_sink_rate.png", "fig_emergence.png"},
}
# What "run" records about a trained model (cli.Run.record).
RUN_KEYS = {"argv", "script", "seed", "subject", "profile", "device", "precision", "torch", "commit"}


def folder_of(out, name):
    """Where a script writes: out/<script>, and 05 a folder per profile (tiny for --quick)."""
    return out / name / "tiny" if name == "05_pretrain_headwise" else out / name


def without_run(metrics):
    """The numbers alone: the "run" entry records the command line, which differs between two runs."""
    return {key: value for key, value in metrics.items() if key != "run"}


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_quick_run_writes_its_metrics_and_figures(quick, name):
    out, results = quick
    folder = folder_of(out, name)
    on_disk = json.loads((folder / "metrics.json").read_text())
    assert on_disk == results[name]
    assert next(iter(on_disk)) == "run"
    assert set(KEYS[name]) <= set(on_disk), set(KEYS[name]) - set(on_disk)
    run = on_disk["run"]
    assert set(run) == RUN_KEYS
    assert run["argv"] == ["--quick", "--out_dir", str(out)] and run["script"] == name and run["seed"] == 0
    assert run["subject"] == "tiny model" and run["profile"] == "tiny"
    assert run["precision"] == device_precision(run["device"]) and run["torch"] == str(torch.__version__)
    assert run["commit"] is None or re.fullmatch(r"[0-9a-f]{40}(\+changes)?", run["commit"]), run["commit"]
    assert all(math.isfinite(n) for n in numbers_in(on_disk))
    figures = {f.name: f.stat().st_size for f in folder.glob("*.png")}
    assert set(figures) == FIGURES[name]
    assert all(size > 0 for size in figures.values()), figures


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_same_seed_gives_identical_metrics(quick, name, tmp_path):
    """Trained again from scratch in an empty folder, not loaded from the first run's cache (05: its four
    variants). The "run" entries differ: --out_dir is another folder."""
    _, results = quick
    again = SCRIPTS[name].main(["--quick", "--out_dir", str(tmp_path)])
    assert without_run(again) == without_run(results[name])
