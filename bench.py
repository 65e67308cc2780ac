"""
Measure STEM against SwiGLU, resident against offloaded: speed, memory, and the quality runs.

    python bench.py --mode ffn --device cpu       # one FFN layer fwd+bwd, SwiGLU vs STEM, several shapes
    python bench.py --mode train --device cpu     # whole training steps: SwiGLU, STEM dense/lazy/offloaded
    python bench.py --mode offload                # copy rates, gather rate, unique ids, bytes, lower bound
    python bench.py --mode decode                 # generation tok/s resident vs offloaded, cache hit rate
    python bench.py --mode quality --runs runs    # the results table and plots of quality.sh

Each mode prints a header (device, dtype, torch, config), a table, and as its last line one JSON
object holding every figure. Timings: burn_in steps, then `steps` timed steps, synchronised on CUDA;
variants are timed side by side in one run and reported as ratios (ffn, offload, decode: in one
process; train: a child process per variant, round-robin over --repeats, so that each variant's
memory is its own). Memory in `train` mode is the peak CUDA allocation, or on the CPU the peak RSS
of the variant's process. Plots go to --plot_dir (default out/bench, outside git); the README's
figures were written with --plot_dir=assets.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from model import GPT, GPTConfig, STEM, SwiGLU, configure_optimizer
from tables import ResidentTables
from common import (Batches, UserError, check_model_config, die, edit_probes, fact_recall, load_meta, parse_config,
                    require, resolve_device)

MODES = ("ffn", "train", "offload", "decode", "quality")
# dense bf16 peak of known GPUs (FLOP/s), for MFU; others: pass --peak_flops
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


@dataclass
class BenchConfig:
    mode: str = "ffn"  # ffn | train | offload | decode | quality
    device: str = "auto"
    dtype: str = "auto"
    data_dir: str = "data/facts"  # real tokens for train / offload / decode
    batch_size: int = 16
    burn_in: int = 3  # untimed steps first (allocator warm-up, lazy init)
    steps: int = 10  # timed steps
    shapes: str = "128x512x4096,256x1024x4096,768x2048x2048"  # ffn mode: n_embd x ffn_hidden x tokens
    table_vocab: int = 8192  # ffn mode: rows of the STEM table
    peak_flops: Optional[float] = None  # for MFU; None = a known GPU's bf16 peak, or none on CPU
    cache_sizes: str = "16,64,256,1024"  # decode mode
    decode_tokens: int = 64  # decode mode: new tokens per sample
    ckpt: str = ""  # decode mode: a trained checkpoint (real token statistics; its data); "" = random init
    runs: str = "runs"  # quality mode: folders written by quality.sh
    variants: str = "swiglu,stem-dense,stem-lazy,stem-offload"  # train mode
    repeats: int = 1  # train mode: runs per variant, round-robin; the median is reported
    shape: str = "gpt2-small"  # offload mode: the shape for host rates and the step model, or "model" (--n_layer=...)
    unique_ids: int = 0  # offload mode: K for the step model; 0 = measured on data_dir if its vocabulary fits, else 10k
    shared_fraction: float = 0.45  # offload mode: with --unique_ids, the fraction of K the previous step shares
    host_gbps: float = 60.0  # offload mode: host memory bandwidth of a GPU server, for the step model
    host_threads: Optional[int] = None  # offload mode: RowAdamW threads; None = min(8, cores)
    plot_dir: str = "out/bench"  # where PNGs go (the README's are in assets/: pass --plot_dir=assets to redo them)
    variant: str = ""  # internal: train mode runs each variant in a child process


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
    the unique and the gather counted in."""
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

        def run(layer, lazy_rows=False):
            def step():
                if lazy_rows:
                    uniq, inv = torch.unique(ids, return_inverse=True)
                    leaf = layer.table.index_select(0, uniq).requires_grad_()  # (K, ffn), as tables.py
                    with ctx:
                        y = layer(x, inv, leaf)
                else:
                    with ctx:
                        y = layer(x, ids)
                y.float().sum().backward()
                layer.zero_grad(set_to_none=True)
                x.grad = None
            return step
        res = timed_side_by_side(dict(swiglu=run(swiglu), stem_dense=run(stem), stem_lazy=run(lazy, True)),
                                 device, bc.burn_in, bc.steps)
        theory = 2 / 3  # two matmuls instead of three, forward and backward alike
        r = {k: res[k] / res["swiglu"] for k in ("stem_dense", "stem_lazy")}
        rows.append(dict(shape=f"d={d} ffn={h} tokens={n}", swiglu=f"{res['swiglu'] * 1e3:.2f} ms",
                         stem_dense=f"{res['stem_dense'] * 1e3:.2f} ms ({r['stem_dense']:.3f})",
                         stem_lazy=f"{res['stem_lazy'] * 1e3:.2f} ms ({r['stem_lazy']:.3f})", flop_ratio=f"{theory:.3f}"))
        out.append(dict(n_embd=d, ffn_hidden=h, tokens=n, swiglu_ms=res["swiglu"] * 1e3,
                        stem_dense_ms=res["stem_dense"] * 1e3, stem_lazy_ms=res["stem_lazy"] * 1e3,
                        dense_ratio=r["stem_dense"], lazy_ratio=r["stem_lazy"], flop_ratio=theory))
    table(rows, ["shape", "swiglu", "stem_dense", "stem_lazy", "flop_ratio"])
    print("# (ratio to SwiGLU in brackets); stem_dense: the dense (vocab, ffn) table gradient; stem_lazy: "
          "compact rows, unique and gather included")
    return {"ffn": out, "table_vocab": bc.table_vocab}


# -----------------------------------------------------------------------------
# train: whole steps, each variant in its own child process (so that peak RSS is its own)

VARIANTS = {  # name: (ffn, table_optimizer, offload)
    "swiglu": ("swiglu", "dense", False),
    "stem-dense": ("stem", "dense", False),
    "stem-lazy": ("stem", "lazy", False),
    "stem-offload": ("stem", "lazy", True),
}


def train_variant(bc, mc, device, ctx):
    """Timed training steps of one variant; returns its figures."""
    ffn, table_optimizer, offloaded = VARIANTS[bc.variant]
    mc.ffn = ffn
    meta = load_meta(bc.data_dir)
    mc.vocab_size = meta["vocab_size"]
    torch.manual_seed(0)
    batches = Batches(bc.data_dir, meta, mc.block_size, bc.batch_size, device, seed=0)
    model = GPT(mc)
    flops = 3 * model.flops_per_token()
    if offloaded:
        import offload
        tables = offload.OffloadedTables(model, device)
    else:
        tables = ResidentTables(model, device, table_optimizer)
    optimizer = configure_optimizer(model, 1e-3, 0.1)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    upcoming = batches.get("train", to_device=False)
    tables.prefetch([upcoming[0]])

    def step():  # train.py's loop, one micro-batch a step
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

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    dt = timed(step, device, bc.burn_in, bc.steps, tables.sync)
    tok = bc.batch_size * mc.block_size
    if device.startswith("cuda"):
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return dict(variant=bc.variant, step_ms=dt * 1e3, tok_per_s=tok / dt, peak_mem_mib=mem,
                train_flops_per_token=flops)


def peak_flops(bc, device):
    if bc.peak_flops is None and device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return bc.peak_flops


def run_variants(argv, variants, repeats):
    """Each variant's training steps in a child process of its own (its peak memory is its own), the
    variants round-robin `repeats` times; per variant the run with the median tokens/s."""
    runs = {v: [] for v in variants}
    args, rest = [], list(argv)
    while rest:  # the parent's arguments, less the ones the child gets anew (--key=value or --key value)
        a = rest.pop(0)
        if a.split("=")[0] in ("--mode", "--variant", "--variants", "--repeats"):
            if "=" not in a and rest:
                rest.pop(0)
            continue
        args.append(a)
    for _ in range(repeats):
        for v in variants:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--mode=train", *args, f"--variant={v}"],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise UserError(f"variant {v} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
            runs[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
    out = []
    for v, rs in runs.items():
        rs.sort(key=lambda r: r["tok_per_s"])
        med = dict(rs[len(rs) // 2], tok_per_s_runs=[r["tok_per_s"] for r in rs])
        out.append(med)
    return out


def bench_train(bc, mc, device, argv):
    peak = peak_flops(bc, device)
    names = [v for v in bc.variants.split(",") if v]
    for v in names:
        if v not in VARIANTS:
            raise UserError(f"variants: {v!r} is not one of {', '.join(VARIANTS)}")
    if mc.ffn == "swiglu":
        names = [v for v in names if VARIANTS[v][0] == "swiglu"]
    results = run_variants(argv, names, bc.repeats)
    base = next((r for r in results if r["variant"] == "swiglu"), None)
    lazy = next((r for r in results if r["variant"] == "stem-lazy"), None)
    rows = []
    for r in results:
        r["vs_swiglu"] = r["tok_per_s"] / base["tok_per_s"] if base else None
        r["vs_stem_lazy"] = r["tok_per_s"] / lazy["tok_per_s"] if lazy else None
        r["mfu"] = r["train_flops_per_token"] * r["tok_per_s"] / peak if peak else None
        rows.append(dict(variant=r["variant"], step=f"{r['step_ms']:.1f} ms", tok_s=f"{r['tok_per_s']:,.0f}",
                         runs=" ".join(f"{t:,.0f}" for t in r["tok_per_s_runs"]),
                         vs_swiglu=f"{r['vs_swiglu']:.3f}" if r["vs_swiglu"] else "-",
                         vs_lazy=f"{r['vs_stem_lazy']:.3f}" if r["vs_stem_lazy"] else "-",
                         mem=f"{r['peak_mem_mib']:,.0f} MiB", mfu=f"{r['mfu']:.1%}" if r["mfu"] else "n/a"))
    table(rows, ["variant", "step", "tok_s", "runs", "vs_swiglu", "vs_lazy", "mem", "mfu"])
    print(f"# tok_s: the median of {bc.repeats} runs (all runs listed), the variants run round-robin; memory: "
          f"{'peak CUDA allocation' if device.startswith('cuda') else 'peak RSS of the child process'}; "
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
    its floor (the same fused kernel on one contiguous (K, W) tensor), and the write-back scatter."""
    from tables import RowAdamW, adamw_
    table = torch.empty(V, W).fill_(0.01)  # touched: untouched pages would read as free zeros
    opt = RowAdamW(table, threads)
    opt.m.fill_(0.001)
    opt.v.fill_(0.001)
    ids = torch.randperm(V)[:K].sort().values
    staging, g = torch.empty(K, W), torch.full((K, W), 0.01)
    p, m, v = torch.full((K, W), 0.01), torch.full((K, W), 0.001), torch.full((K, W), 0.001)
    hyper = ((0.9, 0.95), 1e-8, 0.1)
    fns = dict(gather=lambda: torch.index_select(table, 0, ids, out=staging),
               host_update=lambda: opt.update(ids, g, 1, 1e-4, *hyper),
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
        K, s, source = WEB_TEXT["unique"], WEB_TEXT["shared"], "web-text estimate (OFFLOAD_STEP_MODEL.md)"
    n_stem = len(GPT(GPTConfig(**{**{k: v for k, v in shape.items() if k != "batch_size"}, "vocab_size": 8})).stem_layers)
    W = n_stem * shape["ffn_hidden"]
    rates, threads = host_rates(shape["vocab_size"], W, int(K), bc.steps, bc.host_threads)
    res = dict(shape=shape, ids=dict(st, data_dir=bc.data_dir, used_unique=K, used_shared=s, source=source),
               host_threads=threads, **rates)
    res["host_update_vs_floor"] = rates["host_update_gbps"] / rates["fused_floor_gbps"]
    rows = [dict(what=f"unique ids per step ({bc.data_dir}, {st['tokens_per_step']} tokens)",
                 value=f"{st['unique']:.0f} (p95 {st['unique_p95']}), {st['shared']:.0%} shared with the previous step"),
            dict(what=f"host gather ({K:.0f} rows x {W} floats of {shape['vocab_size']})", value=f"{rates['gather_gbps']:.2f} GB/s"),
            dict(what=f"host lazy AdamW (RowAdamW, {threads} threads)", value=f"{rates['host_update_gbps']:.2f} GB/s"),
            dict(what="floor: fused AdamW, one contiguous tensor", value=f"{rates['fused_floor_gbps']:.2f} GB/s"),
            dict(what="host update / floor", value=f"{res['host_update_vs_floor']:.2f}"),
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
        args = [f"--{k}={v}" for k, v in shape.items()] + [a for a in argv if a.startswith(("--data_dir", "--steps",
                                                                                            "--burn_in", "--dtype"))]
        runs = run_variants(args, ["stem-lazy", "stem-offload"], 1)
        lazy, off = runs
        mfu = [r["train_flops_per_token"] * r["tok_per_s"] / peak for r in runs]
        res["measured"] = dict(resident_lazy=lazy, offloaded=off, ratio=off["tok_per_s"] / lazy["tok_per_s"],
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


def bench_decode(bc, mc, device, ctx):
    import offload
    from common import check_provenance, load_checkpoint, model_from_checkpoint
    torch.manual_seed(0)
    if bc.ckpt:
        ckpt = load_checkpoint(bc.ckpt)
        model, bc.data_dir = model_from_checkpoint(ckpt, bc.ckpt), ckpt["config"]["train"]["data_dir"]
        check_provenance(ckpt, load_meta(bc.data_dir), bc.data_dir, bc.ckpt)  # its prompts come from its own data
        mc = model.cfg
        print("# decode model: " + bc.ckpt + " (" + ", ".join(f"{k}={v}" for k, v in asdict(mc).items()) + ")")
    else:
        model = GPT(mc)
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


def plot(path, xlabel, ylabel, series, logx=False, bands=None, title=None):
    import matplotlib
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
        ckpt = torch.load(os.path.join(bc.runs, name, "ckpt.pt"), map_location="cpu", weights_only=True)
        if ckpt["iter"] != ckpt["config"]["train"]["max_iters"]:
            print(f"# skipping {name}: unfinished ({ckpt['iter']} of {ckpt['config']['train']['max_iters']} steps)")
            continue
        mc = GPTConfig(**ckpt["config"]["model"])
        m = GPT(mc)
        m.load_state_dict(ckpt["model"])
        edit = None
        facts_path = os.path.join(ckpt["config"]["train"]["data_dir"], "facts.json")
        if m.stem_layers and os.path.isfile(facts_path):  # knowledge editing by row swaps, 100 entity pairs
            import prepare_data
            enc = prepare_data.load_tokenizer(ckpt["config"]["train"]["data_dir"])
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


def check_config(bc, mc):
    """Every value in range before anything is measured or written: one error line otherwise."""
    require(bc.mode in MODES, f"mode={bc.mode!r} is not one of {', '.join(MODES)}")
    for k in ("batch_size", "steps", "repeats", "decode_tokens", "table_vocab"):
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
    if os.path.exists(bc.plot_dir) and not os.path.isdir(bc.plot_dir):
        raise UserError(f"plot_dir={bc.plot_dir} is a file, not a folder: choose another --plot_dir")
    check_model_config(mc)


def main(argv):
    bc, mc = BenchConfig(), GPTConfig()
    parse_config(argv, bc, mc, doc=__doc__)
    check_config(bc, mc)
    if bc.mode == "quality":
        header(bc, None, None, None, "summary of saved runs")
        res = bench_quality(bc)
    else:
        device, dtype, ctx, note = resolve_device(bc.device, bc.dtype)
        if bc.variant:  # a child of --mode train: one variant, one JSON line
            if bc.variant not in VARIANTS:
                raise UserError(f"variant={bc.variant!r} is not one of {', '.join(VARIANTS)}")
            print(json.dumps(train_variant(bc, mc, device, ctx)))
            return
        if bc.mode in ("train", "offload") or (bc.mode == "decode" and not bc.ckpt):  # else: the checkpoint's data
            if not os.path.isfile(os.path.join(bc.data_dir, "meta.json")):
                if bc.data_dir != BenchConfig.data_dir:
                    load_meta(bc.data_dir)  # raises the usual hint
                import prepare_data
                prepare_data.prepare(dataset="facts", out_dir=bc.data_dir, progress=False)
            mc.vocab_size = load_meta(bc.data_dir)["vocab_size"]
        header(bc, mc if bc.mode != "ffn" and not (bc.mode == "decode" and bc.ckpt) else None, device, dtype, note)
        if bc.mode == "ffn":
            res = bench_ffn(bc, device, ctx)
        elif bc.mode == "train":
            res = bench_train(bc, mc, device, argv)
        elif bc.mode == "offload":
            res = bench_offload(bc, mc, device, argv)
        else:
            res = bench_decode(bc, mc, device, ctx)
        res.update(device=note, torch=torch.__version__)
    res.update(mode=bc.mode, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(res))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        die(str(e))
