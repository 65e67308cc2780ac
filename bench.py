"""
How fast, and how much memory: STEM against SwiGLU, resident tables against offloaded ones.

    python bench.py --mode ffn --device cpu       # one FFN layer fwd+bwd: SwiGLU, STEM dense / lazy, a free table
    python bench.py --mode train --device cpu     # whole training steps: SwiGLU, STEM dense / lazy / offloaded
    python bench.py --mode offload                # host gather and update rates, copy rates, unique ids, step model
    python bench.py --mode decode [--ckpt=RUN]    # generation tok/s, resident vs offloaded, the row cache's hit rate

Not here: whether STEM learns better, and the paper's claims (claims.py).

Each mode prints a header (device, dtype, torch, model config), a table, and as its last line one JSON object
holding every figure. Timings: burn_in untimed steps, then `steps` timed ones, synchronised on CUDA; variants
are timed side by side in one process (train: in each of --repeats child processes) and reported as ratios;
peak memory comes from a child process per variant. MFU divides by the GPU's bf16 dense peak (PEAK_FLOPS, by
variant) or by --peak_flops. Plots go to --plot_dir (default out/bench).
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
import torch.nn.functional as F

import offload
from common import (Batches, check_model_config, check_provenance, load_checkpoint, load_meta, model_from_checkpoint,
                    prepare_facts, resolve_device)
from configurator import UserError, die, parse_config, require
from model import GPT, GPTConfig, STEM, SwiGLU, configure_optimizer
from tables import ResidentTables, RowAdamW, adamw_

MODES = ("ffn", "train", "offload", "decode")
# bf16 dense peak FLOP/s of known GPUs, for MFU, by variant (peak_flops reads the variant off the device name)
PEAK_FLOPS = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12,
              "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}


@dataclass
class BenchConfig:
    mode: str = "ffn"  # ffn | train | offload | decode
    device: str = "auto"
    dtype: str = "auto"
    data_dir: str = "data/facts"  # real tokens for train / offload / decode (decode --ckpt: its own unless given)
    batch_size: int = 16
    burn_in: int = 3  # untimed steps first (allocator warm-up, lazy init, torch.compile)
    steps: int = 10  # timed steps
    shapes: str = "128x512x4096,256x1024x4096,768x2048x2048"  # ffn mode: n_embd x ffn_hidden x tokens
    table_vocab: int = 8192  # ffn mode: rows of the STEM table
    peak_flops: Optional[float] = None  # for MFU; None = the GPU's bf16 dense peak if PEAK_FLOPS knows it
    variants: str = "swiglu,stem-dense,stem-lazy,stem-offload"  # train mode
    repeats: int = 1  # train mode: child processes, each timing every variant; medians over them are reported
    turn: int = 5  # train mode: steps a variant runs before the next one's turn (drained at the end of each turn)
    compile: bool = True  # train mode: torch.compile on CUDA, as train.py; always off on CPU
    grad_accum: int = 1  # train mode: micro-batches per step, as train.py
    shape: str = "gpt2-small"  # offload mode: the shape for host rates and the step model, or "model" (--n_layer=...)
    unique_ids: int = 0  # offload mode: K for the step model; 0 = measured on data_dir if its vocabulary fits, else 10k
    host_gbps: float = 60.0  # offload mode: host memory bandwidth of a GPU server, for the step model
    cache_sizes: str = "16,64,256,1024"  # decode mode: GPU row cache sizes
    decode_tokens: int = 64  # decode mode: new tokens per sample
    ckpt: str = ""  # decode mode: a trained checkpoint (file or run folder) and its data; "" = random init
    plot_dir: str = "out/bench"  # where PNGs go (the README's are in assets/: pass --plot_dir=assets to redo them)
    child: str = ""  # internal: a child of train mode: "speed" (the --variant list in turns) or "memory" (one)
    variant: str = ""  # internal: the child's variants, comma-separated


def timed(fns, device, burn_in, steps, turn=1, drains=None):
    """Seconds per call of each fn in the dict, taking turns in one process so that all meet the same machine
    (other jobs, clock, heap): `turn` timed calls of a, then of b, ..., until each has made `steps`; the median
    over the turns. A pipeline (the GPU runs ahead, offload's threads behind) comes with drains: each turn
    starts with an untimed call that refills it, and is drained after the clock stops."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    for k, fn in fns.items():
        for _ in range(burn_in):
            fn()
        if drains:
            drains[k]()
    per_call = {k: [] for k in fns}
    for i in range(0, steps, turn):
        n = min(turn, steps - i)
        for k, fn in fns.items():
            if drains:
                fn()  # untimed: the pipeline refills
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            per_call[k].append((time.perf_counter() - t0) / n)
            if drains:
                drains[k]()
    return {k: statistics.median(v) for k, v in per_call.items()}


def table(rows, cols):
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(r[c].ljust(w) for c, w in zip(cols, widths)))


def plot(path, xlabel, ylabel, series, logx=False, bands=None, title=None, logy=False):
    """One figure of lines {name: [(x, y), ...]}, each with an optional band {name: (lows, highs)}."""
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
            ax.fill_between(xs, *bands[name], color=line.get_color(), alpha=0.2)
    ax.set(xscale="log" if logx else "linear", yscale="log" if logy else "linear", xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title or "", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ckpt_file(path):  # a checkpoint given as a file, or as the run folder holding ckpt.pt
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def peak_flops(bc, device):
    """(peak FLOP/s for MFU, where it comes from), or (None, why there is none). The variant is read off
    the device name by whole words: chip and form factor ("NVIDIA H100 80GB HBM3": H100 SXM; an A100's
    peak is the same in every form), and an L40S is no L4, a GH200 no H200."""
    if bc.peak_flops:
        return bc.peak_flops, "--peak_flops"
    if not device.startswith("cuda"):
        return None, "none on the CPU (pass --peak_flops)"
    name = torch.cuda.get_device_name(device)
    words = set(name.upper().replace("-", " ").split())
    form = "NVL" if "NVL" in words else "PCIe" if "PCIE" in words else "SXM"
    chip = next((c for c in ("H100", "H200", "A100", "L4", "RTX 4090") if set(c.split()) <= words), "")
    v = next((k for k in (f"{chip} {form}", chip) if k in PEAK_FLOPS), None)
    if v is None:
        return None, f"none: {name!r} is not in bench.py's PEAK_FLOPS (pass --peak_flops)"
    return PEAK_FLOPS[v], f"{v} bf16 dense (device {name!r})"


# -----------------------------------------------------------------------------
# ffn: one layer, forward + backward


def bench_ffn(bc, device, ctx):
    """One FFN layer, forward and backward: SwiGLU; STEM with the dense (vocab, ffn_hidden) table gradient of
    a plain lookup (the dense optimizer's); STEM with the lazy optimizer's compact rows (tables.py: unique
    ids, gathered rows, a (K, ffn_hidden) gradient), unique and gather counted in; and STEM's floor, SwiGLU
    with W_up x handed in ready (2/3 of the matmuls, all of the elementwise work): the table's cost is above it."""
    rows, out = [], []
    for shape in bc.shapes.split(","):
        d, h, n = (int(v) for v in shape.split("x"))
        cfg = GPTConfig(vocab_size=bc.table_vocab, n_embd=d, ffn_hidden=h)
        x = torch.randn(1, n, d, device=device, requires_grad=True)
        ids = torch.randint(0, bc.table_vocab, (1, n), device=device)
        swiglu, stem, lazy = SwiGLU(cfg).to(device), STEM(cfg).to(device), STEM(cfg).to(device)
        lazy.table.requires_grad_(False)  # as ResidentTables does: gradients go to the compact leaf
        u0 = torch.randn(1, n, h, device=device, requires_grad=True)  # the floor's ready W_up x (with a gradient)

        def run(layer, how="plain"):
            def step():
                if how == "lazy":  # as tables.py: the unique ids, and their rows gathered into a (K, ffn) leaf
                    uniq, inv = torch.unique(ids, return_inverse=True)
                    lazy_args = (inv, layer.table.index_select(0, uniq).requires_grad_())
                with ctx:
                    y = (layer.down(F.silu(layer.gate(x)) * u0) if how == "floor" else
                         layer(x, *lazy_args) if how == "lazy" else layer(x, ids))
                y.float().sum().backward()
                layer.zero_grad(set_to_none=True)
                x.grad = u0.grad = None
            return step
        ms = {k: t * 1e3 for k, t in timed(dict(swiglu=run(swiglu), stem_dense=run(stem), stem_lazy=run(lazy, "lazy"),
                                                floor=run(swiglu, "floor")), device, bc.burn_in, bc.steps).items()}
        ratio = {k: ms[k] / ms["swiglu"] for k in ("stem_dense", "stem_lazy", "floor")}
        out.append(dict(n_embd=d, ffn_hidden=h, tokens=n, **{f"{k}_ms": v for k, v in ms.items()}, flop_ratio=2 / 3,
                        **{f"{k.replace('stem_', '')}_ratio": r for k, r in ratio.items()}))  # flops: 2 matmuls of 3
        rows.append(dict(shape=f"d={d} ffn={h} tokens={n}", swiglu=f"{ms['swiglu']:.2f} ms",
                         **{k: f"{ms[k]:.2f} ms ({r:.3f})" for k, r in ratio.items()},
                         lazy_vs_floor=f"{ms['stem_lazy'] / ms['floor']:.3f}", flop_ratio=f"{2 / 3:.3f}"))
    table(rows, ["shape", "swiglu", "stem_dense", "stem_lazy", "floor", "lazy_vs_floor", "flop_ratio"])
    print("# (ratio to SwiGLU); stem_dense: a (vocab, ffn) table gradient; stem_lazy: compact rows, unique and gather "
          "included; floor: SwiGLU with W_up x ready, one matmul fewer: STEM's cost if its table were free")
    return {"ffn": out, "table_vocab": bc.table_vocab}


# -----------------------------------------------------------------------------
# train: whole training steps, the variants side by side in child processes

# name: (ffn, table optimizer, offloaded)
VARIANTS = {"swiglu": ("swiglu", "dense", False), "stem-dense": ("stem", "dense", False),
            "stem-lazy": ("stem", "lazy", False), "stem-offload": ("stem", "lazy", True)}


def trainer(variant, bc, mc, device, ctx):
    """One variant's training step (train.py's loop: grad_accum micro-batches, the next step's rows prefetched,
    clipping, the tables' step), its drain, and its training FLOPs per token; from seed 0, the same batches."""
    ffn, table_optimizer, offloaded = VARIANTS[variant]
    meta = load_meta(bc.data_dir)
    mc = GPTConfig(**{**asdict(mc), "ffn": ffn, "vocab_size": meta["vocab_size"]})
    torch.manual_seed(0)
    batches = Batches(bc.data_dir, meta, mc.block_size, bc.batch_size, device, seed=0)
    raw = GPT(mc)
    flops = 3 * raw.flops_per_token()
    tables = offload.OffloadedTables(raw, device) if offloaded else ResidentTables(raw, device, table_optimizer)
    model = torch.compile(raw) if bc.compile and device.startswith("cuda") else raw  # as train.py
    optimizer = configure_optimizer(raw, 1e-3, 0.1)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def draw():
        return [batches.get("train", to_device=False) for _ in range(bc.grad_accum)]
    upcoming = draw()
    tables.prefetch([x for x, _ in upcoming])

    def step():
        nonlocal upcoming
        micro, rows = upcoming, tables.rows()
        upcoming = draw()
        tables.prefetch([x for x, _ in upcoming])  # offload: fetched while this step computes
        for (x, y), (stem_ids, stem_tables) in zip(micro, rows):
            x, y = batches.to_device(x, y)
            with ctx:
                _, loss = model(x, y, stem_ids=stem_ids, stem_tables=stem_tables)
            (loss / bc.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        tables.step(1e-3, 1.0)
        optimizer.zero_grad(set_to_none=True)
    return step, tables.drain, flops


def train_child(bc, mc, device, ctx):
    """A child of --mode train. --child=speed: the --variant list's steps taken in turns, in one process.
    --child=memory: one variant alone, for its peak memory."""
    built = {v: trainer(v, bc, mc, device, ctx) for v in bc.variant.split(",")}
    if bc.child == "speed":
        dt = timed({v: b[0] for v, b in built.items()}, device, bc.burn_in, bc.steps, bc.turn,
                   {v: b[1] for v, b in built.items()})
        return {v: dict(step_s=dt[v], train_flops_per_token=b[2]) for v, b in built.items()}
    step, drain, _ = next(iter(built.values()))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(max(bc.burn_in, 1) + 1):
        step()
    drain()
    return dict(peak_mem_mib=torch.cuda.max_memory_allocated(device) / 2**20 if cuda else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # the CPU's peak RSS: KiB -> MiB on Linux


def run_variants(argv, variants, repeats, tokens, peak):
    """Speed: `repeats` child processes, each timing every variant in turns (timed); memory: one child per
    variant, alone, for its peak. A child gets argv, then the keys that make it a child (the later wins).
    Per variant: its step time in each child and their median, tok/s, MFU (given a peak), and its speedup
    over swiglu and stem-lazy where they ran, each ratio taken side by side in one child."""
    def child(role, variant):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--mode=train", f"--child={role}",
                            f"--variant={variant}"], capture_output=True, text=True)
        if p.returncode != 0:
            raise UserError(f"variant {variant} failed: "
                            f"{p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    runs = [child("speed", ",".join(variants)) for _ in range(repeats)]
    out = {}
    for v in variants:
        steps, flops = [r[v]["step_s"] for r in runs], runs[0][v]["train_flops_per_token"]
        out[v] = dict(variant=v, step_ms=statistics.median(steps) * 1e3, tok_per_s=tokens / statistics.median(steps),
                      step_s_runs=steps, train_flops_per_token=flops, peak_mem_mib=child("memory", v)["peak_mem_mib"])
        out[v]["mfu"] = flops * out[v]["tok_per_s"] / peak if peak else None
    for r in out.values():  # the speedup over a base: the median over the children of base's step time / r's
        r["vs_swiglu"], r["vs_stem_lazy"] = (
            statistics.median(b / t for b, t in zip(out[v]["step_s_runs"], r["step_s_runs"])) if v in out else None
            for v in ("swiglu", "stem-lazy"))
    return list(out.values())


def bench_train(bc, mc, device, argv):
    peak, peak_source = peak_flops(bc, device)
    compiled = bc.compile and device.startswith("cuda")  # as train.py: on the CPU compile time outweighs the gain
    names = [v for v in bc.variants.split(",") if v]
    if mc.ffn == "swiglu":
        names = [v for v in names if VARIANTS[v][0] == "swiglu"]
    require(names, f"variants={bc.variants!r}: nothing to run (with --ffn=swiglu only the swiglu variant runs)")
    results = run_variants(argv, names, bc.repeats, bc.batch_size * mc.block_size * bc.grad_accum, peak)
    base = next((r for r in results if r["variant"] == "swiglu"), None)
    table([dict(variant=r["variant"], step=f"{r['step_ms']:.1f} ms", tok_s=f"{r['tok_per_s']:,.0f}",
                runs=" ".join(f"{t * 1e3:.0f}" for t in r["step_s_runs"]),
                vs_swiglu="-" if base is None else f"{r['vs_swiglu']:.3f}",
                swiglu_runs="-" if base is None else " ".join(f"{b / t:.3f}" for b, t in zip(base["step_s_runs"],
                                                                                             r["step_s_runs"])),
                vs_lazy="-" if r["vs_stem_lazy"] is None else f"{r['vs_stem_lazy']:.3f}",
                mem=f"{r['peak_mem_mib']:,.0f} MiB", mfu="n/a" if r["mfu"] is None else f"{r['mfu']:.1%}")
           for r in results], ["variant", "step", "tok_s", "runs", "vs_swiglu", "swiglu_runs", "vs_lazy", "mem", "mfu"])
    why = "on" if compiled else "off (CPU: compile time outweighs the gain)" if bc.compile else "off"
    print(f"# {bc.repeats} child process(es), each timing every variant in turns of {bc.turn} of {bc.steps} steps of "
          f"{bc.grad_accum} micro-batch(es); step, vs_*: medians over the children (runs, swiglu_runs: each child's); "
          f"mem: {'peak CUDA allocation' if device.startswith('cuda') else 'peak RSS'} of the variant alone in a "
          f"child; torch.compile: {why}; MFU peak: {f'{peak:.4g} FLOP/s, ' if peak else ''}{peak_source}")
    return {"train": results, "batch_size": bc.batch_size, "block_size": mc.block_size, "grad_accum": bc.grad_accum,
            "compile": compiled, "peak_flops": peak, "peak_flops_source": peak_source}


# -----------------------------------------------------------------------------
# offload: host rates against their floors, copy rates, and a step model of offloaded training

# named shapes for the step model (and the host-rate measurements); "model" = the --key=value model config
SHAPES = {"gpt2-small": dict(n_layer=12, n_head=12, n_embd=768, ffn_hidden=2048, vocab_size=50257, block_size=1024,
                             stem_layers="third", batch_size=32)}
# web text, 32 x 1024 GPT-2 tokens a step: K unique ids (Zipf over BPE ranks x burstiness: 8.9k-15.4k), and the
# fraction of them the previous step shares
WEB_TEXT = dict(unique=10_000, shared=0.45)


def id_stats(data_dir, meta, block_size, batch_size, n=30):
    """Unique ids per step (mean, p95) and the fraction of them the previous step also had, on real data."""
    batches = Batches(data_dir, meta, block_size, batch_size, "cpu", seed=0)
    steps = [torch.unique(batches.get("train", to_device=False)[0]) for _ in range(n)]
    ks = sorted(len(u) for u in steps)
    shared = [torch.isin(u, prev).float().mean().item() for prev, u in zip(steps, steps[1:])]
    return dict(tokens_per_step=batch_size * block_size, unique=statistics.mean(ks), unique_p95=ks[int(n * 0.95)],
                shared=statistics.mean(shared))


def host_rates(V, W, K, steps):
    """GB/s of fp32 table values (4 bytes each) for the host side of one offloaded step, on K random
    rows of a (V, W) table: the gather into staging, the lazy AdamW (RowAdamW, as offload runs it), its
    floor (the same fused kernel on one contiguous (K, W) tensor), and the write-back scatter."""
    table = torch.empty(V, W).fill_(0.01)  # touched: untouched pages would read as free zeros
    opt = RowAdamW(table)  # min(8, cores) threads
    opt.m.fill_(0.001)
    opt.v.fill_(0.001)
    ids = torch.randperm(V)[:K].sort().values
    staging, g = torch.empty(K, W), torch.full((K, W), 0.01)
    g_rows = g.unbind(0)  # made once, as offload.py does for its reused gradient buffer
    p, m, v = torch.full((K, W), 0.01), torch.full((K, W), 0.001), torch.full((K, W), 0.001)
    hyper = ((0.9, 0.95), 1e-8, 0.1)
    fns = dict(gather=lambda: torch.index_select(table, 0, ids, out=staging),
               host_update=lambda: opt.update(ids, g, 1, 1e-4, *hyper, g_rows=g_rows),
               fused_floor=lambda: adamw_([p], [g], [m], [v], 1, 1e-4, *hyper),
               scatter=lambda: table.index_copy_(0, ids, staging))
    t = timed(fns, "cpu", 2, steps)
    return {f"{k}_gbps": K * W * 4 / t[k] / 1e9 for k in fns}, opt.threads


def step_model(shape, K, s, rates, link_gbps, host_gbps, mfu, peak):
    """Predicted offloaded / resident step time for the design of offload.py, per step: rows new in the step
    (K(1-s)) come in from the host; rows shared with a neighbouring step are updated on the GPU; rows in
    neither neighbour (K(1-s)^2) get the host AdamW; rows leaving the GPU (Ks(1-s)) are written back as p, m,
    v; rows new and shared with the next step (K(1-s)s) bring their moments in. Host threads and copy streams
    overlap the GPU step, which takes the longest of them. Host time: this machine's measured rates, or a
    host of `host_gbps` GB/s memory bandwidth (bytes counted)."""
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
    server, here = (t_gpu / max(t_gpu + t_dev, t_host, t_h2d, t_d2h) for t_host in (t_host_server, t_host_here))
    return server, here, inputs


def bench_offload(bc, mc, device, argv):
    shape = dict(asdict(mc), batch_size=bc.batch_size) if bc.shape == "model" else SHAPES[bc.shape]
    meta = load_meta(bc.data_dir)
    st = id_stats(bc.data_dir, meta, shape["block_size"], shape["batch_size"])
    if bc.unique_ids:
        K, s, source = bc.unique_ids, WEB_TEXT["shared"], "given (--unique_ids; shared: the web-text estimate)"
    elif meta["vocab_size"] == shape["vocab_size"]:
        K, s, source = st["unique"], st["shared"], f"measured on {bc.data_dir}"
    else:
        K, s, source = WEB_TEXT["unique"], WEB_TEXT["shared"], "the web-text estimate (WEB_TEXT)"
    cfg = {k: v for k, v in shape.items() if k != "batch_size"}
    n_stem = len(GPT(GPTConfig(**{**cfg, "vocab_size": 8})).stem_layers)
    require(n_stem, f"the {bc.shape} shape has no table layers (ffn={shape.get('ffn', 'stem')}, "
            f"stem_layers={shape.get('stem_layers')!r}): nothing to offload; give a STEM shape")
    require(K <= shape["vocab_size"], f"unique_ids={K} is more than the shape's vocabulary ({shape['vocab_size']})")
    W = n_stem * shape["ffn_hidden"]
    rates, threads = host_rates(shape["vocab_size"], W, int(K), bc.steps)
    res = dict(shape=shape, ids=dict(st, data_dir=bc.data_dir, used_unique=K, used_shared=s, source=source),
               host_threads=threads, **rates)
    res["host_update_vs_floor"] = rates["host_update_gbps"] / rates["fused_floor_gbps"]
    gbps = {k: f"{rates[k + '_gbps']:.2f} GB/s" for k in ("gather", "host_update", "fused_floor", "scatter")}
    rows = [(f"unique ids per step ({bc.data_dir}, {st['tokens_per_step']} tokens)",
             f"{st['unique']:.0f} (p95 {st['unique_p95']}), {st['shared']:.0%} shared with the previous step"),
            (f"host gather ({K:.0f} rows x {W} floats of {shape['vocab_size']})", gbps["gather"]),
            (f"host lazy AdamW (RowAdamW, {f'{threads} threads' if threads else 'one gathered block'})",
             f"{gbps['host_update']} ({res['host_update_vs_floor']:.2f} of the floor)"),
            ("floor: fused AdamW, one contiguous tensor", gbps["fused_floor"]),
            ("host write-back scatter", gbps["scatter"])]
    link = 50.0  # GB/s, pinned PCIe Gen5 x16 as reported for H100; measured below on CUDA
    if device.startswith("cuda"):
        big = 256 * 2**20
        h, g = torch.empty(big // 4, pin_memory=True), torch.empty(big // 4, device=device)
        t = timed(dict(h2d=lambda: g.copy_(h, non_blocking=True), d2h=lambda: h.copy_(g, non_blocking=True)),
                  device, 2, 10)
        res.update({f"{k}_gbps": big / t[k] / 1e9 for k in t})
        link = min(res["h2d_gbps"], res["d2h_gbps"])
        rows.append(("pinned H2D / D2H", f"{res['h2d_gbps']:.1f} / {res['d2h_gbps']:.1f} GB/s"))
    peak, peak_source = peak_flops(bc, device)
    model_peak = peak or PEAK_FLOPS["H200"]  # the step model predicts a GPU server: this GPU, or an H200
    for mfu in (0.5, 0.25):
        pred, pred_here, inputs = step_model(shape, K, s, rates, link, bc.host_gbps, mfu, model_peak)
        res.setdefault("predicted", []).append(dict(inputs, predicted_ratio=pred, predicted_ratio_this_host=pred_here))
        rows.append((f"PREDICTED offloaded/resident, MFU {mfu:.0%} of {model_peak:.4g} FLOP/s",
                     f"{pred:.3f} (host of {bc.host_gbps:.0f} GB/s); {pred_here:.3f} (this machine's host rates)"))
    res["predicted_ratio"] = min(p["predicted_ratio"] for p in res["predicted"])
    if device.startswith("cuda") and bc.shape != "model":  # the real thing, as train mode times it, at the shape
        lazy, off = run_variants(argv + [f"--{k}={v}" for k, v in shape.items()], ["stem-lazy", "stem-offload"],
                                 bc.repeats, shape["batch_size"] * shape["block_size"] * bc.grad_accum, peak)
        res["measured"] = dict(resident_lazy=lazy, offloaded=off, ratio=off["vs_stem_lazy"],
                               gpu_mem_saved_mib=lazy["peak_mem_mib"] - off["peak_mem_mib"])
        mfu = "n/a" if peak is None else f"{lazy['mfu']:.1%} / {off['mfu']:.1%}"
        rows += [("MEASURED offloaded/resident-lazy tok/s; MFU", f"{off['vs_stem_lazy']:.3f} ({off['tok_per_s']:,.0f} "
                  f"vs {lazy['tok_per_s']:,.0f}); {mfu}"),
                 ("MEASURED GPU memory: resident-lazy / offloaded (peak allocation)",
                  f"{lazy['peak_mem_mib']:,.0f} / {off['peak_mem_mib']:,.0f} MiB")]
    table([dict(what=w, value=v) for w, v in rows], ["what", "value"])
    print(f"# step model inputs (per step; K from {source}; peak: {peak_source if peak else 'an H200, assumed'}):")
    for p in res["predicted"]:
        print("#   " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items()))
    print("# predicted, not measured: " + ("the MEASURED rows are the real run" if "measured" in res else
                                           "run on a CUDA machine for the measured ratio (gpu_check.sh)"))
    res.update(peak_flops=peak, peak_flops_source=peak_source)
    return res


# -----------------------------------------------------------------------------
# decode: generation, resident vs offloaded, cache hit rate


def bench_decode(bc, mc, device, ctx, keys_set):
    torch.manual_seed(0)
    if bc.ckpt:  # a trained model; its prompts from its own data, unless told where that data now lives
        ignored = [f"--{k}" for k in sorted(keys_set) if k in GPTConfig.__dataclass_fields__]
        require(not ignored, f"--ckpt brings its own model: drop {', '.join(ignored)}")
        ckpt = load_checkpoint(ckpt_file(bc.ckpt))
        model, mc = model_from_checkpoint(ckpt, bc.ckpt), GPTConfig(**ckpt["config"]["model"])
        bc.data_dir = bc.data_dir if "data_dir" in keys_set else ckpt["config"]["train"]["data_dir"]
        check_provenance(ckpt, load_meta(bc.data_dir), bc.data_dir, ckpt_file(bc.ckpt))
        print(f"# decode model: {bc.ckpt} ({', '.join(f'{k}={v}' for k, v in asdict(mc).items())})")
    else:
        model = GPT(mc)
    require(model.stem_layers, f"the decode bench compares resident and offloaded tables, and this model has none "
            f"(ffn={mc.ffn}, stem_layers={mc.stem_layers!r}, n_layer={mc.n_layer}): give a STEM model")
    require(mc.block_size >= 4, f"block_size={mc.block_size}: decode needs at least 4 (half prompt, half new)")
    model = model.to(device).eval()
    batches = Batches(bc.data_dir, load_meta(bc.data_dir), mc.block_size // 2, bc.batch_size, "cpu", seed=0)
    prompt = batches.get("val", to_device=False)[0].to(device)  # half a context of real text, then decode

    def gen(m, fn=None):  # the same prompts and samples for every variant
        return lambda: m.generate(prompt, bc.decode_tokens, temperature=1.0, top_k=50, stem_fn=fn,
                                  generator=torch.Generator(device=device).manual_seed(0))
    engines = []
    for n in [int(s) for s in bc.cache_sizes.split(",")]:
        m = GPT(mc).eval()
        m.load_state_dict(model.state_dict())
        engines.append((m, offload.OffloadedTables(m, device, train=False, cache_rows=max(n, bc.batch_size))))
    with ctx:  # side by side (OffloadedTables placed its model m)
        t = timed({-1: gen(model), **{i: gen(m, e.stem_fn) for i, (m, e) in enumerate(engines)}}, device, 1,
                  max(1, bc.steps // 3))
    tok = bc.batch_size * bc.decode_tokens
    results = [dict(variant="resident", cache_rows=0, tok_per_s=tok / t[-1], hit_rate=None)]
    results += [dict(variant="offload", cache_rows=e.cache.n, tok_per_s=tok / t[i], hit_rate=e.cache.hit_rate())
                for i, (_, e) in enumerate(engines)]
    rows = [dict(variant=r["variant"], cache=str(r["cache_rows"]), tok_s=f"{r['tok_per_s']:,.0f}",
                 vs_resident=f"{r['tok_per_s'] / results[0]['tok_per_s']:.3f}",
                 hit="-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}") for r in results]
    table(rows, list(rows[0]))
    plot(os.path.join(bc.plot_dir, "decode_hit_rate.png"), "GPU row cache size (rows)", "decode hit rate",
         {"offload (LFU)": [(r["cache_rows"], r["hit_rate"]) for r in results[1:]]}, logx=True)
    return {"decode": results, "batch_size": bc.batch_size, "decode_tokens": bc.decode_tokens}


def check_config(bc, mc):
    """Every value in range before anything is measured or written: one error line otherwise."""
    require(bc.mode in MODES, f"mode={bc.mode!r} is not one of {', '.join(MODES)} (quality, claims: claims.py)")
    for k in ("batch_size", "steps", "repeats", "turn", "decode_tokens", "table_vocab", "grad_accum"):
        require(getattr(bc, k) >= 1, f"{k}={getattr(bc, k)} must be at least 1")
    require(bc.shape in ("model", *SHAPES), f"shape={bc.shape!r} is not one of model, {', '.join(SHAPES)}")
    bad = [v for v in f"{bc.variants},{bc.variant}".split(",") if v and v not in VARIANTS]
    require(not bad, f"variants: {', '.join(map(repr, bad))} not one of {', '.join(VARIANTS)}")
    require(bc.burn_in >= 0 and bc.unique_ids >= 0, "burn_in and unique_ids must be 0 or more")
    require(bc.host_gbps > 0 and (bc.peak_flops is None or bc.peak_flops > 0),
            f"host_gbps={bc.host_gbps} and peak_flops={bc.peak_flops} must be positive")
    for key, spec, n in (("shapes", bc.shapes, 3), ("cache_sizes", bc.cache_sizes, 1)):
        parts = [p.split("x") for p in spec.split(",")]
        require(all(len(p) == n and all(v.isdigit() and int(v) > 0 for v in p) for p in parts),
                f"{key}={spec!r} is not a comma-separated list of " + ("ExFxN shapes (n_embd x ffn_hidden x tokens), "
                "e.g. 128x512x4096" if n == 3 else "positive row counts, e.g. 16,64,256"))
    require(not os.path.isfile(bc.plot_dir), f"plot_dir={bc.plot_dir} is a file: choose a folder")
    check_model_config(mc)


def main(argv):
    bc, mc = BenchConfig(), GPTConfig()
    keys_set = parse_config(argv, bc, mc, doc=__doc__)
    check_config(bc, mc)
    device, dtype, ctx, note = resolve_device(bc.device, bc.dtype)
    if bc.child:  # a child of --mode train: one JSON line
        require(bc.child in ("speed", "memory"), f"child={bc.child!r} is internal: speed or memory")
        print(json.dumps(train_child(bc, mc, device, ctx)))
        return
    own_data = bc.mode != "ffn" and not (bc.mode == "decode" and bc.ckpt)  # decode --ckpt: the checkpoint's
    if own_data:
        if bc.data_dir == BenchConfig.data_dir and not os.path.isfile(os.path.join(bc.data_dir, "meta.json")):
            prepare_facts(bc.data_dir, progress=False)  # the default data is made on first use, as train.py does
        mc.vocab_size = load_meta(bc.data_dir)["vocab_size"]  # other data: the usual hint when it is missing
    print(f"# nanoSTEM bench --mode {bc.mode} | {note} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    if own_data:
        print("# model: " + ", ".join(f"{k}={v}" for k, v in asdict(mc).items()))
    res = dict(ffn=lambda: bench_ffn(bc, device, ctx), train=lambda: bench_train(bc, mc, device, argv),
               offload=lambda: bench_offload(bc, mc, device, argv),
               decode=lambda: bench_decode(bc, mc, device, ctx, keys_set))[bc.mode]()
    res.update(device=note, torch=torch.__version__, mode=bc.mode, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(res))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        die(str(e))
