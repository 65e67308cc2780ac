"""claims.py: the pure functions against independent references; curves, quality, stability and summary on
hand-written (or copied) runs and outputs, checked against numbers computed here; spread, context and locality
on tiny trained runs. The modes run in-process; one subprocess checks the error line."""
import json
import math
import os
import shutil
import statistics
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from conftest import TINY, _train_inproc, assert_user_error, run, tiny_config

import claims
from common import Batches, load_checkpoint, load_meta, model_from_checkpoint
from configurator import UserError
from model import GPT


def claims_json(capsys, *args):
    capsys.readouterr()
    claims.main(list(args))
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), out


@pytest.fixture(scope="module")
def stem_run(trained):
    """conftest's tiny STEM run (2 layers, the table in the last), 6 steps, evaluated at 3 and 6: read only."""
    return trained[0]


@pytest.fixture(scope="module")
def swiglu_run(facts, tmp_path_factory):
    """The same with SwiGLU FFNs (same data, same steps)."""
    out = str(tmp_path_factory.mktemp("swiglu"))
    _train_inproc(f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=3", "--ffn=swiglu",
                  *TINY)
    return out


@pytest.fixture(scope="module")
def deep_stem(facts, tmp_path_factory):
    """A 3-layer STEM run with a table in layer 1: attention in layer 2 carries an edit to other positions."""
    out = str(tmp_path_factory.mktemp("deep"))
    _train_inproc(f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=6", "--eval_interval=6", *TINY,
                  "--n_layer=3", "--stem_layers=1")
    return out


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ---- pure functions against independent references


def direct_stats(x):
    """|cos| of every pair by a double loop; median and linear-interpolated 95th percentile by hand."""
    vals = []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            ni, nj = math.sqrt(sum(v * v for v in x[i])), math.sqrt(sum(v * v for v in x[j]))
            vals.append(abs(sum(a * b for a, b in zip(x[i], x[j]))) / (ni * nj))
    vals.sort()
    n = len(vals)
    median = vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2
    r = 0.95 * (n - 1)
    lo = int(math.floor(r))
    p95 = vals[lo] + (r - lo) * (vals[min(lo + 1, n - 1)] - vals[lo])
    return median, p95


def test_pairwise_abs_cos_stats_against_a_double_loop():
    rng = np.random.default_rng(3)
    for n, d in ((2, 3), (7, 5), (10, 4)):  # n(n-1)/2 = 1, 21 (odd count), 45 pairs
        x = rng.normal(size=(n, d)) + 0.3  # a shared offset: |cos| well away from 0
        s = claims.pairwise_abs_cos_stats(x)
        median, p95 = direct_stats(x.tolist())
        assert abs(s["median"] - median) < 1e-12 and abs(s["p95"] - p95) < 1e-12, (n, s, median, p95)
    assert claims.pairwise_abs_cos_stats(np.eye(5) * 3) == dict(median=0.0, p95=0.0)  # orthogonal rows
    ones = claims.pairwise_abs_cos_stats(np.array([[1.0, 2.0], [-2.0, -4.0], [0.5, 1.0]]))  # parallel, either sign
    assert abs(ones["median"] - 1) < 1e-12 and abs(ones["p95"] - 1) < 1e-12
    assert len(claims.pairwise_abs_cos(rng.normal(size=(6, 3)))) == 15
    with pytest.raises(ValueError):
        claims.pairwise_abs_cos_stats(np.ones((1, 4)))


def test_heaps_fit_and_mean_distinct_on_known_sequences():
    T = [16 * 2 ** i for i in range(9)]
    k, beta = claims.heaps_fit(T, [3 * t ** 0.6 for t in T])
    assert abs(k - 3) < 1e-9 and abs(beta - 0.6) < 1e-12
    noisy = [3 * t ** 0.6 * math.exp(0.05 * math.sin(7 * i)) for i, t in enumerate(T)]  # +-5% wiggle
    k, beta = claims.heaps_fit(T, noisy)
    assert abs(beta - 0.6) < 0.02 and abs(k - 3) < 0.3
    rng = np.random.default_rng(0)
    assert claims.mean_distinct(np.arange(5000), 256, 20, rng) == 256  # all distinct: D = T
    assert claims.mean_distinct(np.arange(5000) % 7, 64, 20, rng) == 7  # period 7: D = 7 for T >= 7
    assert claims.mean_distinct(np.arange(5000) % 7, 3, 20, rng) == 3
    # windows holding exactly min(T, 100) ids: beta 1 below 100
    D = [claims.mean_distinct(np.arange(5000) % 100, t, 10, rng) for t in (16, 32, 64)]
    k, beta = claims.heaps_fit([16, 32, 64], D)
    assert abs(beta - 1) < 1e-12 and abs(k - 1) < 1e-9


def test_count_spikes_on_a_hand_made_loss_list():
    nan = float("nan")
    #         0    1    2    3    4    5    6    7    8    9   10   11   12   13
    losses = [9.0, 5.0, 5.0, 5.0, 5.0, 5.6, 5.0, 5.0, 5.5, 5.4, nan, 5.0, 6.0, 5.2]
    # window 3, margin 0.5: t=3 (median of 9,5,5 = 5): 5.0 no; t=5: 5.6 > 5 + 0.5 yes; t=8: 5.5 is not above 5.5;
    # t=9: 5.4 no; t=10: not finite, yes; t=11: median of the finite 5.5, 5.4 = 5.45, 5.0 no;
    # t=12: median of 5.4, 5.0 = 5.2, 6.0 > 5.7 yes; t=13: median of 5.0, 6.0 = 5.5, 5.2 no. Steps 0-2: never.
    assert claims.count_spikes(losses, window=3, margin=0.5) == [5, 10, 12]
    # margin 0.05: also t=8 (5.5 > 5.0 + 0.05) and t=9 (median of 5.0, 5.0, 5.5 = 5.0; 5.4 > 5.05)
    assert claims.count_spikes(losses, window=3, margin=0.05) == [5, 8, 9, 10, 12]
    assert claims.count_spikes(losses, window=20, margin=0.5) == []  # shorter than the window
    assert claims.count_spikes([10.0 - 0.1 * i for i in range(50)]) == []  # a falling loss has none
    ex = dict(claims.running_excess(losses, 3))
    assert ex[10] == math.inf and abs(ex[5] - 0.6) < 1e-12 and abs(ex[12] - 0.8) < 1e-12


def test_position_losses_average_to_the_model_loss():
    model = GPT(tiny_config(block_size=8)).eval()
    x, y = torch.randint(0, 50, (5, 8)), torch.randint(0, 50, (5, 8))
    pl = claims.position_losses(model, x, y, nullcontext(), chunk=2)  # chunks of 2, 2, 1 windows
    assert pl.shape == (5, 8) and pl.dtype == torch.float64
    assert abs(pl.mean().item() - model(x, y)[1].item()) < 1e-5
    assert torch.allclose(pl[3], claims.position_losses(model, x[3:4], y[3:4], nullcontext())[0])


def test_swap_rows_acts_only_where_the_rows_are_read():
    model = GPT(tiny_config(n_layer=3, stem_layers="1")).eval()  # attention in layer 2 follows the table
    before = [f.table.detach().clone() for f in model.stem_ffns()]
    x = torch.tensor([[1, 2, 3, 4, 5, 6]])
    base = model(x, x)[0]
    claims.swap_rows(model, [40, 41], [42, 43])  # ids not in x
    assert torch.equal(model.stem_ffns()[0].table[40], before[0][42])
    assert torch.equal(model(x, x)[0], base)  # bitwise: rows never read change nothing
    claims.swap_rows(model, [40, 41], [42, 43])  # twice restores
    assert all(torch.equal(f.table, b) for f, b in zip(model.stem_ffns(), before))
    claims.swap_rows(model, [2], [30])  # id 2 is at position 1
    changed = (model(x, x)[0] - base).abs().amax(-1)[0]
    assert changed[0] == 0 and (changed[1:] > 0).all()  # causal: position 0 untouched, 1 and after change


# ---- runs compared: curves, quality, stability, summary


def test_curves_mode_on_hand_written_metrics(tmp_path, capsys, monkeypatch):
    a, b, c = (str(tmp_path / n) for n in "abc")
    def ev(it, tok, vl, **kw):
        return dict(kind="eval", iter=it, tokens=tok, train_loss=9.0, val_loss=vl, **kw)
    write_jsonl(f"{a}/metrics.jsonl", [ev(0, 0, 5.0, recall=0.1), dict(kind="train", iter=1, loss=5.0),
                                       ev(20, 1280, 4.1, recall=0.5), ev(10, 640, 3.9, recall=0.3)])  # out of order
    write_jsonl(f"{b}/metrics.jsonl", [ev(0, 0, 5.1, recall=0.1), [1, 2], {"iter": 5}, dict(kind="eval", tokens=9),
                                       "text", None, ev(10, 1280, 4.2, recall=0.2)])  # 2x the batch; 5 lines not rows
    write_jsonl(f"{c}/metrics.jsonl", [ev(10, 640, 4.4)])  # not facts data: no recall
    drawn = {}
    monkeypatch.setattr(claims, "plot", lambda path, x, y, series, **kw: drawn.__setitem__(os.path.basename(path),
                                                                                          series))
    res, out = claims_json(capsys, "--mode=curves", f"--runs={a},{b},{c}", f"--plot_dir={tmp_path / 'plots'}")
    assert f"note: {b}/metrics.jsonl: 5 unreadable line(s) dropped" in out
    assert res["curves"][a] == [dict(iter=0, tokens=0, val_loss=5.0, recall=0.1),
                                dict(iter=10, tokens=640, val_loss=3.9, recall=0.3),
                                dict(iter=20, tokens=1280, val_loss=4.1, recall=0.5)]
    assert res["curves"][c] == [dict(iter=10, tokens=640, val_loss=4.4)]
    assert res["final"][a] == dict(iter=20, tokens=1280, val_loss=4.1, recall=0.5, best_val_loss=3.9)
    assert res["final"][b]["best_val_loss"] == 4.2
    table = [[v.strip() for v in line.split("|")] for line in out.splitlines()[2:7]]  # after the header and the note
    assert table[0] == ["step", "tokens", f"val {a}", f"val {b}", f"val {c}", f"recall {a}", f"recall {b}"]
    assert table[2] == ["0", "0", "5.0000", "5.1000", "-", "0.100", "0.100"]
    assert table[3] == ["10", "640 / 1,280", "3.9000", "4.2000", "4.4000", "0.300", "0.200"]
    assert table[4] == ["20", "1,280", "4.1000", "-", "-", "0.500", "-"]
    # the plots: by tokens, each run its own line; recall only for the runs that have it
    assert set(drawn) == {"curves_val_vs_tokens.png", "curves_recall_vs_tokens.png"}
    assert drawn["curves_val_vs_tokens.png"] == {a: [(0, 5.0), (640, 3.9), (1280, 4.1)], b: [(0, 5.1), (1280, 4.2)],
                                                 c: [(640, 4.4)]}
    assert drawn["curves_recall_vs_tokens.png"] == {a: [(0, 0.1), (640, 0.3), (1280, 0.5)], b: [(0, 0.1), (1280, 0.2)]}
    write_jsonl(f"{tmp_path}/d/metrics.jsonl", [dict(kind="train", iter=1, loss=5.0)])
    for runs, needle in ((f"{a},{a}", "twice"), ("", "needs --runs"), (f"{a},{tmp_path}/none", "no metrics.jsonl"),
                         (f"{tmp_path}/d", "no evaluation yet")):
        with pytest.raises(UserError, match=needle):
            claims.main(["--mode=curves", f"--runs={runs}", f"--plot_dir={tmp_path}"])


def test_quality_mode_groups_seeds(stem_run, swiglu_run, facts, tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, src in (("facts-swiglu-s1", swiglu_run), ("facts-swiglu-s2", swiglu_run), ("facts-stem-s1", stem_run)):
        shutil.copytree(src, runs / name)
    rows = [json.loads(line) for line in open(runs / "facts-swiglu-s2" / "metrics.jsonl")]
    rows[max(i for i, r in enumerate(rows) if r["kind"] == "eval")]["val_loss"] = 7.25  # seed 2's last evaluation
    write_jsonl(str(runs / "facts-swiglu-s2" / "metrics.jsonl"), rows)
    write_jsonl(str(runs / "facts-stem-s2" / "metrics.jsonl"), [])  # interrupted before its first checkpoint
    (runs / "notes").mkdir()
    _train_inproc(f"--data_dir={facts}", f"--out_dir={runs / 'facts-stem-s3'}", "--max_iters=0", *TINY)
    res, out = claims_json(capsys, "--mode=quality", f"--runs_dir={runs}", f"--plot_dir={tmp_path / 'plots'}")
    assert "# skipping facts-stem-s2: unfinished (no checkpoint yet)" in out
    assert "# skipping facts-stem-s3: trained 0 steps" in out
    q = {r["arch"]: r for r in res["quality"]}
    assert set(q) == {"swiglu", "stem"} and (q["swiglu"]["seeds"], q["stem"]["seeds"]) == (2, 1)
    ev = [json.loads(line) for line in open(os.path.join(swiglu_run, "metrics.jsonl"))]
    ev = [r for r in ev if r["kind"] == "eval"]
    v1 = ev[-1]["val_loss"]
    assert q["swiglu"]["val_loss_mean"] == statistics.mean([v1, 7.25])
    assert abs(q["swiglu"]["val_loss_std"] - abs(v1 - 7.25) / math.sqrt(2)) < 1e-12 and q["stem"]["val_loss_std"] == 0
    assert q["swiglu"]["best_val_loss_mean"] == statistics.mean([min(r["val_loss"] for r in ev), min(
        [r["val_loss"] for r in ev[:-1]] + [7.25])])
    assert q["swiglu"]["recall_mean"] == ev[-1]["recall"] and (q["swiglu"]["steps"], q["swiglu"]["tokens"]) == (
        6, ev[-1]["tokens"])
    tr = [json.loads(line) for line in open(os.path.join(stem_run, "metrics.jsonl"))]
    assert q["stem"]["tok_per_s"] == statistics.median(r["tok_per_s"] for r in tr if r["kind"] == "train")
    assert q["stem"]["params_tables"] > 0 == q["swiglu"]["params_tables"]
    assert q["swiglu"]["edit_success_mean"] is None and 0 <= q["stem"]["edit_success_mean"] <= 1
    for name in ("val_vs_tokens", "val_vs_flops", "recall_vs_tokens"):
        assert os.path.isfile(tmp_path / "plots" / f"quality_facts_{name}.png")
    with pytest.raises(UserError, match="no finished runs"):
        claims.main(["--mode=quality", f"--runs_dir={runs / 'notes'}", f"--plot_dir={tmp_path}"])


def fake_run(path, ffn, lr, seed, losses, done=True):
    """A run folder as stability reads it: per-step training losses in metrics.jsonl (written out of order)
    and a checkpoint holding only the config it needs."""
    rows = [dict(kind="train", iter=i + 1, loss=v) for i, v in enumerate(losses)]
    write_jsonl(os.path.join(path, "metrics.jsonl"), rows[1::2] + rows[::2])
    torch.save(dict(model={}, iter=len(losses) if done else 1, config=dict(
        model=dict(ffn=ffn), train=dict(learning_rate=lr, seed=seed, max_iters=len(losses)))),
        os.path.join(path, "ckpt.pt"))


def test_stability_mode_on_hand_made_runs(tmp_path, capsys):
    d = tmp_path / "runs"
    flat = [5.0] * 8
    fake_run(d / "swiglu-s1", "swiglu", 1e-3, 1, flat)
    fake_run(d / "moe-s1", "hash_moe", 1e-3, 1, flat[:5] + [6.0] + flat[6:])  # step 6: 1.0 above the median
    fake_run(d / "moe-s2", "hash_moe", 1e-3, 2, flat[:4] + [5.5] + flat[5:])  # step 5: 0.5 above, not more
    fake_run(d / "stem-s1", "stem", 3e-3, 1, flat[:6] + [float("nan"), 5.0])  # diverged at step 7
    fake_run(d / "stem-s2", "stem", 3e-3, 2, flat, done=False)  # unfinished: skipped
    fake_run(d / "stem-s3", "stem", 3e-3, 3, [])  # 0 steps (train.py --max_iters=0): skipped
    res, out = claims_json(capsys, "--mode=stability", f"--runs_dir={d}", "--spike_window=3",
                           f"--plot_dir={tmp_path / 'plots'}")
    st = res["stability"]
    assert "# skipping stem-s2: unfinished (1 of 8 steps)" in out and st["window"] == 3 and st["margin"] == 0.5
    assert "# skipping stem-s3: trained 0 steps" in out
    s = {(r["ffn"], r["learning_rate"]): r for r in st["summary"]}
    assert list(s) == [("hash_moe", 1e-3), ("swiglu", 1e-3), ("stem", 3e-3)]
    assert s[("hash_moe", 1e-3)]["spikes_per_seed"] == [1, 0] and s[("hash_moe", 1e-3)]["spikes_mean"] == 0.5
    assert s[("hash_moe", 1e-3)]["max_excess"] == 1.0 and s[("hash_moe", 1e-3)]["seeds"] == [1, 2]
    assert s[("swiglu", 1e-3)]["spikes_per_seed"] == [0] and s[("swiglu", 1e-3)]["max_excess"] == 0.0
    assert s[("stem", 3e-3)]["diverged"] == 1 and s[("stem", 3e-3)]["spikes_per_seed"] == [1]
    runs = {os.path.basename(r["run"]): r for r in st["runs"]}
    assert runs["moe-s1"]["spike_steps"] == [6] and runs["moe-s1"]["losses"] == flat[:5] + [6.0] + flat[6:]
    assert runs["stem-s1"]["spike_steps"] == [7] and runs["moe-s2"]["max_excess"] == pytest.approx(0.5)
    assert sorted(os.listdir(tmp_path / "plots")) == ["stability_lr1e-03.png", "stability_lr3e-03.png"]


def test_summary_mode_on_hand_made_outputs(tmp_path, capsys):
    d = tmp_path / "claims"
    d.mkdir()
    with pytest.raises(UserError, match="holds none"):
        claims.main(["--mode=summary", f"--claims_dir={d}"])
    out = lambda name, obj: (d / name).write_text("# a header\n| a table |\n" + json.dumps(obj) + "\n")  # noqa: E731
    out("quality.txt", dict(quality=[dict(dataset="facts", arch="stem-all", val_loss_mean=2.0)]))
    out("stability.txt", dict(stability=dict(definition="a spike is", window=20, margin=0.5, summary=[
        dict(ffn="stem", learning_rate=1e-3, spikes_per_seed=[0, 1], spikes_mean=0.5)])))
    stats = lambda m, p: dict(median=m, p95=p)  # noqa: E731
    out("spread-stem-third-s1.txt", dict(spread=dict(trained=stats(0.1, 0.4), init=stats(0.03, 0.1),
                                                     random=stats(0.03, 0.1), swiglu_up=stats(0.7, 0.9))))
    out("spread-stem-third-s2.txt", dict(spread=dict(trained=stats(0.3, 0.6), init=stats(0.03, 0.1),
                                                     random=stats(0.03, 0.1), swiglu_up=None)))
    out("locality-stem-all-s1.txt", dict(locality=dict(fact_recall=0.5, edit_success=1.0, unchanged=0.9, c_correct=0.4,
                                                       c_correct_edited=0.4, control_unchanged=None)))
    for seed, diff in ((1, -0.1), (2, -0.2), (3, -0.6)):
        out(f"context-stem-all-s{seed}.txt", dict(context=dict(
            mean_diff=diff, diff_first_quarter=diff, diff_last_quarter=diff, slope=1e-4 * seed, heaps_beta=0.8)))
    res, text = claims_json(capsys, "--mode=summary", f"--claims_dir={d}")
    sm = res["summary"]
    assert sm["quality"][0]["val_loss_mean"] == 2.0 and sm["stability"][0]["spikes_per_seed"] == [0, 1]
    t = sm["spread"]["stem-third"]
    assert t["trained_median"]["per_seed"] == [0.1, 0.3] and abs(t["trained_median"]["mean"] - 0.2) < 1e-12
    assert abs(t["trained_median"]["sd"] - math.sqrt(2 * 0.1 ** 2)) < 1e-12
    assert t["swiglu_up_median"] == dict(mean=0.7, sd=0.0, per_seed=[0.7])  # seed 2 has no SwiGLU: one value
    assert sm["locality"]["stem-all"]["control_unchanged"] is None and sm["locality"]["stem-all"]["edit_success"][
        "mean"] == 1.0
    c = sm["context"]["stem-all"]["mean_diff"]
    assert c["per_seed"] == [-0.1, -0.2, -0.6] and abs(c["mean"] + 0.3) < 1e-12
    assert abs(c["sd"] - math.sqrt(((0.2) ** 2 + 0.1 ** 2 + 0.3 ** 2) / 2)) < 1e-12
    assert "trained_median       0.2000 ± 0.1414   per seed: 0.1000 0.3000" in text
    assert "mean_diff            -0.3000 ± 0.2646   per seed: -0.1000 -0.2000 -0.6000" in text
    (d / "spread-stem-all-s1.txt").write_text("# a header\n| unfinished table |\n")
    with pytest.raises(UserError, match="does not end in a JSON line"):
        claims.main(["--mode=summary", f"--claims_dir={d}"])


# ---- the claims on trained runs: spread, context, locality


def test_spread_mode(stem_run, swiglu_run, facts, tmp_path, capsys):
    res, text = claims_json(capsys, "--mode=spread", f"--ckpt={stem_run}", f"--ckpt_swiglu={swiglu_run}",
                            "--device=cpu", f"--plot_dir={tmp_path}", "--spread_ids=64")
    sp = res["spread"]
    assert set(sp) == {"trained", "init", "random", "swiglu_up"} and res["mode"] == "spread"
    for v in sp.values():
        assert set(v) == {"median", "p95"} and 0 <= v["median"] <= v["p95"] <= 1
    assert res["layer"] == 1 and [e["layer"] for e in res["per_layer"]] == [1] and res["ids"] == 64
    # Gaussian vectors of width 64: median |cos| about 0.674 / 8, P95 about 1.96 / 8 (2,016 pairs)
    assert abs(sp["random"]["median"] - 0.674 / 8) < 0.012 and abs(sp["random"]["p95"] - 1.96 / 8) < 0.03
    assert sp["swiglu_up"]["median"] > sp["random"]["median"]  # W_up x of real tokens share a direction
    assert os.path.isfile(tmp_path / "spread_abs_cos_cdf.png") and "SwiGLU W_up x" in text
    # the top ids are the most frequent of train.bin, by a direct count
    meta = load_meta(facts)
    data = np.fromfile(os.path.join(facts, "train.bin"), dtype=meta["dtype"])
    ids, _ = claims.top_ids(facts, meta, 5)
    counts = np.bincount(data, minlength=meta["vocab_size"])
    assert sorted(counts[ids].tolist(), reverse=True) == sorted(counts.tolist(), reverse=True)[:5]


def test_spread_init_is_the_runs_own_init(facts, tmp_path, capsys):
    # a 0-step run saves its initial weights: the "init" rows (a fresh GPT, the run's seed) must equal them exactly
    out = str(tmp_path / "zero")
    _train_inproc(f"--data_dir={facts}", f"--out_dir={out}", "--max_iters=0", "--seed=7", *TINY)
    res, _ = claims_json(capsys, "--mode=spread", f"--ckpt={out}/ckpt.pt", "--device=cpu", f"--plot_dir={tmp_path}")
    assert res["spread"]["init"] == res["spread"]["trained"] and res["spread"]["swiglu_up"] is None
    assert res["spread"]["random"] != res["spread"]["init"]


def test_context_mode(stem_run, swiglu_run, facts, tmp_path, capsys):
    res, _ = claims_json(capsys, "--mode=context", f"--ckpt={stem_run}", f"--ckpt_swiglu={swiglu_run}", "--device=cpu",
                         f"--plot_dir={tmp_path}", "--context_max=256", "--context_windows=20", "--context_batches=2",
                         "--batch_size=3")
    c = res["context"]
    assert c["T"] == [16, 32, 64, 128, 256] and len(c["distinct"]) == 5 and c["data_dir"] == facts
    assert all(1 <= d <= t for d, t in zip(c["distinct"], c["T"])) and c["distinct"] == sorted(c["distinct"])
    assert (c["heaps_k"], c["heaps_beta"]) == claims.heaps_fit(c["T"], c["distinct"]) and 0 < c["heaps_beta"] < 1
    assert len(c["diff"]) == 32 and all(abs(d - (s - w)) < 1e-12 for d, s, w in zip(c["diff"], c["loss_stem"],
                                                                                     c["loss_swiglu"]))
    assert abs(c["slope"] - np.polyfit(np.arange(32), c["diff"], 1)[0]) < 1e-12 and c["slope_se"] > 0
    # the per-position losses average to each model's own loss on the same validation windows
    meta = load_meta(facts)
    for path, key in ((stem_run, "loss_stem"), (swiglu_run, "loss_swiglu")):
        model = model_from_checkpoint(load_checkpoint(os.path.join(path, "ckpt.pt"))).eval()
        batches, gen = Batches(facts, meta, 32, 3, "cpu", seed=0), torch.Generator().manual_seed(0)
        with torch.no_grad():
            ref = np.mean([model(*batches.get("val", gen))[1].item() for _ in range(2)])
        assert abs(np.mean(c[key]) - ref) < 1e-5, (key, np.mean(c[key]), ref)
    assert os.path.isfile(tmp_path / "context_distinct_ids.png")
    assert os.path.isfile(tmp_path / "context_loss_diff_by_position.png")
    res, _ = claims_json(capsys, "--mode=context", f"--data_dir={facts}", f"--plot_dir={tmp_path}",
                         "--context_windows=5")
    assert "diff" not in res["context"] and res["context"]["T"][0] == 16


def test_locality_mode(deep_stem, stem_run, tmp_path, capsys):
    res, text = claims_json(capsys, "--mode=locality", f"--ckpt={deep_stem}", "--device=cpu", "--locality_pairs=8")
    loc = res["locality"]
    for k in ("fact_recall", "edit_success", "unchanged", "c_correct", "c_correct_edited", "control_unchanged",
              "control_identical_logits", "positive_changed_logits"):
        assert 0 <= loc[k] <= 1, k
    assert loc["pairs"] + loc["skipped"] == 8 and loc["control_pairs"] > 0 and loc["positive_pairs"] > 0
    assert loc["control_unchanged"] == 1.0 and loc["control_identical_logits"] == 1.0  # exactly: rows never read
    assert loc["positive_changed_logits"] == 1.0  # the same swap on a token of the prompt does change the logits
    assert "by construction" not in text
    # 2 layers, the table in the last: an edit cannot reach another position
    res, text = claims_json(capsys, "--mode=locality", f"--ckpt={stem_run}", "--device=cpu", "--locality_pairs=4")
    assert res["locality"]["unchanged"] == 1.0 and "by construction" in text


def test_a_damaged_facts_json_is_one_line(stem_run, facts, tmp_path):
    """locality and quality read facts.json of the data a run was trained on: damaged, it is one error line."""
    data, run = tmp_path / "data", tmp_path / "runs" / "facts-stem-s1"
    shutil.copytree(facts, data)
    shutil.copytree(stem_run, run)
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["config"]["train"]["data_dir"] = str(data)  # the same data (fingerprint), in a folder damaged below
    torch.save(ckpt, run / "ckpt.pt")
    for text in ('{"probes": [', '{"probes": [{"prompt": "x"}], "chance": {}}', '"probes"'):
        (data / "facts.json").write_text(text)
        for args in (["--mode=locality", f"--ckpt={run}"], ["--mode=quality", f"--runs_dir={run.parent}"]):
            with pytest.raises(UserError, match=f"{data} is damaged .*facts.json"):
                claims.main(args + ["--device=cpu", f"--plot_dir={tmp_path / 'plots'}"])
    os.remove(data / "facts.json")
    meta = json.loads((data / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps(dict(meta, dataset="text")))  # data of another kind
    with pytest.raises(UserError, match="is not a facts dataset .*--mode locality needs one"):
        claims.main(["--mode=locality", f"--ckpt={run}", "--device=cpu", f"--plot_dir={tmp_path / 'plots'}"])


def test_claim_modes_bad_arguments(stem_run, swiglu_run, tmp_path):
    assert_user_error(run("claims.py", "--mode=spread", ok=False), "needs --ckpt")
    for args, needle in ((["--mode=bench"], "mode='bench' is not one of"),
                         (["--mode=spread", f"--ckpt={stem_run}", "--spread_ids=1"], "at least 2"),
                         (["--mode=spread", f"--ckpt={swiglu_run}"], "no table layers"),
                         (["--mode=spread", f"--ckpt={tmp_path}/none"], "no checkpoint there"),
                         (["--mode=locality", f"--ckpt={swiglu_run}"], "no table layers"),
                         (["--mode=context", f"--ckpt={stem_run}"], "give both"),
                         (["--mode=context", f"--ckpt={swiglu_run}", f"--ckpt_swiglu={stem_run}"], "no table layers"),
                         (["--mode=context", f"--ckpt={stem_run}", f"--ckpt_swiglu={stem_run}"], "swapped"),
                         (["--mode=stability", f"--runs_dir={tmp_path}/none"], "no such folder"),
                         (["--mode=stability", "--spike_margin=0"], "spike_margin"),
                         (["--mode=quality", f"--runs_dir={tmp_path}/none"], "claims.sh"),
                         (["--mode=summary", f"--claims_dir={tmp_path}/none"], "no such folder"),
                         (["--mode=context", "--context_max=16"], "context_max"),
                         (["--n_layer=2"], "unknown config key")):
        with pytest.raises(UserError, match=needle):
            claims.main(args + ["--device=cpu", f"--plot_dir={tmp_path}"])
