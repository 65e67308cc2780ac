"""
How fast, and how much memory: STEM against SwiGLU, resident tables against offloaded ones. Not here: whether STEM
learns better, and the paper's claims (claims.py).

    python bench.py --mode ffn --device cpu       # one FFN layer fwd+bwd: SwiGLU, STEM dense / lazy, a free table
    python bench.py --mode train --device cpu     # whole training steps: SwiGLU, STEM dense / lazy / offloaded
    python bench.py --mode offload                # host rates, unique ids, tables' GPU memory, step model
    python bench.py --mode decode [--ckpt=RUN]    # generation tok/s, resident vs offloaded, the row cache's hit rate

Each mode prints a header, a table and, last, a JSON line of every figure. Variants are timed side by side, in
turns after burn_in untimed steps (train: in each of --repeats children); peak memory: a child per variant.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import offload
from common import (Batches, check_model_config, check_provenance, load_checkpoint, load_meta, model_from_checkpoint,
                    prepare_facts, pyplot, resolve_device)
from configurator import UserError, die, parse_config, read_preset, require
from model import GPT, GPTConfig, STEM, SwiGLU, configure_optimizer
from tables import ResidentTables, RowAdamW, adamw_, joint_norm

MODES = ("ffn", "train", "offload", "decode")
PEAK_FLOPS = {"H100 SXM": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12,
              "A100": 312e12, "L4": 121e12, "RTX 4090": 165e12}  # bf16 dense FLOP/s, for MFU (see peak_flops)


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
    peak_flops: float = 0.0  # for MFU; 0 = the GPU's bf16 dense peak if PEAK_FLOPS knows it
    variants: str = "swiglu,stem-dense,stem-lazy,stem-offload"  # train mode (a child: the ones it runs)
    repeats: int = 1  # train mode: child processes, each timing every variant; medians over them are reported
    turn: int = 5  # train mode: steps a variant runs before the next one's turn (drained at the end of each turn)
    compile: bool = True  # train mode: torch.compile on CUDA, as train.py; always off on CPU
    grad_accum: int = 1  # train mode, offload --shape=model, and offload's measured run: micro-batches per step
    shape: str = "gpt2-small"  # offload mode: a preset's model and batch (SHAPES), or "model" (--n_layer=... etc.)
    host_gbps: float = 60.0  # offload mode: host memory bandwidth of a GPU server, for the step model
    cache_sizes: str = "16,64,256,1024"  # decode mode: GPU row cache sizes
    decode_tokens: int = 64  # decode mode: new tokens per sample
    ckpt: str = ""  # decode mode: a trained checkpoint (file or run folder) and its data; "" = random init
    plot_dir: str = "out/bench"  # where PNGs go (decode mode's hit rate plot)
    child: str = ""  # internal: a child of train mode: "speed" (its variants in turns) or "memory" (one alone)


def timed(fns, device, burn_in, steps, turn=1, drains=None):
    """Seconds per call of each fn, in turns of `turn` timed calls (a's, b's, ...) so all meet the same machine;
    the median over turns. A pipeline (offload's) has drains: each turn refills it untimed, then drains it."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    refill, drains = drains is not None, drains or {k: (lambda: None) for k in fns}
    for k, fn in fns.items():
        for _ in range(burn_in):
            fn()
        drains[k]()
    per_call = {k: [] for k in fns}
    for i in range(0, steps, turn):
        n = min(turn, steps - i)
        for k, fn in fns.items():
            if refill:
                fn()  # untimed: the pipeline refills
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            per_call[k].append((time.perf_counter() - t0) / n)
            drains[k]()
    return {k: statistics.median(v) for k, v in per_call.items()}


def table(rows, cols):  # cells: strings as given, None as "-", numbers to 4 significant digits
    cells = [[v if isinstance(v, str) else "-" if v is None else f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
              for v in (r[c] for c in cols)] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))


def plot(path, xlabel, ylabel, series, logx=False, bands=None, title=None, logy=False):
    """One figure of lines {name: [(x, y), ...]}, each with an optional band {name: (lows, highs)}."""
    plt = pyplot(path)
    if plt is None:
        return
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
    """(peak FLOP/s for MFU, its source) or (None, why), by whole words of the device name: a GH200 is no H200."""
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
    """One FFN layer, fwd + bwd: SwiGLU; STEM, a dense (vocab, ffn) table gradient; STEM, the lazy optimizer's (K, ffn)
    rows (unique, gather included); the floor: SwiGLU given W_up x (STEM's cost if its table were free)."""
    out = []
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
        out.append(dict(n_embd=d, ffn_hidden=h, tokens=n, **{f"{k}_ms": v for k, v in ms.items()}, flop_ratio=2 / 3,
                        **{f"{k.replace('stem_', '')}_ratio": ms[k] / ms["swiglu"]  # ratios to SwiGLU; flop_ratio:
                           for k in ("stem_dense", "stem_lazy", "floor")}))  # STEM's 2 matmuls of SwiGLU's 3
    table(out, list(out[0]))
    return {"ffn": out, "table_vocab": bc.table_vocab}


# -----------------------------------------------------------------------------
# train: whole training steps, the variants side by side in child processes

# name: (ffn, table optimizer, offloaded)
VARIANTS = {"swiglu": ("swiglu", "dense", False), "stem-dense": ("stem", "dense", False),
            "stem-lazy": ("stem", "lazy", False), "stem-offload": ("stem", "lazy", True)}


def trainer(variant, bc, mc, device, ctx):
    """One variant's training step as train.py's (the next step's rows prefetched), its sync, its FLOPs per token."""
    ffn, table_optimizer, offloaded = VARIANTS[variant]
    meta = load_meta(bc.data_dir)
    mc = GPTConfig(**{**asdict(mc), "ffn": ffn, "vocab_size": meta["vocab_size"]})
    torch.manual_seed(0)
    batches = Batches(bc.data_dir, meta, mc.block_size, bc.batch_size, device, seed=0)
    raw = GPT(mc)
    tables = offload.OffloadedTables(raw, device) if offloaded else ResidentTables(raw, device, table_optimizer)
    model = torch.compile(raw) if bc.compile and device.startswith("cuda") else raw  # as train.py
    optimizer = configure_optimizer(raw, 1e-3, 0.1)
    params = [p for g in optimizer.param_groups for p in g["params"]]

    def draw():  # a step's micro-batches, their ids prefetched (offload: fetched while the step before computes)
        micro = [batches.get("train", to_device=False) for _ in range(bc.grad_accum)]
        tables.prefetch([x for x, _ in micro])
        return micro
    upcoming = [draw()]

    def step():  # train.py's order: the next step drawn after micro-batch 0's backward; the tables, then the backbone
        micro, rows = upcoming[0], tables.rows()
        for j, ((x, y), (stem_ids, stem_tables)) in enumerate(zip(micro, rows)):
            x, y = batches.to_device(x, y)
            with ctx:
                _, loss = model(x, y, stem_ids=stem_ids, stem_tables=stem_tables)
            (loss / bc.grad_accum).backward()
            if j == 0:
                upcoming[0] = draw()
        tables.step(1e-3, 1.0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, tables.sync, 3 * raw.flops_per_token()


def train_child(bc, mc, device, ctx):
    """A child of --mode train: --child=speed, its variants' steps in turns; --child=memory, one variant alone."""
    built = {v: trainer(v, bc, mc, device, ctx) for v in bc.variants.split(",")}
    if bc.child == "speed":
        dt = timed({v: b[0] for v, b in built.items()}, device, bc.burn_in, bc.steps, bc.turn,
                   {v: b[1] for v, b in built.items()})
        return {v: dict(step_s=dt[v], train_flops_per_token=b[2]) for v, b in built.items()}
    step, sync, _ = next(iter(built.values()))
    for _ in range(max(bc.burn_in, 1) + 1):
        step()
    sync()  # peaks since this process began, its variant alone: the CPU's RSS in KiB (Linux), CUDA's allocation
    return dict(peak_mem_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def run_variants(argv, variants, repeats, tokens, peak):
    """`repeats` speed children, each timing every variant in turns, and a memory child per variant; each gets argv,
    then the keys that make it a child (the later wins). Per variant: step times, tok/s, MFU, speedups, peak memory."""
    def child(role, variants):
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--mode=train", f"--child={role}",
                            f"--variants={variants}"], capture_output=True, text=True)
        err = p.stderr.strip().splitlines()
        require(p.returncode == 0, f"variant {variants} failed: {err[-1] if err else p.returncode}")
        return json.loads(p.stdout.strip().splitlines()[-1])

    runs = [child("speed", ",".join(variants)) for _ in range(repeats)]
    out = {}
    for v in variants:
        steps, flops = [r[v]["step_s"] for r in runs], runs[0][v]["train_flops_per_token"]
        out[v] = dict(variant=v, step_ms=statistics.median(steps) * 1e3, tok_per_s=tokens / statistics.median(steps),
                      step_s_runs=steps, train_flops_per_token=flops, peak_mem_mib=child("memory", v)["peak_mem_mib"])
        out[v]["mfu"] = flops * out[v]["tok_per_s"] / peak if peak else None
    for r in out.values():  # the speedup over a base in each child (base's step time / r's), and their median
        for v, key in (("swiglu", "vs_swiglu"), ("stem-lazy", "vs_stem_lazy")):
            runs = [b / t for b, t in zip(out[v]["step_s_runs"], r["step_s_runs"])] if v in out else None
            r[key], r[key + "_runs"] = runs and statistics.median(runs), runs
    return list(out.values())


def bench_train(bc, mc, device, argv):
    peak, peak_source = peak_flops(bc, device)
    compiled, tokens = bc.compile and device.startswith("cuda"), bc.batch_size * mc.block_size * bc.grad_accum
    results = run_variants(argv, bc.variants.split(","), bc.repeats, tokens, peak)
    table(results, ["variant", "step_ms", "tok_per_s", "vs_swiglu", "vs_stem_lazy", "peak_mem_mib", "mfu"])
    why = "on" if compiled else "off (CPU: compile time outweighs the gain)" if bc.compile else "off"
    print(f"# {bc.repeats} child(ren) timing all variants in turns of {bc.turn} of {bc.steps} steps of {bc.grad_accum} "
          f"micro-batch(es): medians (each child's: the JSON); peak_mem: a variant alone (CUDA allocation; on the CPU, "
          f"RSS); torch.compile: {why}; MFU peak: {f'{peak:.4g} FLOP/s, ' if peak else ''}{peak_source}")
    return {"train": results, "batch_size": bc.batch_size, "block_size": mc.block_size, "grad_accum": bc.grad_accum,
            "compile": compiled, "peak_flops": peak, "peak_flops_source": peak_source}


# -----------------------------------------------------------------------------
# offload: host rates against their floor, unique ids, device memory, a step model of offloaded training
SHAPES = {"gpt2-small": ("presets/gpt2_small_stem.py", 50257)}  # offload's shapes: a preset, its vocabulary
# Web text in GPT-2's BPE, estimated: ids per 16 x 1024 micro-batch, per step of 32, and the share the step before had.
# Zipf (exponent 1-1.1, tokens independent) gives 4.1k-5.7k, 34k-42k, 90-94%; real text is burstier, all lower.
WEB_TEXT = dict(unique_micro=5_000, unique_step=30_000, shared=0.85)
BYTES = dict(gather=8, grad_add=12, norm=4, host_update=28)  # host memory traffic per fp32 value (reads + writes)


def offload_shape(bc, mc):
    """(model config, batch_size, grad_accum) for offload mode: a named shape's preset, or the command line's."""
    if bc.shape == "model":
        return mc, bc.batch_size, bc.grad_accum
    path, vocab = SHAPES[bc.shape]
    p = dict(read_preset(os.path.join(os.path.dirname(os.path.abspath(__file__)), path)))
    cfg = GPTConfig(**{**{k: v for k, v in p.items() if k in GPTConfig.__dataclass_fields__}, "vocab_size": vocab})
    return cfg, p["batch_size"], p["grad_accum"]


def require_tables(cfg, mode):
    """cfg's model on the meta device (no memory), refused unless it has STEM tables for `mode` to move."""
    with torch.device("meta"):
        model = GPT(cfg)
    require(model.stem_layers, f"the {mode} bench moves STEM tables, and this model has none (no table layers with "
            f"ffn={cfg.ffn}, stem_layers={cfg.stem_layers!r}, n_layer={cfg.n_layer}): give a STEM model")
    require(mode != "decode" or cfg.block_size >= 4, f"block_size={cfg.block_size}: decode needs 4 (half prompt)")
    return model


def id_stats(data_dir, meta, block_size, batch_size, grad_accum, n=10):
    """Means over n steps of data: unique ids per micro-batch, per step, and micro-batch 0's share in the last step."""
    batches = Batches(data_dir, meta, block_size, batch_size, "cpu", seed=0)
    micro = [[torch.unique(batches.get("train", to_device=False)[0]) for _ in range(grad_accum)] for _ in range(n + 1)]
    steps = [torch.unique(torch.cat(us)) for us in micro]
    shared = [torch.isin(us[0], prev).float().mean().item() for prev, us in zip(steps, micro[1:])]
    return dict(unique_micro=statistics.mean(len(u) for us in micro for u in us),
                unique_step=statistics.mean(len(u) for u in steps), shared=statistics.mean(shared))


def host_rates(V, W, h, K, k, steps):
    """GB/s of fp32 values in an offloaded step's host work on a (V, W) table: k rows gathered, their gradient added
    to the step's (K, W) sum, its joint norm (layers of h), RowAdamW of the K rows, and AdamW on one tensor (floor)."""
    table = torch.empty(V, W).fill_(0.01)  # touched: untouched pages would read as free zeros
    opt = RowAdamW(table)  # min(8, cores) threads
    opt.m.fill_(0.001)
    opt.v.fill_(0.001)
    ids = torch.randperm(V)[:K].sort().values
    pos = torch.randperm(K)[:k].sort().values  # the micro-batch's rows among the step's
    staging, g, acc = torch.empty(k, W), torch.full((k, W), 0.01), torch.full((K, W), 0.01)
    acc_rows = acc.unbind(0)  # made once, as offload.py does for its reused gradient buffer
    hyper = ((0.9, 0.95), 1e-8, 0.1)
    fns = dict(gather=lambda: torch.index_select(table, 0, ids[pos], out=staging),
               grad_add=lambda: acc.index_add_(0, pos, g),
               norm=lambda: joint_norm(acc.split(h, dim=1), 1.0),
               host_update=lambda: opt.update(ids, acc, 1, 1e-4, *hyper, g_rows=acc_rows),
               fused_floor=lambda: adamw_([table[:K]], [acc], [opt.m[:K]], [opt.v[:K]], 1, 1e-4, *hyper))
    t = timed(fns, "cpu", 2, steps)
    return {f"{x}_gbps": (k if x in ("gather", "grad_add") else K) * W * 4 / t[x] / 1e9 for x in fns}, opt.threads


def step_model(cfg, B, A, K, k, s, link_gbps, host_gbps, mfu, peak):
    """Predicted offloaded / resident-lazy step time in offload.py's design: A micro-batches of B sequences, k unique
    ids each, K a step, a server host of host_gbps GB/s (BYTES). Resident: t_gpu (training FLOPs at mfu x peak).
    Offloaded: t_gpu plus a gap at each step's end, the GPU waiting for the last gradients (D2H, host add), the K
    rows' norm, AdamW of the next micro-batch 0's k0 = k * s rows, their gather and H2D; the rest overlaps the GPU.
    Left out: the resident GPU AdamW, host threads and DMA sharing memory, planning, Python, K varying by step."""
    model = require_tables(cfg, "offload")
    W, tokens, k0 = len(model.stem_layers) * cfg.ffn_hidden, B * cfg.block_size * A, k * s
    flops = 3 * model.flops_per_token()
    t_gpu = flops * tokens / (mfu * peak)
    link = k * W * 4 / (link_gbps * 1e9)  # one micro-batch's rows (or their gradients) across, one way
    row = {x: W * b / (host_gbps * 1e9) for x, b in BYTES.items()}  # seconds of host work per row
    t = dict(gpu_step=t_gpu, copies=(A - 1) * link,  # copies: each way on its own stream, less the gap's
             gap=2 * link + k * row["grad_add"] + K * row["norm"] + k0 * row["host_update"] + k * row["gather"],
             host_work=(K - k0) * row["host_update"] + (A - 1) * k * (row["gather"] + row["grad_add"]))
    inputs = dict(n_stem=len(model.stem_layers), row_floats=W, batch_size=B, grad_accum=A, tokens_per_step=tokens,
                  unique_K=round(K), unique_k=round(k), shared_s=round(s, 3), next_micro0_rows=round(k0), mfu=mfu,
                  train_flops_per_token=flops, peak_flops=peak, link_gbps=round(link_gbps, 1), host_gbps=host_gbps,
                  **{f"{x}_ms": v * 1e3 for x, v in t.items()})
    return t_gpu / (t["gap"] + max(t_gpu, t["host_work"], t["copies"])), inputs


def bench_offload(bc, mc, device, argv, keys_set):
    cfg, B, A = offload_shape(bc, mc)
    meta = load_meta(bc.data_dir)
    st = id_stats(bc.data_dir, meta, cfg.block_size, B, A)
    est = st if meta["vocab_size"] == cfg.vocab_size else WEB_TEXT
    source = f"measured on {bc.data_dir}" if est is st else "the web-text estimate (WEB_TEXT)"
    K, k, s = est["unique_step"], est["unique_micro"], est["shared"]
    W = len(require_tables(cfg, "offload").stem_layers) * cfg.ffn_hidden
    rates, threads = host_rates(cfg.vocab_size, W, cfg.ffn_hidden, round(K), round(k), bc.steps)
    dev = offload.device_bytes(cfg, B, grad_accum=A, unique_per_micro=round(k), unique_per_step=round(K))
    res = dict(shape=dict(asdict(cfg), batch_size=B, grad_accum=A), host_threads=threads, device_bytes=dev,
               ids=dict(st, data_dir=bc.data_dir, used_K=K, used_k=k, used_shared=s, source=source), **rates,
               host_update_vs_floor=rates["host_update_gbps"] / rates["fused_floor_gbps"])
    rows = [(f"unique ids per micro-batch; per step; micro-batch 0's in the step before ({bc.data_dir}: {A} x {B} x "
             f"{cfg.block_size})", f"{st['unique_micro']:,.0f}; {st['unique_step']:,.0f}; {st['shared']:.0%}"),
            (f"host GB/s, rows of {W} floats: gather / grad_add of {k:,.0f}; norm / RowAdamW / AdamW floor (one "
             f"tensor) of {K:,.0f}", " / ".join(f"{v:.2f}" for v in rates.values())),
            (f"host_update_vs_floor (RowAdamW: {f'{threads} threads' if threads else 'one gathered block'})",
             f"{res['host_update_vs_floor']:.2f}"),
            ("tables' GPU memory, predicted: resident lazy / offload (offload / resident)",
             f"{dev['resident_lazy'] / 2**20:,.1f} / {dev['offload'] / 2**20:,.1f} MiB "
             f"({dev['offload'] / dev['resident_lazy']:.1%})")]
    link = 50.0  # GB/s, pinned PCIe Gen5 x16 as reported for H100; measured below on CUDA
    if device.startswith("cuda"):
        h, g = torch.empty(2**26, pin_memory=True), torch.empty(2**26, device=device)  # 256 MiB of fp32
        t = timed(dict(h2d=lambda: g.copy_(h, non_blocking=True), d2h=lambda: h.copy_(g, non_blocking=True)),
                  device, 2, 10)
        res.update({f"{x}_gbps": 2**28 / t[x] / 1e9 for x in t})
        link = min(res["h2d_gbps"], res["d2h_gbps"])
        rows.append(("pinned H2D / D2H", f"{res['h2d_gbps']:.1f} / {res['d2h_gbps']:.1f} GB/s"))
    peak, peak_source = peak_flops(bc, device)
    for mfu in (0.5, 0.25):  # the step model predicts a GPU server: this GPU, or an H200
        pred, inputs = step_model(cfg, B, A, K, k, s, link, bc.host_gbps, mfu, peak or PEAK_FLOPS["H200"])
        res.setdefault("predicted", []).append(dict(inputs, predicted_ratio=pred))
        rows.append((f"PREDICTED offloaded/resident, MFU {mfu:.0%}, host {bc.host_gbps:.0f} GB/s", f"{pred:.3f}"))
    res["predicted_ratio"] = min(p["predicted_ratio"] for p in res["predicted"])
    if device.startswith("cuda") and bc.shape != "model":  # the real thing, as train mode times it, at the shape
        run_A = bc.grad_accum if "grad_accum" in keys_set else A  # --grad_accum: a shorter run (gpu_check.sh)
        lazy, off = run_variants(argv + [f"--{x}={v}" for x, v in dict(res["shape"], grad_accum=run_A).items()],
                                 ["stem-lazy", "stem-offload"], bc.repeats, run_A * B * cfg.block_size, peak)
        res["measured"] = dict(grad_accum=run_A, resident_lazy=lazy, offloaded=off, ratio=off["vs_stem_lazy"],
                               gpu_mem_saved_mib=lazy["peak_mem_mib"] - off["peak_mem_mib"])
        mfu = "n/a" if peak is None else f"{lazy['mfu']:.1%} / {off['mfu']:.1%}"
        rows += [(f"MEASURED offloaded/resident-lazy tok/s (grad_accum {run_A}); MFU",
                  f"{off['vs_stem_lazy']:.3f} ({off['tok_per_s']:,.0f} vs {lazy['tok_per_s']:,.0f}); {mfu}"),
                 ("MEASURED GPU memory: resident-lazy / offloaded (peak allocation)",
                  f"{lazy['peak_mem_mib']:,.0f} / {off['peak_mem_mib']:,.0f} MiB")]
    table([dict(what=w, value=v) for w, v in rows], ["what", "value"])
    print(f"# PREDICTED, not measured ({'the MEASURED rows are' if 'measured' in res else 'gpu_check.sh runs'} the "
          f"real run); the step model's inputs (K, k, s: {source}; peak: {peak_source if peak else 'an H200'}):")
    for p in res["predicted"]:
        print("#   " + ", ".join(f"{x}={v:.4g}" if isinstance(v, float) else f"{x}={v}" for x, v in p.items()))
    return dict(res, peak_flops=peak, peak_flops_source=peak_source)


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
    require_tables(mc, "decode")  # checked before the data too (check_config), here for a checkpoint's model
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
    results = [dict(variant="resident", cache_rows=0, tok_per_s=tok / t[-1], vs_resident=1.0, hit_rate=None)]
    results += [dict(variant="offload", cache_rows=e.cache.n, tok_per_s=tok / t[i], vs_resident=t[-1] / t[i],
                     hit_rate=e.cache.hit_rate()) for i, (_, e) in enumerate(engines)]
    table(results, list(results[0]))
    plot(os.path.join(bc.plot_dir, "decode_hit_rate.png"), "GPU row cache size (rows)", "decode hit rate",
         {"offload (LFU)": [(r["cache_rows"], r["hit_rate"]) for r in results[1:]]}, logx=True)
    return {"decode": results, "batch_size": bc.batch_size, "decode_tokens": bc.decode_tokens}


def check_config(bc, mc):
    """Every value in range, and the mode's model fit for it, before any data is prepared or anything measured."""
    require(bc.mode in MODES, f"mode={bc.mode!r} is not one of {', '.join(MODES)} (quality, claims: claims.py)")
    for k in ("batch_size", "steps", "repeats", "turn", "decode_tokens", "table_vocab", "grad_accum"):
        require(getattr(bc, k) >= 1, f"{k}={getattr(bc, k)} must be at least 1")
    require(bc.burn_in >= 0 and bc.peak_flops >= 0 and bc.host_gbps > 0,
            f"burn_in={bc.burn_in}, peak_flops={bc.peak_flops} must be 0 or more, host_gbps={bc.host_gbps} positive")
    require(bc.shape in ("model", *SHAPES), f"shape={bc.shape!r} is not one of model, {', '.join(SHAPES)}")
    bad = [v for v in bc.variants.split(",") if v and v not in VARIANTS]
    require(not bad, f"variants: {', '.join(map(repr, bad))} not one of {', '.join(VARIANTS)}")
    for key, n, eg in (("shapes", 3, "128x512x4096 (n_embd x ffn_hidden x tokens)"), ("cache_sizes", 1, "16,64")):
        parts = [p.split("x") for p in getattr(bc, key).split(",")]
        require(all(len(p) == n and all(v.isdigit() and int(v) > 0 for v in p) for p in parts),
                f"{key}={getattr(bc, key)!r} is not a comma-separated list such as {eg}")
    require(not os.path.isfile(bc.plot_dir), f"plot_dir={bc.plot_dir} is a file: choose a folder")
    require(bc.child in ("", "speed", "memory"), f"child={bc.child!r} is internal (train mode's children): drop it")
    require(not bc.ckpt or os.path.isfile(ckpt_file(bc.ckpt)), f"no checkpoint at {bc.ckpt} (a ckpt.pt or its folder)")
    check_model_config(mc)
    if bc.mode == "train":  # the variants that run: with --ffn=swiglu, only swiglu
        names = [v for v in bc.variants.split(",") if v and (mc.ffn != "swiglu" or v == "swiglu")]
        require(names, f"variants={bc.variants!r}: nothing to run (with --ffn=swiglu only the swiglu variant runs)")
        bc.variants = ",".join(names)
    elif bc.mode == "decode" and not bc.ckpt:
        require_tables(mc, "decode")
    elif bc.mode == "offload":
        require_tables(offload_shape(bc, mc)[0], "offload")


def main(argv):
    bc, mc = BenchConfig(), GPTConfig()
    keys_set = parse_config(argv, bc, mc, doc=__doc__)
    check_config(bc, mc)
    device, dtype, ctx, note = resolve_device(bc.device, bc.dtype)
    if bc.child:  # a child of --mode train: one JSON line
        print(json.dumps(train_child(bc, mc, device, ctx)))
        return
    print(f"# nanoSTEM bench --mode {bc.mode} | {note} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    if bc.mode != "ffn" and not (bc.mode == "decode" and bc.ckpt):  # decode --ckpt: the checkpoint's data
        prepare_facts(bc.data_dir, BenchConfig.data_dir, progress=False)  # made on first use, as train.py does
        mc.vocab_size = load_meta(bc.data_dir)["vocab_size"]  # other data: the usual hint when it is missing
        shown = offload_shape(bc, mc)[0] if bc.mode == "offload" else mc  # offload: the shape modelled
        print("# model: " + ", ".join(f"{k}={v}" for k, v in asdict(shown).items()))
    res = dict(ffn=lambda: bench_ffn(bc, device, ctx), train=lambda: bench_train(bc, mc, device, argv),
               offload=lambda: bench_offload(bc, mc, device, argv, keys_set),
               decode=lambda: bench_decode(bc, mc, device, ctx, keys_set))[bc.mode]()
    print(json.dumps(dict(res, device=note, torch=torch.__version__, mode=bc.mode, date=time.strftime("%Y-%m-%d"))))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        die(str(e))
