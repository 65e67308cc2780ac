"""
Measure STEM against SwiGLU, resident against offloaded: speed, memory, and the quality runs.

    python bench.py --mode ffn --device cpu       # one FFN layer fwd+bwd, SwiGLU vs STEM, several shapes
    python bench.py --mode train --device cpu     # whole training steps: SwiGLU, STEM dense/lazy/offloaded
    python bench.py --mode offload                # copy rates, gather rate, unique ids, bytes, lower bound
    python bench.py --mode decode                 # generation tok/s resident vs offloaded, cache hit rate
    python bench.py --mode quality --runs runs    # the results table and plots of quality.sh

Each mode prints a header (device, dtype, torch, config), a table, and as its last line one JSON
object holding every figure. Timings: burn_in steps, then `steps` timed steps, synchronised on CUDA;
variants are timed side by side in one process and reported as ratios. Memory in `train` mode is
the peak CUDA allocation, or on the CPU the peak RSS of a child process per variant.
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

from model import GPT, GPTConfig, STEM, SwiGLU, configure_optimizer
from tables import ResidentTables
from train import Batches, UserError, die, edit_probes, fact_recall, load_meta, parse_config, resolve_device

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
    plot_dir: str = "assets"  # where PNGs go
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


def bench_ffn(bc, device, ctx):
    rows, out = [], []
    for shape in bc.shapes.split(","):
        try:
            d, h, n = (int(v) for v in shape.split("x"))
        except ValueError:
            raise UserError(f"shapes: {shape!r} is not n_embd x ffn_hidden x tokens, e.g. 768x2048x2048") from None
        cfg = GPTConfig(vocab_size=bc.table_vocab, n_embd=d, ffn_hidden=h)
        x = torch.randn(1, n, d, device=device, requires_grad=True)
        ids = torch.randint(0, bc.table_vocab, (1, n), device=device)
        res = {}
        for name, cls in (("swiglu", SwiGLU), ("stem", STEM)):
            layer = cls(cfg).to(device)
            if name == "stem":
                torch.nn.init.xavier_normal_(layer.table)

            def step():
                with ctx:
                    y = layer(x, ids)
                y.float().sum().backward()
                layer.zero_grad(set_to_none=True)
                x.grad = None
            res[name] = timed(step, device, bc.burn_in, bc.steps)
        ratio = res["stem"] / res["swiglu"]
        theory = 2 / 3  # two matmuls instead of three, forward and backward alike
        rows.append(dict(shape=f"d={d} ffn={h} tokens={n}", swiglu=f"{res['swiglu'] * 1e3:.2f} ms",
                         stem=f"{res['stem'] * 1e3:.2f} ms", ratio=f"{ratio:.3f}", flop_ratio=f"{theory:.3f}"))
        out.append(dict(n_embd=d, ffn_hidden=h, tokens=n, swiglu_ms=res["swiglu"] * 1e3, stem_ms=res["stem"] * 1e3,
                        time_ratio=ratio, flop_ratio=theory))
    table(rows, ["shape", "swiglu", "stem", "ratio", "flop_ratio"])
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


def bench_train(bc, mc, device, argv):
    peak = bc.peak_flops
    if peak is None and device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    results = []
    for v in VARIANTS:
        if VARIANTS[v][0] == "stem" and mc.ffn == "swiglu":
            continue
        args = [a for a in argv if not a.startswith("--variant")] + [f"--variant={v}"]
        p = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
        if p.returncode != 0:
            raise UserError(f"variant {v} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
    base = next(r for r in results if r["variant"] == "swiglu")
    lazy = next((r for r in results if r["variant"] == "stem-lazy"), None)
    rows = []
    for r in results:
        r["vs_swiglu"] = r["tok_per_s"] / base["tok_per_s"]
        r["vs_stem_lazy"] = r["tok_per_s"] / lazy["tok_per_s"] if lazy else None
        r["mfu"] = r["train_flops_per_token"] * r["tok_per_s"] / peak if peak else None
        rows.append(dict(variant=r["variant"], step=f"{r['step_ms']:.1f} ms", tok_s=f"{r['tok_per_s']:,.0f}",
                         vs_swiglu=f"{r['vs_swiglu']:.3f}",
                         vs_lazy=f"{r['vs_stem_lazy']:.3f}" if r["vs_stem_lazy"] else "-",
                         mem=f"{r['peak_mem_mib']:,.0f} MiB", mfu=f"{r['mfu']:.1%}" if r["mfu"] else "n/a"))
    table(rows, ["variant", "step", "tok_s", "vs_swiglu", "vs_lazy", "mem", "mfu"])
    print(f"# memory: {'peak CUDA allocation' if device.startswith('cuda') else 'peak RSS of the child process'}; "
          f"MFU peak: {peak if peak else 'unknown (pass --peak_flops)'}")
    return {"train": results, "batch_size": bc.batch_size, "block_size": mc.block_size, "peak_flops": peak}


# -----------------------------------------------------------------------------
# offload: the physical limit


def unique_stats(bc, mc, meta, n=50):
    batches = Batches(bc.data_dir, meta, mc.block_size, bc.batch_size, "cpu", seed=0)
    fr = []
    for _ in range(n):
        x, _ = batches.get("train", to_device=False)
        fr.append(len(torch.unique(x)))
    fr.sort()
    return dict(tokens_per_step=bc.batch_size * mc.block_size, unique_mean=statistics.mean(fr),
                unique_p50=fr[len(fr) // 2], unique_p95=fr[int(len(fr) * 0.95)], unique_max=fr[-1])


def bench_offload(bc, mc, device):
    meta = load_meta(bc.data_dir)
    mc.vocab_size = meta["vocab_size"]
    u = unique_stats(bc, mc, meta)
    n_stem = len(GPT(GPTConfig(**{**asdict(mc), "vocab_size": 8})).stem_layers)
    W = n_stem * mc.ffn_hidden
    bytes_step = u["unique_mean"] * W * 4
    res = dict(unique=u, n_stem=n_stem, bytes_per_step=bytes_step)
    # host gather: rows of a packed table into a (pinned) staging buffer
    table_h = torch.randn(mc.vocab_size, W, pin_memory=device.startswith("cuda"))
    ids = torch.randint(0, mc.vocab_size, (int(u["unique_mean"]),))
    staging = torch.empty(len(ids), W, pin_memory=device.startswith("cuda"))
    t = timed(lambda: torch.index_select(table_h, 0, ids, out=staging), "cpu", bc.burn_in, bc.steps)
    res["gather_gb_s"] = staging.numel() * 4 / t / 1e9
    rows = [dict(what="unique ids per step", value=f"{u['unique_mean']:.0f} of {u['tokens_per_step']} "
                 f"(p50 {u['unique_p50']}, p95 {u['unique_p95']}, {u['unique_mean'] / u['tokens_per_step']:.1%})"),
            dict(what="bytes per step (each way, fp32)", value=f"{bytes_step / 2**20:.2f} MiB ({n_stem} tables x {mc.ffn_hidden})"),
            dict(what="host gather rate", value=f"{res['gather_gb_s']:.1f} GB/s")]
    if not device.startswith("cuda"):
        rows.append(dict(what="copy rates, lower bound", value="CUDA only: run on a GPU machine"))
        table(rows, ["what", "value"])
        return res
    big = 256 * 2**20
    h = torch.empty(big // 4, pin_memory=True)
    g = torch.empty(big // 4, device=device)
    res["h2d_gb_s"] = big / timed(lambda: g.copy_(h, non_blocking=True), device, 2, 10) / 1e9
    res["d2h_gb_s"] = big / timed(lambda: h.copy_(g, non_blocking=True), device, 2, 10) / 1e9
    res["lower_bound_ms"] = 2 * bytes_step / (res["h2d_gb_s"] * 1e9) * 1e3  # rows in, gradients out
    rows += [dict(what="pinned H2D / D2H", value=f"{res['h2d_gb_s']:.1f} / {res['d2h_gb_s']:.1f} GB/s"),
             dict(what="lower bound per step (rows in + grads out)", value=f"{res['lower_bound_ms']:.3f} ms")]
    table(rows, ["what", "value"])
    return res


# -----------------------------------------------------------------------------
# decode: generation, resident vs offloaded, cache hit rate


def bench_decode(bc, mc, device, ctx):
    import offload
    from train import load_checkpoint, model_from_checkpoint
    torch.manual_seed(0)
    if bc.ckpt:
        ckpt = load_checkpoint(bc.ckpt)
        model, bc.data_dir = model_from_checkpoint(ckpt, bc.ckpt), ckpt["config"]["train"]["data_dir"]
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


def main(argv):
    bc, mc = BenchConfig(), GPTConfig()
    parse_config(argv, bc, mc)
    if bc.mode not in ("ffn", "train", "offload", "decode", "quality"):
        raise UserError(f"mode={bc.mode!r} is not one of ffn, train, offload, decode, quality")
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
            res = bench_offload(bc, mc, device)
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
