"""
Training: the named profiles (a model shape and its recipe), AdamW with warmup and cosine, the
training loop with its progress bar and validation, and the checkpoint cache in out/checkpoints.
"""
import contextlib
import gc
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import ByteData, load_corpus
from model import GPT, GPTConfig, InputError


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50
    schedule: str = "cosine"  # or "constant" after warmup
    weight_decay: float = 0.1  # on matrices and embeddings; never on RMSNorm gains
    head_norm_gain_decay: bool = True  # also decay head-wise RMSNorm's gain (the authors' optimizer does)
    grad_clip: float = 1.0
    bos: bool = True  # every window starts with the BOS token
    repeat_prob: float = 0.0  # share of training windows with a copied span (see repeat_span)
    random_prob: float = 0.0  # share of training windows of uniform random bytes: every head idles there
    corpus: str = "stdlib"  # the default text: Python's standard library, or "python": with every installed package
    eval_interval: int = 100
    eval_windows: int = 64
    seed: int = 0


# Named profiles: the model's shape and its training recipe (see docs/recipe_search.md).
# Without BOS (tiny, cpu, gpu) position 0 is an ordinary byte: whatever is special about token 0
# is its position, the paper's point. cpu_bos keeps a fixed first token for 05's fixes to act on.
PROFILES = {
    "tiny": dict(model=dict(block_size=32, n_layer=2, n_head=2, n_embd=32),
                 train=dict(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, schedule="constant", eval_interval=20,
                            eval_windows=16, bos=False, repeat_prob=1.0, random_prob=0.75)),
    # The recipe search's choice (docs/recipe_search.md): 3 windows in 4 random bytes, a copied span in every window.
    "cpu": dict(model=dict(block_size=64, n_layer=3, n_head=4, n_embd=64),
                train=dict(steps=12000, batch_size=32, lr=1e-2, warmup_steps=100, schedule="constant",
                           bos=False, repeat_prob=1.0, random_prob=0.75, eval_interval=1000)),
    # The earlier cpu recipe, with a fixed BOS token: a layer-0 sink on BOS that 05's fixes can remove.
    "cpu_bos": dict(model=dict(block_size=64, n_layer=3, n_head=4, n_embd=64),
                    train=dict(steps=8000, batch_size=32, lr=1e-2, warmup_steps=100, schedule="constant",
                               bos=True, repeat_prob=1.0, eval_interval=500)),
    # Budgeted at Gu et al.'s emergence point (a sink between step 1k and 2k at 1M tokens a step): 4000 steps
    # of 512 x 512 = 262k tokens, 1.05B tokens in all, no BOS, context 512, weight decay 0.5 (their strongest
    # lever); all Python source on the interpreter's path (about 180 MB here: ~6 passes). Not yet run (docs/gpu.md).
    "gpu": dict(model=dict(block_size=512, n_layer=6, n_head=6, n_embd=384),
                train=dict(steps=4000, batch_size=512, lr=3e-3, warmup_steps=200, schedule="constant",
                           weight_decay=0.5, bos=False, repeat_prob=1.0, random_prob=0.5, eval_interval=250,
                           corpus="python")),
}


# The arms a profile trains (05): the seven attention variants, and two ablations of head-wise
# RMSNorm, each (model settings, training settings). "headwise" is the authors' method: the gain
# calibrated at init (model.calibrate_head_norm_gain) and weight-decayed; "headwise_nodecay" keeps
# the calibration without the decay, "headwise_ones" is this project's earlier gain of ones, not decayed.
ARMS = {
    "softmax": (dict(attn="softmax"), {}),
    "sigmoid": (dict(attn="sigmoid"), {}),
    "headwise": (dict(attn="headwise"), {}),
    "gated": (dict(attn="gated"), {}),
    "headwise_nodecay": (dict(attn="headwise"), dict(head_norm_gain_decay=False)),
    "headwise_ones": (dict(attn="headwise", head_norm_init="ones"), dict(head_norm_gain_decay=False)),
    # The fixes the field ships: an extra slot in each head's softmax (model.SLOT_VARIANTS); 05 trains them when named.
    "sink_logit": (dict(attn="sink_logit"), {}),
    "softmax1": (dict(attn="softmax1"), {}),
    "kv_bias": (dict(attn="kv_bias"), {}),
}


def profile_configs(profile, arm="softmax", seed=0, steps=None):
    """(GPTConfig, TrainConfig) of a profile and arm (see ARMS); steps: a shorter (or longer) budget
    than the profile's, evaluated 10 times along the way (05's seed study)."""
    if profile not in PROFILES:
        raise InputError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    if arm not in ARMS:
        raise InputError(f"unknown variant {arm!r}; valid: {', '.join(ARMS)}")
    if steps is not None and steps < 10:
        raise InputError(f"--steps {steps}: train at least 10 steps")
    p, (model_settings, train_settings) = PROFILES[profile], ARMS[arm]
    train_cfg = TrainConfig(seed=seed, **{**p["train"], **train_settings})
    if steps is not None:
        train_cfg = replace(train_cfg, steps=steps, eval_interval=steps // 10)
    return GPTConfig(**{**p["model"], **model_settings}), train_cfg


def learning_rate(step, cfg):
    """Linear warmup, then cosine decay to lr * min_lr_ratio (or constant)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def device_precision(device):
    """The training precision a device gets: bf16 autocast on CUDA with compute capability 8.0 or more
    (A100, H100, RTX 30xx and later); fp16 autocast, with a GradScaler, below it (T4, V100: no bf16
    tensor cores there, and PyTorch's flash and memory-efficient attention refuse bf16); float32 on
    the CPU and on MPS."""
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(device) >= (8, 0) else "fp16"


def autocast(device, precision=None):
    """The autocast context of a precision (default: the device's own); fp32: none."""
    device, precision = torch.device(device), precision or device_precision(device)
    if AMP_DTYPES[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[precision])


@torch.no_grad()
def evaluate(model, x, y, batch_size=64):
    model.eval()
    device, losses = next(model.parameters()).device, []
    for i in range(0, len(x), batch_size):
        with autocast(device):
            losses.append(model(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device))[1].item())
    model.train()
    return float(np.mean(losses))


def norm_gains(model, head_norm_gain=True):
    """The gains of every normalisation: RMSNorm weights and (unless head_norm_gain=False) head-wise RMSNorm's."""
    return [p for name, p in model.named_parameters()
            if name.endswith("norm.weight") or (head_norm_gain and name.endswith("head_norm_gain"))]


def parameter_groups(model, weight_decay, head_norm_gain_decay=False):
    """AdamW groups: matrices and embeddings decay; RMSNorm gains never do; head-wise RMSNorm's gain
    (H, 1, hd) decays only with head_norm_gain_decay (the authors decay every parameter of 2 or more dims).
    The attention slot's parameters never decay: sink_logit's logit b (H, 1, 1) and kv_bias's key k' and
    value v' (H, 1, hd) are biases, one per head, not maps of the input. Decay would pull each to 0,
    that is each slot towards softmax1's, and blur the difference between the three arms (chosen by
    name, not by dimension: their shapes have 3 dimensions)."""
    gains = {id(p) for p in norm_gains(model, head_norm_gain=not head_norm_gain_decay)}
    gains |= {id(p) for name, p in model.named_parameters() if name.split(".")[-1] in ("slot_logit", "slot_key", "slot_value")}
    return [{"params": [p for p in model.parameters() if id(p) not in gains], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if id(p) in gains], "weight_decay": 0.0}]


# ----------------------------------------------------------------------------- several processes (torchrun)

def init_distributed(device):
    """Under torchrun, join its process group (NCCL on CUDA, else gloo) on this rank's GPU -> (device, rank,
    world_size); without torchrun, (device, 0, 1) and nothing else happens."""
    if "WORLD_SIZE" not in os.environ:
        return device, 0, 1
    device = torch.device(device)
    if device.type == "mps":
        raise InputError("torchrun trains on cuda or cpu devices, not mps")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def close_distributed():
    """Leave the process group, if init_distributed joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size():
    """How many processes train together: 1 without torchrun."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    """This process's number among them: 0 without torchrun."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main_process():
    """Rank 0, the process that evaluates and writes files (the only one without torchrun)."""
    return rank() == 0


def local_batch_size(batch_size, n_processes):
    """Each process's share of the global batch."""
    if batch_size % n_processes:
        raise InputError(f"batch {batch_size} does not split over {n_processes} processes")
    return batch_size // n_processes


def batch_generator(seed, rank=0):
    """The random stream of one rank's training windows; rank 0's is the single-process stream."""
    return torch.Generator().manual_seed(seed + 1_000_003 * rank)  # a prime apart: no two (seed, rank) collide


def mean_over_processes(values):
    """A tensor's elementwise mean over every process, on every process."""
    values = values.clone()
    dist.all_reduce(values)  # a sum: gloo has no average
    return values / world_size()


def broadcast_from_main(value):
    """Rank 0's value (any picklable object), on every process."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- one step, in micro-batches

def accumulate_gradients(net, x, y, micro_batch, precision="fp32", scaler=None):
    """Forward and backward the batch (x, y) (B, T) as micro-batches of at most micro_batch windows.
    Each micro-batch's mean loss is weighted by its share of the batch, so that the gradients add up
    to those of the whole batch's mean loss; one micro-batch is the plain step, to the bit.
    Under DDP the gradients are averaged over processes once, in the last micro-batch's backward.
    Returns the batch's mean loss: a 0-dim tensor left on the device (reading it would wait for it)."""
    starts = range(0, len(x), micro_batch)
    total = torch.zeros((), device=x.device)
    for i, start in enumerate(starts):
        xs, ys = x[start:start + micro_batch], y[start:start + micro_batch]
        skip_sync = isinstance(net, DistributedDataParallel) and i < len(starts) - 1
        with net.no_sync() if skip_sync else contextlib.nullcontext():
            with autocast(x.device, precision):
                _, loss = net(xs, ys)
            loss = loss * (len(xs) / len(x))
            (loss if scaler is None else scaler.scale(loss)).backward()
        total += loss.detach()
    return total


def largest_micro_batch(try_step, batch_size, free_memory):
    """The largest micro-batch, from batch_size halving down to 1, for which try_step(size) runs
    without torch.cuda.OutOfMemoryError; free_memory() runs after each one that did not fit.
    None if not even one window fits."""
    size = batch_size
    while size >= 1:
        try:
            try_step(size)
            return size
        except torch.cuda.OutOfMemoryError:
            pass  # free outside the except block: its traceback holds the failed step's tensors
        free_memory()
        size //= 2
    return None


def free_cuda_memory():
    gc.collect()
    torch.cuda.empty_cache()


def cuda_micro_batch(try_step, batch_size, model, block_size):
    """largest_micro_batch on the model's GPU, or a one-line error when not even one window fits."""
    size = largest_micro_batch(try_step, batch_size, free_cuda_memory)
    if size is None:
        device = next(model.parameters()).device
        total, state = torch.cuda.get_device_properties(device).total_memory, 16 * sum(p.numel() for p in model.parameters())
        raise InputError(f"one window of {block_size} tokens does not fit on {torch.cuda.get_device_name(device)} "
                         f"({gib(total):.1f} GiB): the weights, gradients and AdamW state alone take {gib(state):.2f} GiB, "
                         f"plus one window's activations; try a smaller --profile")
    return size


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(n_bytes):
    return n_bytes / 2**30


def duration_text(minutes):
    """Seconds under a minute, else minutes."""
    return f"{minutes * 60:.0f} s" if minutes < 1 else f"{minutes:.1f} min"


@dataclass
class StepPlan:
    """How this device runs a training step, found and timed before training starts."""
    device: str  # its name
    precision: str  # bf16 | fp16 | fp32 (device_precision)
    micro_batch: int
    accumulation: int  # micro-batches per step, on each process
    peak_memory_gib: float  # the probe's peak, on CUDA; NaN elsewhere
    tokens_per_s: float  # of one process

    def minutes(self, cfg, block_size):
        """The estimated training time: cfg.steps steps of the global batch, at the measured speed."""
        return cfg.steps * cfg.batch_size * block_size / (self.tokens_per_s * world_size()) / 60

    def describe(self, cfg, block_size):
        memory = "" if math.isnan(self.peak_memory_gib) else f", peak memory {self.peak_memory_gib:.1f} GiB"
        processes = f" on each of {world_size()} processes" if world_size() > 1 else ""
        return (f"{self.device}, {self.precision}, micro-batch {self.micro_batch} x {self.accumulation} accumulation"
                f"{processes}{memory}, {self.tokens_per_s:,.0f} tokens/s measured: about "
                f"{duration_text(self.minutes(cfg, block_size))} for {cfg.steps} steps (an estimate)")


def plan_training(model, data, cfg, micro_batch=None):
    """Find this device's micro-batch and time one step, on a probe batch (not the training stream,
    and the model's weights are left as they were). micro_batch: set by hand (any device); by default
    the largest that fits on CUDA (largest_micro_batch), else the whole batch."""
    device = next(model.parameters()).device
    precision, batch = device_precision(device), local_batch_size(cfg.batch_size, world_size())
    if micro_batch is not None and micro_batch < 1:
        raise InputError(f"--micro_batch {micro_batch}: give at least 1 window")
    x, y = data.windows("train", batch, cfg.bos, torch.Generator().manual_seed(0))
    x, y = x.to(device), y.to(device)

    def timed_step(size):  # forward and backward of one micro-batch -> seconds
        synchronize(device)
        start = time.perf_counter()
        accumulate_gradients(model, x[:size], y[:size], size, precision)
        synchronize(device)
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    if micro_batch is not None:
        size = min(micro_batch, batch)
    elif device.type == "cuda":
        size = cuda_micro_batch(timed_step, batch, model, data.block_size)
    else:
        size = batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_step(size)  # a warm-up
    seconds = timed_step(size)
    peak = gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return StepPlan(name, precision, size, math.ceil(batch / size), peak, size * data.block_size / seconds)


def to_device(t, device):
    """A CPU tensor on the device; to CUDA from pinned memory, without waiting for the copy."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def checked_losses(losses, first_step):
    """The losses of consecutive steps (0-dim tensors on the device) as floats, read in one host sync
    (under torchrun: the global batch's, the same on every rank, so that a NaN stops all of them)."""
    values = torch.stack(losses).float()
    values = (values if world_size() == 1 else mean_over_processes(values)).tolist()
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise FloatingPointError(f"training stopped: loss is {values[bad]} at step {first_step + bad}; try a lower learning rate")
    return values


# ----------------------------------------------------------------------------- snapshots along training

DEFAULT_SNAPSHOTS = 8  # models kept along each training (--snapshots): step 0 and log-spaced steps to the last


def snapshot_steps(steps, n=DEFAULT_SNAPSHOTS):
    """The steps at which training keeps its model: step 0 (the initialisation), then n - 1 steps spaced evenly
    on a log axis from steps / 1000 (at least step 1) to the last, `steps`; fewer if two round to the same
    step. n = 0: none. The model at step s has taken s optimizer steps."""
    if n <= 0:
        return []
    if n == 1:
        return [0]
    logspaced = np.geomspace(max(1, steps // 1000), steps, n - 1) if n > 2 else [steps]
    return sorted({0, *(int(round(s)) for s in logspaced)})


# ----------------------------------------------------------------------------- training

CHECK_EVERY = 50  # steps between reads of the loss (each read waits for the device)

# On the CPU, compiling the training step takes 13-45 s the first time (6-8 s once torch's cache
# is warm) and then makes each step 1.1-1.4x faster (docs/results.md, "Throughput"): it pays from about 10M
# training tokens, the cpu and cpu_bos profiles, not the tiny profile nor 05's 2000-step seed study.
CPU_COMPILE_FROM_TOKENS = 10_000_000


@contextlib.contextmanager
def deterministic_kernels():
    """torch.use_deterministic_algorithms while it lasts. Compiled CPU kernels otherwise add into
    shared sums from several threads in a varying order, and the same seed trains another model on
    each run; with it, a run repeats to the bit (for a given number of threads). Eager CPU kernels
    are deterministic anyway. Not used on CUDA, where it would stop at ops without such a kernel."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def compiles(device, cfg, block_size, compile=None):
    """Whether training runs its step through torch.compile: as asked when compile is True or False
    (--no_compile), else always on CUDA, on the CPU for runs of CPU_COMPILE_FROM_TOKENS or more, never on MPS."""
    if compile is not None:
        return compile
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and cfg.steps * cfg.batch_size * block_size >= CPU_COMPILE_FROM_TOKENS)


def training_step(model, cfg, block_size, compile=None):
    """How train runs the model's step -> (compiled?, the model it steps: torch.compile's wrapper of the same
    weights, or the model itself; the context to run it in: deterministic kernels for a compiled CPU step)."""
    device = next(model.parameters()).device
    compiled = compiles(device, cfg, block_size, compile)
    kernels = deterministic_kernels() if compiled and device.type == "cpu" else contextlib.nullcontext()
    return compiled, torch.compile(model) if compiled else model, kernels


def planned_step(model, data, cfg, micro_batch=None, compile=None):
    """plan_training on the step as train will run it, compiled where it will be: the speed said before a
    compiled training is the compiled step's (its compiling is done here, and not timed)."""
    _, step_model, kernels = training_step(model, cfg, data.block_size, compile)
    with kernels:
        return plan_training(step_model, data, cfg, micro_batch)


def train(model, data, cfg, desc="train", after_backward=None, micro_batch=None, compile=None, snapshot=None,
          snapshot_at=()):
    """Train in place; returns the history {"step", "train_loss", "val_step", "val_loss", "seconds",
    "snapshot_seconds"} (the last two: wall time of the loop, and the part of it spent in snapshot).
    First it finds and prints how this device runs a step (plan_training). Under torchrun, each
    process trains on its share of cfg.batch_size (the global batch) and DDP averages the gradients;
    rank 0 alone evaluates (elsewhere val_step and val_loss stay empty).
    after_backward(step, model): optional, called with the gradients in place (the tests look).
    compile: torch.compile the training step's forward and backward (default: see compiles; on CUDA a
    step of this small model is bound by elementwise memory traffic that compiling fuses). Evaluation
    and every analysis run `model` itself, uncompiled.
    snapshot(step, model, history): called on rank 0 at each step of snapshot_at, before that step's
    update (so with the model that `step` updates made; snapshot_at may hold cfg.steps, the end)."""
    device, n_processes, main = next(model.parameters()).device, world_size(), is_main_process()
    compiled, step_model, kernels = training_step(model, cfg, data.block_size, compile)
    with kernels:
        plan, batch_size = plan_training(step_model, data, cfg, micro_batch), local_batch_size(cfg.batch_size, n_processes)
        if main:
            print(f"{desc}: {plan.describe(cfg, data.block_size)}" + (", compiled" if compiled else ""))
        # DDP starts every rank from rank 0's weights and averages the gradients in backward; we
        # evaluate and save `model`, its module. Alone, `net` is `step_model` and nothing changes.
        net = step_model if n_processes == 1 else DistributedDataParallel(
            step_model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)  # buffers: RoPE tables
        optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay, cfg.head_norm_gain_decay), lr=cfg.lr,
                                      betas=(0.9, 0.95), **({"fused": True} if device.type == "cuda" else {}))
        scaler = torch.amp.GradScaler(device.type, enabled=plan.precision == "fp16")  # fp16 gradients underflow unscaled
        batches = batch_generator(cfg.seed, rank())  # the data order depends only on the seed (and rank)
        val_x, val_y = data.windows("val", cfg.eval_windows, cfg.bos, torch.Generator().manual_seed(1234))
        history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
        unread, start = [], time.time()  # losses not yet read from the device
        history["snapshot_seconds"] = 0.0

        def keep(step):  # the model after `step` updates, if it is a snapshot step
            if step in snapshot_at and main:
                began = time.time()
                snapshot(step, model, history)
                history["snapshot_seconds"] += time.time() - began

        bar = tqdm(range(cfg.steps), desc=desc, dynamic_ncols=True, mininterval=1.0, disable=not main)
        for step in bar:
            keep(step)
            if step % cfg.eval_interval == 0 and main:
                history["val_step"].append(step)
                history["val_loss"].append(evaluate(model, val_x, val_y))
            x, y = data.windows("train", batch_size, cfg.bos,
                                batches, cfg.repeat_prob, cfg.random_prob)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, cfg)
            optimizer.zero_grad(set_to_none=True)
            unread.append(accumulate_gradients(net, to_device(x, device), to_device(y, device), plan.micro_batch,
                                               plan.precision, scaler))
            if after_backward is not None:
                after_backward(step, model)
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            history["step"].append(step)
            if len(unread) == CHECK_EVERY or step == cfg.steps - 1:
                history["train_loss"] += checked_losses(unread, step + 1 - len(unread))
                unread = []
                if main:
                    bar.set_postfix(loss=f"{history['train_loss'][-1]:.3f}", val=f"{history['val_loss'][-1]:.3f}",
                                    tok_s=f"{cfg.batch_size * data.block_size * (step + 1) / (time.time() - start):.0f}")
    if main:
        history["val_step"].append(cfg.steps)
        history["val_loss"].append(evaluate(model, val_x, val_y))
    keep(cfg.steps)
    history["seconds"] = time.time() - start
    return history


def save_checkpoint(path, model, train_cfg, history, data_fingerprint, environment=None, step=None):
    """Write atomically: a temp file of this writer's own, then a rename, so an interrupted run
    never leaves half a file and two runs training the same model both end with a whole one.
    step: a snapshot's (the file then also says the tokens seen); None: the trained model."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    payload = {"model_config": asdict(model.config), "train_config": asdict(train_cfg), "data": data_fingerprint,
               "environment": environment, "history": history, "state_dict": model.state_dict()}
    if step is not None:
        payload |= {"step": step, "tokens": step * train_cfg.batch_size * model.config.block_size}
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(payload, f)
        os.replace(temporary, path)  # atomic; if two runs finish, the last rename wins, both files whole
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def read_checkpoint(path, device="cpu", expect=None):
    """Rebuild a model from its file alone -> (model, the file's payload less its weights); `expect` (dict)
    must agree with what the file holds."""
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
        model_config = GPTConfig(**payload["model_config"])
    except Exception as e:
        raise InputError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to retrain") from None
    for key, value in (expect or {}).items():
        if payload.get(key) != value:
            raise InputError(f"checkpoint {path} does not match the requested model ({key} differs); delete it to retrain")
    model = GPT(model_config).to(device)
    model.load_state_dict(payload.pop("state_dict"))
    return model, payload


def load_checkpoint(path, device="cpu", expect=None):
    """read_checkpoint -> (model, its training history)."""
    model, payload = read_checkpoint(path, device, expect)
    return model, payload["history"]


def snapshot_path(path, step):
    """Where the cache keeps the snapshot at `step` of the model whose checkpoint is `path`: its key, plus the step."""
    return path.removesuffix(".pt") + f"-step{step}.pt"


def load_snapshot(path, step, device="cpu", expect=None):
    """The snapshot at `step` of the model cached at `path` -> {"step", "tokens", "model"}."""
    model, payload = read_checkpoint(snapshot_path(path, step), device, {**(expect or {}), "step": step})
    return {"step": step, "tokens": payload["tokens"], "model": model}


def training_environment(device, compiled=False):
    """What else changes the trained weights and can be keyed honestly: torch's version and the
    device's kind and precision, whether the step was compiled (its kernels round differently, and
    over thousands of steps that is another model), and under torchrun the number of processes.
    Not keyed: the code itself (edit model.py, data.py or the training loop and you must delete
    out/checkpoints yourself), nor the exact GPU or CPU."""
    device = torch.device(device)
    environment = {"torch": str(torch.__version__), "device": device.type, "precision": device_precision(device)}
    if compiled:  # only then, like world_size: eager checkpoints keep the keys they were cached under
        environment["compiled"] = True
        if device.type == "cpu":  # compiled CPU kernels split their sums by thread: each count, its own model
            environment["threads"] = torch.get_num_threads()
    if world_size() > 1:  # only then: a single process keeps the keys of the checkpoints cached before torchrun
        environment["world_size"] = world_size()
    return environment


def checkpoint_path(profile, arm, seed, data, device, out_dir, steps=None, compile=None):
    """(path, expect): where the cache keeps this model, and what its file must hold (compile: see train)."""
    model_cfg, train_cfg = profile_configs(profile, arm, seed, steps)
    compiled = compiles(device, train_cfg, model_cfg.block_size, compile)
    expect = {"model_config": asdict(model_cfg), "train_config": asdict(train_cfg), "data": data.fingerprint,
              "environment": training_environment(device, compiled)}
    key = hashlib.sha1(json.dumps(expect, sort_keys=True).encode()).hexdigest()[:10]
    # named by the variant, keyed by the settings: two names of one arm share one file
    return os.path.join(out_dir, "checkpoints", f"{profile}-{model_cfg.attn}-seed{seed}-{key}.pt"), expect


def profile_data(profile):
    """The profile's own text, in windows of its context."""
    model_cfg, train_cfg = profile_configs(profile)
    return ByteData(load_corpus(corpus=train_cfg.corpus), model_cfg.block_size, train_cfg.corpus)


def trained_snapshots(profile, arm="softmax", seed=0, data=None, device="cpu", out_dir="out", steps=None, compile=None,
                      snapshots=DEFAULT_SNAPSHOTS):
    """The snapshots that trained_model kept of this model, in training order, and its training history
    -> ([load_snapshot's dict], history)."""
    data = data if data is not None else profile_data(profile)
    path, expect = checkpoint_path(profile, arm, seed, data, device, out_dir, steps, compile)
    return ([load_snapshot(path, step, device, expect)
             for step in snapshot_steps(profile_configs(profile, arm, seed, steps)[1].steps, snapshots)],
            load_checkpoint(path, device, expect)[1])


def in_cache(path, steps, snapshots=0):
    """The model at `path` is in the cache, and so are its snapshots (snapshot_steps(steps, snapshots))."""
    return all(os.path.exists(p) for p in [path] + [snapshot_path(path, s) for s in snapshot_steps(steps, snapshots)])


def trained_model(profile, arm="softmax", seed=0, data=None, device="cpu", out_dir="out", steps=None, micro_batch=None,
                  compile=None, snapshots=0):
    """The model of this profile, arm (ARMS) and seed: from the cache in out_dir/checkpoints, or trained now
    (micro_batch: see plan_training, it changes the result only within float tolerance and is not keyed;
    compile: see train, it is keyed). snapshots: keep that many models along the training
    (snapshot_steps), each in the cache beside the final one (snapshot_path); a cached model whose
    snapshots are missing trains again, to the same weights. load_snapshot reads them."""
    model_cfg, train_cfg = profile_configs(profile, arm, seed, steps)
    data = data if data is not None else profile_data(profile)
    compile = compiles(device, train_cfg, model_cfg.block_size, compile)
    path, expect = checkpoint_path(profile, arm, seed, data, device, out_dir, steps, compile)
    if in_cache(path, train_cfg.steps, snapshots):
        return load_checkpoint(path, device, expect)
    torch.manual_seed(seed)
    model = GPT(model_cfg).to(device)

    def snapshot(step, model, history):
        save_checkpoint(snapshot_path(path, step), model, train_cfg, history, data.fingerprint, expect["environment"], step)

    history = train(model, data, train_cfg, desc=f"{profile}/{arm}/seed {seed}", micro_batch=micro_batch, compile=compile,
                    snapshot=snapshot, snapshot_at=snapshot_steps(train_cfg.steps, snapshots))
    failure = None
    if is_main_process():
        try:
            save_checkpoint(path, model, train_cfg, history, data.fingerprint, expect["environment"])
        except OSError as e:
            failure = f"cannot save the checkpoint {path}: {e.strerror or e}"
    if world_size() > 1:  # every rank learns whether rank 0 saved, rather than wait for a file that never comes
        failure = broadcast_from_main(failure)
    if failure is not None:
        raise InputError(failure)
    if world_size() == 1:
        return model, history
    # Rank 0 alone evaluated and saved; the others load its file, so every rank returns the same
    # weights (DDP kept them equal anyway) and rank 0's full history.
    return (model, history) if is_main_process() else load_checkpoint(path, device, expect)
