"""Tests of training on several processes: two gloo processes on the CPU, launched by torchrun
(python -m torch.distributed.run), train the tiny profile for 3 steps through train (in micro-batches)
and trained_model. (A failure on one rank ending the others: test_training.py.)"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT
from data import ByteData
from model import GPT, InputError
from training import PROFILES, batch_generator, local_batch_size, profile_configs, training_environment

N_PROCESSES, STEPS, MICRO_BATCH = 2, 3, 2  # the tiny batch, 16: 8 a process, 4 micro-batches
TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(800)).encode()

# Run by each process: train in micro-batches of 2 (dumping step 0's averaged gradient, the final
# weights and how many backward passes skipped DDP's gradient sync), then trained_model, with
# save_checkpoint wrapped to record which rank called it, then trained_model again with rank 0's save failing.
DRIVER = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {ROOT!r})
    import torch
    from torch.nn.parallel import DistributedDataParallel
    import training
    from data import ByteData
    from model import GPT, InputError

    training.PROFILES["tiny"]["train"].update(steps={STEPS}, eval_interval=2)
    device, rank, world = training.init_distributed("cpu")
    data = ByteData(open("corpus.txt", "rb").read(), 32)
    model_cfg, train_cfg = training.profile_configs("tiny")

    def dump_first_gradient(step, model):
        if step == 0:
            torch.save({{n: p.grad for n, p in model.named_parameters()}}, f"dumps/grad{{rank}}.pt")

    no_sync, skipped_syncs = DistributedDataParallel.no_sync, []
    def counted_no_sync(self):
        skipped_syncs.append(1)
        return no_sync(self)
    DistributedDataParallel.no_sync = counted_no_sync

    torch.manual_seed(0)
    model = GPT(model_cfg)
    training.train(model, data, train_cfg, after_backward=dump_first_gradient, micro_batch={MICRO_BATCH})
    torch.save(model.state_dict(), f"dumps/state{{rank}}.pt")
    torch.save(len(skipped_syncs), f"dumps/skipped_syncs{{rank}}.pt")

    save = training.save_checkpoint
    def recorded_save(*args, **kwargs):
        open(f"dumps/saved_by_rank{{rank}}", "w").close()
        save(*args, **kwargs)
    training.save_checkpoint = recorded_save
    _, history = training.trained_model("tiny", data=data, out_dir="out")
    torch.save(history, f"dumps/history{{rank}}.pt")

    def failed_save(*args, **kwargs):
        raise OSError(28, "No space left on device")
    training.save_checkpoint = failed_save
    try:
        training.trained_model("tiny", seed=1, data=data, out_dir="out")
    except InputError as e:
        torch.save(str(e), f"dumps/save_error{{rank}}.pt")
    training.close_distributed()
""")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The two processes' folder, once they have finished (a few seconds)."""
    folder = tmp_path_factory.mktemp("ddp")
    (folder / "driver.py").write_text(DRIVER)
    (folder / "corpus.txt").write_bytes(TEXT)
    (folder / "dumps").mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={N_PROCESSES}", "driver.py"]
    done = subprocess.run(command, cwd=folder, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def dumped(folder, name):
    return [torch.load(folder / "dumps" / f"{name}{r}.pt", weights_only=True) for r in range(N_PROCESSES)]


def test_ranks_end_with_identical_parameters(run):
    first, second = dumped(run, "state")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(0)
    assert not torch.equal(first["tok_emb.weight"], GPT(profile_configs("tiny")[0]).tok_emb.weight)  # it trained


def test_only_rank_0_writes_the_checkpoint_and_every_rank_gets_its_history(run):
    assert sorted(os.listdir(run / "dumps")) == sorted(
        [f"{n}{r}.pt" for n in ("grad", "state", "skipped_syncs", "history", "save_error") for r in range(N_PROCESSES)]
        + ["saved_by_rank0"])
    (checkpoint,) = os.listdir(run / "out" / "checkpoints")  # one whole file, no temp file left
    payload = torch.load(run / "out" / "checkpoints" / checkpoint, weights_only=True)
    assert payload["environment"]["world_size"] == N_PROCESSES  # never a 1-process run's key
    first, second = dumped(run, "history")
    assert first == second and first["val_step"] == [0, 2, STEPS]


def test_a_failed_save_on_rank_0_is_every_ranks_error(run):
    for error in dumped(run, "save_error"):
        assert error.startswith("cannot save the checkpoint") and error.endswith("No space left on device")


def test_micro_batches_sync_the_gradients_once_a_step(run):
    micro_batches = local_batch_size(PROFILES["tiny"]["train"]["batch_size"], N_PROCESSES) // MICRO_BATCH
    assert dumped(run, "skipped_syncs") == [STEPS * (micro_batches - 1)] * N_PROCESSES  # all but the last


def test_first_step_gradient_equals_one_process_on_the_global_batch(run):
    """Each rank's 8 windows in 4 micro-batches, DDP's average over ranks in the last one's backward."""
    model_cfg, train_cfg = profile_configs("tiny")
    data, n = ByteData(TEXT, model_cfg.block_size), train_cfg.batch_size // N_PROCESSES
    local = [data.windows("train", n, train_cfg.bos, batch_generator(train_cfg.seed, r),
                          train_cfg.repeat_prob, train_cfg.random_prob) for r in range(N_PROCESSES)]
    assert not torch.equal(local[0][0], local[1][0])  # each rank draws from its own stream
    torch.manual_seed(0)
    model = GPT(model_cfg)
    model(torch.cat([x for x, _ in local]), torch.cat([y for _, y in local]))[1].backward()
    for gradients in dumped(run, "grad"):
        for name, p in model.named_parameters():
            torch.testing.assert_close(gradients[name], p.grad, atol=1e-5, rtol=0, msg=name)


def test_one_process_keeps_todays_cache_key_and_stream():
    assert set(training_environment("cpu")) == {"torch", "device", "precision"}
    assert torch.equal(torch.rand(4, generator=batch_generator(7)), torch.rand(4, generator=torch.Generator().manual_seed(7)))


def test_a_batch_that_does_not_split_is_one_line_error():
    assert local_batch_size(PROFILES["tiny"]["train"]["batch_size"], 2) == 8
    with pytest.raises(InputError, match="batch 32 does not split over 3 processes"):
        local_batch_size(32, 3)
