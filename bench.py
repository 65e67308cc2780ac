"""
Measure STEM against SwiGLU, resident against offloaded: speed, memory, and the quality runs.

    python bench.py --mode ffn --device cpu       # one FFN layer fwd+bwd, SwiGLU vs STEM, several shapes
    python bench.py --mode train --device cpu     # whole training steps: SwiGLU, STEM dense/lazy/offloaded
    python bench.py --mode offload                # copy rates, gather rate, unique ids, bytes, lower bound
    python bench.py --mode decode                 # generation tok/s resident vs offloaded, cache hit rate
    python bench.py --mode quality --runs runs    # the results table and plots of quality.sh
    python bench.py --mode spread --ckpt=STEM_RUN --ckpt_swiglu=SWIGLU_RUN   # |cos| of table rows vs baselines
    python bench.py --mode stability --data_dir=data/shakespeare-gpt2       # loss spikes: swiglu, stem, hash_moe
    python bench.py --mode context --data_dir=D [--ckpt=STEM --ckpt_swiglu=SWIGLU]  # Heaps' law; loss by position
    python bench.py --mode locality --ckpt=STEM_FACTS_RUN                   # edits: success, locality, control

The last four check the paper's claims at small scale (claims.sh runs them; ../shared/docs/STEM_NOTES.md
s. 8). A checkpoint is given as its file or its run folder, and is read with the data it was trained on.

Each mode prints a header (device, dtype, torch, config), a table, and as its last line one JSON
object holding every figure. Timings: burn_in steps, then `steps` timed steps, synchronised on CUDA;
variants are timed side by side in one process and reported as ratios (train: each of --repeats child
processes times every variant, the variants taking turns of --turn steps; medians over the children;
each variant's peak memory from a child of its own: the peak CUDA allocation, or on the CPU the peak
RSS). Plots go to --plot_dir (default out/bench, outside git); the README's figures were written with
--plot_dir=assets.
"""

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import offload
from common import (Batches, check_model_config, edit_probes, fact_recall, load_checkpoint, load_meta, prepare_facts,
                    resolve_device)
from configurator import UserError, die, parse_config, read_preset, require
from model import GPT, GPTConfig, STEM, SwiGLU, configure_optimizer
from tables import ResidentTables
from tokenizer import load_tokenizer

MODES = ("ffn", "train", "offload", "decode", "quality", "spread", "stability", "context", "locality")
# dense bf16 peak of known GPUs (FLOP/s), for MFU; others: pass --peak_flops
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


@dataclass
class BenchConfig:
    mode: str = "ffn"  # ffn | train | offload | decode | quality | spread | stability | context | locality
    device: str = "auto"
    dtype: str = "auto"
    data_dir: str = "data/facts"  # real tokens for train / offload / decode / context (stability: the preset's; decode --ckpt: the checkpoint's unless given)
    batch_size: int = 16
    burn_in: int = 3  # untimed steps first (allocator warm-up, lazy init)
    steps: int = 10  # timed steps
    shapes: str = "128x512x4096,256x1024x4096,768x2048x2048"  # ffn mode: n_embd x ffn_hidden x tokens
    table_vocab: int = 8192  # ffn mode: rows of the STEM table
    peak_flops: Optional[float] = None  # for MFU; None = a known GPU's bf16 peak, or none on CPU
    cache_sizes: str = "16,64,256,1024"  # decode mode
    decode_tokens: int = 64  # decode mode: new tokens per sample
    ckpt: str = ""  # decode: a trained checkpoint (its data), "" = random init; spread, context, locality: the STEM one
    ckpt_swiglu: str = ""  # spread, context: the SwiGLU checkpoint (same data) to compare --ckpt with
    runs: str = "runs"  # quality mode: folders written by quality.sh
    variants: str = "swiglu,stem-dense,stem-lazy,stem-offload"  # train mode
    repeats: int = 1  # train mode: child processes, each timing every variant; medians over them are reported
    turn: int = 5  # train mode: steps a variant runs before the next one's turn (drained at the end of each turn)
    shape: str = "gpt2-small"  # offload mode: the shape for host rates and the step model, or "model" (--n_layer=...)
    unique_ids: int = 0  # offload mode: K for the step model; 0 = measured on data_dir if its vocabulary fits, else 10k
    shared_fraction: float = 0.45  # offload mode: with --unique_ids, the fraction of K the previous step shares
    host_gbps: float = 60.0  # offload mode: host memory bandwidth of a GPU server, for the step model
    host_threads: Optional[int] = None  # offload mode: RowAdamW threads; None = min(8, cores)
    plot_dir: str = "out/bench"  # where PNGs go (the README's are in assets/: pass --plot_dir=assets to redo them)
    spread_ids: int = 256  # spread: rows of the most frequent ids of train.bin, compared pairwise
    spread_layer: int = -1  # spread: the headline layer (all table layers are listed); -1 = the first table layer
    spread_pool: str = "mean"  # spread: one SwiGLU W_up x per id: "mean" over its positions, or its "first"
    spread_tokens: int = 65536  # spread: at most this many tokens of train.bin (windows spread over it) run through SwiGLU
    train_preset: str = "presets/shakespeare.py"  # stability: train.py's preset; its learning_rate is 1x
    stability_steps: int = 60  # stability: training steps per run
    stability_seeds: str = "1"  # stability: comma-separated seeds
    stability_lrs: str = "1,3"  # stability: multiples of the preset's learning_rate (and min_lr)
    stability_dir: str = "out/stability"  # stability: the runs (a finished one is reused, an unfinished one resumed)
    spike_window: int = 20  # stability: W, the previous steps whose median loss a spike is measured against
    spike_margin: float = 0.5  # stability: a spike's loss exceeds that median by more than this (nats)
    context_max: int = 2048  # context: the longest window T for distinct ids (T = 16, 32, ... up to this)
    context_windows: int = 200  # context: random windows per T for distinct ids
    context_batches: int = 8  # context: validation batches (of batch_size windows) for the per-position loss
    locality_pairs: int = 100  # locality: random entity triples (A, B, C) for the two-entity probes
    child: str = ""  # internal: a child of train mode: "speed" (the --variant list in turns) or "memory" (one)
    variant: str = ""  # internal: the child's variants, comma-separated


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, burn_in, steps, pipelined=None):
    """Median seconds per call of fn after burn_in untimed calls. For a pipeline whose calls overlap
    (training steps: the GPU runs ahead, offload's host thread runs behind), pass pipelined = the
    function that drains it: then the calls run back to back and the mean over all of them, drain
    included, is returned."""
    for _ in range(burn_in):
        fn()
    if pipelined:
        pipelined()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        pipelined()
        sync(device)
        return (time.perf_counter() - t0) / steps
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def header(bc, mc, device, dtype, note):
    print(f"# nanoSTEM bench --mode {bc.mode} | {note} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    if mc is not None:
        print("# model: " + ", ".join(f"{k}={v}" for k, v in asdict(mc).items()))


def table(rows, cols):
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(r[c].ljust(w) for c, w in zip(cols, widths)))


# -----------------------------------------------------------------------------
# ffn: one layer, forward + backward


def timed_side_by_side(fns, device, burn_in, steps):
    """Median seconds per call of each fn in the dict, the calls interleaved (a, b, c, a, b, c, ...)
    so that a slow patch of the machine hits every variant alike."""
    for _ in range(burn_in):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(steps):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_ffn(bc, device, ctx):
    """One FFN layer, forward and backward: SwiGLU; STEM with the dense table gradient that a plain
    lookup's backward builds (vocab x ffn_hidden, the dense optimizer's); STEM with the lazy
    optimizer's compact rows (unique ids, gathered rows, a (K, ffn_hidden) gradient: tables.py),
    the unique and the gather counted in; and STEM's floor, a SwiGLU whose W_up x is handed in ready
    (2/3 of the matmuls, all of the elementwise work), against which the table's cost is measured."""
    rows, out = [], []
    for shape in bc.shapes.split(","):
        try:
            d, h, n = (int(v) for v in shape.split("x"))
        except ValueError:
            raise UserError(f"shapes: {shape!r} is not n_embd x ffn_hidden x tokens, e.g. 768x2048x2048") from None
        cfg = GPTConfig(vocab_size=bc.table_vocab, n_embd=d, ffn_hidden=h)
        x = torch.randn(1, n, d, device=device, requires_grad=True)
        ids = torch.randint(0, bc.table_vocab, (1, n), device=device)
        swiglu, stem = SwiGLU(cfg).to(device), STEM(cfg).to(device)
        torch.nn.init.xavier_normal_(stem.table)
        lazy = STEM(cfg).to(device)
        lazy.load_state_dict(stem.state_dict())
        lazy.table.requires_grad_(False)  # as ResidentTables does: gradients go to the compact leaf

        u0 = torch.randn(1, n, h, device=device, requires_grad=True)  # the floor: W_up x handed in ready (its
        # gradient is computed, as SwiGLU's backward computes it for W_up and STEM's for the rows)

        def run(layer, lazy_rows=False, floor=False):
            def step():
                if floor:
                    with ctx:
                        y = layer.down(F.silu(layer.gate(x)) * u0)
                elif lazy_rows:
                    uniq, inv = torch.unique(ids, return_inverse=True)
                    leaf = layer.table.index_select(0, uniq).requires_grad_()  # (K, ffn), as tables.py
                    with ctx:
                        y = layer(x, inv, leaf)
                else:
                    with ctx:
                        y = layer(x, ids)
                y.float().sum().backward()
                layer.zero_grad(set_to_none=True)
                x.grad = u0.grad = None
            return step
        res = timed_side_by_side(dict(swiglu=run(swiglu), stem_dense=run(stem), stem_lazy=run(lazy, True),
                                      floor=run(swiglu, floor=True)), device, bc.burn_in, bc.steps)
        theory = 2 / 3  # two matmuls instead of three, forward and backward alike
        r = {k: res[k] / res["swiglu"] for k in ("stem_dense", "stem_lazy", "floor")}
        rows.append(dict(shape=f"d={d} ffn={h} tokens={n}", swiglu=f"{res['swiglu'] * 1e3:.2f} ms",
                         stem_dense=f"{res['stem_dense'] * 1e3:.2f} ms ({r['stem_dense']:.3f})",
                         stem_lazy=f"{res['stem_lazy'] * 1e3:.2f} ms ({r['stem_lazy']:.3f})",
                         floor=f"{res['floor'] * 1e3:.2f} ms ({r['floor']:.3f})",
                         lazy_vs_floor=f"{res['stem_lazy'] / res['floor']:.3f}", flop_ratio=f"{theory:.3f}"))
        out.append(dict(n_embd=d, ffn_hidden=h, tokens=n, swiglu_ms=res["swiglu"] * 1e3,
                        stem_dense_ms=res["stem_dense"] * 1e3, stem_lazy_ms=res["stem_lazy"] * 1e3,
                        floor_ms=res["floor"] * 1e3, dense_ratio=r["stem_dense"], lazy_ratio=r["stem_lazy"],
                        floor_ratio=r["floor"], flop_ratio=theory))
    table(rows, ["shape", "swiglu", "stem_dense", "stem_lazy", "floor", "lazy_vs_floor", "flop_ratio"])
    print("# (ratio to SwiGLU in brackets); stem_dense: the dense (vocab, ffn) table gradient; stem_lazy: "
          "compact rows, unique and gather included; floor: SwiGLU with W_up x replaced by a ready tensor, i.e. "
          "one matmul fewer and the same elementwise work: what STEM costs if its table were free")
    return {"ffn": out, "table_vocab": bc.table_vocab}


# -----------------------------------------------------------------------------
# train: whole training steps, the variants side by side in child processes

VARIANTS = {  # name: (ffn, table_optimizer, offload)
    "swiglu": ("swiglu", "dense", False),
    "stem-dense": ("stem", "dense", False),
    "stem-lazy": ("stem", "lazy", False),
    "stem-offload": ("stem", "lazy", True),
}


def trainer(variant, bc, mc, device, ctx):
    """One variant's training step (train.py's loop, one micro-batch a step), the function that drains
    its pipeline, and its training FLOPs per token. Every variant starts from seed 0 and reads the
    same batches."""
    ffn, table_optimizer, offloaded = VARIANTS[variant]
    meta = load_meta(bc.data_dir)
    mc = GPTConfig(**{**asdict(mc), "ffn": ffn, "vocab_size": meta["vocab_size"]})
    torch.manual_seed(0)
    batches = Batches(bc.data_dir, meta, mc.block_size, bc.batch_size, device, seed=0)
    model = GPT(mc)
    flops = 3 * model.flops_per_token()
    if offloaded:
        tables = offload.OffloadedTables(model, device)
    else:
        tables = ResidentTables(model, device, table_optimizer)
    optimizer = configure_optimizer(model, 1e-3, 0.1)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    upcoming = batches.get("train", to_device=False)
    tables.prefetch([upcoming[0]])

    def step():
        nonlocal upcoming
        (x, y), ((stem_ids, stem_tables),) = upcoming, tables.rows()
        upcoming = batches.get("train", to_device=False)
        tables.prefetch([upcoming[0]])
        x, y = batches.to_device(x, y)
        with ctx:
            _, loss = model(x, y, stem_ids=stem_ids, stem_tables=stem_tables)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        tables.step(1e-3, 1.0)
        optimizer.zero_grad(set_to_none=True)
    return step, tables.drain, flops


def timed_turns(fns, drains, device, burn_in, steps, turn):
    """Seconds per step of each variant, the variants taking turns in one process: `turn` timed steps
    of a, then of b, ..., until each has run `steps` timed steps; median over the turns. Taking
    turns, every variant meets the same state of the machine (other jobs, clock, the allocator's
    heap), which separate processes do not. A turn is measured in the steady state of its pipeline
    (the GPU runs ahead, offload's threads run behind): one untimed step refills it, the timed steps
    run back to back, and it is drained after the clock stops, so that a previous step's tail is in
    the window at its start as a step's tail is left out at its end."""
    for k, fn in fns.items():
        for _ in range(burn_in):
            fn()
        drains[k]()
    per_step = {k: [] for k in fns}
    for i in range(0, steps, turn):
        n = min(turn, steps - i)
        for k, fn in fns.items():
            fn()  # untimed: the pipeline refills
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            per_step[k].append((time.perf_counter() - t0) / n)
            drains[k]()
    return {k: statistics.median(v) for k, v in per_step.items()}


def train_child(bc, mc, device, ctx):
    """A child of --mode train. --child=speed: the --variant list's steps taken in turns, in one
    process. --child=memory: one variant alone, for its peak memory."""
    names = bc.variant.split(",")
    built = {v: trainer(v, bc, mc, device, ctx) for v in names}
    if bc.child == "speed":
        dt = timed_turns({v: b[0] for v, b in built.items()}, {v: b[1] for v, b in built.items()}, device,
                         bc.burn_in, bc.steps, bc.turn)
        return {v: dict(step_s=dt[v], train_flops_per_token=built[v][2]) for v in names}
    step, drain, _ = built[names[0]]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(max(bc.burn_in, 1) + 1):
        step()
    drain()
    if device.startswith("cuda"):
        return dict(peak_mem_mib=torch.cuda.max_memory_allocated() / 2**20)
    return dict(peak_mem_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB -> MiB on Linux


def peak_flops(bc, device):
    if bc.peak_flops is None and device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return bc.peak_flops


def cli_pairs(argv):
    """The --key=value (or --key value) arguments as (key, value) pairs, and the other arguments."""
    pairs, other, rest = [], [], list(argv)
    while rest:
        a = rest.pop(0)
        if not a.startswith("--"):
            other.append(a)
        elif "=" in a:
            pairs.append(tuple(a[2:].split("=", 1)))
        else:
            pairs.append((a[2:], rest.pop(0) if rest else ""))
    return pairs, other


def run_variants(argv, variants, repeats, tokens):
    """Speed: `repeats` child processes, each timing every variant in turns (timed_turns); per variant
    its step time in each child (ratios are taken per child: speedup). Memory: one child per
    variant, alone, for its peak."""
    pairs, other = cli_pairs(argv)
    args = other + [f"--{k}={v}" for k, v in pairs if k not in ("mode", "child", "variant", "variants", "repeats")]

    def child(role, variant):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *args, "--mode=train", f"--child={role}",
                            f"--variant={variant}"], capture_output=True, text=True)
        if p.returncode != 0:
            raise UserError(f"variant {variant} failed: "
                            f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    runs = [child("speed", ",".join(variants)) for _ in range(repeats)]
    out = []
    for v in variants:
        steps = [r[v]["step_s"] for r in runs]
        out.append(dict(variant=v, step_ms=statistics.median(steps) * 1e3, tok_per_s=tokens / statistics.median(steps),
                        step_s_runs=steps, train_flops_per_token=runs[0][v]["train_flops_per_token"],
                        peak_mem_mib=child("memory", v)["peak_mem_mib"]))
    return out


def speedup(r, base):
    """Median over the children of base's step time / r's, each pair timed side by side in one child."""
    return statistics.median(b / t for b, t in zip(base["step_s_runs"], r["step_s_runs"])) if base else None


def bench_train(bc, mc, device, argv):
    peak = peak_flops(bc, device)
    names = [v for v in bc.variants.split(",") if v]
    for v in names:
        if v not in VARIANTS:
            raise UserError(f"variants: {v!r} is not one of {', '.join(VARIANTS)}")
    if mc.ffn == "swiglu":
        names = [v for v in names if VARIANTS[v][0] == "swiglu"]
    require(names, f"variants={bc.variants!r}: nothing to run (with --ffn=swiglu only the swiglu variant runs)")
    results = run_variants(argv, names, bc.repeats, bc.batch_size * mc.block_size)
    base = next((r for r in results if r["variant"] == "swiglu"), None)
    lazy = next((r for r in results if r["variant"] == "stem-lazy"), None)
    rows = []
    for r in results:
        r["vs_swiglu"], r["vs_stem_lazy"] = speedup(r, base), speedup(r, lazy)
        r["mfu"] = r["train_flops_per_token"] * r["tok_per_s"] / peak if peak else None
        rows.append(dict(variant=r["variant"], step=f"{r['step_ms']:.1f} ms", tok_s=f"{r['tok_per_s']:,.0f}",
                         runs=" ".join(f"{t * 1e3:.0f}" for t in r["step_s_runs"]),
                         vs_swiglu=f"{r['vs_swiglu']:.3f}" if base else "-",
                         swiglu_runs=" ".join(f"{b / t:.3f}" for b, t in zip(base["step_s_runs"], r["step_s_runs"]))
                         if base else "-",
                         vs_lazy=f"{r['vs_stem_lazy']:.3f}" if lazy else "-",
                         mem=f"{r['peak_mem_mib']:,.0f} MiB", mfu=f"{r['mfu']:.1%}" if r["mfu"] else "n/a"))
    table(rows, ["variant", "step", "tok_s", "runs", "vs_swiglu", "swiglu_runs", "vs_lazy", "mem", "mfu"])
    print(f"# {bc.repeats} child process(es), each timing every variant in turns of {bc.turn} steps ({bc.steps} timed "
          f"steps each, after {bc.burn_in} untimed); step: the median over the children (runs: each child's, ms); "
          f"vs_*: the median of the children's ratios (swiglu_runs: each child's); memory: "
          f"{'peak CUDA allocation' if device.startswith('cuda') else 'peak RSS'} of the variant alone in a child; "
          f"MFU peak: {peak if peak else 'unknown (pass --peak_flops)'}")
    return {"train": results, "batch_size": bc.batch_size, "block_size": mc.block_size, "peak_flops": peak}


# -----------------------------------------------------------------------------
# offload: host rates against their floors, copy rates, and a step model of offloaded training

# named shapes for the step model (and the host-rate measurements); "model" = the --key=value model config
SHAPES = {"gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, ffn_hidden=2048, vocab_size=50257, block_size=1024,
                             stem_layers="third", batch_size=32)}
WEB_TEXT = dict(unique=10_000, shared=0.45)  # K and the fraction shared with the previous step, 32 x 1024 GPT-2 tokens


def id_stats(data_dir, meta, block_size, batch_size, n=30):
    """Unique ids per step and the fraction of them the previous step also had, on real data."""
    batches = Batches(data_dir, meta, block_size, batch_size, "cpu", seed=0)
    ks, shared, prev = [], [], None
    for _ in range(n):
        u = torch.unique(batches.get("train", to_device=False)[0])
        ks.append(len(u))
        if prev is not None:
            shared.append(torch.isin(u, prev).float().mean().item())
        prev = u
    ks.sort()
    return dict(tokens_per_step=batch_size * block_size, unique=statistics.mean(ks), unique_p95=ks[int(len(ks) * 0.95)],
                shared=statistics.mean(shared))


def host_rates(V, W, K, steps, threads=None):
    """GB/s of fp32 table values (4 bytes each) for the host side of one offloaded step, on K random
    rows of a (V, W) table: the gather into staging, the lazy AdamW (RowAdamW, as offload runs it),
    the same on K consecutive rows (what scattered addresses cost), its floor (the same fused kernel
    on one contiguous (K, W) tensor), and the write-back scatter."""
    from tables import RowAdamW, adamw_
    table = torch.empty(V, W).fill_(0.01)  # touched: untouched pages would read as free zeros
    opt = RowAdamW(table, threads)
    opt.m.fill_(0.001)
    opt.v.fill_(0.001)
    ids, consecutive = torch.randperm(V)[:K].sort().values, torch.arange(K)
    staging, g = torch.empty(K, W), torch.full((K, W), 0.01)
    g_rows = g.unbind(0)  # made once, as offload.py does for its reused gradient buffer
    p, m, v = torch.full((K, W), 0.01), torch.full((K, W), 0.001), torch.full((K, W), 0.001)
    hyper = ((0.9, 0.95), 1e-8, 0.1)
    fns = dict(gather=lambda: torch.index_select(table, 0, ids, out=staging),
               host_update=lambda: opt.update(ids, g, 1, 1e-4, *hyper, g_rows=g_rows),
               host_update_consecutive=lambda: opt.update(consecutive, g, 1, 1e-4, *hyper, g_rows=g_rows),  # no scattered addresses
               fused_floor=lambda: adamw_([p], [g], [m], [v], 1, 1e-4, *hyper),
               scatter=lambda: table.index_copy_(0, ids, staging))
    t = timed_side_by_side(fns, "cpu", 2, steps)
    return {f"{k}_gbps": K * W * 4 / t[k] / 1e9 for k in fns}, opt.threads


def step_model(shape, K, s, rates, link_gbps, host_gbps, mfu, peak):
    """Predicted offloaded / resident step time for the offload design of offload.py, per step:
    rows new in the step (K(1-s)) come in from the host; rows shared with a neighbouring step are
    updated on the GPU; rows in neither neighbour (K(1-s)^2) get the host AdamW; rows leaving the
    GPU (Ks(1-s)) are written back as p, m, v; rows new and shared with the next step (K(1-s)s)
    bring their moments in. The host side runs on its own threads and the copies on their own
    streams, overlapped with the GPU step; the step takes the longest of them. Host time: either
    this machine's measured rates or a host of `host_gbps` GB/s memory bandwidth (bytes counted)."""
    cfg = GPTConfig(**{k: v for k, v in shape.items() if k != "batch_size"})
    model = GPT(GPTConfig(**{**asdict(cfg), "vocab_size": 8}))  # the counts need no real tables
    n_stem = len(model.stem_layers)
    W = n_stem * cfg.ffn_hidden
    tokens = shape["batch_size"] * cfg.block_size
    flops = 3 * (model.flops_per_token() + 2 * cfg.n_embd * (cfg.vocab_size - 8))  # the real head
    t_gpu = flops * tokens / (mfu * peak)
    new, host, wb, mv = K * (1 - s), K * (1 - s) ** 2, K * s * (1 - s), K * (1 - s) * s
    values = dict(gather=(new + 2 * mv) * W, host_update=host * W, scatter=3 * wb * W)  # fp32 values per step
    t_host_here = sum(values[k] * 4 / (rates[f"{k}_gbps"] * 1e9) for k in values)
    bytes_host = 8 * values["gather"] + 28 * values["host_update"] + 8 * values["scatter"]
    t_host_server = bytes_host / (host_gbps * 1e9)
    t_h2d = (new + 2 * mv) * W * 4 / (link_gbps * 1e9)
    t_d2h = (host + 3 * wb) * W * 4 / (link_gbps * 1e9)
    t_dev = 28 * (K - host) * W / 4.8e12 * 3  # GPU AdamW on the shared rows, with its gathers and scatters (HBM)
    inputs = dict(n_stem=n_stem, row_floats=W, tokens_per_step=tokens, unique_K=round(K), shared_s=round(s, 3),
                  train_flops_per_token=flops, mfu=mfu, peak_flops=peak, link_gbps=round(link_gbps, 1),
                  host_gbps=host_gbps, gpu_step_ms=t_gpu * 1e3, host_ms_this_machine=t_host_here * 1e3,
                  host_ms_server=t_host_server * 1e3, h2d_ms=t_h2d * 1e3, d2h_ms=t_d2h * 1e3, gpu_extra_ms=t_dev * 1e3)

    def ratio(t_host):
        return t_gpu / max(t_gpu + t_dev, t_host, t_h2d, t_d2h)
    return ratio(t_host_server), ratio(t_host_here), inputs


def bench_offload(bc, mc, device, argv):
    cuda = device.startswith("cuda")
    if bc.shape == "model":
        shape = dict(asdict(mc), batch_size=bc.batch_size)
    elif bc.shape in SHAPES:
        shape = SHAPES[bc.shape]
    else:
        raise UserError(f"shape={bc.shape!r} is not one of model, {', '.join(SHAPES)}")
    meta = load_meta(bc.data_dir)
    st = id_stats(bc.data_dir, meta, shape["block_size"], shape["batch_size"])
    if bc.unique_ids:
        K, s, source = bc.unique_ids, bc.shared_fraction, "given (--unique_ids, --shared_fraction)"
    elif meta["vocab_size"] == shape["vocab_size"]:
        K, s, source = st["unique"], st["shared"], f"measured on {bc.data_dir}"
    else:
        K, s, source = WEB_TEXT["unique"], WEB_TEXT["shared"], "web-text estimate: Zipf over BPE ranks x burstiness, 8.9k-15.4k"
    n_stem = len(GPT(GPTConfig(**{**{k: v for k, v in shape.items() if k != "batch_size"}, "vocab_size": 8})).stem_layers)
    require(n_stem, f"the {bc.shape} shape has no table layers (ffn={shape.get('ffn', 'stem')}, "
            f"stem_layers={shape.get('stem_layers')!r}): nothing to offload; give a STEM shape")
    require(K <= shape["vocab_size"], f"unique_ids={K} is more than the shape's vocabulary ({shape['vocab_size']})")
    W = n_stem * shape["ffn_hidden"]
    rates, threads = host_rates(shape["vocab_size"], W, int(K), bc.steps, bc.host_threads)
    res = dict(shape=shape, ids=dict(st, data_dir=bc.data_dir, used_unique=K, used_shared=s, source=source),
               host_threads=threads, **rates)
    res["host_update_vs_floor"] = rates["host_update_gbps"] / rates["fused_floor_gbps"]
    rows = [dict(what=f"unique ids per step ({bc.data_dir}, {st['tokens_per_step']} tokens)",
                 value=f"{st['unique']:.0f} (p95 {st['unique_p95']}), {st['shared']:.0%} shared with the previous step"),
            dict(what=f"host gather ({K:.0f} rows x {W} floats of {shape['vocab_size']})", value=f"{rates['gather_gbps']:.2f} GB/s"),
            dict(what=f"host lazy AdamW (RowAdamW, {f'{threads} threads' if threads else 'one gathered block'})", value=f"{rates['host_update_gbps']:.2f} GB/s"),
            dict(what="floor: fused AdamW, one contiguous tensor", value=f"{rates['fused_floor_gbps']:.2f} GB/s"),
            dict(what="host update / floor", value=f"{res['host_update_vs_floor']:.2f}"),
            dict(what="the same on consecutive rows / floor",
                 value=f"{rates['host_update_consecutive_gbps'] / rates['fused_floor_gbps']:.2f}"),
            dict(what="host write-back scatter", value=f"{rates['scatter_gbps']:.2f} GB/s")]
    link = 50.0  # GB/s, pinned PCIe Gen5 x16 as reported for H100 (STEM_NOTES.md); measured below on CUDA
    if cuda:
        big = 256 * 2**20
        h = torch.empty(big // 4, pin_memory=True)
        g = torch.empty(big // 4, device=device)
        res["h2d_gbps"] = big / timed(lambda: g.copy_(h, non_blocking=True), device, 2, 10) / 1e9
        res["d2h_gbps"] = big / timed(lambda: h.copy_(g, non_blocking=True), device, 2, 10) / 1e9
        link = min(res["h2d_gbps"], res["d2h_gbps"])
        rows.append(dict(what="pinned H2D / D2H", value=f"{res['h2d_gbps']:.1f} / {res['d2h_gbps']:.1f} GB/s"))
    peak = peak_flops(bc, device) or PEAK_FLOPS["H200"]
    for mfu in (0.5, 0.25):
        pred, pred_here, inputs = step_model(shape, K, s, rates, link, bc.host_gbps, mfu, peak)
        res.setdefault("predicted", []).append(dict(inputs, predicted_ratio=pred, predicted_ratio_this_host=pred_here))
        rows.append(dict(what=f"PREDICTED offloaded/resident, MFU {mfu:.0%}",
                         value=f"{pred:.3f} (host of {bc.host_gbps:.0f} GB/s); {pred_here:.3f} (this machine's host rates)"))
    res["predicted_ratio"] = min(p["predicted_ratio"] for p in res["predicted"])
    if cuda and bc.shape != "model":  # the real thing: resident-lazy and offloaded training at the shape
        args = [f"--{k}={v}" for k, v in shape.items()] + [f"--{k}={v}" for k, v in cli_pairs(argv)[0] if k in (
            "data_dir", "steps", "burn_in", "turn", "dtype", "device")]
        runs = run_variants(args, ["stem-lazy", "stem-offload"], bc.repeats, shape["batch_size"] * shape["block_size"])
        lazy, off = runs
        mfu = [r["train_flops_per_token"] * r["tok_per_s"] / peak for r in runs]
        res["measured"] = dict(resident_lazy=lazy, offloaded=off, ratio=speedup(off, lazy),
                               gpu_mem_saved_mib=lazy["peak_mem_mib"] - off["peak_mem_mib"], mfu=mfu)
        rows += [dict(what="MEASURED offloaded/resident-lazy tok/s",
                      value=f"{res['measured']['ratio']:.3f} ({off['tok_per_s']:,.0f} vs {lazy['tok_per_s']:,.0f})"),
                 dict(what="MEASURED MFU resident-lazy / offloaded", value=f"{mfu[0]:.1%} / {mfu[1]:.1%} of {peak:.3g}"),
                 dict(what="GPU memory: resident-lazy / offloaded (peak allocation)",
                      value=f"{lazy['peak_mem_mib']:,.0f} / {off['peak_mem_mib']:,.0f} MiB "
                            f"(saved {res['measured']['gpu_mem_saved_mib']:,.0f} MiB)")]
    table(rows, ["what", "value"])
    print(f"# step model inputs (per step; K from {source}):")
    for p in res["predicted"]:
        print("#   " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()))
    print("# predicted, not measured: " + ("the MEASURED row is the real run" if "measured" in res else
                                           "run on a CUDA machine for the measured ratio (gpu_check.sh)"))
    return res


# -----------------------------------------------------------------------------
# decode: generation, resident vs offloaded, cache hit rate


def bench_decode(bc, mc, device, ctx, keys_set=frozenset()):
    from common import check_provenance, load_checkpoint, model_from_checkpoint
    torch.manual_seed(0)
    if bc.ckpt:
        ignored = sorted(k for k in keys_set if k in GPTConfig.__dataclass_fields__)
        require(not ignored, f"--ckpt brings its own model: drop {', '.join('--' + k for k in ignored)}")
        bc.ckpt = ckpt_file(bc.ckpt)
        ckpt = load_checkpoint(bc.ckpt)
        model = model_from_checkpoint(ckpt, bc.ckpt)
        if "data_dir" not in keys_set:  # its own data, unless told where that data now lives
            bc.data_dir = ckpt["config"]["train"]["data_dir"]
        check_provenance(ckpt, load_meta(bc.data_dir), bc.data_dir, bc.ckpt)  # its prompts come from its own data
        mc = model.cfg
        print("# decode model: " + bc.ckpt + " (" + ", ".join(f"{k}={v}" for k, v in asdict(mc).items()) + ")")
    else:
        model = GPT(mc)
    require(model.stem_layers, f"the decode bench compares resident and offloaded tables, and this model has none "
            f"(ffn={mc.ffn}, stem_layers={mc.stem_layers!r}, n_layer={mc.n_layer}): give a STEM model")
    require(mc.block_size >= 4, f"block_size={mc.block_size}: the decode bench needs at least 4 (half prompt, half new)")
    model = model.to(device).eval()
    meta = load_meta(bc.data_dir)
    batches = Batches(bc.data_dir, meta, mc.block_size // 2, bc.batch_size, "cpu", seed=0)
    prompt, _ = batches.get("val", to_device=False)  # half a context of real text, then decode
    prompt = prompt.to(device)

    def gen(m, fn=None):
        with ctx:
            return m.generate(prompt, bc.decode_tokens, temperature=1.0, top_k=50, stem_fn=fn,
                              generator=torch.Generator(device=device).manual_seed(0))
    tok = bc.batch_size * bc.decode_tokens
    t_res = timed(lambda: gen(model), device, 1, max(1, bc.steps // 3))
    results = [dict(variant="resident", cache_rows=0, tok_per_s=tok / t_res, hit_rate=None)]
    for n in [int(s) for s in bc.cache_sizes.split(",")]:
        m = GPT(mc).eval()
        m.load_state_dict(model.state_dict())
        eng = offload.OffloadedTables(m, device, train=False, cache_rows=max(n, bc.batch_size))  # places m
        t = timed(lambda: gen(m, eng.stem_fn), device, 1, max(1, bc.steps // 3))
        results.append(dict(variant="offload", cache_rows=eng.cache.n, tok_per_s=tok / t, hit_rate=eng.cache.hit_rate()))
    rows = [dict(variant=r["variant"], cache=str(r["cache_rows"]), tok_s=f"{r['tok_per_s']:,.0f}",
                 vs_resident=f"{r['tok_per_s'] / results[0]['tok_per_s']:.3f}",
                 hit=f"{r['hit_rate']:.3f}" if r["hit_rate"] is not None else "-") for r in results]
    table(rows, ["variant", "cache", "tok_s", "vs_resident", "hit"])
    plot(os.path.join(bc.plot_dir, "decode_hit_rate.png"), "GPU row cache size (rows)", "decode hit rate",
         {"offload (LFU)": [(r["cache_rows"], r["hit_rate"]) for r in results[1:]]}, logx=True)
    return {"decode": results, "batch_size": bc.batch_size, "decode_tokens": bc.decode_tokens}


# -----------------------------------------------------------------------------
# quality: summarise the runs of quality.sh


def plot(path, xlabel, ylabel, series, logx=False, bands=None, title=None, logy=False):
    try:
        import matplotlib
    except ImportError:  # e.g. a GPU machine with only torch: the figures are in the table and the JSON
        print(f"# matplotlib is not installed: {path} not drawn")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in series.items():
        xs, ys = zip(*pts)
        line, = ax.plot(xs, ys, "o-", ms=3, label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bench_quality(bc):
    if not os.path.isdir(bc.runs):
        raise UserError(f"no runs in {bc.runs}: run `bash quality.sh` first")
    groups = {}  # (dataset, arch) -> list of runs
    for name in sorted(os.listdir(bc.runs)):
        path = os.path.join(bc.runs, name, "metrics.jsonl")
        if not os.path.isfile(path) or "-s" not in name:
            continue
        ckpt_path = os.path.join(bc.runs, name, "ckpt.pt")
        if not os.path.isfile(ckpt_path):
            print(f"# skipping {name}: unfinished (no checkpoint yet)")
            continue
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["iter"] != ckpt["config"]["train"]["max_iters"]:
            print(f"# skipping {name}: unfinished ({ckpt['iter']} of {ckpt['config']['train']['max_iters']} steps)")
            continue
        mc = GPTConfig(**ckpt["config"]["model"])
        m = GPT(mc)
        m.load_state_dict(ckpt["model"])
        edit = None
        facts_path = os.path.join(ckpt["config"]["train"]["data_dir"], "facts.json")
        if m.stem_layers and os.path.isfile(facts_path):  # knowledge editing by row swaps, 100 entity pairs
            enc = load_tokenizer(ckpt["config"]["train"]["data_dir"])
            edit = fact_recall(m, enc, edit_probes(json.load(open(facts_path)), enc), "cpu")["recall"]
        rows = [json.loads(line) for line in open(path)]
        ev = [r for r in rows if r["kind"] == "eval"]
        tr = [r["tok_per_s"] for r in rows if r["kind"] == "train"]
        dataset, arch = name.rsplit("-s", 1)[0].split("-", 1)
        groups.setdefault((dataset, arch), []).append(dict(
            ev=ev, counts=m.param_counts(), flops=3 * m.flops_per_token(), tok_s=statistics.median(tr), edit=edit))
    if not groups:
        raise UserError(f"no finished runs in {bc.runs}: run `bash quality.sh` first")
    out, rows = [], []
    for (dataset, arch), runs in sorted(groups.items()):
        final = [r["ev"][-1] for r in runs]
        vl = [f["val_loss"] for f in final]
        rec = [f["recall"] for f in final if "recall" in f]
        c = runs[0]["counts"]
        sd = statistics.stdev(vl) if len(vl) > 1 else 0.0
        rsd = statistics.stdev(rec) if len(rec) > 1 else 0.0
        edits = [r["edit"] for r in runs if r["edit"] is not None]
        res = dict(dataset=dataset, arch=arch, seeds=len(runs), steps=final[0]["iter"], tokens=final[0]["tokens"],
                   val_loss_mean=statistics.mean(vl), val_loss_std=sd,
                   best_val_loss_mean=statistics.mean(min(e["val_loss"] for e in r["ev"]) for r in runs),
                   recall_mean=statistics.mean(rec) if rec else None, recall_std=rsd if rec else None,
                   edit_success_mean=statistics.mean(edits) if edits else None,
                   params_total=c["total"], params_tables=c["tables"], params_active=c["active"],
                   train_flops_per_token=runs[0]["flops"], tok_per_s=statistics.median(r["tok_s"] for r in runs))
        out.append(res)
        rows.append(dict(data=dataset, arch=arch, seeds=str(len(runs)), val=f"{res['val_loss_mean']:.3f} ± {sd:.3f}",
                         best_val=f"{res['best_val_loss_mean']:.3f}",
                         recall=f"{res['recall_mean']:.3f} ± {rsd:.3f}" if rec else "-",
                         edit=f"{res['edit_success_mean']:.3f}" if edits else "-",
                         total=f"{c['total'] / 1e6:.2f}M", tables=f"{c['tables'] / 1e6:.2f}M",
                         active=f"{c['active'] / 1e6:.2f}M", flops=f"{runs[0]['flops'] / 1e6:.1f}M",
                         tok_s=f"{res['tok_per_s']:,.0f}"))
    table(rows, ["data", "arch", "seeds", "val", "best_val", "recall", "edit", "total", "tables", "active", "flops", "tok_s"])
    for dataset in sorted({d for d, _ in groups}):
        has_recall = all("recall" in r["ev"][-1] for (d, _), runs in groups.items() if d == dataset for r in runs)
        views = [("tokens", "tokens", "val_loss"), ("training FLOPs", "flops", "val_loss")]
        views += [("tokens", "tokens", "recall")] if has_recall else []
        for xname, xkey, ykey in views:
            series, bands = {}, {}
            for (d, arch), runs in sorted(groups.items()):
                if d != dataset:
                    continue
                n = min(len(r["ev"]) for r in runs)
                xs = [runs[0]["ev"][i]["tokens"] * (runs[0]["flops"] if xkey == "flops" else 1) for i in range(n)]
                per = [[r["ev"][i][ykey] for r in runs] for i in range(n)]
                series[arch] = list(zip(xs, [statistics.mean(p) for p in per]))
                bands[arch] = ([min(p) for p in per], [max(p) for p in per])
            plot(os.path.join(bc.plot_dir, f"quality_{dataset}_{ykey.replace('_loss', '')}_vs_{xkey}.png"), xname,
                 "validation loss" if ykey == "val_loss" else "fact recall", series, bands=bands,
                 title=f"{dataset}: mean of {len(groups[(dataset, 'swiglu')]) if (dataset, 'swiglu') in groups else ''} "
                       f"seeds, band min..max")
    print(f"# plots: {bc.plot_dir}/quality_<dataset>_val_vs_tokens.png, _val_vs_flops.png, _recall_vs_tokens.png "
          f"(facts; band: min..max over seeds)")
    return {"quality": out}


# -----------------------------------------------------------------------------
# the paper's claims at small scale (STEM_NOTES.md s. 8; claims.sh runs them all): the pure functions
# first (tests import them), then one mode per claim: spread (5), stability (4), context (7), locality (6)


def pairwise_abs_cos(x):
    """|cos| of every pair of distinct rows of x (n, d), as a flat float64 array of n(n-1)/2 values
    (the upper triangle of the cosine matrix). A zero row has |cos| 0 with everything."""
    x = np.asarray(x, dtype=np.float64)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    return np.minimum(np.abs(u @ u.T)[np.triu_indices(len(x), 1)], 1.0)  # rounding can pass 1 for parallel rows


def pairwise_abs_cos_stats(x):
    """{median, p95} of the pairwise |cos| of the rows of x (n >= 2 rows); p95 as numpy's default
    (linear interpolation between order statistics)."""
    c = pairwise_abs_cos(x)
    if c.size == 0:
        raise ValueError("pairwise |cos| needs at least 2 rows")
    return dict(median=float(np.median(c)), p95=float(np.percentile(c, 95)))


def heaps_fit(T, D):
    """Heaps' law D = k T^beta fitted by least squares on log D = log k + beta log T: returns (k, beta)."""
    beta, logk = np.polyfit(np.log(np.asarray(T, dtype=np.float64)), np.log(np.asarray(D, dtype=np.float64)), 1)
    return float(np.exp(logk)), float(beta)


def mean_distinct(data, T, windows, rng):
    """Mean number of distinct ids in `windows` random windows of T consecutive tokens of data."""
    starts = rng.integers(0, len(data) - T + 1, size=windows)
    return float(np.mean([len(np.unique(np.asarray(data[s:s + T]))) for s in starts]))


def running_excess(losses, window):
    """[(t, loss[t] - median of the finite losses among loss[t-window:t])] for t >= window; the excess is
    inf where loss[t] is not finite, and None where the window holds no finite loss."""
    out = []
    for t in range(window, len(losses)):
        prev = [v for v in losses[t - window:t] if math.isfinite(v)]
        if not math.isfinite(losses[t]):
            out.append((t, math.inf))
        else:
            out.append((t, losses[t] - statistics.median(prev) if prev else None))
    return out


def count_spikes(losses, window=20, margin=0.5):
    """Indices t (0-based) of the loss spikes: t >= window and loss[t] > median(loss[t-window:t]) + margin
    (nats; the median over the finite losses of the window), or loss[t] not finite (a diverged step)."""
    return [t for t, e in running_excess(losses, window) if e is not None and e > margin]


SPIKE_DEFINITION = ("a spike is a step t (after the first W) whose training loss exceeds the median of the previous "
                    "W steps' finite losses by more than the margin, or is not finite")


@torch.no_grad()
def position_losses(model, x, y, ctx, chunk=4):
    """Cross-entropy at each position of each window x -> y (B, T): (B, T) float64 on the CPU. In chunks
    of `chunk` windows, so that a 50k-way vocabulary's logits stay small."""
    out = []
    for i in range(0, x.size(0), chunk):
        xb, yb = x[i:i + chunk], y[i:i + chunk]
        with ctx:
            logits, _ = model(xb, yb)
        out.append(F.cross_entropy(logits.float().transpose(1, 2), yb, reduction="none").double().cpu())  # (b, T)
    return torch.cat(out)


@torch.no_grad()
def swap_rows(model, a, b):
    """In every table of the model, rows a[i] and b[i] change places (twice restores). a and b: lists
    of token ids of equal length, no id in both."""
    assert len(a) == len(b) and not set(a) & set(b), (a, b)
    ia, ib = torch.tensor(a), torch.tensor(b)
    for f in model.stem_ffns():
        ra, rb = f.table[ia].clone(), f.table[ib].clone()
        f.table[ia], f.table[ib] = rb, ra


def ckpt_file(path):
    """A checkpoint given as a file or as the run folder holding ckpt.pt."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def load_model(path, device, what="--ckpt"):
    """(model in eval mode on device, checkpoint, its data folder, that folder's meta)."""
    from common import check_provenance, load_checkpoint, model_from_checkpoint
    path = ckpt_file(path)
    ckpt = load_checkpoint(path)
    data_dir = ckpt["config"]["train"]["data_dir"]
    meta = load_meta(data_dir)
    check_provenance(ckpt, meta, data_dir, path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    print(f"# {what}: {path} (step {ckpt['iter']} of {ckpt['config']['train']['max_iters']}, ffn={model.cfg.ffn}, "
          f"stem_layers={model.cfg.stem_layers}, table layers {model.stem_layers or 'none'}, data {data_dir})")
    return model, ckpt, data_dir, meta


def same_data(ckpt, meta, data_dir, path):
    """Refuse a second checkpoint trained on other data than the first one's."""
    from common import check_provenance
    check_provenance(ckpt, meta, data_dir, ckpt_file(path))


def bars(path, labels, values, ylabel, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(range(len(values)), values, color="tab:blue")
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=15)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.1)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- spread (claim 5): STEM rows near-orthogonal against a random baseline; dense W_up x clusters


def top_ids(data_dir, meta, n):
    """The n most frequent ids of train.bin (ties: the smaller id first), and the count of ids that occur."""
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
    counts = np.bincount(np.asarray(data), minlength=meta["vocab_size"])
    order = np.argsort(-counts, kind="stable")
    present = int((counts > 0).sum())
    return order[:min(n, present)].tolist(), present


@torch.no_grad()
def up_outputs(model, layers, ids, data_dir, meta, pool, max_tokens, batch, device, ctx):
    """For each layer, one W_up x vector per id: the SwiGLU up-projection's output at the positions of
    train.bin (windows of block_size spread evenly over the file, at most max_tokens in all) holding
    that id, pooled by `pool`: "first" occurrence or "mean" over occurrences. -> ({layer: (len(found), ffn)},
    found ids in the order of `ids`, tokens read)."""
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
    T, want = model.cfg.block_size, torch.tensor(ids)
    slot = torch.full((meta["vocab_size"],), -1, dtype=torch.long)
    slot[want] = torch.arange(len(ids))
    W = model.cfg.ffn_hidden
    sums = {L: torch.zeros(len(ids), W, dtype=torch.float64) for L in layers}
    counts = torch.zeros(len(ids), dtype=torch.float64)
    got = {}
    hooks = [model.blocks[L].ffn.up.register_forward_hook(lambda m, i, o, L=L: got.__setitem__(L, o)) for L in layers]
    n_windows = max(1, min(max_tokens, len(data) - 1) // T)
    starts = np.linspace(0, len(data) - T, n_windows).astype(np.int64)  # evenly over the file
    read = 0
    try:
        for w0 in range(0, n_windows, batch):
            nw = min(batch, n_windows - w0)
            x = torch.from_numpy(np.stack([np.asarray(data[s:s + T]) for s in starts[w0:w0 + nw]]).astype(np.int64))
            with ctx:
                model(x.to(device))  # targets=None: the head runs on the last position only
            read += x.numel()
            s = slot[x.reshape(-1)]  # (n,) slot of each position, -1 when not a wanted id
            at = s >= 0
            if pool == "first":
                at &= counts[s.clamp(min=0)] == 0
                pos = at.nonzero().squeeze(1)
                _, keep = np.unique(s[pos].numpy(), return_index=True)  # the first position of each id in this batch
                pos = pos[torch.from_numpy(keep)]
                s_at = s[pos]
            else:
                pos = at.nonzero().squeeze(1)
                s_at = s[pos]
            for L in layers:
                out = got[L].reshape(-1, W).float().cpu()[pos].double()
                sums[L].index_add_(0, s_at, out)
            counts.index_add_(0, s_at, torch.ones(len(s_at), dtype=torch.float64))
            if pool == "first" and bool((counts > 0).all()):
                break
    finally:
        for h in hooks:
            h.remove()
    found = (counts > 0).nonzero().squeeze(1)
    vecs = {L: (sums[L][found] / counts[found, None]).numpy() for L in layers}
    return vecs, [ids[i] for i in found.tolist()], read


def bench_spread(bc, device, ctx):
    stem, ckpt, data_dir, meta = load_model(bc.ckpt, device)
    require(stem.stem_layers, f"{bc.ckpt} has no table layers (ffn={stem.cfg.ffn}): --ckpt must be a STEM checkpoint")
    layers = stem.stem_layers
    layer = layers[0] if bc.spread_layer == -1 else bc.spread_layer
    require(layer in layers, f"spread_layer={bc.spread_layer}: layer {layer} is not a table layer of {bc.ckpt} "
            f"(its table layers: {layers}); -1 picks the first")
    ids, present = top_ids(data_dir, meta, bc.spread_ids)
    require(len(ids) >= 2, f"{data_dir}/train.bin holds fewer than 2 distinct ids")
    torch.manual_seed(ckpt["config"]["train"]["seed"])  # train.py seeds, then builds the model: the same init
    init = GPT(stem.cfg)
    W = stem.cfg.ffn_hidden
    rand = torch.randn(len(ids), W, generator=torch.Generator().manual_seed(0)).numpy()
    swiglu_vecs, found, read = None, ids, 0
    if bc.ckpt_swiglu:
        dense, dckpt, _, _ = load_model(bc.ckpt_swiglu, device, "--ckpt_swiglu")
        same_data(dckpt, meta, data_dir, bc.ckpt_swiglu)
        require(dense.cfg.ffn_hidden == W, f"--ckpt_swiglu has ffn_hidden={dense.cfg.ffn_hidden}, the STEM model "
                f"{W}: |cos| depends on the width, so the two must match")
        for L in layers:
            require(type(dense.blocks[L].ffn) is SwiGLU, f"layer {L} of --ckpt_swiglu is not a SwiGLU FFN "
                    f"(ffn={dense.cfg.ffn}, its layers {dense.ffn_layers}): no up-projection to compare")
        swiglu_vecs, found, read = up_outputs(dense, layers, ids, data_dir, meta, bc.spread_pool, bc.spread_tokens,
                                              bc.batch_size, device, ctx)
        require(len(found) >= 2, f"fewer than 2 of the top ids occur in the {read} tokens read: raise --spread_tokens")
        if len(found) < len(ids):
            print(f"# {len(ids) - len(found)} of the {len(ids)} ids do not occur in the {read:,} tokens read: "
                  f"every entry uses the {len(found)} that do")
    sel = [ids.index(i) for i in found]
    rand = rand[sel]
    per_layer, rows, cdfs = [], [], {}
    for L in layers:
        ent = dict(layer=L,
                   trained=pairwise_abs_cos_stats(stem.blocks[L].ffn.table.detach().cpu()[found].double().numpy()),
                   init=pairwise_abs_cos_stats(init.blocks[L].ffn.table.detach()[found].double().numpy()),
                   random=pairwise_abs_cos_stats(rand),
                   swiglu_up=pairwise_abs_cos_stats(swiglu_vecs[L]) if swiglu_vecs else None)
        per_layer.append(ent)
        for k in ("trained", "init", "random", "swiglu_up"):
            if ent[k] is not None:
                rows.append(dict(layer=str(L) + (" (headline)" if L == layer else ""), rows=dict(
                    trained="STEM table, trained", init="STEM table, at init (same seed)",
                    random=f"Gaussian N(0,1), width {W}", swiglu_up=f"SwiGLU W_up x ({bc.spread_pool} per id)")[k],
                    median=f"{ent[k]['median']:.4f}", p95=f"{ent[k]['p95']:.4f}"))
    table(rows, ["layer", "rows", "median", "p95"])
    print(f"# |cos| over the {len(found) * (len(found) - 1) // 2:,} pairs of the {len(found)} most frequent ids of "
          f"{data_dir}/train.bin ({present:,} distinct ids occur); random vectors of width {W} give a median "
          f"about 0.674/sqrt({W}) = {0.674 / W ** 0.5:.4f} and a P95 about 1.96/sqrt({W}) = {1.96 / W ** 0.5:.4f}")
    if swiglu_vecs:
        print(f"# SwiGLU: the output of blocks[{'/'.join(map(str, layers))}].ffn.up on {read:,} tokens of train.bin "
              f"(windows of {stem.cfg.block_size} spread evenly over it), {bc.spread_pool} over each id's positions")
    head = next(e for e in per_layer if e["layer"] == layer)
    qs = np.linspace(0.005, 0.995, 100)
    sources = dict(trained=stem.blocks[layer].ffn.table.detach().cpu()[found].double().numpy(),
                   init=init.blocks[layer].ffn.table.detach()[found].double().numpy(), random=rand)
    if swiglu_vecs:
        sources["swiglu_up"] = swiglu_vecs[layer]
    for k, v in sources.items():
        cdfs[k] = list(zip(np.quantile(pairwise_abs_cos(v), qs).tolist(), qs.tolist()))
    plot(os.path.join(bc.plot_dir, "spread_abs_cos_cdf.png"), "|cos| of a pair of rows", "fraction of pairs below",
         cdfs, title=f"layer {layer}, {len(found)} most frequent ids")
    print(f"# headline: layer {layer} (the first table layer unless --spread_layer); plot: {bc.plot_dir}/spread_abs_cos_cdf.png")
    return {"spread": {k: head[k] for k in ("trained", "init", "random", "swiglu_up")}, "layer": layer,
            "per_layer": per_layer, "ids": len(found), "ids_asked": bc.spread_ids, "pool": bc.spread_pool,
            "swiglu_tokens_read": read, "ffn_hidden": W}


# ---- stability (claim 4): loss spikes of swiglu, stem and hash_moe at the preset lr and a multiple of it


STABILITY_FFNS = ("swiglu", "stem", "hash_moe")


def stability_run(bc, mc_keys, ffn, mult, seed, lr, min_lr):
    """One short train.py run in stability_dir (kept: a finished run is reused, an unfinished one
    resumed); returns its per-step training losses."""
    out = os.path.join(bc.stability_dir, f"{ffn}-lr{mult:g}x-s{seed}")
    args = [bc.train_preset, f"--data_dir={bc.data_dir}", f"--ffn={ffn}", f"--max_iters={bc.stability_steps}",
            f"--eval_interval={bc.stability_steps}", "--eval_iters=2", f"--log_interval={bc.stability_steps}",
            "--eval_facts=False", f"--learning_rate={lr * mult!r}", f"--min_lr={min_lr * mult!r}", f"--seed={seed}",
            "--compile=False", "--stop_on_nan=False", f"--out_dir={out}"] + [f"--{k}={v}" for k, v in mc_keys.items()]
    args += [f"--{k}={getattr(bc, k)}" for k in ("device", "dtype") if getattr(bc, k) != "auto"]
    path = os.path.join(out, "ckpt.pt")
    if os.path.isfile(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        c = ck["config"]
        want = dict(max_iters=bc.stability_steps, seed=seed, data_dir=bc.data_dir, ffn=ffn, **mc_keys)
        have = {k: c["train"].get(k, c["model"].get(k)) for k in want}
        bad = [f"{k}={have[k]!r} (here {want[k]!r})" for k in want if str(have[k]) != str(want[k])]
        if not math.isclose(c["train"]["learning_rate"], lr * mult, rel_tol=1e-9):
            bad.append(f"learning_rate={c['train']['learning_rate']!r} (here {lr * mult!r})")
        if bad:
            raise UserError(f"{out} holds a run with other settings ({', '.join(bad)}): delete it or choose "
                            f"another --stability_dir")
        if ck["iter"] < ck["config"]["train"]["max_iters"]:
            args.append("--init_from=resume")  # an interrupted run continues (train.py refuses a fresh start)
        else:
            args = None  # finished: reused
    t0 = time.time()
    if args is not None:
        p = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), *args],
                           capture_output=True, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip() or p.stdout.strip() or str(p.returncode)).splitlines()[-1]
            raise UserError(f"training {out} failed: {last}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = sorted((r["iter"], r["loss"]) for r in rows if r["kind"] == "train")
    return [v for _, v in steps], out, (time.time() - t0 if args is not None else None)


def bench_stability(bc, mc, keys_set):
    require(os.path.isfile(bc.train_preset), f"train_preset={bc.train_preset}: no such file")
    load_meta(bc.data_dir)  # the usual hint when the data is missing
    preset = dict(read_preset(bc.train_preset))
    require("learning_rate" in preset, f"{bc.train_preset} sets no learning_rate: the stability runs scale it")
    lr, min_lr = preset["learning_rate"], preset.get("min_lr", preset["learning_rate"] / 10)
    mc_keys = {k: getattr(mc, k) for k in sorted(keys_set) if k in GPTConfig.__dataclass_fields__
               and k not in ("ffn", "vocab_size")}
    if "batch_size" in keys_set:
        mc_keys["batch_size"] = bc.batch_size
    seeds = [int(s) for s in bc.stability_seeds.split(",")]
    mults = [float(m) for m in bc.stability_lrs.split(",")]
    runs = []
    for seed in seeds:
        for mult in mults:
            for ffn in STABILITY_FFNS:
                losses, out, secs = stability_run(bc, mc_keys, ffn, mult, seed, lr, min_lr)
                spikes = count_spikes(losses, bc.spike_window, bc.spike_margin)
                finite = [v for v in losses if math.isfinite(v)]
                excess = [e for _, e in running_excess(losses, bc.spike_window) if e is not None and math.isfinite(e)]
                runs.append(dict(ffn=ffn, lr_mult=mult, learning_rate=lr * mult, seed=seed, out_dir=out,
                                 steps=len(losses), spikes=len(spikes), spike_steps=[t + 1 for t in spikes],
                                 max_excess=max(excess) if excess else None,
                                 final_loss=losses[-1] if losses else None, diverged=len(finite) < len(losses),
                                 seconds=secs, losses=losses))
                print(f"# {out}: {len(losses)} steps, {len(spikes)} spikes" +
                      (f" ({secs:.0f} s)" if secs is not None else " (reused)"), flush=True)
    summary, rows = [], []
    for mult in mults:
        for ffn in STABILITY_FFNS:
            rs = [r for r in runs if r["ffn"] == ffn and r["lr_mult"] == mult]
            s = dict(ffn=ffn, lr_mult=mult, learning_rate=lr * mult, spikes_per_seed=[r["spikes"] for r in rs],
                     spikes_mean=statistics.mean(r["spikes"] for r in rs),
                     max_excess=max((r["max_excess"] for r in rs if r["max_excess"] is not None), default=None),
                     final_loss_mean=statistics.mean(r["final_loss"] for r in rs),
                     diverged=sum(r["diverged"] for r in rs))
            summary.append(s)
            rows.append(dict(ffn=ffn, lr=f"{lr * mult:.2e} ({mult:g}x)", spikes=" ".join(map(str, s["spikes_per_seed"])),
                             mean=f"{s['spikes_mean']:.2f}",
                             max_excess=f"{s['max_excess']:+.3f}" if s["max_excess"] is not None else "-",
                             final=f"{s['final_loss_mean']:.3f}", diverged=str(s["diverged"])))
        plot(os.path.join(bc.plot_dir, f"stability_lr{mult:g}x.png"), "step", "training loss",
             {f"{r['ffn']} s{r['seed']}": list(enumerate(r["losses"], 1)) for r in runs if r["lr_mult"] == mult},
             title=f"{os.path.basename(bc.data_dir.rstrip('/'))}, lr {lr * mult:.2e} ({mult:g}x the preset's)")
    table(rows, ["ffn", "lr", "spikes", "mean", "max_excess", "final", "diverged"])
    print(f"# {SPIKE_DEFINITION}; W = {bc.spike_window}, margin = {bc.spike_margin} nats. spikes: per seed "
          f"({', '.join(map(str, seeds))}); max_excess: the largest loss minus running median; {bc.stability_steps} steps "
          f"of {bc.train_preset} on {bc.data_dir} (its warmup and cosine schedule, peak and floor lr scaled)")
    print(f"# plots: {bc.plot_dir}/stability_lr<m>x.png; runs kept in {bc.stability_dir} (reused when finished)")
    return {"stability": dict(definition=SPIKE_DEFINITION, window=bc.spike_window, margin=bc.spike_margin,
                              steps=bc.stability_steps, preset=bc.train_preset, data_dir=bc.data_dir,
                              preset_learning_rate=lr, seeds=seeds, summary=summary, runs=runs)}


# ---- context (claim 7): distinct ids vs context length (Heaps' law), per-position loss STEM - SwiGLU


def bench_context(bc, device, ctx, keys_set):
    data_dir = bc.data_dir
    models = None
    if bc.ckpt:
        stem, ckpt, stem_data, meta = load_model(bc.ckpt, device)
        dense, dckpt, _, _ = load_model(bc.ckpt_swiglu, device, "--ckpt_swiglu")
        same_data(dckpt, meta, stem_data, bc.ckpt_swiglu)
        require(stem.stem_layers and dense.cfg.ffn == "swiglu", f"--ckpt is ffn={stem.cfg.ffn} and --ckpt_swiglu "
                f"ffn={dense.cfg.ffn}: --ckpt must have table layers and --ckpt_swiglu be SwiGLU (swapped?)")
        require(dense.cfg.block_size == stem.cfg.block_size, f"the two checkpoints have block_size "
                f"{stem.cfg.block_size} and {dense.cfg.block_size}: per-position losses need the same context")
        if "data_dir" in keys_set:
            same_data(ckpt, load_meta(data_dir), data_dir, bc.ckpt)
        data_dir, models = stem_data, (stem, dense)
    meta = load_meta(data_dir)
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
    Ts, t = [], 16
    while t <= min(bc.context_max, len(data)):
        Ts.append(t)
        t *= 2
    require(len(Ts) >= 2, f"{data_dir}/train.bin holds {len(data)} tokens: too few for windows of 16 and 32")
    rng = np.random.default_rng(0)
    D = [mean_distinct(data, T, bc.context_windows, rng) for T in Ts]
    k, beta = heaps_fit(Ts, D)
    rows = [dict(T=str(T), distinct=f"{d:.1f}", fraction=f"{d / T:.3f}", fit=f"{k * T ** beta:.1f}") for T, d in zip(Ts, D)]
    table(rows, ["T", "distinct", "fraction", "fit"])
    print(f"# distinct ids (= table rows a STEM layer reads) in a window of T tokens of {data_dir}/train.bin, mean "
          f"over {bc.context_windows} random windows; Heaps fit D = k T^beta (least squares in log-log): "
          f"k = {k:.3f}, beta = {beta:.3f}" + (" (sublinear)" if beta < 1 else ""))
    plot(os.path.join(bc.plot_dir, "context_distinct_ids.png"), "context length T (tokens)", "distinct ids in the window",
         {"measured": list(zip(Ts, D)), f"fit {k:.2f} T^{beta:.3f}": [(T, k * T ** beta) for T in Ts],
          "T (all distinct)": [(T, T) for T in Ts]}, logx=True, logy=True)
    res = dict(data_dir=data_dir, windows=bc.context_windows, T=Ts, distinct=D, heaps_k=k, heaps_beta=beta)
    if models:
        stem, dense = models
        B = bc.batch_size
        batches = Batches(data_dir, meta, stem.cfg.block_size, B, "cpu", seed=0)
        gen = torch.Generator().manual_seed(0)
        ls, ld = [], []
        for _ in range(bc.context_batches):  # the same validation windows for both models
            x, y = batches.get("val", gen, to_device=False)
            x, y = x.to(device), y.to(device)
            ls.append(position_losses(stem, x, y, ctx))
            ld.append(position_losses(dense, x, y, ctx))
        per_window = (torch.cat(ls) - torch.cat(ld)).numpy()  # (windows, T): STEM - SwiGLU
        ls, ld = torch.cat(ls).mean(0).numpy(), torch.cat(ld).mean(0).numpy()
        diff = ls - ld
        T, n_win = len(diff), len(per_window)
        pos = np.arange(T)
        slope, icpt = np.polyfit(pos, diff, 1)
        # the slope is linear in the data: the mean of the per-window slopes; its standard error from their spread
        slopes = np.polyfit(pos, per_window.T, 1)[0]
        se = float(slopes.std(ddof=1) / n_win ** 0.5) if n_win > 1 else float("nan")
        q = max(1, T // 4)
        first, last = float(diff[:q].mean()), float(diff[-q:].mean())
        rows = [dict(positions=f"{a}-{b - 1}", stem=f"{ls[a:b].mean():.4f}", swiglu=f"{ld[a:b].mean():.4f}",
                     diff=f"{diff[a:b].mean():+.4f}") for a, b in
                [(a, min(T, a + max(1, T // 8))) for a in range(0, T, max(1, T // 8))]]
        table(rows, ["positions", "stem", "swiglu", "diff"])
        grows = bool(slope < -2 * se)
        verdict = ("grows with position" if grows else "shrinks with position" if slope > 2 * se else
                   "shows no trend with position beyond 2 standard errors")
        print(f"# validation loss per position (0 = the first predicted token, context of 1), mean over "
              f"{bc.context_batches} x {B} windows of val.bin; diff = STEM - SwiGLU (negative: STEM better); "
              f"least-squares slope {slope:+.2e} ± {se:.1e} (standard error over the windows) nats per position "
              f"(first quarter {first:+.4f}, last quarter {last:+.4f}): STEM's advantage {verdict}")
        plot(os.path.join(bc.plot_dir, "context_loss_diff_by_position.png"), "position in the context",
             "val loss STEM - SwiGLU (nats)", {"STEM - SwiGLU": list(zip(pos.tolist(), diff.tolist())),
                                               f"fit, slope {slope:+.2e}": [(0, icpt), (T - 1, icpt + slope * (T - 1))]})
        res.update(windows_loss=bc.context_batches * B, loss_stem=ls.tolist(), loss_swiglu=ld.tolist(),
                   diff=diff.tolist(), slope=float(slope), slope_se=se, intercept=float(icpt),
                   diff_first_quarter=first, diff_last_quarter=last, advantage_grows=grows, verdict=verdict,
                   mean_diff=float(diff.mean()))
    print(f"# plots: {bc.plot_dir}/context_distinct_ids.png" +
          (f", {bc.plot_dir}/context_loss_diff_by_position.png" if models else ""))
    return {"context": res}


# ---- locality (claim 6): an edit of A changes A's facts, not C's in the same prompt; untouched rows change nothing


@torch.no_grad()
def greedy(model, ids, steps, device, stem_ids=None):
    """(the greedy continuation's tokens, the logits at every position of the prompt) for one prompt."""
    x = torch.tensor([ids], device=device)
    s = None if stem_ids is None else torch.tensor([stem_ids], device=device)
    out = model.generate(x, steps, temperature=0, stem_ids=s)[0, len(ids):].tolist()
    logits, _ = model(x, x, stem_ids=s)  # with targets: the logits of every position (the loss is not used)
    return out, logits[0].float().cpu()


def bench_locality(bc, device, ctx):
    import random
    import re
    model, ckpt, data_dir, meta = load_model(bc.ckpt, device)
    require(model.stem_layers, f"{bc.ckpt} has no table layers (ffn={model.cfg.ffn}): --ckpt must be a STEM checkpoint")
    facts_path = os.path.join(data_dir, "facts.json")
    require(os.path.isfile(facts_path), f"{data_dir} is not a facts dataset (no facts.json): --mode locality needs one")
    facts, enc = json.load(open(facts_path)), load_tokenizer(data_dir)
    recall = fact_recall(model, enc, facts["probes"], device, ctx)["recall"]
    probes = edit_probes(facts, enc)
    edit = fact_recall(model, enc, probes, device, ctx)["recall"]
    model.eval()  # fact_recall leaves the model in train mode
    cap = {p["entity"]: p for p in facts["probes"] if p["attribute"] == LOCALITY_ATTRIBUTE}
    names = sorted(cap)
    rng = random.Random(0)
    n = dict(pairs=0, skipped=0, unchanged=0, correct=0, correct_edited=0, control=0, control_unchanged=0,
             control_identical=0, positive=0, positive_changed=0)

    def toks(name):
        return enc.encode(" " + name)
    for _ in range(bc.locality_pairs):
        a, c, b = rng.sample(names, 3)
        prompt = cap[a]["prompt"] + cap[a]["answer"] + ". " + cap[c]["prompt"]
        edited = re.sub(rf"\b{re.escape(a)}\b", b, prompt)
        ids, sids = enc.encode(prompt), enc.encode(edited)
        if len(ids) != len(sids) or len(ids) > model.cfg.block_size - 8:
            n["skipped"] += 1  # a swap that changes the token count has no position-wise edit
            continue
        steps = len(enc.encode(cap[c]["answer"]))
        with ctx:
            plain, plain_logits = greedy(model, ids, steps, device)
            moved, _ = greedy(model, ids, steps, device, sids)
        n["pairs"] += 1
        n["unchanged"] += moved == plain
        n["correct"] += enc.decode(plain).startswith(cap[c]["answer"])
        n["correct_edited"] += enc.decode(moved).startswith(cap[c]["answer"])
        used = set(ids) | set(plain)  # every id the unedited run looks up (prompt, then its own answer)
        # control: swap the table rows of D and E, two entities whose tokens the run never looks up
        for _ in range(20):
            d, e = rng.sample([m for m in names if m not in (a, c)], 2)
            if len(toks(d)) == len(toks(e)) and not (set(toks(d)) | set(toks(e))) & used and not set(toks(d)) & set(toks(e)):
                swap_rows(model, toks(d), toks(e))
                with ctx:
                    out, logits = greedy(model, ids, steps, device)
                swap_rows(model, toks(d), toks(e))  # back
                n["control"] += 1
                n["control_unchanged"] += out == plain
                n["control_identical"] += bool(torch.equal(logits, plain_logits))
                break
        # positive control: the same row swap on A, whose tokens are in the prompt, does change the logits
        ta, tb = toks(a), toks(b)
        if len(ta) == len(tb) and not set(ta) & set(tb):
            swap_rows(model, ta, tb)
            with ctx:
                _, logits = greedy(model, ids, steps, device)
            swap_rows(model, ta, tb)
            n["positive"] += 1
            n["positive_changed"] += not torch.equal(logits, plain_logits)
    require(n["pairs"] > 0, f"no two-entity probe of {data_dir} keeps its token count under the edit")
    frac = lambda k, of: n[k] / n[of] if n[of] else None  # noqa: E731
    loc = dict(fact_recall=recall, edit_success=edit, edit_probes=len(probes), pairs=n["pairs"], skipped=n["skipped"],
               unchanged=frac("unchanged", "pairs"), c_correct=frac("correct", "pairs"),
               c_correct_edited=frac("correct_edited", "pairs"), control_pairs=n["control"],
               control_unchanged=frac("control_unchanged", "control"),
               control_identical_logits=frac("control_identical", "control"), positive_pairs=n["positive"],
               positive_changed_logits=frac("positive_changed", "positive"))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [dict(what="fact recall (all probes)", value=fmt(recall), n=str(len(facts["probes"]))),
            dict(what="edit success: A's prompt with B's rows answers B's fact", value=fmt(edit), n=str(len(probes))),
            dict(what="locality: C's answer unchanged by the edit A->B", value=fmt(loc["unchanged"]), n=str(n["pairs"])),
            dict(what="  C answered correctly, without / with the edit",
                 value=f"{fmt(loc['c_correct'])} / {fmt(loc['c_correct_edited'])}", n=str(n["pairs"])),
            dict(what="control: rows of D, E (not looked up) swapped: answer unchanged", value=fmt(loc["control_unchanged"]),
                 n=str(n["control"])),
            dict(what="  logits at every prompt position bitwise identical", value=fmt(loc["control_identical_logits"]), n=str(n["control"])),
            dict(what="positive control: rows of A, B swapped: prompt logits changed", value=fmt(loc["positive_changed_logits"]),
                 n=str(n["positive"]))]
    table(rows, ["what", "value", "n"])
    print(f"# two-entity probes: '{cap[names[0]]['prompt']}{cap[names[0]]['answer']}. <the same for C>' -> C's "
          f"{LOCALITY_ATTRIBUTE}; the edit looks A's tokens up through B's rows (stem_ids, as sample.py --edit); "
          f"greedy answers of len(C's answer) tokens compared. {n['skipped']} random triples skipped (token count "
          f"changes). Control: a STEM layer reads only the rows of the ids at its positions, so rows of ids the run "
          f"never looks up cannot change anything: 1.0 exactly is the expected value, not a measurement of the model")
    if model.stem_layers[0] == model.cfg.n_layer - 1:
        print(f"# note: the first table layer is the last layer ({model.stem_layers[0]}): no attention follows it, so "
              f"an edit cannot reach C's positions and locality is 1.0 by construction here")
    bars(os.path.join(bc.plot_dir, "locality.png"),
         ["fact recall", "edit success", "C unchanged\nby edit of A", "C correct", "C correct\nafter edit",
          "control\nunchanged"],
         [recall, edit, loc["unchanged"], loc["c_correct"], loc["c_correct_edited"], loc["control_unchanged"] or 0.0],
         "fraction", f"{os.path.basename(os.path.dirname(os.path.abspath(ckpt_file(bc.ckpt))))}: {n['pairs']} two-entity probes")
    print(f"# plot: {bc.plot_dir}/locality.png")
    return {"locality": loc}


LOCALITY_ATTRIBUTE = "capital"  # the two-entity probes ask for this attribute (1 in 400 by chance)


def check_config(bc, mc):
    """Every value in range before anything is measured or written: one error line otherwise."""
    require(bc.mode in MODES, f"mode={bc.mode!r} is not one of {', '.join(MODES)}")
    for k in ("batch_size", "steps", "repeats", "turn", "decode_tokens", "table_vocab"):
        require(getattr(bc, k) >= 1, f"{k}={getattr(bc, k)} must be at least 1")
    require(bc.burn_in >= 0 and bc.unique_ids >= 0, "burn_in and unique_ids must be 0 or more")
    require(0 <= bc.shared_fraction <= 1, f"shared_fraction={bc.shared_fraction} must be in [0, 1]")
    require(bc.host_gbps > 0, f"host_gbps={bc.host_gbps} must be positive")
    require(bc.host_threads is None or bc.host_threads >= 1, f"host_threads={bc.host_threads} must be at least 1")
    require(bc.peak_flops is None or bc.peak_flops > 0, f"peak_flops={bc.peak_flops} must be positive")
    for key, spec, n in (("shapes", bc.shapes, 3), ("cache_sizes", bc.cache_sizes, 1)):
        parts = [p.split("x") for p in spec.split(",")]
        require(all(len(p) == n and all(v.isdigit() and int(v) > 0 for v in p) for p in parts),
                f"{key}={spec!r} is not a comma-separated list of " + ("ExFxN shapes (n_embd x ffn_hidden x tokens), "
                "e.g. 128x512x4096" if n == 3 else "positive row counts, e.g. 16,64,256"))
    for k in ("spread_ids", "spread_tokens", "stability_steps", "spike_window", "context_max", "context_windows",
              "context_batches", "locality_pairs"):
        require(getattr(bc, k) >= 1, f"{k}={getattr(bc, k)} must be at least 1")
    require(bc.spread_ids >= 2, f"spread_ids={bc.spread_ids} must be at least 2 (|cos| is over pairs of rows)")
    require(bc.spread_layer >= -1, f"spread_layer={bc.spread_layer} must be a layer index, or -1 for the first table layer")
    require(bc.spread_pool in ("mean", "first"), f"spread_pool={bc.spread_pool!r} is not one of mean, first")
    require(bc.spike_margin > 0, f"spike_margin={bc.spike_margin} must be positive (nats)")
    require(bc.context_max >= 32, f"context_max={bc.context_max} must be at least 32 (windows of 16 and 32 at least)")
    require(all(s.strip().lstrip("-").isdigit() for s in bc.stability_seeds.split(",")),
            f"stability_seeds={bc.stability_seeds!r} is not a comma-separated list of integers, e.g. 1,2,3")
    try:
        lrs = [float(m) for m in bc.stability_lrs.split(",")]
    except ValueError:
        lrs = [0.0]
    require(all(m > 0 and math.isfinite(m) for m in lrs), f"stability_lrs={bc.stability_lrs!r} is not a comma-separated "
            f"list of positive multiples, e.g. 1,3")
    if bc.mode in ("spread", "locality"):
        require(bc.ckpt, f"--mode {bc.mode} needs --ckpt=STEM_CHECKPOINT (a ckpt.pt or its run folder)")
    if bc.mode == "context":
        require(bool(bc.ckpt) == bool(bc.ckpt_swiglu), "--mode context compares two checkpoints: give both --ckpt "
                "and --ckpt_swiglu, or neither (distinct ids only)")
    for k in ("ckpt", "ckpt_swiglu"):
        if getattr(bc, k) and bc.mode in ("spread", "context", "locality"):
            require(os.path.isfile(ckpt_file(getattr(bc, k))), f"{k}={getattr(bc, k)}: no checkpoint there (a ckpt.pt, "
                    f"or a run folder holding one)")
    if bc.mode == "stability":
        require(os.path.isfile(bc.train_preset), f"train_preset={bc.train_preset}: no such preset file")
        if os.path.exists(bc.stability_dir) and not os.path.isdir(bc.stability_dir):
            raise UserError(f"stability_dir={bc.stability_dir} is a file, not a folder: choose another --stability_dir")
    if os.path.exists(bc.plot_dir) and not os.path.isdir(bc.plot_dir):
        raise UserError(f"plot_dir={bc.plot_dir} is a file, not a folder: choose another --plot_dir")
    check_model_config(mc)


def main(argv):
    bc, mc = BenchConfig(), GPTConfig()
    keys_set = parse_config(argv, bc, mc, doc=__doc__)
    check_config(bc, mc)
    if bc.mode == "quality":
        header(bc, None, None, None, "summary of saved runs")
        res = bench_quality(bc)
    elif bc.mode in ("spread", "stability", "context", "locality"):
        device, dtype, ctx, note = resolve_device(bc.device, bc.dtype)
        header(bc, None, device, dtype, note)
        if bc.mode == "spread":
            res = bench_spread(bc, device, ctx)
        elif bc.mode == "stability":
            if "data_dir" not in keys_set:  # the preset's data
                bc.data_dir = dict(read_preset(bc.train_preset)).get("data_dir", bc.data_dir)
            res = bench_stability(bc, mc, keys_set)
        elif bc.mode == "context":
            res = bench_context(bc, device, ctx, keys_set)
        else:
            res = bench_locality(bc, device, ctx)
        res.update(device=note, torch=torch.__version__)
    else:
        device, dtype, ctx, note = resolve_device(bc.device, bc.dtype)
        if bc.child:  # a child of --mode train: one JSON line
            require(bc.child in ("speed", "memory"), f"child={bc.child!r} is internal: speed or memory")
            bad = [v for v in bc.variant.split(",") if v not in VARIANTS]
            require(not bad, f"variant={bc.variant!r}: {', '.join(bad)} not one of {', '.join(VARIANTS)}")
            print(json.dumps(train_child(bc, mc, device, ctx)))
            return
        if bc.mode in ("train", "offload") or (bc.mode == "decode" and not bc.ckpt):  # else: the checkpoint's data
            if not os.path.isfile(os.path.join(bc.data_dir, "meta.json")):
                if bc.data_dir != BenchConfig.data_dir:
                    load_meta(bc.data_dir)  # raises the usual hint
                prepare_facts(bc.data_dir, progress=False)
            mc.vocab_size = load_meta(bc.data_dir)["vocab_size"]
        header(bc, mc if bc.mode != "ffn" and not (bc.mode == "decode" and bc.ckpt) else None, device, dtype, note)
        if bc.mode == "ffn":
            res = bench_ffn(bc, device, ctx)
        elif bc.mode == "train":
            res = bench_train(bc, mc, device, argv)
        elif bc.mode == "offload":
            res = bench_offload(bc, mc, device, argv)
        else:
            res = bench_decode(bc, mc, device, ctx, keys_set)
        res.update(device=note, torch=torch.__version__)
    res.update(mode=bc.mode, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(res))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        die(str(e))
