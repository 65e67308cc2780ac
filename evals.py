"""
What a user judges a model by besides its validation loss: multiple choice (HellaSwag's format, or a set made from
the facts world) and needle in a haystack (retrieving a number from the context, by context length and depth).
The scorers and their plots; claims.py runs them, on one checkpoint or a STEM/SwiGLU pair side by side:

    python claims.py --mode mc --ckpt=out --ckpt_swiglu=out-swiglu          # facts world: its probes, 4 choices
    python claims.py --mode mc --ckpt=RUN --mc_file=hellaswag_val.jsonl     # HellaSwag as distributed
    python claims.py --mode needle --ckpt=RUN [--ckpt_swiglu=RUN] [--input=filler.txt]

Multiple choice is scored as build-nanogpt scores HellaSwag: each ending's cross-entropy given the context, acc by
the lowest sum over the ending's tokens, acc_norm by the lowest mean. The needle task's world (filler, needle,
question) is prepare_data.py's, so a model trained on `prepare_data.py --dataset needle` sees the same wording.
"""

import json
import math
import os
import random
import re

import numpy as np
import torch
import torch.nn.functional as F

from bench import table
from common import load_facts, pyplot
from configurator import UserError, require
from prepare_data import QUESTION, filler_sentences, haystack, needle_fact
from tokenizer import load_tokenizer

# -----------------------------------------------------------------------------
# multiple choice


def read_mc_file(path):
    """HellaSwag-format items, one JSON object per line: ctx (text), endings (texts, no leading space), label."""
    items = []
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read mc_file={path} ({e}): give a .jsonl file in HellaSwag's format") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            o = json.loads(line)
            item = dict(ctx=o["ctx"], endings=o["endings"], label=int(o["label"]))
            assert isinstance(item["ctx"], str) and item["ctx"].strip() and isinstance(item["endings"], list)
            assert len(item["endings"]) >= 2 and all(isinstance(e, str) and e.strip() for e in item["endings"])
            assert 0 <= item["label"] < len(item["endings"])
        except (ValueError, KeyError, TypeError, AssertionError):
            raise UserError(f"{path}:{i} is not a multiple-choice item: each line must be a JSON object with ctx "
                            "(text), endings (a list of two or more texts) and label (the right one's index)") from None
        items.append(item)
    require(items, f"mc_file={path} holds no items")
    return items


def facts_mc_items(facts, choices=4, seed=0):
    """One item per facts probe: its prompt, the answer among choices - 1 other values of the same attribute."""
    rng, items = random.Random(seed), []
    values = {a: sorted({e[a] for e in facts["entities"]}) for a in {p["attribute"] for p in facts["probes"]}}
    for p in facts["probes"]:
        answer = p["answer"].strip()
        others = [v for v in values[p["attribute"]] if v != answer]
        endings = rng.sample(others, min(choices - 1, len(others))) + [answer]
        rng.shuffle(endings)
        items.append(dict(ctx=p["prompt"], endings=endings, label=endings.index(answer)))
    return items


@torch.no_grad()
def ending_losses(model, ctx_ids, endings_ids, device, ctx):
    """(summed, mean) cross-entropy of each ending's tokens, each given the context and the ending's tokens before
    it: all endings in one forward pass, padded at the end (a causal model never sees the padding)."""
    T = model.cfg.block_size
    rows = [(ctx_ids + e)[-(T + 1):] for e in endings_ids]  # a long context loses its beginning
    L = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), L, dtype=torch.long)
    y = torch.full((len(rows), L), -1, dtype=torch.long)  # -1: no target (context and padding)
    for i, (r, e) in enumerate(zip(rows, endings_ids)):
        n = min(len(e), len(r) - 1)
        x[i, :len(r) - 1] = torch.tensor(r[:-1])
        y[i, len(r) - 1 - n:len(r) - 1] = torch.tensor(r[-n:])
    x, y = x.to(device), y.to(device)
    with ctx:
        logits, _ = model(x, y)  # with targets the model returns the logits of every position
    ce = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")  # 0 where no target
    sums = ce.sum(1)
    return sums.cpu(), (sums / (y >= 0).sum(1)).cpu()


def score_mc(model, enc, items, device, ctx):
    """{acc, acc_norm, n, chance} of the model on the items (context = encode(ctx), endings = encode(" " + e))."""
    model.eval()
    right = right_norm = 0
    for it in items:
        sums, means = ending_losses(model, enc.encode(it["ctx"]), [enc.encode(" " + e) for e in it["endings"]],
                                    device, ctx)
        right += int(sums.argmin()) == it["label"]
        right_norm += int(means.argmin()) == it["label"]
    n = len(items)
    return dict(acc=right / n, acc_norm=right_norm / n, n=n,
                chance=sum(1 / len(it["endings"]) for it in items) / n)


def draw_mc(path, scores):
    """Bars of acc and acc_norm per model, with chance as a line."""
    plt = pyplot(path)
    if plt is None:
        return
    names = list(scores)
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(names), 3.2))
    xs = np.arange(len(names))
    for k, (key, off) in enumerate([("acc", -0.2), ("acc_norm", 0.2)]):
        bars = ax.bar(xs + off, [scores[m][key] for m in names], 0.38, label=key, color=f"C{k}")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.axhline(scores[names[0]]["chance"], color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(xs, names)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel(f"accuracy ({scores[names[0]]['n']} items)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------
# needle in a haystack


def text_sentences(text):
    """A text's sentences (split after . ! or ?, whitespace collapsed): a user's own filler."""
    return [s for s in (" ".join(p.split()) for p in re.split(r"(?<=[.!?])\s+", text)) if s]


def needle_prompt(enc, filler, rng, context, depth, eot):
    """(prompt ids, number): <|endoftext|>, filler sentences from a random place in `filler` with the needle after
    round(depth * count) of them, and the question; prompt and answer fit in `context` tokens, the filler fills it
    to within a sentence."""
    name, number = needle_fact(rng)
    budget = context - len(enc.encode(f" {number}.")) - 1  # the answer, and the <|endoftext|> in front
    start, sents = rng.randrange(len(filler)), []
    question = QUESTION.format(name=name)
    used = len(enc.encode(" ".join(haystack([], [(name, number, 0)]) + [question])))
    while len(sents) < len(filler):
        used += len(enc.encode(" " + filler[(start + len(sents)) % len(filler)]))
        if used > budget:
            break
        sents.append(filler[(start + len(sents)) % len(filler)])
    while True:  # token counts of pieces may differ by one from the whole's: trim until it fits
        ids = enc.encode(" ".join(haystack(sents, [(name, number, depth)]) + [question]))
        if len(ids) <= budget or not sents:
            break
        sents.pop()
    require(len(ids) <= budget, f"needle context {context} is too short for the needle and the question "
            f"({len(ids) + context - budget} tokens): give longer --needle_contexts")
    return [eot] + ids, number


@torch.no_grad()
def needle_accuracy(model, enc, filler, contexts, depths, trials, device, ctx, seed=0):
    """acc[i][j]: the fraction of `trials` prompts of context i with the needle at depth j whose greedy answer is
    the number (the continuation starts with " NUMBER", no further digit). The same prompts for every model."""
    model.eval()
    acc = []
    for i, c in enumerate(contexts):
        row = []
        for j, d in enumerate(depths):
            rng, hits = random.Random(f"{seed}-{c}-{d}"), 0
            for _ in range(trials):
                ids, number = needle_prompt(enc, filler, rng, c, d, enc.eot_token)
                with ctx:
                    out = model.generate(torch.tensor([ids], device=device), len(enc.encode(f" {number}.")),
                                         temperature=0)
                hits += bool(re.match(rf" {number}(?!\d)", enc.decode(out[0, len(ids):].tolist())))
            row.append(hits / trials)
        acc.append(row)
    return acc


def needle_summary(contexts, acc, acc_swiglu=None):
    """Accuracy per context (mean over depths); with a SwiGLU model, STEM - SwiGLU per context and its slope
    per doubling of the context (positive: STEM's advantage grows with context)."""
    res = dict(acc_by_context=[float(np.mean(r)) for r in acc])
    if acc_swiglu is not None:
        res["acc_by_context_swiglu"] = [float(np.mean(r)) for r in acc_swiglu]
        diff = [a - b for a, b in zip(res["acc_by_context"], res["acc_by_context_swiglu"])]
        slope = float(np.polyfit(np.log2(contexts), diff, 1)[0]) if len(contexts) > 1 else None
        res.update(diff_by_context=diff, mean_diff=float(np.mean(diff)), diff_shortest=diff[0], diff_longest=diff[-1],
                   diff_slope=slope)
    return res


def draw_needle(path, contexts, depths, accs):
    """Heatmaps of accuracy (context x depth), one per model, and the first minus the second when there are two."""
    plt = pyplot(path)
    if plt is None:
        return
    panels, diff_name = list(accs.items()), " - ".join(accs)
    if len(panels) == 2:
        panels.append((diff_name, (np.array(panels[0][1]) - np.array(panels[1][1])).tolist()))
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 3.2 * len(panels), 0.9 + 0.45 * len(contexts)),
                             squeeze=False)
    for ax, (name, a) in zip(axes[0], panels):
        diff = len(panels) == 3 and name == diff_name
        im = ax.imshow(np.array(a), cmap="RdBu" if diff else "viridis", vmin=-1 if diff else 0, vmax=1,
                       aspect="auto", origin="lower")
        for (i, j), v in np.ndenumerate(np.array(a)):
            ax.text(j, i, f"{v:+.2f}" if diff else f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if diff or v > 0.5 else "white")
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(contexts)), [str(c) for c in contexts])
        ax.set_xlabel("needle depth (0: first sentence)")
        ax.set_ylabel("context (tokens)")
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def shortest_context(enc, filler):
    """The shortest context worth measuring: <|endoftext|>, four filler sentences with the needle, the question,
    the answer (so that the five default depths are five different places)."""
    name, number = needle_fact(random.Random(0))
    sents = haystack(filler[:4], [(name, number, 0.5)]) + [QUESTION.format(name=name)]
    return 1 + len(enc.encode(" ".join(sents))) + len(enc.encode(f" {number}."))


def needle_contexts(text, block_size, shortest):
    """The contexts to measure, sorted: --needle_contexts, or block_size / 8, / 4, / 2 and block_size itself
    where they are at least `shortest`."""
    if not text:
        contexts = [block_size >> k for k in (3, 2, 1, 0) if block_size >> k >= shortest]
        require(contexts, f"block_size {block_size} is too short for the needle task: its prompts take at least "
                f"{shortest} tokens")
        return contexts
    contexts = parse_floats(text, "needle_contexts")
    require(all(c == int(c) for c in contexts), f"needle_contexts={text!r}: give whole numbers of tokens")
    require(all(shortest <= c <= block_size for c in contexts), f"needle_contexts={text!r}: each must be at least "
            f"{shortest} (the needle, the question, four filler sentences) and at most block_size {block_size}")
    return sorted({int(c) for c in contexts})


def parse_floats(text, key, lo=-math.inf, hi=math.inf):
    """A comma list of numbers in [lo, hi], or one error line naming the key."""
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    require(vals and all(lo <= v <= hi for v in vals), f"{key}={text!r}: give numbers in [{lo:g}, {hi:g}] "
            f"separated by commas")
    return vals


def generated_filler(n=4096, seed=0):
    return filler_sentences(random.Random(seed), n)


# -----------------------------------------------------------------------------
# the two modes of claims.py: models = {name: model} (--ckpt, and --ckpt_swiglu if given), their data folder


def mc_mode(cc, models, data_dir, device, ctx):
    """claims.py --mode mc: HellaSwag's format (--mc_file), or the facts world's probes among three distractors."""
    enc = load_tokenizer(data_dir)
    if cc.mc_file:
        items, source = read_mc_file(cc.mc_file), cc.mc_file
    else:
        items = facts_mc_items(load_facts(data_dir, "--mode mc without --mc_file needs one"))
        source = os.path.join(data_dir, "facts.json")
    items = items[:cc.mc_limit or None]
    scores = {name: score_mc(m, enc, items, device, ctx) for name, m in models.items()}
    table([dict(model=k, acc=f"{v['acc']:.4f}", acc_norm=f"{v['acc_norm']:.4f}", n=str(v["n"]),
                chance=f"{v['chance']:.4f}") for k, v in scores.items()], ["model", "acc", "acc_norm", "n", "chance"])
    print(f"# {source}: acc picks the ending of lowest summed loss, acc_norm of lowest loss per token")
    draw_mc(os.path.join(cc.plot_dir, "mc.png"), scores)
    print(f"# plot: {cc.plot_dir}/mc.png")
    (first, res), *twin = scores.items()
    res = dict(res, source=source, model=first)
    for _, v in twin:
        res.update(acc_swiglu=v["acc"], acc_norm_swiglu=v["acc_norm"])
    return {"mc": res}


def needle_mode(cc, models, data_dir, device, ctx):
    """claims.py --mode needle: accuracy by context length x depth, per model; with a pair, the difference."""
    enc, T = load_tokenizer(data_dir), min(m.cfg.block_size for m in models.values())
    try:
        filler = text_sentences(open(cc.input, encoding="utf-8").read()) if cc.input else generated_filler()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"input={cc.input}: cannot read it as UTF-8 text ({e}): give a text file as filler") from None
    require(len(filler) >= 4, f"input={cc.input} holds {len(filler)} sentences: the filler needs at least 4")
    contexts = needle_contexts(cc.needle_contexts, T, shortest_context(enc, filler))
    depths = sorted(set(parse_floats(cc.needle_depths, "needle_depths", 0, 1)))
    accs = {name: needle_accuracy(m, enc, filler, contexts, depths, cc.needle_trials, device, ctx)
            for name, m in models.items()}
    for name, acc in accs.items():
        print(f"# {name}: accuracy by context (rows) and needle depth (columns), {cc.needle_trials} prompts each")
        table([dict(context=str(c), **{f"{d:g}": f"{a:.2f}" for d, a in zip(depths, row)}, mean=f"{np.mean(row):.3f}")
               for c, row in zip(contexts, acc)], ["context"] + [f"{d:g}" for d in depths] + ["mean"])
    (first, acc), *twin = accs.items()
    res = dict(contexts=contexts, depths=depths, acc=acc, trials=cc.needle_trials, model=first,
               filler=cc.input or "generated")
    if twin:
        res["acc_swiglu"] = twin[0][1]
    res.update(needle_summary(contexts, acc, res.get("acc_swiglu")))
    if twin:
        slope = "" if res["diff_slope"] is None else f"; slope {res['diff_slope']:+.3f} per doubling of the context"
        print(f"# {first} - swiglu by context: " + ", ".join(f"{c}: {d:+.3f}" for c, d in zip(contexts,
              res["diff_by_context"])) + slope)
    draw_needle(os.path.join(cc.plot_dir, "needle.png"), contexts, depths, accs)
    print(f"# plot: {cc.plot_dir}/needle.png")
    return {"needle": res}
