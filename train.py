"""
Train a GPT with STEM or SwiGLU FFNs: the training script, read top to bottom. The model is model.py,
the tables' optimizer tables.py (offload.py with --offload); this file holds no model code.

    python train.py                                   # the main job: facts data, small STEM model
    python train.py --ffn=swiglu --max_iters=500      # any --key=value from the two configs below
    python train.py presets/shakespeare.py --seed=2   # a preset file (plain assignments), then overrides
    python train.py --init_from=resume                # continue out/ckpt.pt exactly where it stopped
    torchrun --standalone --nproc_per_node=2 train.py # data parallel (NCCL on GPUs, gloo on CPUs)

With no arguments it prepares the facts data if missing, trains on the available device, evaluates
validation loss and fact recall, and writes out/ckpt.pt, out/metrics.jsonl and out/loss.png.
It never overwrites a run: a fresh start into an out_dir holding a checkpoint is refused.
"""

import dataclasses
import gc
import json
import math
import os
import shlex
import shutil
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import offload
from common import (Batches, RunLock, check_model_config, check_provenance, check_same_architecture, clock, evaluate,
                    fact_recall, load_checkpoint, load_facts, load_meta, model_from_checkpoint, plot_losses,
                    prepare_facts, print_accounting, ranks_agree, resolve_device, save_checkpoint,
                    truncate_jsonl)
from configurator import UserError, die, parse_config, print_config, require
from model import GPT, GPTConfig, configure_optimizer
from tables import ResidentTables
from tokenizer import load_tokenizer


@dataclass
class TrainConfig:
    data_dir: str = "data/facts"  # made by prepare_data.py (the facts data is made here if missing)
    out_dir: str = "out"  # ckpt.pt, metrics.jsonl, loss.png (and best.pt with keep_best)
    init_from: str = "scratch"  # scratch (refused over a checkpoint) | resume (same run; a new block_size allowed)
    batch_size: int = 32  # sequences per micro-batch (per process under DDP)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 600  # optimizer steps (the default run: about 3 minutes on a 2-core CPU)
    eval_interval: int = 100  # steps between evaluations (and checkpoints)
    eval_iters: int = 10  # validation batches per evaluation (fixed batches: comparable across runs)
    log_interval: int = 50  # steps between log lines (metrics.jsonl gets every step)
    learning_rate: float = 3e-3  # peak; small models take a high rate
    min_lr: float = 3e-4  # cosine floor, lr / 10 as Chinchilla
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: typing.Optional[int] = None  # cosine length; None = max_iters
    weight_decay: float = 0.1  # AdamW, as the paper (matrices, embeddings and tables; not norms)
    grad_clip: float = 1.0  # max norm, applied to backbone and tables separately (authors' code)
    table_optimizer: str = "dense"  # "dense": AdamW over whole tables (paper) | "lazy": only batch rows
    eval_facts: bool = True  # fact recall at each evaluation when the data is the facts dataset
    stop_on_nan: bool = True  # val loss nan/inf: stop, keep the last good checkpoint (False: save it, go on)
    keep_best: bool = False  # also keep out_dir/best.pt, the checkpoint with the lowest validation loss
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" (bfloat16 autocast on CUDA, float32 on CPU), "float32", "bfloat16"
    compile: bool = True  # torch.compile on CUDA; always off on CPU (compile time outweighs the gain)
    offload: bool = False  # STEM tables in host memory, rows prefetched each step (offload.py); implies lazy
    seed: int = 1337


def get_lr(it, tc):
    decay = tc.lr_decay_iters or tc.max_iters
    if it < tc.warmup_iters:
        return tc.learning_rate * (it + 1) / tc.warmup_iters
    if it >= decay:
        return tc.min_lr
    ratio = (it - tc.warmup_iters) / max(1, decay - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (tc.learning_rate - tc.min_lr)


def check_config(tc, mc, resuming_keys_unknown=False):
    """Every value in range before anything is read, built or written: one error line otherwise.
    resuming_keys_unknown: a resume before the checkpoint's keys are restored (load_run checks again
    after), so checks that compare two keys wait."""
    for k in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        require(getattr(tc, k) >= 1, f"{k}={getattr(tc, k)} must be at least 1")
    require(tc.max_iters >= 0 and tc.warmup_iters >= 0, "max_iters and warmup_iters must be 0 or more")
    require(tc.lr_decay_iters is None or tc.lr_decay_iters >= 1, "lr_decay_iters must be None or at least 1")
    require(tc.learning_rate > 0, f"learning_rate={tc.learning_rate} must be positive")
    require(0 <= tc.min_lr and (resuming_keys_unknown or tc.min_lr <= tc.learning_rate),
            f"min_lr={tc.min_lr} must be in [0, learning_rate={tc.learning_rate}]")
    require(tc.weight_decay >= 0, f"weight_decay={tc.weight_decay} must be 0 or more")
    require(tc.grad_clip > 0, f"grad_clip={tc.grad_clip} must be positive (a value such as 1e9 turns clipping off)")
    require(tc.init_from in ("scratch", "resume"), f"init_from={tc.init_from!r} is not one of scratch, resume")
    require(tc.table_optimizer in ("dense", "lazy"), f"table_optimizer={tc.table_optimizer!r} is not dense or lazy")
    check_model_config(mc)
    if os.path.exists(tc.out_dir) and not os.path.isdir(tc.out_dir):
        raise UserError(f"out_dir={tc.out_dir} is a file, not a folder: choose another --out_dir")


def refuse_to_overwrite(tc):
    """A fresh start never writes over a run (checked after values, device and data: those are heard first)."""
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    if tc.init_from == "scratch" and os.path.exists(ckpt_path):
        raise UserError(f"{ckpt_path} exists: continue that run with --init_from=resume, or start over in another "
                        f"--out_dir (or delete {ckpt_path} first)")


MACHINE_KEYS = ("init_from", "out_dir", "device", "dtype", "compile", "offload")  # where it runs, not what it trains


def load_run(tc, mc, keys_set, ddp):
    """The data's meta (the facts data is made on first use) and, on resume, the checkpoint, checked
    against this run's data and arguments. The model config comes from the data (vocab) or the
    checkpoint (but a given block_size); on resume, so do the training keys not given (it continues the run)."""
    ckpt = None
    if tc.init_from == "resume":
        path = os.path.join(tc.out_dir, "ckpt.pt")
        ckpt = load_checkpoint(path)
        saved = ckpt["config"]["train"]
        changed = [f"{k} {saved[k]!r} -> {getattr(tc, k)!r}" for k in sorted(keys_set)
                   if k in saved and k not in MACHINE_KEYS and saved[k] != getattr(tc, k)]
        require("weight_decay" not in keys_set or saved.get("weight_decay", tc.weight_decay) == tc.weight_decay,
                f"weight_decay cannot change on resume (the optimizer state holds {saved.get('weight_decay')}): "
                f"drop --weight_decay, or train from scratch in another --out_dir")
        for k, v in saved.items():
            if k not in keys_set and k not in MACHINE_KEYS and hasattr(tc, k):
                setattr(tc, k, v)
        check_config(tc, mc)
        if changed:
            print(f"note: resuming with changed training keys: {', '.join(changed)}")
    if not ddp:  # under DDP every rank would write it: prepare it first
        prepare_facts(tc.data_dir, TrainConfig.data_dir)
    meta = load_meta(tc.data_dir)
    if "vocab_size" not in keys_set:
        mc.vocab_size = meta["vocab_size"]
    require(mc.vocab_size >= meta["vocab_size"], f"vocab_size={mc.vocab_size} is smaller than the data's "
            f"{meta['vocab_size']}: drop --vocab_size")
    if ckpt is None:
        return meta, None
    check_same_architecture(ckpt["config"]["model"], mc, keys_set - {"block_size"}, path)
    check_provenance(ckpt, meta, tc.data_dir, path)
    if "block_size" in keys_set and ckpt["config"]["model"]["block_size"] != mc.block_size:
        print(f"note: going on at block_size {mc.block_size}, trained so far at {ckpt['config']['model']['block_size']}"
              f" (positions have no weights with RoPE)")
        ckpt["config"]["model"]["block_size"] = mc.block_size
        ckpt.update(best_val_loss=float("inf"), best_iter=0)  # val losses at other contexts do not compare
    for k, v in ckpt["config"]["model"].items():
        setattr(mc, k, v)
    return meta, ckpt


def build(tc, mc, ckpt, device, ddp, keys_set):
    """The model (built on the CPU), its tables placed (offload takes them out before the move to the
    device), the backbone optimizer, and on resume every state restored; also the accounting."""
    model = model_from_checkpoint(ckpt, "checkpoint") if ckpt else GPT(mc)
    accounting = (model.param_counts(), model.flops_per_token())  # before offload takes the tables out
    if tc.offload:
        if "table_optimizer" not in keys_set:
            tc.table_optimizer = "lazy"  # the only one offload runs (below); said in the printed config
        require(tc.table_optimizer == "lazy", "offload needs --table_optimizer=lazy: dense AdamW reads and writes "
                "every row of every table each step (~28 bytes per table value through host memory), the traffic "
                "offload exists to avoid; the lazy optimizer touches only the rows of the batch")
        require(not ddp, "offload runs on one process: drop --offload or run without torchrun")
        tables = offload.OffloadedTables(model, device, weight_decay=tc.weight_decay)
    else:
        tables = ResidentTables(model, device, tc.table_optimizer, weight_decay=tc.weight_decay, ddp=ddp)
    optimizer = configure_optimizer(model, tc.learning_rate, tc.weight_decay)  # the backbone
    state = dict(iter=0, best_val_loss=float("inf"), best_iter=0, tokens=0, last_val_loss=None)
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"]["backbone"])
        try:
            tables.load_optimizer_state_dict(ckpt["optimizer"]["tables"])
        except ValueError as e:
            raise UserError(f"{os.path.join(tc.out_dir, 'ckpt.pt')}: {e}") from None
        state.update({k: ckpt[k] for k in state if k in ckpt})
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"].get("cuda") is not None and device.startswith("cuda"):
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
    return model, tables, optimizer, state, accounting


def load_probes(tc, meta):
    """The facts probes and the tokenizer, for the recall metric; (None, None) for other data."""
    if not (tc.eval_facts and meta["dataset"] == "facts"):
        return None, None
    enc, facts = load_tokenizer(tc.data_dir), load_facts(tc.data_dir)
    probes, chance = facts["probes"], sum(facts["chance"].values()) / len(facts["chance"])
    print(f"fact recall: {len(probes)} probes, chance level {chance:.3f}")
    return probes, enc


def checkpoint(raw_model, tables, optimizer, tc, mc, meta, state, data_rng, device, data_rngs=None):
    return {  # everything a resume needs, with the same keys whether the tables were resident or offloaded
        "model": tables.state_dict(raw_model),
        "optimizer": {"backbone": optimizer.state_dict(),
                      "tables": tables.optimizer_state_dict(get_lr(state["iter"], tc))},
        "config": {"model": dataclasses.asdict(mc), "train": dataclasses.asdict(tc)},
        # what it was trained on: a resume, sample.py and claims.py refuse other data or another tokenizer
        "data": dict(data_dir=tc.data_dir, **{k: meta.get(k) for k in ("dataset", "fingerprint", "tokenizer_sha256")}),
        **state,  # iter, tokens, best_val_loss, best_iter, last_val_loss
        "rng": {"torch": torch.get_rng_state(), "data": data_rng, "data_ranks": data_rngs,  # DDP: every rank's
                "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None},
    }


def start_processes(tc):
    """(ddp, rank, world size) under torchrun (NCCL on GPUs, one per process; gloo on CPUs), else one process."""
    if int(os.environ.get("RANK", -1)) == -1:
        return False, 0, 1
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = tc.device != "cpu" and torch.cuda.is_available()
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        tc.device = f"cuda:{local}"
        torch.cuda.set_device(tc.device)
    elif tc.device == "auto":
        tc.device = "cpu"
    return True, rank, world


class Progress:
    """Log lines and metrics.jsonl rows. Steps are kept as device tensors and read once per log line,
    so the GPU is never made to wait per step; dt is the mean over the steps since the last line.
    The first logged step (allocator warm-up, torch.compile) is left out of the smoothed tok/s and ETA."""

    def __init__(self, path, master, tokens_per_step, max_iters):
        self.path, self.master, self.tokens_per_step, self.max_iters = path, master, tokens_per_step, max_iters
        self.steps = []  # (iter, lr, tokens, tensor[loss, grad norm, table grad norm])
        self.t_start = self.t_last = time.time()
        self.dt_avg = None  # smoothed seconds per step after warm-up: tok/s and the ETA
        self.warm = False  # the first flush holds the warm-up step

    def write(self, row):
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def step(self, it, lr, tokens, loss, gnorm, tnorm):
        self.steps.append((it, lr, tokens, torch.stack([loss.detach().float(), gnorm.float(), tnorm.float()])))

    def flush(self):
        values = torch.stack([v for *_, v in self.steps]).tolist()  # the one device read
        dt = (time.time() - self.t_last) / len(self.steps)
        if self.warm:
            self.dt_avg = dt if self.dt_avg is None else 0.7 * self.dt_avg + 0.3 * dt
        self.warm = True
        for (it, lr, tokens, _), (loss, gn, tn) in zip(self.steps, values):
            self.write(dict(kind="train", iter=it, loss=loss, lr=lr, grad_norm=gn, table_grad_norm=tn,
                            dt_ms=dt * 1000, tok_per_s=self.tokens_per_step / dt, tokens=tokens))
        if self.master:
            speed = (f"{self.tokens_per_step / self.dt_avg:,.0f} tok/s | {clock(time.time() - self.t_start)} elapsed, "
                     f"ETA {clock((self.max_iters - it) * self.dt_avg)}") if self.dt_avg else "warm-up (not timed)"
            print(f"step {it:5d} | loss {loss:.4f} | lr {lr:.2e} | grad norm {gn:.2f} (tables {tn:.2f}) "
                  f"| dt {dt * 1000:.0f} ms | {speed}")
        self.steps, self.t_last = [], time.time()


def restore_data_order(batches, ckpt, rank, world, fresh_seed, log):
    """Each rank continues its own data draws, so a resumed run sees the batches an uninterrupted one
    would. With another number of processes, rank 0 continues and the others draw anew."""
    ranks = ckpt["rng"].get("data_ranks") or [ckpt["rng"]["data"]]  # one per process that trained it
    batches.gen.set_state(ranks[rank] if len(ranks) == world else ranks[0])
    if len(ranks) != world:
        if rank:
            batches.gen.manual_seed(fresh_seed)
        log(f"note: the checkpoint was trained by {len(ranks)} process(es), this run has {world}: "
            f"the data order is not the one an uninterrupted run would have seen")


def resume_command(tc, mc, keys_set):
    """The command that continues this run. A resume takes the keys it is not given from the
    checkpoint, so it repeats the folder and what this run was given, shell-quoted."""
    given = ["out_dir"] + sorted(keys_set - {"out_dir", "init_from"})
    args = [f"--{k}={getattr(tc if hasattr(tc, k) else mc, k)}" for k in given] + ["--init_from=resume"]
    return "python train.py " + " ".join(shlex.quote(a) for a in args)


def train(tc, mc, keys_set):
    # ---- processes, device, data, model, tables, optimizers
    ddp, rank, world = start_processes(tc)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device, dtype, ctx, note = resolve_device(tc.device, tc.dtype)
    torch.manual_seed(tc.seed)
    meta, ckpt = load_run(tc, mc, keys_set, ddp)
    batches = Batches(tc.data_dir, meta, mc.block_size, tc.batch_size, device, tc.seed + rank)
    refuse_to_overwrite(tc)
    raw_model, tables, optimizer, state, accounting = build(tc, mc, ckpt, device, ddp, keys_set)
    if ckpt:
        restore_data_order(batches, ckpt, rank, world, tc.seed + rank + 7919 * state["iter"], log)
        ckpt = None  # free memory
        if state["iter"] >= tc.max_iters:
            log(f"note: the checkpoint is at step {state['iter']} and max_iters is {tc.max_iters}: nothing to train "
                f"(raise --max_iters to continue)")
    model = torch.compile(raw_model) if tc.compile and device.startswith("cuda") else raw_model  # CPU: not worth it
    if ddp:
        local = [int(os.environ["LOCAL_RANK"])] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=local)
    tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum * world
    if master:
        print_config(mc, tc)
        print(note + f"; compile: {'on' if tc.compile and device.startswith('cuda') else 'off'}"
              + (f"; DDP over {world} processes" if ddp else "") + f"; tables: {tables.describe()}")
        print_accounting(raw_model, *accounting, tc=tc, tokens_per_step=tokens_per_step,
                         table_bytes=offload.device_bytes(mc, tc.batch_size, grad_accum=tc.grad_accum))
        print(f"data: {tc.data_dir} ({meta['dataset']}, vocab {meta['vocab_size']}, "
              f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens)")
    paths = {k: os.path.join(tc.out_dir, f) for k, f in
             [("ckpt", "ckpt.pt"), ("best", "best.pt"), ("metrics", "metrics.jsonl"), ("plot", "loss.png")]}

    probes, enc = load_probes(tc, meta) if master else (None, None)  # for the fact recall metric
    if master:  # metrics.jsonl is truncated to the resumed step so that it tells one story
        truncate_jsonl(paths["metrics"], state["iter"])
    progress = Progress(paths["metrics"], master, tokens_per_step, tc.max_iters)

    def evaluate_and_save():
        log(f"evaluating at step {state['iter']} ({tc.eval_iters} batches per split"
            + (f", {len(probes)} fact probes" if probes else "") + ") ...", flush=True)
        tables.sync()  # every queued table update has landed
        losses = evaluate(raw_model, batches, tc.eval_iters, ctx, tables.lookup)
        row = dict(kind="eval", iter=state["iter"], tokens=state["tokens"], train_loss=losses["train"],
                   val_loss=losses["val"])
        msg = f"eval {state['iter']:5d} | train {losses['train']:.4f} | val {losses['val']:.4f}"
        if probes:
            rec = fact_recall(raw_model, enc, probes, device, ctx, stem_fn=tables.stem_fn)
            row.update(rec)
            msg += f" | recall {rec['recall']:.3f} (" + ", ".join(f"{k} {v:.2f}" for k, v in rec.items()
                                                             if k != "recall") + ")"
        log(msg)
        progress.write(row)
        improved = losses["val"] < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=losses["val"], best_iter=state["iter"])
        state["last_val_loss"] = losses["val"]
        if tc.stop_on_nan and not math.isfinite(losses["val"]):  # diverged: keep the last good checkpoint
            raise UserError(f"training diverged at step {state['iter']} (val loss {losses['val']}): "
                            + (f"{paths['ckpt']} keeps step {saved[0]}" if saved[0] is not None
                               else "no checkpoint written")
                            + "; lower --learning_rate or raise --warmup_iters")
        save_checkpoint(paths["ckpt"], checkpoint(raw_model, tables, optimizer, tc, mc, meta, state, data_rng, device,
                                                  data_rngs[0]))
        saved[0] = state["iter"]
        if tc.keep_best and improved:
            shutil.copyfile(paths["ckpt"], paths["best"] + ".tmp")
            os.replace(paths["best"] + ".tmp", paths["best"])
        plot_losses(paths["metrics"], paths["plot"])

    data_rng = batches.gen.get_state()  # the data generator's state after the current step's draws
    saved = [state["iter"] if state["iter"] else None]  # the step ckpt.pt holds
    data_rngs = [None]  # under DDP, every rank's data_rng, gathered at each checkpoint

    def gather_data_rngs():  # called by every rank at a checkpoint step
        if ddp:
            data_rngs[0] = [None] * world
            torch.distributed.all_gather_object(data_rngs[0], data_rng)

    def draw():  # one step's micro-batches, on the CPU, in the same order whatever the placement
        return [batches.get("train", to_device=False) for _ in range(tc.grad_accum)]

    # the batches are drawn one step ahead, so that the tables can fetch the next step's rows while
    # this step computes (offload); a resident run just computes the next step's unique ids early
    upcoming = draw()
    tables.prefetch([x for x, _ in upcoming])

    # ---- the loop
    params = [p for g in optimizer.param_groups for p in g["params"]]
    try:
        if state["iter"] == 0:
            gather_data_rngs()
            if master:
                evaluate_and_save()
        while state["iter"] < tc.max_iters:
            lr = get_lr(state["iter"], tc)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_batches, step_tables = upcoming, tables.rows()
            for micro, ((x, y), (stem_ids, stem_tables)) in enumerate(zip(step_batches, step_tables)):
                x, y = batches.to_device(x, y)
                if ddp:  # all-reduce gradients on the last micro-batch only
                    model.require_backward_grad_sync = micro == tc.grad_accum - 1
                with ctx:
                    _, loss = model(x, y, stem_ids=stem_ids, stem_tables=stem_tables)
                (loss / tc.grad_accum).backward()  # scaled: the micro-batches' gradients add up to the mean
                if micro == 0:  # the next step's ids, while the GPU runs this backward
                    data_rng = batches.gen.get_state()  # where a run resumed after this step draws from
                    if state["iter"] + 1 < tc.max_iters:
                        upcoming = draw()
                        tables.prefetch([x for x, _ in upcoming])  # offload: fetched as this step's update allows
            # the tables by their own norm, then the backbone (the authors' code clips both): independent
            # parameters, and offload's last gradients leave for the host without waiting for the backbone's AdamW
            tnorm = tables.step(lr, tc.grad_clip)  # offload: waits for the last backward; the update is queued
            gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["iter"] += 1
            state["tokens"] += tokens_per_step
            it = state["iter"]
            progress.step(it, lr, state["tokens"], loss, gnorm, tnorm)  # no device read here: the GPU runs ahead
            at_checkpoint = it % tc.eval_interval == 0 or it == tc.max_iters
            if at_checkpoint:
                gather_data_rngs()
            evaluating = at_checkpoint and master
            if it % tc.log_interval == 0 or it == 1 or evaluating:
                progress.flush()
            if evaluating:
                evaluate_and_save()
                progress.t_last = time.time()  # evaluation time is not step time
    except KeyboardInterrupt:
        log(f"\ninterrupted at step {state['iter']}: " + (f"{paths['ckpt']} holds step {saved[0]}; continue with: "
            + resume_command(tc, mc, keys_set) if saved[0] is not None else "no checkpoint was written"))
        sys.exit(130)

    if ddp:
        log(f"DDP: parameter checksums across ranks {'agree' if ranks_agree(raw_model, world) else 'DIFFER'}")
        # free the DDP wrapper (it holds the process group) before destroying the group: left to interpreter
        # exit, gloo's threads were sometimes torn down mid-finalization (std::terminate, 1 in 15 CPU runs)
        del model
        gc.collect()
        torch.distributed.destroy_process_group()
    tables.sync()
    last = f" (val {state['last_val_loss']:.4f})" if state["last_val_loss"] is not None else ""
    best = f", kept in {paths['best']}" if tc.keep_best else " (not kept: --keep_best=True keeps it)"
    log(f"done: {state['iter']} steps; {paths['ckpt']} holds the last step{last}; "
        f"best val {state['best_val_loss']:.4f} at step {state['best_iter']}{best}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    tc, mc = TrainConfig(), GPTConfig()
    try:
        keys_set = parse_config(argv, mc, tc, doc=__doc__)
        check_config(tc, mc, resuming_keys_unknown=tc.init_from == "resume")
        master = int(os.environ.get("RANK", 0)) == 0
        created = master and not os.path.exists(tc.out_dir)
        try:
            os.makedirs(tc.out_dir, exist_ok=True) if master else None
        except OSError as e:
            raise UserError(f"cannot create out_dir {tc.out_dir}: {e.strerror}; choose another --out_dir") from None
        try:
            with RunLock(tc.out_dir) if master else nullcontext():  # a second run into this out_dir refuses
                train(tc, mc, keys_set)
        except UserError:
            if created and not os.listdir(tc.out_dir):
                os.rmdir(tc.out_dir)  # refused before writing anything: leave no empty folder behind
            raise
    except UserError as e:
        die(str(e))


if __name__ == "__main__":
    main()
