"""
Is STEM better, and do the paper's claims hold? Training runs compared by their learning curves, and
the STEM paper's claims checked at small scale (claims.sh runs the whole sequence, resumable).

    python claims.py --mode curves --runs=out,out-swiglu   # val loss and recall at each evaluation, run by run
    python claims.py --mode quality --runs_dir=runs        # runs/DATASET-ARCH-sSEED: mean ± sd over the seeds
    python claims.py --mode stability --runs_dir=runs/claims/stability  # claim 4: loss spikes per FFN and lr
    python claims.py --mode spread --ckpt=STEM_RUN --ckpt_swiglu=SWIGLU_RUN   # claim 5: |cos| of table rows
    python claims.py --mode locality --ckpt=STEM_FACTS_RUN                    # claim 6: edits, locality, control
    python claims.py --mode context --ckpt=STEM_RUN --ckpt_swiglu=SWIGLU_RUN  # claim 7: Heaps' law, loss by position
    python claims.py --mode summary --claims_dir=runs/claims                  # claims.sh's outputs, mean ± sd
    python claims.py --mode mc --ckpt=RUN [--ckpt_swiglu=RUN] [--mc_file=hellaswag_val.jsonl]  # multiple choice
    python claims.py --mode needle --ckpt=RUN [--ckpt_swiglu=RUN] [--input=filler.txt]  # needle in a haystack

A run is a train.py --out_dir (metrics.jsonl, ckpt.pt); spread, locality and context read a checkpoint (file or
run folder) with the data it was trained on; mc and needle (evals.py) take any model, and a SwiGLU twin.
Each mode prints a header, a table, and as its last line one JSON object holding every figure. Plots go to
--plot_dir (out/claims). Not here: speed and memory (bench.py).
"""

import glob
import json
import math
import os
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import evals
from bench import ckpt_file, plot, table
from common import (Batches, check_provenance, edit_probes, fact_recall, load_checkpoint, load_facts, load_meta,
                    model_from_checkpoint, read_metrics, resolve_device)
from configurator import UserError, die, parse_config, require
from model import GPT
from tokenizer import load_tokenizer

MODES = ("curves", "quality", "stability", "spread", "locality", "context", "summary", "mc", "needle")


@dataclass
class ClaimsConfig:
    mode: str = "curves"  # curves | quality | stability | spread | locality | context | summary | mc | needle
    device: str = "auto"
    dtype: str = "auto"
    runs: str = ""  # curves: run folders (train.py's --out_dir), comma-separated, e.g. out,out-swiglu
    runs_dir: str = "runs"  # quality: a folder of runs named DATASET-ARCH-sSEED; stability: a folder of runs
    claims_dir: str = "runs/claims"  # summary: claims.sh's outputs, NAME.txt each ending in its JSON line
    ckpt: str = ""  # spread, context, locality: the STEM checkpoint (a ckpt.pt or its run folder); mc, needle: any
    ckpt_swiglu: str = ""  # spread, context, mc, needle: the SwiGLU checkpoint (same data) to compare --ckpt with
    data_dir: str = "data/facts"  # context without --ckpt: the tokens to count distinct ids in
    batch_size: int = 16  # spread, context: windows per forward pass
    plot_dir: str = "out/claims"  # where PNGs go
    spread_ids: int = 256  # spread: rows of the most frequent ids of train.bin, compared pairwise
    spread_tokens: int = 65536  # spread: at most this many tokens of train.bin (windows spread over it) through SwiGLU
    spike_window: int = 20  # stability: W, the previous steps whose median loss a spike is measured against
    spike_margin: float = 0.5  # stability: a spike's loss exceeds that median by more than this (nats)
    context_max: int = 2048  # context: the longest window T for distinct ids (T = 16, 32, ... up to this)
    context_windows: int = 200  # context: random windows per T for distinct ids
    context_batches: int = 8  # context: validation batches (of batch_size windows) for the per-position loss
    locality_pairs: int = 100  # locality: random entity triples (A, B, C) for the two-entity probes
    mc_file: str = ""  # mc: HellaSwag-format .jsonl (ctx, endings, label); empty: a set made from --ckpt's facts
    mc_limit: int = 0  # mc: score the first N items only (0: all)
    needle_contexts: str = ""  # needle: context lengths in tokens, e.g. 64,128,256,512 (empty: block_size/8 .. /1)
    needle_depths: str = "0,0.25,0.5,0.75,1"  # needle: where the needle sits among the filler sentences
    needle_trials: int = 20  # needle: prompts per context and depth
    input: str = ""  # needle: a UTF-8 text whose sentences are the filler (empty: the needle world's own filler)


# -----------------------------------------------------------------------------
# curves and quality: runs side by side, by their evaluations


def read_evals(run):
    """(eval rows, train rows) of run/metrics.jsonl, each in step order."""
    path = os.path.join(run, "metrics.jsonl")
    require(os.path.isfile(path), f"{run} holds no metrics.jsonl: give run folders (train.py's --out_dir)")
    rows = sorted(read_metrics(path), key=lambda r: r["iter"])
    return [r for r in rows if r["kind"] == "eval"], [r for r in rows if r["kind"] == "train"]


def finished_runs(runs_dir, pattern=r".+"):
    """(run folder, its name's match, checkpoint) of each finished run in runs_dir; a note for an unfinished one."""
    require(os.path.isdir(runs_dir), f"runs_dir={runs_dir}: no such folder of runs (claims.sh trains them)")
    for name in sorted(os.listdir(runs_dir)):
        m, run = re.fullmatch(pattern, name), os.path.join(runs_dir, name)
        if not m or not os.path.isfile(os.path.join(run, "metrics.jsonl")):
            continue
        ckpt = load_checkpoint(os.path.join(run, "ckpt.pt")) if os.path.isfile(os.path.join(run, "ckpt.pt")) else None
        if ckpt is None or ckpt["iter"] != ckpt["config"]["train"]["max_iters"]:
            print(f"# skipping {name}: unfinished (" + ("no checkpoint yet)" if ckpt is None else
                  f"{ckpt['iter']} of {ckpt['config']['train']['max_iters']} steps)"))
        elif ckpt["iter"] == 0:  # train.py --max_iters=0 (a look at the setup): no losses to compare
            print(f"# skipping {name}: trained 0 steps")
        else:
            yield run, m, ckpt


def draw_curves(plot_dir, name, groups, title, flops=None):
    """Val loss (and fact recall where every run has it) against tokens, and against training FLOPs given flops
    {label: per token}. groups: {label: [each run's eval rows]}: their mean, band min..max. Returns the paths."""
    paths = []
    for xkey, ykey in (("tokens", "val_loss"), ("flops", "val_loss"), ("tokens", "recall")):
        series, bands = {}, {}
        for label, runs in groups.items():
            n = min(len(ev) for ev in runs)
            if (xkey == "flops" and not flops) or not all(ykey in ev[i] for ev in runs for i in range(n)):
                continue
            per = [[ev[i][ykey] for ev in runs] for i in range(n)]  # (evaluations, runs)
            xs = [runs[0][i]["tokens"] * (flops[label] if xkey == "flops" else 1) for i in range(n)]
            series[label] = list(zip(xs, map(statistics.mean, per)))
            bands[label] = ([min(p) for p in per], [max(p) for p in per])
        if series:
            paths.append(os.path.join(plot_dir, f"{name}_{ykey.replace('_loss', '')}_vs_{xkey}.png"))
            plot(paths[-1], "tokens" if xkey == "tokens" else "training FLOPs",
                 "validation loss" if ykey == "val_loss" else "fact recall", series, bands=bands, title=title)
    return paths


def claims_curves(cc):
    runs = [r for r in cc.runs.split(",") if r]
    require(runs, "--mode curves needs --runs=RUN,RUN...: run folders (train.py --out_dir), e.g. --runs=out,out2")
    require(len(set(runs)) == len(runs), f"runs={cc.runs!r} names a run twice")
    ev = {r: read_evals(r)[0] for r in runs}
    require(all(ev.values()), f"{', '.join(r for r in runs if not ev[r])}: no evaluation yet in metrics.jsonl (one "
            f"every --eval_interval steps)")
    at = {r: {e["iter"]: e for e in ev[r]} for r in runs}
    rows, recall = [], [r for r in runs if all("recall" in e for e in ev[r])]  # recall: the runs on facts data
    for s in sorted({e["iter"] for r in runs for e in ev[r]}):
        here = [r for r in runs if s in at[r]]
        rows.append(dict(step=str(s), tokens=" / ".join(f"{t:,}" for t in sorted({at[r][s]["tokens"] for r in here})),
                         **{f"val {r}": f"{at[r][s]['val_loss']:.4f}" if r in here else "-" for r in runs},
                         **{f"recall {r}": f"{at[r][s]['recall']:.3f}" if r in here else "-" for r in recall}))
    table(rows, list(rows[0]))
    paths = draw_curves(cc.plot_dir, "curves", {r: [ev[r]] for r in runs}, "one line per run")
    print(f"# val: validation loss at each evaluation (lower is better); recall: fact recall (facts data). Runs of "
          f"other batch sizes are compared at equal tokens in the plots: {', '.join(paths)}")
    curves = {r: [{k: e[k] for k in ("iter", "tokens", "val_loss", "recall") if k in e} for e in ev[r]] for r in runs}
    final = {r: dict(curves[r][-1], best_val_loss=min(e["val_loss"] for e in ev[r])) for r in runs}
    return {"curves": curves, "final": final, "plots": paths}


def claims_quality(cc):
    groups = {}  # (dataset, arch) -> finished runs
    for run, m, ckpt in finished_runs(cc.runs_dir, r"([^-]+)-(.+)-s\d+"):
        model, data_dir = model_from_checkpoint(ckpt, run), ckpt["config"]["train"]["data_dir"]
        edit = None
        if model.stem_layers and os.path.isfile(os.path.join(data_dir, "facts.json")):  # edits by row swaps, 100 pairs
            enc = load_tokenizer(data_dir)
            edit = fact_recall(model, enc, edit_probes(load_facts(data_dir), enc), "cpu")["recall"]
        ev, tr = read_evals(run)
        groups.setdefault(m.groups(), []).append(dict(ev=ev, counts=model.param_counts(), edit=edit,
                                                      flops=3 * model.flops_per_token(),
                                                      tok_s=statistics.median(r["tok_per_s"] for r in tr)))
    require(groups, f"no finished runs in {cc.runs_dir}: run `CLAIMS=1-3 bash claims.sh` first")
    out, rows = [], []
    for (dataset, arch), runs in sorted(groups.items()):
        final = [r["ev"][-1] for r in runs]
        vl, rec = [f["val_loss"] for f in final], [f["recall"] for f in final if "recall" in f]
        edits, c = [r["edit"] for r in runs if r["edit"] is not None], runs[0]["counts"]
        sd, rsd = (statistics.stdev(v) if len(v) > 1 else 0.0 for v in (vl, rec))
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
                         **{k: f"{c[k] / 1e6:.2f}M" for k in ("total", "tables", "active")},
                         flops=f"{runs[0]['flops'] / 1e6:.1f}M", tok_s=f"{res['tok_per_s']:,.0f}"))
    table(rows, list(rows[0]))
    for dataset in sorted({d for d, _ in groups}):
        g = {arch: runs for (d, arch), runs in sorted(groups.items()) if d == dataset}
        seeds = "/".join(map(str, sorted({len(runs) for runs in g.values()})))
        draw_curves(cc.plot_dir, f"quality_{dataset}", {a: [r["ev"] for r in runs] for a, runs in g.items()},
                    f"{dataset}: mean of {seeds} seeds, band min..max", {a: runs[0]["flops"] for a, runs in g.items()})
    print(f"# val, recall: the last evaluation, mean ± sd over the seeds; edit: edit success (sample.py --edit); "
          f"plots: {cc.plot_dir}/quality_<dataset>_val_vs_tokens.png, _val_vs_flops.png, _recall_vs_tokens.png")
    return {"quality": out}


# -----------------------------------------------------------------------------
# the paper's claims at small scale (claims.sh runs them all): the pure functions first, then a mode per claim


def pairwise_abs_cos(x):
    """|cos| of the n(n-1)/2 pairs of distinct rows of x (n, d), flat float64; a zero row has |cos| 0 with all."""
    x = np.asarray(x, dtype=np.float64)
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    return np.minimum(np.abs(u @ u.T)[np.triu_indices(len(x), 1)], 1.0)  # rounding can pass 1 for parallel rows


def pairwise_abs_cos_stats(x):
    """{median, p95} of the pairwise |cos| of the rows of x (n >= 2), p95 interpolated linearly (numpy's default)."""
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
    """[(t, loss[t] - median of the finite losses among loss[t-window:t])] for t >= window: inf where loss[t]
    is not finite, None where the window holds no finite loss."""
    out = []
    for t in range(window, len(losses)):
        prev = [v for v in losses[t - window:t] if math.isfinite(v)]
        out.append((t, math.inf if not math.isfinite(losses[t]) else losses[t] - statistics.median(prev) if prev
                    else None))
    return out


def count_spikes(losses, window=20, margin=0.5):
    """Indices t (0-based) of the loss spikes: t >= window and loss[t] > median(loss[t-window:t]) + margin
    (nats; the median over the finite losses of the window), or loss[t] not finite (a diverged step)."""
    return [t for t, e in running_excess(losses, window) if e is not None and e > margin]


SPIKE_DEFINITION = ("a spike is a step t (after the first W) whose training loss exceeds the median of the previous "
                    "W steps' finite losses by more than the margin, or is not finite")


@torch.no_grad()
def position_losses(model, x, y, ctx, chunk=4):
    """Cross-entropy at each position of x -> y (B, T): (B, T) float64 on the CPU; in chunks of windows, so that
    a 50k-way vocabulary's logits stay small."""
    out = []
    for i in range(0, x.size(0), chunk):
        xb, yb = x[i:i + chunk], y[i:i + chunk]
        with ctx:
            logits, _ = model(xb, yb)
        out.append(F.cross_entropy(logits.float().transpose(1, 2), yb, reduction="none").double().cpu())  # (b, T)
    return torch.cat(out)


@torch.no_grad()
def swap_rows(model, a, b):
    """In every table of the model, rows a[i] and b[i] (ids, none in both) change places; twice restores."""
    assert len(a) == len(b) and not set(a) & set(b), (a, b)
    ia, ib = torch.tensor(a), torch.tensor(b)
    for f in model.stem_ffns():
        f.table[ia], f.table[ib] = f.table[ib].clone(), f.table[ia].clone()


def load_model(cc, device, key="ckpt", data=None, any_ffn=False):
    """(model in eval mode on device, checkpoint, its data folder, that folder's meta) of --ckpt, which must have
    table layers (unless any_ffn), or of --ckpt_swiglu, a SwiGLU model trained on data = --ckpt's (folder, meta)."""
    path = ckpt_file(getattr(cc, key))
    ckpt = load_checkpoint(path)
    data_dir, meta = data or (ckpt["config"]["train"]["data_dir"], load_meta(ckpt["config"]["train"]["data_dir"]))
    check_provenance(ckpt, meta, data_dir, path)
    model = model_from_checkpoint(ckpt, path).to(device).eval()
    print(f"# --{key}: {path} (step {ckpt['iter']} of {ckpt['config']['train']['max_iters']}, ffn={model.cfg.ffn}, "
          f"stem_layers={model.cfg.stem_layers}, table layers {model.stem_layers or 'none'}, data {data_dir})")
    if key == "ckpt":
        require(model.stem_layers or any_ffn, f"{path} has no table layers (ffn={model.cfg.ffn}): --ckpt must be a "
                f"STEM model")
    else:
        require(model.cfg.ffn == "swiglu", f"{path} is ffn={model.cfg.ffn}: --ckpt_swiglu must be SwiGLU (swapped?)")
    return model, ckpt, data_dir, meta


def top_ids(data_dir, meta, n):
    """The n most frequent ids of train.bin (ties: the smaller id first), and the count of ids that occur."""
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
    counts = np.bincount(np.asarray(data), minlength=meta["vocab_size"])
    present = int((counts > 0).sum())
    return np.argsort(-counts, kind="stable")[:min(n, present)].tolist(), present


@torch.no_grad()
def up_outputs(model, layers, ids, data_dir, meta, max_tokens, batch, device, ctx):
    """Per layer, the SwiGLU up-projection's output averaged over the positions of each id in windows spread evenly
    over train.bin (max_tokens in all) -> ({layer: (len(found), ffn)}, the ids found in `ids` order, tokens read)."""
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
    T, W = model.cfg.block_size, model.cfg.ffn_hidden
    slot = torch.full((meta["vocab_size"],), -1, dtype=torch.long)
    slot[torch.tensor(ids)] = torch.arange(len(ids))
    sums = {L: torch.zeros(len(ids), W, dtype=torch.float64) for L in layers}
    counts, got = torch.zeros(len(ids), dtype=torch.float64), {}
    hooks = [model.blocks[L].ffn.up.register_forward_hook(lambda m, i, o, L=L: got.__setitem__(L, o)) for L in layers]
    n_windows = max(1, min(max_tokens, len(data) - 1) // T)
    starts = np.linspace(0, len(data) - T, n_windows).astype(np.int64)  # evenly over the file
    for w0 in range(0, n_windows, batch):
        x = torch.from_numpy(np.stack([np.asarray(data[s:s + T]) for s in starts[w0:w0 + batch]]).astype(np.int64))
        with ctx:
            model(x.to(device))  # targets=None: the head runs on the last position only
        s = slot[x.reshape(-1)]  # (n,) slot of each position, -1 when not a wanted id
        pos = (s >= 0).nonzero().squeeze(1)
        for L in layers:
            sums[L].index_add_(0, s[pos], got[L].reshape(-1, W).float().cpu()[pos].double())
        counts.index_add_(0, s[pos], torch.ones(len(pos), dtype=torch.float64))
    for h in hooks:
        h.remove()
    found = (counts > 0).nonzero().squeeze(1)
    vecs = {L: (sums[L][found] / counts[found, None]).numpy() for L in layers}
    return vecs, [ids[i] for i in found.tolist()], n_windows * T


def claims_spread(cc, device, ctx):
    """Claim 5: STEM's table rows are near-orthogonal (against random vectors), SwiGLU's W_up x cluster."""
    stem, ckpt, data_dir, meta = load_model(cc, device)
    layers, layer = stem.stem_layers, stem.stem_layers[0]  # every table layer, and the first as the headline
    ids, present = top_ids(data_dir, meta, cc.spread_ids)
    require(len(ids) >= 2, f"{data_dir}/train.bin holds fewer than 2 distinct ids")
    torch.manual_seed(ckpt["config"]["train"]["seed"])  # train.py seeds, then builds the model: the same init
    init, W = GPT(stem.cfg), stem.cfg.ffn_hidden
    swiglu, found, read = {}, ids, 0
    if cc.ckpt_swiglu:
        dense = load_model(cc, device, "ckpt_swiglu", (data_dir, meta))[0]
        require(dense.cfg.ffn_hidden == W, f"--ckpt_swiglu has ffn_hidden={dense.cfg.ffn_hidden}, the STEM model "
                f"{W}: |cos| depends on the width, so the two must match")
        swiglu, found, read = up_outputs(dense, layers, ids, data_dir, meta, cc.spread_tokens, cc.batch_size, device,
                                         ctx)
        require(len(found) >= 2, f"fewer than 2 of the top ids occur in the {read} tokens read: raise --spread_tokens")
        print(f"# {len(found)} of the {len(ids)} ids occur in the {read:,} tokens read: |cos| over those")
    rand = torch.randn(len(ids), W, generator=torch.Generator().manual_seed(0)).numpy()[[ids.index(i) for i in found]]
    names = dict(trained="STEM table, trained", init="STEM table, at init (same seed)",
                 random=f"Gaussian N(0,1), width {W}", swiglu_up="SwiGLU W_up x (mean per id)")
    per_layer, rows = [], []
    for L in layers:
        vecs = dict(trained=stem.blocks[L].ffn.table.detach().cpu()[found].double().numpy(),
                    init=init.blocks[L].ffn.table.detach()[found].double().numpy(), random=rand,
                    **({"swiglu_up": swiglu[L]} if swiglu else {}))
        per_layer.append(dict(dict(layer=L, swiglu_up=None), **{k: pairwise_abs_cos_stats(v) for k, v in vecs.items()}))
        rows += [dict(layer=str(L) + (" (headline)" if L == layer else ""), rows=names[k],
                      median=f"{per_layer[-1][k]['median']:.4f}", p95=f"{per_layer[-1][k]['p95']:.4f}") for k in vecs]
        if L == layer:  # the distribution of |cos| over the pairs: quantiles as a CDF
            qs = np.linspace(0.005, 0.995, 100)
            plot(os.path.join(cc.plot_dir, "spread_abs_cos_cdf.png"), "|cos| of a pair of rows", "fraction of pairs "
                 "below", {k: list(zip(np.quantile(pairwise_abs_cos(v), qs).tolist(), qs.tolist())) for k, v in
                           vecs.items()}, title=f"layer {layer}, {len(found)} most frequent ids")
    table(rows, ["layer", "rows", "median", "p95"])
    print(f"# |cos| over the pairs of the {len(found)} most frequent ids of {data_dir}/train.bin ({present:,} ids "
          f"occur); random vectors give a median about 0.674/sqrt({W}) = {0.674 / W ** 0.5:.4f}, a P95 about "
          f"1.96/sqrt({W}) = {1.96 / W ** 0.5:.4f}" + (f"; SwiGLU: ffn.up's output on {read:,} tokens of train.bin, "
          f"averaged per id" if swiglu else "") + f"; plot: {cc.plot_dir}/spread_abs_cos_cdf.png")
    return dict(spread={k: per_layer[0][k] for k in ("trained", "init", "random", "swiglu_up")}, layer=layer,
                per_layer=per_layer, ids=len(found), ids_asked=cc.spread_ids, swiglu_tokens_read=read, ffn_hidden=W)


def claims_stability(cc):
    """Claim 4: loss spikes in the training losses of the finished runs in runs_dir, by FFN and learning rate."""
    runs = []
    for run, _, ckpt in finished_runs(cc.runs_dir):
        c = ckpt["config"]
        losses = [r["loss"] for r in read_evals(run)[1]]
        spikes = count_spikes(losses, cc.spike_window, cc.spike_margin)
        excess = [e for _, e in running_excess(losses, cc.spike_window) if e is not None and math.isfinite(e)]
        runs.append(dict(run=run, ffn=c["model"]["ffn"], learning_rate=c["train"]["learning_rate"],
                         seed=c["train"]["seed"], steps=len(losses), spikes=len(spikes), losses=losses,
                         spike_steps=[t + 1 for t in spikes], max_excess=max(excess) if excess else None,
                         final_loss=losses[-1] if losses else math.nan, diverged=not all(map(math.isfinite, losses))))
    require(runs, f"no finished runs in {cc.runs_dir}: train some (CLAIMS=4 bash claims.sh) first")
    summary, rows = [], []
    for lr in sorted({r["learning_rate"] for r in runs}):
        for ffn in sorted({r["ffn"] for r in runs if r["learning_rate"] == lr}):
            col = lambda k: [r[k] for r in runs if r["ffn"] == ffn and r["learning_rate"] == lr]  # noqa: E731
            s = dict(ffn=ffn, learning_rate=lr, seeds=col("seed"), spikes_per_seed=col("spikes"),
                     spikes_mean=statistics.mean(col("spikes")), final_loss_mean=statistics.mean(col("final_loss")),
                     max_excess=max((e for e in col("max_excess") if e is not None), default=None),
                     diverged=sum(col("diverged")))
            summary.append(s)
            rows.append(dict(ffn=ffn, lr=f"{lr:.2e}", seeds=" ".join(map(str, s["seeds"])),
                             spikes=" ".join(map(str, s["spikes_per_seed"])), mean=f"{s['spikes_mean']:.2f}",
                             max_excess="-" if s["max_excess"] is None else f"{s['max_excess']:+.3f}",
                             final=f"{s['final_loss_mean']:.3f}", diverged=str(s["diverged"])))
        plot(os.path.join(cc.plot_dir, f"stability_lr{lr:.0e}.png"), "step", "training loss",
             {f"{r['ffn']} s{r['seed']}": list(enumerate(r["losses"], 1)) for r in runs if r["learning_rate"] == lr},
             title=f"learning rate {lr:.2e}")
    table(rows, ["ffn", "lr", "seeds", "spikes", "mean", "max_excess", "final", "diverged"])
    print(f"# {SPIKE_DEFINITION}; W = {cc.spike_window}, margin = {cc.spike_margin} nats. spikes: per seed; "
          f"max_excess: the largest loss minus running median; plots: {cc.plot_dir}/stability_lr<lr>.png")
    return {"stability": dict(definition=SPIKE_DEFINITION, window=cc.spike_window, margin=cc.spike_margin,
                              runs_dir=cc.runs_dir, summary=summary, runs=runs)}


def claims_context(cc, device, ctx, keys_set):
    """Claim 7: distinct ids against context length (Heaps' law); the loss by position, STEM - SwiGLU."""
    data_dir, models = cc.data_dir, None
    if cc.ckpt:  # the data the two were trained on, which a --data_dir given must be
        given = (data_dir, load_meta(data_dir)) if "data_dir" in keys_set else None
        stem, _, data_dir, meta = load_model(cc, device, "ckpt", given)
        models = (stem, load_model(cc, device, "ckpt_swiglu", (data_dir, meta))[0])
        require(models[1].cfg.block_size == stem.cfg.block_size, f"the two checkpoints have block_size "
                f"{stem.cfg.block_size} and {models[1].cfg.block_size}: per-position losses need the same context")
    meta = load_meta(data_dir)
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.dtype(meta["dtype"]), mode="r")
    Ts = [16 * 2 ** i for i in range(40) if 16 * 2 ** i <= min(cc.context_max, len(data))]  # 16, 32, ...
    require(len(Ts) >= 2, f"{data_dir}/train.bin holds {len(data)} tokens: too few for windows of 16 and 32")
    rng = np.random.default_rng(0)
    D = [mean_distinct(data, T, cc.context_windows, rng) for T in Ts]
    k, beta = heaps_fit(Ts, D)
    table([dict(T=str(T), distinct=f"{d:.1f}", fraction=f"{d / T:.3f}", fit=f"{k * T ** beta:.1f}")
           for T, d in zip(Ts, D)], ["T", "distinct", "fraction", "fit"])
    print(f"# distinct ids (= table rows a STEM layer reads) in T tokens of {data_dir}/train.bin, mean over "
          f"{cc.context_windows} windows; Heaps fit D = k T^beta (log-log least squares): k {k:.3f}, beta {beta:.3f}")
    plot(os.path.join(cc.plot_dir, "context_distinct_ids.png"), "context length T (tokens)", "distinct ids in it",
         {"measured": list(zip(Ts, D)), f"fit {k:.2f} T^{beta:.3f}": [(T, k * T ** beta) for T in Ts],
          "T (all distinct)": [(T, T) for T in Ts]}, logx=True, logy=True)
    res = dict(data_dir=data_dir, windows=cc.context_windows, T=Ts, distinct=D, heaps_k=k, heaps_beta=beta)
    if models:
        B, gen = cc.batch_size, torch.Generator().manual_seed(0)
        batches = Batches(data_dir, meta, models[0].cfg.block_size, B, "cpu", seed=0)
        windows = [[t.to(device) for t in batches.get("val", gen, to_device=False)] for _ in range(cc.context_batches)]
        ls, ld = (torch.cat([position_losses(m, x, y, ctx) for x, y in windows]).numpy() for m in models)
        per_window = ls - ld  # (windows, T): STEM - SwiGLU, the same windows for both
        ls, ld, diff = ls.mean(0), ld.mean(0), per_window.mean(0)
        n_win, T = per_window.shape
        pos = np.arange(T)
        slopes, icpts = np.polyfit(pos, per_window.T, 1)  # a fit is linear in the data: the fit of the mean is
        slope, icpt = slopes.mean(), icpts.mean()  # the mean of the per-window fits, its standard error their spread
        se = float(slopes.std(ddof=1) / n_win ** 0.5) if n_win > 1 else float("nan")
        q, w = max(1, T // 4), max(1, T // 8)  # quarters; the table's blocks, eighths
        first, last = float(diff[:q].mean()), float(diff[-q:].mean())
        table([dict(positions=f"{a}-{min(T, a + w) - 1}", stem=f"{ls[a:a + w].mean():.4f}",
                    swiglu=f"{ld[a:a + w].mean():.4f}", diff=f"{diff[a:a + w].mean():+.4f}") for a in range(0, T, w)],
              ["positions", "stem", "swiglu", "diff"])
        grows = bool(slope < -2 * se)
        verdict = ("grows with position" if grows else "shrinks with position" if slope > 2 * se else
                   "shows no trend with position beyond 2 standard errors")
        print(f"# val loss per position (0: context of 1), mean over {cc.context_batches} x {B} windows of val.bin; "
              f"diff = STEM - SwiGLU (negative: STEM better); slope {slope:+.2e} ± {se:.1e} (standard error) nats "
              f"per position (first quarter {first:+.4f}, last {last:+.4f}): STEM's advantage {verdict}")
        fit = [(0, icpt), (T - 1, icpt + slope * (T - 1))]
        plot(os.path.join(cc.plot_dir, "context_loss_diff_by_position.png"), "position in the context",
             "val loss STEM - SwiGLU (nats)", {"STEM - SwiGLU": list(zip(pos.tolist(), diff.tolist())),
                                               f"fit, slope {slope:+.2e}": fit})
        res.update(windows_loss=cc.context_batches * B, loss_stem=ls.tolist(), loss_swiglu=ld.tolist(),
                   diff=diff.tolist(), mean_diff=float(diff.mean()), slope=float(slope), slope_se=se,
                   intercept=float(icpt), diff_first_quarter=first, diff_last_quarter=last, advantage_grows=grows,
                   verdict=verdict)
    print(f"# plots: {cc.plot_dir}/context_*.png")
    return {"context": res}


@torch.no_grad()
def greedy(model, ids, steps, device, ctx, stem_ids=None):
    """(the greedy continuation's tokens, the logits at every position of the prompt) for one prompt."""
    x = torch.tensor([ids], device=device)
    s = None if stem_ids is None else torch.tensor([stem_ids], device=device)
    with ctx:
        out = model.generate(x, steps, temperature=0, stem_ids=s)[0, len(ids):].tolist()
        logits, _ = model(x, x, stem_ids=s)  # with targets: the logits of every position (the loss is not used)
    return out, logits[0].float().cpu()


LOCALITY_ATTRIBUTE = "capital"  # the two-entity probes ask for this attribute (1 in 400 by chance)
LOCALITY_FIGURES = (  # (figure, the count it is a fraction of, what it is)
    ("unchanged", "pairs", "locality: C's answer unchanged by the edit A->B"),
    ("c_correct", "pairs", "  C answered correctly without the edit"),
    ("c_correct_edited", "pairs", "  C answered correctly with the edit"),
    ("control_unchanged", "control_pairs", "control: rows of D, E (not looked up) swapped: answer unchanged"),
    ("control_identical_logits", "control_pairs", "  logits at every prompt position bitwise identical"),
    ("positive_changed_logits", "positive_pairs", "positive control: rows of A, B swapped: prompt logits changed"))


def claims_locality(cc, device, ctx):
    """Claim 6: an edit of A changes A's facts, not C's in the same prompt; rows never looked up change nothing."""
    model, _, data_dir, _ = load_model(cc, device)
    facts, enc = load_facts(data_dir, "--mode locality needs one"), load_tokenizer(data_dir)
    probes = edit_probes(facts, enc)
    recall, edit = (fact_recall(model, enc, p, device, ctx)["recall"] for p in (facts["probes"], probes))
    model.eval()  # fact_recall leaves the model in train mode
    cap = {p["entity"]: p for p in facts["probes"] if p["attribute"] == LOCALITY_ATTRIBUTE}
    names, rng = sorted(cap), random.Random(0)
    n = dict.fromkeys(["pairs", "skipped", "control_pairs", "positive_pairs"] + [f[0] for f in LOCALITY_FIGURES], 0)
    toks = {m: enc.encode(" " + m) for m in names}

    def swappable(x, y):  # rows of the same number of tokens, none shared
        return len(toks[x]) == len(toks[y]) and not set(toks[x]) & set(toks[y])

    def swapped(x, y):  # the prompt's answer and logits with the table rows of entities x and y swapped
        swap_rows(model, toks[x], toks[y])
        out = greedy(model, ids, steps, device, ctx)
        swap_rows(model, toks[x], toks[y])  # back
        return out
    for _ in range(cc.locality_pairs):
        a, c, b = rng.sample(names, 3)
        prompt = cap[a]["prompt"] + cap[a]["answer"] + ". " + cap[c]["prompt"]
        ids, sids = enc.encode(prompt), enc.encode(re.sub(rf"\b{re.escape(a)}\b", b, prompt))  # sids: A read as B
        if len(ids) != len(sids) or len(ids) > model.cfg.block_size - 8:
            n["skipped"] += 1  # a swap that changes the token count has no position-wise edit
            continue
        steps = len(enc.encode(cap[c]["answer"]))
        plain, plain_logits = greedy(model, ids, steps, device, ctx)
        moved, _ = greedy(model, ids, steps, device, ctx, sids)
        n["pairs"] += 1
        n["unchanged"] += moved == plain
        n["c_correct"] += enc.decode(plain).startswith(cap[c]["answer"])
        n["c_correct_edited"] += enc.decode(moved).startswith(cap[c]["answer"])
        used = set(ids) | set(plain)  # every id the unedited run looks up (prompt, then its own answer)
        # control: swap the table rows of D and E, two entities whose tokens the run never looks up
        for _ in range(20):
            d, e = rng.sample([m for m in names if m not in (a, c)], 2)
            if swappable(d, e) and not set(toks[d] + toks[e]) & used:
                out, logits = swapped(d, e)
                n["control_pairs"] += 1
                n["control_unchanged"] += out == plain
                n["control_identical_logits"] += bool(torch.equal(logits, plain_logits))
                break
        if swappable(a, b):  # positive control: the same row swap on A, whose tokens are in the prompt
            n["positive_pairs"] += 1
            n["positive_changed_logits"] += not torch.equal(swapped(a, b)[1], plain_logits)
    require(n["pairs"] > 0, f"no two-entity probe of {data_dir} keeps its token count under the edit")
    loc = dict(n, fact_recall=recall, edit_success=edit, edit_probes=len(probes),
               **{k: n[k] / n[of] if n[of] else None for k, of, _ in LOCALITY_FIGURES})  # counts -> fractions
    table([dict(what=w, value="-" if loc[k] is None else f"{loc[k]:.3f}", n=str(m)) for w, k, m in [
        ("fact recall (all probes)", "fact_recall", len(facts["probes"])),
        ("edit success: A's prompt with B's rows answers B's fact", "edit_success", len(probes))]
        + [(w, k, n[of]) for k, of, w in LOCALITY_FIGURES]], ["what", "value", "n"])
    print(f"# probes '{cap[names[0]]['prompt']}{cap[names[0]]['answer']}. <C's>' -> C's {LOCALITY_ATTRIBUTE}; the edit "
          f"reads A's tokens through B's rows (sample.py --edit); {n['skipped']} triples skipped (token count "
          f"changes). Control: rows never looked up cannot change anything: 1.0 exactly is expected, not a measurement")
    if model.stem_layers[0] == model.cfg.n_layer - 1:
        print(f"# note: the first table layer is the last layer ({model.stem_layers[0]}): no attention follows it, so "
              f"an edit cannot reach C's positions and locality is 1.0 by construction here")
    return {"locality": loc}


# -----------------------------------------------------------------------------
# what a user judges a model by (evals.py): multiple choice and needle in a haystack, one model or a pair


def load_pair(cc, device):
    """({name: model in eval mode} of --ckpt and, if given, --ckpt_swiglu on the same data), the data folder."""
    model, _, data_dir, meta = load_model(cc, device, any_ffn=True)
    require(not cc.ckpt_swiglu or model.cfg.ffn != "swiglu", f"{cc.ckpt} is SwiGLU as well: give the STEM run as "
            f"--ckpt and its SwiGLU twin as --ckpt_swiglu (swapped?)")
    models = {model.cfg.ffn: model}
    if cc.ckpt_swiglu:
        models["swiglu"] = load_model(cc, device, "ckpt_swiglu", (data_dir, meta))[0]
    return models, data_dir


def last_json(path, mode):
    try:
        return json.loads(open(path).read().strip().splitlines()[-1])[mode]
    except (ValueError, IndexError, KeyError, TypeError):
        raise UserError(f"{path} does not end in a JSON line of --mode {mode} (unfinished?): delete it, run claims.sh "
                        f"again") from None


SEED_FIGURES = [  # (mode, what it shows, {figure in the mode's JSON line (spread: ROWS_STAT): format})
    ("spread", "claim 5: pairwise |cos| of the rows, headline layer",
     {f"{k}_{q}": ".4f" for k in ("trained", "init", "random", "swiglu_up") for q in ("median", "p95")}),
    ("locality", "claim 6: edits on facts data", dict.fromkeys(
        ("fact_recall", "edit_success", "unchanged", "c_correct", "c_correct_edited", "control_unchanged"), ".4f")),
    ("context", "claim 7: val loss STEM - SwiGLU by position (negative: STEM better; slope < 0: the gap grows)",
     dict(mean_diff="+.4f", diff_first_quarter="+.4f", diff_last_quarter="+.4f", slope="+.2e", heaps_beta=".3f")),
    ("needle", "claim 10: needle accuracy STEM - SwiGLU by context (positive: STEM better; slope > 0: the gap grows)",
     dict(mean_diff="+.3f", diff_shortest="+.3f", diff_longest="+.3f", diff_slope="+.3f"))]


def claims_summary(cc):
    """claims.sh's outputs, one line per figure, mean ± sd over the seeds."""
    d, res = cc.claims_dir, {}
    require(os.path.isdir(d), f"claims_dir={d}: no such folder (bash claims.sh writes runs/claims)")
    if os.path.isfile(os.path.join(d, "quality.txt")):
        print("claims 1-3: see quality.txt (val loss, recall and edit success per model, mean ± sd over seeds)")
        res["quality"] = last_json(os.path.join(d, "quality.txt"), "quality")
    if os.path.isfile(os.path.join(d, "stability.txt")):
        st = last_json(os.path.join(d, "stability.txt"), "stability")
        res["stability"] = st["summary"]
        print(f"claim 4: loss spikes per run ({st['definition']}; W {st['window']}, margin {st['margin']} nats)")
        for s in st["summary"]:
            print(f"  {s['ffn']:9s} lr {s['learning_rate']:.2e}: spikes per seed {s['spikes_per_seed']}, "
                  f"mean {s['spikes_mean']:.2f}")
    for mode, what, figures in SEED_FIGURES:
        groups = {}  # arch -> the JSON lines of MODE-ARCH-sSEED.txt
        for p in sorted(glob.glob(os.path.join(d, f"{mode}-*-s*.txt"))):
            groups.setdefault(os.path.basename(p)[len(mode) + 1:].rsplit("-s", 1)[0], []).append(last_json(p, mode))
        for arch, outs in groups.items():
            print(f"{what}; {arch}, {len(outs)} seed(s)")
            outs = [dict(o, **{f"{k}_{q}": x for k, v in o.items() if isinstance(v, dict) for q, x in v.items()})
                    for o in outs]  # spread: {"trained": {"median": x}} -> trained_median
            for name, f in figures.items():
                vals = [o[name] for o in outs if o.get(name) is not None]  # mean ± sd (0 for one value) of these
                s = res.setdefault(mode, {}).setdefault(arch, {})[name] = dict(
                    mean=statistics.mean(vals), sd=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    per_seed=vals) if vals else None
                if s:
                    print(f"  {name:20s} {s['mean']:{f}} ± {s['sd']:{f.lstrip('+')}}   per seed: "
                          + " ".join(f"{v:{f}}" for v in s["per_seed"]))
    require(res, f"{d} holds none of claims.sh's outputs (quality.txt, stability.txt, MODE-ARCH-sSEED.txt)")
    return {"summary": res}


def check_config(cc):
    """Every value in range before anything is read or written: one error line otherwise."""
    require(cc.mode in MODES, f"mode={cc.mode!r} is not one of {', '.join(MODES)} (speed and memory: python bench.py)")
    for k, lo in dict(batch_size=1, spread_tokens=1, spike_window=1, context_windows=1, context_batches=1,
                      locality_pairs=1, spread_ids=2, context_max=32, mc_limit=0, needle_trials=1).items():
        # (spread_ids: |cos| of pairs; context_max: T = 16 and 32)
        require(getattr(cc, k) >= lo, f"{k}={getattr(cc, k)} must be at least {lo}")
    require(cc.spike_margin > 0, f"spike_margin={cc.spike_margin} must be positive (nats)")
    require(cc.ckpt or cc.mode not in ("spread", "locality", "mc", "needle"),
            f"--mode {cc.mode} needs --ckpt={'RUN' if cc.mode in ('mc', 'needle') else 'STEM_RUN'} (or a ckpt.pt)")
    require(cc.mode != "context" or bool(cc.ckpt) == bool(cc.ckpt_swiglu), "--mode context compares two checkpoints: "
            "give both --ckpt and --ckpt_swiglu, or neither (distinct ids only)")
    for k in ("ckpt", "ckpt_swiglu") if cc.mode in ("spread", "context", "locality", "mc", "needle") else ():
        path = getattr(cc, k)
        require(not path or os.path.isfile(ckpt_file(path)), f"{k}={path}: no checkpoint there (ckpt.pt or its folder)")
    require(not os.path.isfile(cc.plot_dir), f"plot_dir={cc.plot_dir} is a file: choose a folder")
    for k in ("mc_file", "input"):
        require(not getattr(cc, k) or os.path.isfile(getattr(cc, k)), f"{k}={getattr(cc, k)}: no such file")
    evals.parse_floats(cc.needle_depths, "needle_depths", 0, 1)


def main(argv):
    cc = ClaimsConfig()
    keys_set = parse_config(argv, cc, doc=__doc__)
    check_config(cc)
    device, _, ctx, note = resolve_device(cc.device, cc.dtype)
    print(f"# nanoSTEM claims --mode {cc.mode} | {note} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    res = dict(curves=lambda: claims_curves(cc), quality=lambda: claims_quality(cc),
               stability=lambda: claims_stability(cc), summary=lambda: claims_summary(cc),
               spread=lambda: claims_spread(cc, device, ctx), locality=lambda: claims_locality(cc, device, ctx),
               context=lambda: claims_context(cc, device, ctx, keys_set),
               mc=lambda: evals.mc_mode(cc, *load_pair(cc, device), device, ctx),
               needle=lambda: evals.needle_mode(cc, *load_pair(cc, device), device, ctx))[cc.mode]()
    res.update(mode=cc.mode, device=note, torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    print(json.dumps(res))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        die(str(e))
