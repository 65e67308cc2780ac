"""
What train.py, sample.py, bench.py and claims.py share: the device and dtype decision, data batches and facts,
checkpoints and their provenance, the run lock, evaluation (loss, fact recall, edit probes), metrics.jsonl, the loss
plot, the accounting printout. Not a script (nothing to run); no model code (model.py) or configs (configurator.py).

    from common import Batches, load_checkpoint, fact_recall     # as the scripts do
"""

import ctypes
import fcntl
import json
import os
import random
import socket
import time
from contextlib import nullcontext

import numpy as np
import torch

import prepare_data
from configurator import UserError, require
from model import GPT, GPTConfig, parse_stem_layers
from tables import to_device

# -----------------------------------------------------------------------------
# config checks


def check_model_config(mc):
    """Every GPTConfig value in range, before anything is built or written."""
    for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "ffn_hidden"):
        require(getattr(mc, k) >= 1, f"{k}={getattr(mc, k)} must be at least 1")
    heads = [h for h in range(1, min(mc.n_embd, 64) + 1) if mc.n_embd % h == 0 and (mc.n_embd // h) % 2 == 0]
    require(mc.n_embd % mc.n_head == 0, f"n_embd={mc.n_embd} is not divisible by n_head={mc.n_head}: "
            f"pick n_head among {heads}")
    require((mc.n_embd // mc.n_head) % 2 == 0, f"head size n_embd/n_head = {mc.n_embd // mc.n_head} is odd; rotary "
            f"embeddings rotate pairs of channels, so it must be even: change n_embd or n_head")
    require(mc.rope_theta > 0 and mc.norm_eps > 0, "rope_theta and norm_eps must be positive")
    require(mc.moe_experts >= 1, f"moe_experts={mc.moe_experts} must be at least 1")
    try:
        parse_stem_layers(mc.stem_layers, mc.n_layer, mc.ffn)
    except ValueError as e:
        raise UserError(str(e)) from None


# -----------------------------------------------------------------------------
# device, dtype, data, checkpoints


def reuse_freed_memory():
    """On Linux with glibc: keep freed memory for the next allocation (MALLOC_MMAP_MAX_=0 and a huge
    MALLOC_TRIM_THRESHOLD_, set at run time). Otherwise glibc maps every block over 32 MiB afresh (GPT-2 logits:
    200 MB) and each CPU step page-faults its big tensors in again: up to 40% of a step, varying between processes
    by more than STEM's FLOP saving. Cost: peak memory is kept until exit. Returns whether it applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return False


def resolve_device(device, dtype):
    """(device, dtype name, autocast context, note) with the reason for each decision."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} was asked for but CUDA is not available here; use --device=cpu")
    kind, sep, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (sep and not index.isdigit()):
        raise UserError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"dtype={dtype!r} is not one of auto, float32, bfloat16")
    ctx = nullcontext() if dtype == "float32" else torch.autocast(kind, dtype=torch.bfloat16)
    what = torch.cuda.get_device_name(device) if kind == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if kind == "cpu" and reuse_freed_memory():
        what += ", freed memory reused (glibc: no mmap per big tensor)"
    note = f"device: {device} ({what}); dtype: {dtype} " + (
        "(weights float32, matmuls in bfloat16 autocast)" if dtype == "bfloat16" else "(float32 throughout)")
    return device, dtype, ctx, note


def reprepare(data_dir):
    """The fix for a damaged data folder: prepare_data.py's same inputs would find it "already prepared"."""
    return f"prepare it again (python prepare_data.py ... --out_dir={data_dir} --force)"


def prepare_facts(data_dir, default, **kw):
    """The default data (train.py's and bench.py's data/facts) is made on first use; other folders are not."""
    if data_dir == default and not os.path.isfile(os.path.join(data_dir, "meta.json")):
        print(f"{data_dir} not found: preparing the facts dataset (python prepare_data.py)")
        prepare_data.prepare(dataset="facts", out_dir=data_dir, **kw)


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        name = os.path.basename(os.path.normpath(data_dir))
        if name.startswith("facts") and (name[5:].isdigit() or name == "facts"):  # facts400: a preset's data
            hint = "python prepare_data.py" + (f" --entities={name[5:]}" if name[5:] else "")
        elif name.startswith("shakespeare"):
            hint = "python prepare_data.py --dataset=shakespeare --tokenizer=gpt2"
        else:
            hint = "python prepare_data.py --dataset=text --input=YOUR_TEXT"
        if os.path.abspath(data_dir) != os.path.abspath(os.path.join("data", "facts")):  # prepare_data.py's default
            hint += f" --out_dir={data_dir}"
        if os.path.isdir(data_dir) and os.listdir(data_dir):
            hint += " --force"  # files but no meta.json: an interrupted preparation, or someone else's data
        raise UserError(f"no prepared data in {data_dir} (meta.json missing): run `{hint}` first, "
                        f"or point --data_dir at a prepared folder")
    try:
        meta = json.load(open(path))
        assert isinstance(meta, dict)
        assert isinstance(meta["vocab_size"], int) and meta["vocab_size"] >= 1
        dtype = np.dtype(meta["dtype"])
        assert dtype in (np.dtype(np.uint16), np.dtype(np.uint32))
        for split in ("train", "val"):
            assert os.path.getsize(os.path.join(data_dir, f"{split}.bin")) % dtype.itemsize == 0
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{data_dir} is damaged (meta.json unreadable or incomplete, or a .bin file missing or "
                        f"cut short): {reprepare(data_dir)}") from None
    return meta


def load_facts(data_dir, need="this needs one"):
    """facts.json, {"probes": [{prompt, answer, attribute, entity}, ...], "chance": {attribute: probability}}."""
    path = os.path.join(data_dir, "facts.json")
    require(os.path.isfile(path) or load_meta(data_dir).get("dataset") == "facts",  # a facts folder without it: damaged
            f"{data_dir} is not a facts dataset (no facts.json): {need}")
    try:
        facts = json.load(open(path))
        assert facts["probes"] and facts["chance"] and min(facts["chance"].values()) > 0  # train.py prints their mean
        assert all(isinstance(p[k], str) for p in facts["probes"] for k in ("prompt", "answer", "attribute", "entity"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, AssertionError):
        raise UserError(f"{data_dir} is damaged (facts.json missing or incomplete): {reprepare(data_dir)}") from None
    return facts


class Batches:
    """Random windows of block_size+1 tokens from train.bin / val.bin (nanoGPT's get_batch), drawn with a seeded
    generator whose state goes into the checkpoint: a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, data_dir, meta, block_size, batch_size, device, seed):
        self.data_dir, self.paths = data_dir, {s: os.path.join(data_dir, f"{s}.bin") for s in ("train", "val")}
        self.dtype, self.vocab_size = np.dtype(meta["dtype"]), meta["vocab_size"]
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
        w = torch.stack([torch.from_numpy(data[i:i + self.block_size + 1].astype(np.int64)) for i in ix.tolist()])
        if int(w.max()) >= self.vocab_size:
            raise UserError(f"{self.paths[split]} holds token id {int(w.max())}, not below the vocabulary of "
                            f"{self.vocab_size}: the data folder is damaged; {reprepare(self.data_dir)}")
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()  # inputs, and the next token of each: (B, T) each
        return self.to_device(x, y) if to_device else (x, y)

    def to_device(self, x, y):
        return to_device(x, self.device), to_device(y, self.device)


def save_checkpoint(path, ckpt):
    tmp = path + ".tmp"
    try:
        torch.save(ckpt, tmp)
    except BaseException:  # Ctrl-C or a full disk mid-write: no half file left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)  # atomic: a crash mid-write never leaves a half checkpoint under the real name


def load_checkpoint(path, map_location="cpu"):
    folder = os.path.dirname(path)
    if folder and os.path.isfile(folder):
        raise UserError(f"{folder} is a file: --out_dir names the folder that holds ckpt.pt "
                        f"(--out_dir={os.path.dirname(folder) or '.'})")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py --out_dir={folder or '.'})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable (truncated or corrupt: {type(e).__name__}); "
                        f"retrain, or point --out_dir at a good one") from None
    if not isinstance(ckpt, dict) or not {"model", "config"} <= set(ckpt):
        raise UserError(f"{path} is not a nanoSTEM checkpoint (no 'model'/'config' entries)")
    return ckpt


def model_from_checkpoint(ckpt, path="checkpoint"):
    other = "it was written by another version of the code"
    try:
        cfg = GPTConfig(**ckpt["config"]["model"])
    except TypeError as e:
        raise UserError(f"{path}: its model config does not fit this code's GPTConfig ({e}); {other}") from None
    model = GPT(cfg)
    try:
        missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    except RuntimeError:
        raise UserError(f"{path}: a weight's shape does not match its own config; {other}") from None
    if missing or unexpected:
        raise UserError(f"{path} does not match its own config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}): {other}")
    return model


def check_same_architecture(saved, current, keys_set, path):
    """A resumed run takes the model config from the checkpoint: an override that contradicts it is an error."""
    for k in sorted(keys_set & set(saved)):
        if saved[k] != getattr(current, k):
            raise UserError(f"{path} was trained with {k}={saved[k]!r} but this run asks for "
                            f"{k}={getattr(current, k)!r}: drop --{k}, or train from scratch in another --out_dir")


def check_provenance(ckpt, meta, data_dir, path, key="fingerprint"):
    """Refuse data (key="fingerprint") or a tokenizer ("tokenizer_sha256") other than the checkpoint's."""
    saved = ckpt.get("data")
    if not saved or saved.get(key) is None or meta.get(key) is None:
        print(f"note: {path} or {data_dir} records no {key}: the data and tokenizer cannot be checked")
        return
    if saved[key] != meta[key]:
        what = "data" if key == "fingerprint" else "tokenizer"
        raise UserError(f"{path} was trained on {saved['data_dir']} ({what} {key} {saved[key][:16]}), but "
                        f"{data_dir} holds {key} {meta[key][:16]} (another folder, or prepared again since): "
                        f"point --data_dir at the original data, or prepare it again (see the checkpoint's config)")


class RunLock:
    """out_dir/train.lock, flock-ed while a run writes there (a second run refuses); the OS drops it at any exit."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "train.lock")

    def __enter__(self):
        try:
            self.f = open(self.path, "a+")
        except OSError as e:
            raise UserError(f"cannot write to out_dir {os.path.dirname(self.path)}: {e.strerror}; "
                            f"choose another --out_dir") from None
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            owner = self.f.read().strip()
            self.f.close()
            raise UserError(f"{os.path.dirname(self.path) or '.'} is in use by another training run ({owner}): "
                            f"wait for it or use another --out_dir") from None
        self.f.truncate(0)
        self.f.write(f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.f.flush()
        return self

    def __exit__(self, *exc):
        os.remove(self.path)
        self.f.close()


# -----------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model, batches, eval_iters, ctx, lookup=None):
    """Mean loss over the same eval_iters batches of each split every time; lookup(x) gives offloaded rows."""
    model.eval()
    out = {}
    for split in ("train", "val"):
        gen, losses = torch.Generator().manual_seed(12345), []
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
    """Fraction of probes ("The capital of Zurgilpil is" -> " Palran") whose greedy continuation starts with the
    answer, overall and per attribute, batched by token length. A "stem_prompt" gives the ids of the rows (an edit)."""
    model.eval()
    groups, hits = {}, {}
    for p in probes:
        groups.setdefault(len(enc.encode(p["prompt"])), []).append(p)
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
    """Knowledge-editing probes: entity A's prompt, A's tokens looked up through B's rows, B's answer expected; left
    out are attributes where A and B agree (no signal) and prompts whose token count the swap changes."""
    rng, by = random.Random(seed), {}
    for p in facts["probes"]:
        by.setdefault(p["entity"], {})[p["attribute"]] = p
    names, out = sorted(by), []
    for _ in range(n_pairs):
        a, b = rng.sample(names, 2)
        for attr, p in by[a].items():
            stem_prompt = p["prompt"].replace(a, b)
            if by[b][attr]["answer"] == p["answer"] or len(enc.encode(stem_prompt)) != len(enc.encode(p["prompt"])):
                continue
            out.append(dict(p, answer=by[b][attr]["answer"], stem_prompt=stem_prompt))
    return out


def read_metrics(path):
    """metrics.jsonl's train and eval rows (dicts), in file order; other lines (a killed run leaves one) dropped."""
    needs = {"train": ("iter", "loss"), "eval": ("iter", "tokens", "val_loss")}  # the numbers its readers use
    lines, rows = [line for line in open(path) if line.strip()], []
    for line in lines:
        try:
            row = json.loads(line)
            if all(isinstance(row[k], (int, float)) for k in needs[row["kind"]]):
                rows.append(row)
        except (ValueError, KeyError, TypeError):
            pass
    if len(rows) < len(lines):
        print(f"note: {path}: {len(lines) - len(rows)} unreadable line(s) dropped (a run killed mid-write leaves one)")
    return rows


def pyplot(path):
    """matplotlib.pyplot, off screen, for a figure to be saved at path (its folder made); None without matplotlib."""
    try:
        import matplotlib  # imported here: only what plots needs it (and it is slow to import)
    except ImportError:  # e.g. a GPU machine with only torch: the figures are in the table and the JSON
        print(f"# matplotlib is not installed: {path} not drawn")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return plt


def plot_losses(metrics_path, png_path):
    """out_dir/loss.png: training and validation loss by step, and beside it fact recall where the data has probes."""
    plt = pyplot(png_path)
    if plt is None:
        return
    rows = read_metrics(metrics_path)
    tr = [(r["iter"], r["loss"]) for r in rows if r["kind"] == "train"]
    ev = [(r["iter"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    rec = [(r["iter"], r["recall"]) for r in rows if r["kind"] == "eval" and "recall" in r]
    fig, axes = plt.subplots(1, 2 if rec else 1, figsize=(11 if rec else 6, 4), squeeze=False)
    ax = axes[0][0]
    if tr:
        ax.plot(*zip(*tr), lw=0.8, alpha=0.6, label="train (per step)")
    if ev:
        ax.plot(*zip(*ev), "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss")
    ax.legend()
    if rec:
        axes[0][1].plot(*zip(*rec), "o-", color="C2")
        axes[0][1].set(xlabel="step", ylabel="fact recall", ylim=(0, 1.02))
    for a in axes[0]:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def print_accounting(model, counts=None, flops=None, tc=None, tokens_per_step=None, table_bytes=None):
    """Parameters and FLOPs per token; with a TrainConfig, the run's total compute and the device memory of its weights
    and optimizer states: estimates, except table_bytes (offload.device_bytes: what each table placement allocates)."""
    c, flops = counts or model.param_counts(), flops or model.flops_per_token()
    kind = "STEM" if model.cfg.ffn in ("stem", "swiglu") else f"{model.cfg.ffn} (ablation)"
    print(f"{kind} layers: {model.ffn_layers or 'none'} of {model.cfg.n_layer}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in c.items()))
    print(f"FLOPs per token (forward, context {model.cfg.block_size}): {flops:,} (matmul weights + attention; "
          f"tables are lookups); training ~3x")
    if tc is None:
        return
    total = 3 * flops * tokens_per_step * tc.max_iters
    print(f"compute: {tokens_per_step:,} tokens per step, {tokens_per_step * tc.max_iters:,} in all, {total:.3g} FLOPs "
          f"(estimate: {clock(total / 400e12)} h:m:s at 400 TFLOP/s, an H100 at 40% MFU)")
    backbone = (c["total"] - c["tables"]) * 16  # fp32 weights, gradients and two AdamW moments: 16 bytes a value
    line = f"device memory, weights and optimizer (activations not counted): backbone {backbone / 1e9:.2f} GB"
    if c["tables"] and tc.table_optimizer == "dense":
        line += f", tables {c['tables'] * 16 / 1e9:.2f} GB (dense AdamW: tables, gradients, two moments)"
    elif c["tables"] and table_bytes:
        mine, other = ("offload", "resident_lazy") if tc.offload else ("resident_lazy", "offload")
        line += (f", tables at most {table_bytes[mine] / 1e9:.2f} GB {'offloaded' if tc.offload else 'resident'} "
                 f"({'resident' if tc.offload else 'offloaded'}: {table_bytes[other] / 1e9:.2f} GB)")
    print(line)


# -----------------------------------------------------------------------------
# small utilities


def ranks_agree(raw_model, world):
    """DDP ranks must hold identical weights: a cheap check that the table updates agreed."""
    s = torch.stack([p.detach().double().sum() for p in raw_model.parameters()]).sum().reshape(1)
    all_s = [torch.zeros_like(s) for _ in range(world)]
    torch.distributed.all_gather(all_s, s)
    return all(torch.equal(a, s) for a in all_s)


def clock(seconds):
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def truncate_jsonl(path, last_iter):
    """Keep the rows of a metrics file up to last_iter (a resumed run rewrites what came after), atomically."""
    keep = [r for r in read_metrics(path) if r["iter"] <= last_iter] if last_iter and os.path.exists(path) else []
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(path + ".tmp", path)
