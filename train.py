"""
Train a GPT with STEM or SwiGLU FFNs.

    python train.py                                   # the main job: facts data, small STEM model
    python train.py --ffn=swiglu --max_iters=500      # any --key=value from the two configs below
    python train.py presets/shakespeare.py --seed=2   # a preset file (plain assignments), then overrides
    torchrun --standalone --nproc_per_node=2 train.py # data parallel (NCCL on GPUs, gloo on CPUs)

With no arguments it prepares the facts data if missing, trains on the available device, evaluates
validation loss and fact recall, and writes out/ckpt.pt, out/metrics.jsonl and out/loss.png.
"""

import ast
import dataclasses
import json
import math
import os
import random
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from model import GPT, GPTConfig, configure_optimizer, parse_stem_layers
from tables import ResidentTables


@dataclass
class TrainConfig:
    data_dir: str = "data/facts"  # made by prepare_data.py (the facts data is made here if missing)
    out_dir: str = "out"  # ckpt.pt, metrics.jsonl, loss.png
    init_from: str = "scratch"  # "scratch" or "resume" (continue exactly from out_dir/ckpt.pt)
    batch_size: int = 32  # sequences per micro-batch (per process under DDP)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_iters: int = 600  # optimizer steps (the default run: about 2.5 minutes on a 2-core CPU)
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
    device: str = "auto"  # "auto" (cuda if present), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" (bfloat16 autocast on CUDA, float32 on CPU), "float32", "bfloat16"
    compile: bool = True  # torch.compile on CUDA; always off on CPU (compile time outweighs the gain)
    offload: bool = False  # STEM tables in host memory, rows prefetched each step (offload.py); implies lazy
    seed: int = 1337


# -----------------------------------------------------------------------------
# config: dataclasses + type-checked --key=value overrides (one mechanism for every script)


class UserError(Exception):
    """Bad input: reported as one line, exit code 1, no traceback."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def _coerce(key, value, typ, from_cli):
    """Convert a command-line string (or check a preset literal) against a dataclass field type."""
    if typing.get_origin(typ) is typing.Union:  # Optional[X]
        if value is None or (from_cli and value == "None"):
            return None
        typ = next(t for t in typing.get_args(typ) if t is not type(None))
    if from_cli:
        try:
            if typ is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return typ(value) if typ in (int, float) else value
        except ValueError:
            raise UserError(f"--{key}={value} is not a valid {typ.__name__}") from None
    if typ is float and type(value) is int:
        value = float(value)
    if type(value) is not typ:
        raise UserError(f"{key} = {value!r} is not a {typ.__name__}")
    return value


def parse_config(argv, *configs):
    """Apply an optional preset file (first argument; plain assignments such as `n_layer = 6`) and
    --key=value / --key value / --flag arguments to the dataclass instances, in place. List fields
    are repeatable. Returns the set of keys that were set."""
    fields = {}
    for c in configs:
        for f in dataclasses.fields(c):
            fields[f.name] = (c, f)
    items, args = [], list(argv)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        if not os.path.isfile(path):
            raise UserError(f"preset file {path} not found (a preset is a .py file of plain assignments)")
        for node in ast.parse(open(path).read()).body:
            try:
                assert isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
                items.append((node.targets[0].id, ast.literal_eval(node.value), False))
            except (AssertionError, ValueError):
                raise UserError(f"{path}:{node.lineno}: a preset may only hold assignments of literals, "
                                f"such as n_layer = 6") from None
    while args:
        a = args.pop(0)
        if not a.startswith("--"):
            raise UserError(f"unexpected argument {a!r}: use --key=value")
        key, eq, value = a[2:].partition("=")
        if key in fields and not eq:  # --key value, or a bare --flag for booleans
            if fields[key][1].type is bool and (not args or args[0].startswith("--")):
                value = "True"
            elif args:
                value = args.pop(0)
            else:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
        items.append((key, value, True))
    seen = set()
    for key, value, from_cli in items:
        if key not in fields:
            raise UserError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(fields))}")
        obj, f = fields[key]
        if f.type is list:
            getattr(obj, key).append(value)
        else:
            setattr(obj, key, _coerce(key, value, f.type, from_cli))
        seen.add(key)
    return seen


def print_config(*configs):
    for c in configs:
        print(f"{type(c).__name__}:")
        for k, v in dataclasses.asdict(c).items():
            print(f"  {k} = {v!r}")


# -----------------------------------------------------------------------------
# device, dtype, data, checkpoints


def resolve_device(device, dtype):
    """(device, dtype name, autocast context, note) with the reason for each decision."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} was asked for but CUDA is not available here; use --device=cpu")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"dtype={dtype!r} is not one of auto, float32, bfloat16")
    dev_type = device.split(":")[0]
    ctx = nullcontext() if dtype == "float32" else torch.autocast(dev_type, dtype=torch.bfloat16)
    what = torch.cuda.get_device_name(device) if dev_type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    note = f"device: {device} ({what}); dtype: {dtype} " + (
        "(weights float32, matmuls in bfloat16 autocast)" if dtype == "bfloat16" else "(float32 throughout)")
    return device, dtype, ctx, note


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        name = os.path.basename(os.path.normpath(data_dir))
        hint = "python prepare_data.py" if name == "facts" else f"python prepare_data.py --dataset {name} ..."
        raise UserError(f"no prepared data in {data_dir} (meta.json missing): run `{hint}` first, "
                        f"or point --data_dir at a prepared folder")
    with open(path) as f:
        return json.load(f)


class Batches:
    """Random windows of block_size+1 tokens from train.bin / val.bin (nanoGPT's get_batch), drawn
    with a seeded generator whose state goes into the checkpoint, so that a resumed run sees the
    same batches as an uninterrupted one."""

    def __init__(self, data_dir, meta, block_size, batch_size, device, seed):
        self.paths = {s: os.path.join(data_dir, f"{s}.bin") for s in ("train", "val")}
        self.dtype = np.dtype(meta["dtype"])
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        for split, path in self.paths.items():
            n = os.path.getsize(path) // self.dtype.itemsize if os.path.exists(path) else 0
            if n <= block_size + 1:
                raise UserError(f"{path} holds {n} tokens, not more than block_size + 1 = {block_size + 1}: "
                                f"lower --block_size or prepare more data")
        self.gen = torch.Generator().manual_seed(seed)

    def get(self, split, gen=None, to_device=True):
        # a fresh memmap per batch avoids the memory growth of a long-lived one (nanoGPT issue)
        data = np.memmap(self.paths[split], dtype=self.dtype, mode="r")
        ix = torch.randint(len(data) - self.block_size - 1, (self.batch_size,), generator=gen or self.gen)
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in ix.tolist()])
        if not to_device:
            return x, y
        return self.to_device(x, y)

    def to_device(self, x, y):
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y


def save_checkpoint(path, ckpt):
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half checkpoint under the real name


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py --out_dir={os.path.dirname(path) or '.'})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable (truncated or corrupt: {type(e).__name__}); "
                        f"retrain, or point --out_dir at a good one") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise UserError(f"{path} is not a nanoSTEM checkpoint (no 'model'/'config' entries)")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    cfg = GPTConfig(**ckpt["config"]["model"])
    model = GPT(cfg)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:
        raise UserError(f"{path} does not match its own config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}): it was written by another version of the code")
    return model


def check_same_architecture(saved, current, keys_set, path):
    """A resumed run takes the model config from the checkpoint; an override that contradicts it
    (say --ffn=swiglu on a STEM checkpoint) is an error rather than a silent surprise."""
    for k in sorted(keys_set & set(saved)):
        if saved[k] != getattr(current, k):
            raise UserError(f"{path} was trained with {k}={saved[k]!r} but this run asks for "
                            f"{k}={getattr(current, k)!r}: drop --{k}, or train from scratch in another --out_dir")


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, batches, eval_iters, ctx, lookup=None):
    """Mean loss over the same eval_iters batches of each split every time (fixed generator).
    lookup(x) -> (stem_ids, stem_tables) supplies the STEM rows when the tables live elsewhere (offload)."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen = torch.Generator().manual_seed(12345)
        losses = []
        for _ in range(eval_iters):
            x, y = batches.get(split, gen)
            with ctx:
                stem_ids, stem_tables = lookup(x) if lookup else (None, None)
                losses.append(model(x, y, stem_ids=stem_ids, stem_tables=stem_tables)[1].item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


@torch.no_grad()
def fact_recall(model, enc, probes, device, ctx=nullcontext(), batch=256, stem_fn=None):
    """Fraction of probes ("The capital of Velmora is" -> " Drasil") whose greedy continuation
    starts with the answer, overall and per attribute. Probes of equal token length run as a batch.
    A probe with a "stem_prompt" looks its STEM rows up by that text's ids (an edit)."""
    model.eval()
    groups = {}
    for p in probes:
        groups.setdefault(len(enc.encode(p["prompt"])), []).append(p)
    hits = {}
    for n, group in groups.items():
        for i in range(0, len(group), batch):
            chunk = group[i:i + batch]
            idx = torch.tensor([enc.encode(p["prompt"]) for p in chunk], device=device)
            stem_ids = torch.tensor([enc.encode(p.get("stem_prompt", p["prompt"])) for p in chunk], device=device)
            steps = max(len(enc.encode(p["answer"])) for p in chunk)
            with ctx:
                out = model.generate(idx, steps, temperature=0, stem_ids=stem_ids, stem_fn=stem_fn)
            for p, row in zip(chunk, out[:, n:].tolist()):
                hits.setdefault(p["attribute"], []).append(enc.decode(row).startswith(p["answer"]))
    model.train()
    res = {a: sum(h) / len(h) for a, h in hits.items()}
    res["recall"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return res


def edit_probes(facts, enc, n_pairs=100, seed=0):
    """Probes that measure knowledge editing: entity A's prompt, with A's token looked up through
    B's rows; the expected answer is B's. Attributes where A and B agree are left out (no signal),
    and so are prompts where the swap changes the token count."""
    rng = random.Random(seed)
    by = {}
    for p in facts["probes"]:
        by.setdefault(p["entity"], {})[p["attribute"]] = p
    names = sorted(by)
    out = []
    for _ in range(n_pairs):
        a, b = rng.sample(names, 2)
        for attr, p in by[a].items():
            stem_prompt = p["prompt"].replace(a, b)
            if by[b][attr]["answer"] == p["answer"] or len(enc.encode(stem_prompt)) != len(enc.encode(p["prompt"])):
                continue
            out.append(dict(p, answer=by[b][attr]["answer"], stem_prompt=stem_prompt))
    return out


def plot_losses(metrics_path, png_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)]
    tr = [(r["iter"], r["loss"]) for r in rows if r["kind"] == "train"]
    ev = [(r["iter"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr), lw=0.8, alpha=0.6, label="train (per step)")
    if ev:
        ax.plot(*zip(*ev), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def get_lr(it, tc):
    decay = tc.lr_decay_iters or tc.max_iters
    if it < tc.warmup_iters:
        return tc.learning_rate * (it + 1) / tc.warmup_iters
    if it >= decay:
        return tc.min_lr
    ratio = (it - tc.warmup_iters) / max(1, decay - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (tc.learning_rate - tc.min_lr)


def print_accounting(model, counts=None, flops=None):
    c = counts or model.param_counts()
    T = model.cfg.block_size
    print(f"STEM layers: {model.stem_layers or 'none'} of {model.cfg.n_layer}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in c.items()))
    print(f"FLOPs per token (forward, context {T}): {flops or model.flops_per_token():,} "
          f"(matmul weights + attention; tables are lookups); training ~3x")


# -----------------------------------------------------------------------------
# training


def train(tc, mc, keys_set):
    # ---- processes and device
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = 0, 1
    if ddp:
        import torch.distributed as dist
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        use_cuda = tc.device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if use_cuda:
            tc.device = f"cuda:{local}"
            torch.cuda.set_device(tc.device)
        elif tc.device == "auto":
            tc.device = "cpu"
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    device, dtype, ctx, note = resolve_device(tc.device, tc.dtype)
    torch.manual_seed(tc.seed)

    # ---- data (the facts data is made on first use) and model config
    if not os.path.isfile(os.path.join(tc.data_dir, "meta.json")) and tc.data_dir == TrainConfig.data_dir and not ddp:
        print(f"{tc.data_dir} not found: preparing the facts dataset (python prepare_data.py)")
        import prepare_data
        prepare_data.prepare(dataset="facts", out_dir=tc.data_dir)
    meta = load_meta(tc.data_dir)
    if "vocab_size" not in keys_set:
        mc.vocab_size = meta["vocab_size"]
    elif mc.vocab_size < meta["vocab_size"]:
        raise UserError(f"vocab_size={mc.vocab_size} is smaller than the data's {meta['vocab_size']}: drop --vocab_size")
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")
    if tc.init_from not in ("scratch", "resume"):
        raise UserError(f"init_from={tc.init_from!r} is not one of scratch, resume")
    try:
        parse_stem_layers(mc.stem_layers, mc.n_layer, mc.ffn)
    except ValueError as e:
        raise UserError(str(e)) from None
    if tc.table_optimizer not in ("dense", "lazy"):
        raise UserError(f"table_optimizer={tc.table_optimizer!r} is not one of dense, lazy")
    ckpt = None
    if tc.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        check_same_architecture(ckpt["config"]["model"], mc, keys_set, ckpt_path)
        for k, v in ckpt["config"]["model"].items():
            setattr(mc, k, v)
    batches = Batches(tc.data_dir, meta, mc.block_size, tc.batch_size, device, tc.seed + rank)

    # ---- model (built on the CPU), its tables placed (offload takes them out before the move), optimizers
    model = model_from_checkpoint(ckpt, ckpt_path) if ckpt else GPT(mc)
    accounting = (model.param_counts(), model.flops_per_token())
    if tc.offload:
        if "table_optimizer" not in keys_set:
            tc.table_optimizer = "lazy"  # the only one offload runs (below); said in the printed config
        if tc.table_optimizer != "lazy":
            raise UserError("offload needs --table_optimizer=lazy: dense AdamW reads and writes every row of every "
                            "table each step (~28 bytes per table value through host memory), the traffic offload "
                            "exists to avoid; the lazy optimizer touches only the rows of the batch")
        if ddp:
            raise UserError("offload runs on one process: drop --offload or run without torchrun")
        import offload
        try:
            tables = offload.OffloadedTables(model, device, weight_decay=tc.weight_decay)
        except offload.OffloadError as e:
            raise UserError(str(e)) from None
    else:
        tables = ResidentTables(model, device, tc.table_optimizer, weight_decay=tc.weight_decay, ddp=ddp)
    optimizer = configure_optimizer(model, tc.learning_rate, tc.weight_decay)  # the backbone
    iter_num, best_val = 0, float("inf")
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"]["backbone"])
        try:
            tables.load_optimizer_state_dict(ckpt["optimizer"]["tables"])
        except ValueError as e:
            raise UserError(f"{ckpt_path}: {e}") from None
        iter_num, best_val = ckpt["iter"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        batches.gen.set_state(ckpt["rng"]["data"])
        if ckpt["rng"].get("cuda") is not None and device.startswith("cuda"):
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        ckpt = None  # free memory
    raw_model = model
    if tc.compile and device.startswith("cuda"):
        model = torch.compile(model)
        compile_note = "compile: on"
    else:
        compile_note = "compile: off" + (" (CPU: compile time outweighs the gain at these sizes)" if tc.compile else "")
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(os.environ["LOCAL_RANK"])] if device.startswith("cuda") else None)

    if master:
        print_config(mc, tc)
        print(note + f"; {compile_note}" + (f"; DDP over {world} processes" if ddp else "") +
              f"; tables: {tables.n} ({tc.table_optimizer} AdamW, " +
              (f"{tables.table.numel() * 4 / 2**20:.1f} MiB + moments in host memory, offloaded)" if tc.offload
               else "on the device)"))
        print_accounting(raw_model, *accounting)
        print(f"data: {tc.data_dir} ({meta['dataset']}, vocab {meta['vocab_size']}, "
              f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens)")
    tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum * world

    # ---- facts probes for the recall metric
    probes, enc = None, None
    if tc.eval_facts and meta["dataset"] == "facts" and master:
        import prepare_data
        enc = prepare_data.load_tokenizer(tc.data_dir)
        facts = json.load(open(os.path.join(tc.data_dir, "facts.json")))
        probes = facts["probes"]
        chance = sum(facts["chance"].values()) / len(facts["chance"])
        log(f"fact recall: {len(probes)} probes, chance level {chance:.3f}")

    # ---- logs: metrics.jsonl is truncated to the resumed step so that it tells one story
    os.makedirs(tc.out_dir, exist_ok=True)
    metrics_path = os.path.join(tc.out_dir, "metrics.jsonl")
    if master:
        old = open(metrics_path).readlines() if (iter_num and os.path.exists(metrics_path)) else []
        with open(metrics_path, "w") as f:
            f.writelines(line for line in old if json.loads(line)["iter"] <= iter_num)

    def write_metrics(row):
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def evaluate_and_save():
        nonlocal best_val
        tables.sync()  # every queued table update has landed
        losses = evaluate(raw_model, batches, tc.eval_iters, ctx, tables.lookup)
        row = dict(kind="eval", iter=iter_num, tokens=iter_num * tokens_per_step,
                   train_loss=losses["train"], val_loss=losses["val"])
        msg = f"eval {iter_num:5d} | train {losses['train']:.4f} | val {losses['val']:.4f}"
        if probes:
            rec = fact_recall(raw_model, enc, probes, device, ctx, stem_fn=tables.stem_fn)
            row.update(rec)
            msg += f" | recall {rec['recall']:.3f} (" + ", ".join(f"{k} {v:.2f}" for k, v in rec.items() if k != "recall") + ")"
        log(msg)
        write_metrics(row)
        best_val = min(best_val, losses["val"])
        ckpt = {  # the same keys whether the tables were resident or offloaded
            "model": tables.state_dict(raw_model),
            "optimizer": {"backbone": optimizer.state_dict(),
                          "tables": tables.optimizer_state_dict(get_lr(iter_num, tc))},
            "config": {"model": dataclasses.asdict(mc), "train": dataclasses.asdict(tc)},
            "iter": iter_num,
            "best_val_loss": best_val,
            "rng": {"torch": torch.get_rng_state(), "data": data_rng,
                    "cuda": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None},
        }
        save_checkpoint(ckpt_path, ckpt)
        plot_losses(metrics_path, os.path.join(tc.out_dir, "loss.png"))

    data_rng = batches.gen.get_state()  # the data generator's state after the current step's draws
    if iter_num == 0 and master:
        evaluate_and_save()

    def draw():  # one step's micro-batches, on the CPU, in the same order whatever the placement
        return [batches.get("train", to_device=False) for _ in range(tc.grad_accum)]

    # the batches are drawn one step ahead, so that the tables can fetch the next step's rows while
    # this step computes (offload); a resident run just computes the next step's unique ids early
    upcoming = draw()
    tables.prefetch([x for x, _ in upcoming])

    # ---- the loop
    params = [p for g in optimizer.param_groups for p in g["params"]]
    logged = []  # (iter, loss, lr, grad norm, table grad norm) as tensors, read at log time: one sync per log line
    t_log = time.time()
    while iter_num < tc.max_iters:
        lr = get_lr(iter_num, tc)
        for g in optimizer.param_groups:
            g["lr"] = lr
        step_batches, step_tables = upcoming, tables.rows()
        data_rng = batches.gen.get_state()  # where a run resumed after this step draws from
        if iter_num + 1 < tc.max_iters:
            upcoming = draw()
            tables.prefetch([x for x, _ in upcoming])  # offload: gathered and copied while this step computes
        for micro, ((x, y), (stem_ids, stem_tables)) in enumerate(zip(step_batches, step_tables)):
            x, y = batches.to_device(x, y)
            if ddp:  # all-reduce gradients on the last micro-batch only
                model.require_backward_grad_sync = micro == tc.grad_accum - 1
            with ctx:
                _, loss = model(x, y, stem_ids=stem_ids, stem_tables=stem_tables)
            (loss / tc.grad_accum).backward()  # scaled: the micro-batches' gradients add up to the mean
        # clip and step the backbone, then the tables by their own norm (the authors' code does both)
        gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        tnorm = tables.step(lr, tc.grad_clip)  # offload: the host part is queued, not waited for
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        logged.append((iter_num, lr, torch.stack([loss.detach().float(), gnorm.float(), tnorm.float()])))
        evaluating = (iter_num % tc.eval_interval == 0 or iter_num == tc.max_iters) and master
        if iter_num % tc.log_interval == 0 or iter_num == 1 or evaluating:
            # no device synchronize per step: the GPU runs ahead, and the time per step is the mean
            # over the steps since the last log line, read once here
            values = torch.stack([v for _, _, v in logged]).tolist()
            dt = (time.time() - t_log) / len(logged)
            for (it, lr_, _), (lossf, gn, tn) in zip(logged, values):
                write_metrics(dict(kind="train", iter=it, loss=lossf, lr=lr_, grad_norm=gn, table_grad_norm=tn,
                                   dt_ms=dt * 1000, tok_per_s=tokens_per_step / dt))
            log(f"step {iter_num:5d} | loss {lossf:.4f} | lr {lr:.2e} | grad norm {gn:.2f} (tables {tn:.2f}) "
                f"| dt {dt * 1000:.0f} ms | {tokens_per_step / dt:,.0f} tok/s")
            logged, t_log = [], time.time()
        if evaluating:
            evaluate_and_save()
            t_log = time.time()  # evaluation time is not step time

    if ddp:  # the ranks must hold identical weights; a cheap check that the table updates agreed
        s = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum().reshape(1)
        all_s = [torch.zeros_like(s) for _ in range(world)]
        torch.distributed.all_gather(all_s, s)
        log(f"DDP: parameter checksums across ranks {'agree' if all(torch.equal(a, s) for a in all_s) else 'DIFFER'}")
        torch.distributed.destroy_process_group()
    tables.sync()
    log(f"done: {iter_num} steps, best val loss {best_val:.4f}; checkpoint {ckpt_path}")


def main(argv=None):
    tc, mc = TrainConfig(), GPTConfig()
    try:
        keys_set = parse_config(sys.argv[1:] if argv is None else argv, mc, tc)
        train(tc, mc, keys_set)
    except UserError as e:
        die(str(e))


if __name__ == "__main__":
    main()
