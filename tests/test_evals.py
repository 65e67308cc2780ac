"""Multiple choice and needle in a haystack (evals.py, claims.py --mode mc / needle): the scorers against a plain
per-ending forward pass and hand computations, the needle's prompts and training documents, the modes end to end."""
import json
import math
import os
import random
import re
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import evals
import prepare_data
from conftest import TINY, assert_user_error, run_inproc, tiny_config
from model import GPT
from configurator import UserError
from tokenizer import load_tokenizer


def last_json(p):
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---- multiple choice

def test_ending_losses_match_a_plain_forward_per_ending():
    model = GPT(tiny_config()).eval()  # block_size 16
    g = torch.Generator().manual_seed(0)
    for ctx_len in (3, 14):  # 14: context + ending longer than the block, so the context loses its beginning
        ctx_ids = torch.randint(50, (ctx_len,), generator=g).tolist()
        endings = [torch.randint(50, (n,), generator=g).tolist() for n in (1, 4, 2, 5)]
        sums, means = evals.ending_losses(model, ctx_ids, endings, "cpu", nullcontext())
        for i, e in enumerate(endings):
            ids = (ctx_ids + e)[-17:]
            x = torch.tensor([ids[:-1]])
            with torch.no_grad():
                logp = F.log_softmax(model(x, x)[0][0].double(), -1)  # one ending alone, no padding
            want = -sum(logp[len(ids) - 1 - len(e) + k - 0, t] for k, t in enumerate(e)).item()
            assert sums[i].item() == pytest.approx(want, rel=1e-5)
            assert means[i].item() == pytest.approx(want / len(e), rel=1e-5)


class Bytes:
    """A tokenizer of one id per byte."""
    eot_token = 0

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode()


class LikesX(torch.nn.Module):
    """A 'model' whose next token is 'x' with probability 1/2 and any other of the 256 bytes with 1/510."""

    def __init__(self):
        super().__init__()
        self.cfg = tiny_config(block_size=64)
        logp = torch.full((256,), math.log(0.5 / 255))
        logp[ord("x")] = math.log(0.5)
        self.register_buffer("logp", logp)

    def forward(self, x, targets=None):
        return self.logp.expand(*x.shape, 256), None


def test_hand_made_file_scored_as_by_hand(tmp_path):
    # an ending e costs log 510 for its space, log 2 per 'x' and log 510 per other byte:
    # "x" sums 6.93 (mean 3.46), "xxxxxxxxxx" 13.17 (mean 1.20), "ab" 18.70 (mean 6.23):
    # acc picks "x", acc_norm picks "xxxxxxxxxx"
    rows = [dict(ctx="Q:", endings=["x", "xxxxxxxxxx", "ab"], label=0),
            dict(ctx="Q:", endings=["ab", "xxxxxxxxxx", "x"], label=1),
            dict(ctx="Q:", endings=["ab", "x"], label=0)]
    path = tmp_path / "hand.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = evals.read_mc_file(str(path))
    assert items == rows
    res = evals.score_mc(LikesX(), Bytes(), items, "cpu", nullcontext())
    assert res == dict(acc=1 / 3, acc_norm=1 / 3, n=3, chance=pytest.approx((1 / 3 + 1 / 3 + 1 / 2) / 3))


def test_facts_items_hold_the_answer_among_same_attribute_distractors(facts):
    f = json.load(open(os.path.join(facts, "facts.json")))
    items = evals.facts_mc_items(f)
    assert len(items) == len(f["probes"])
    for it, p in zip(items, f["probes"]):
        values = {e[p["attribute"]] for e in f["entities"]}
        assert it["ctx"] == p["prompt"] and it["endings"][it["label"]] == p["answer"].strip()
        assert len(set(it["endings"])) == len(it["endings"]) == min(4, len(values))
        assert set(it["endings"]) <= values
    assert len({it["label"] for it in items}) > 1  # the answer's place varies


def test_mode_mc_on_facts_and_on_a_file(trained, tmp_path):
    out, _ = trained
    p = run_inproc("claims.py", "--mode=mc", f"--ckpt={out}", f"--plot_dir={tmp_path}")
    mc = last_json(p)["mc"]
    assert mc["n"] == 48 and mc["chance"] == 0.25 and 0 <= mc["acc"] <= 1 and 0 <= mc["acc_norm"] <= 1
    assert (tmp_path / "mc.png").stat().st_size > 0
    good = '{"ctx": "a", "endings": ["b", "c"], "label": 0}\n'
    for bad in ('{"ctx": "a", "endings": ["b"], "label": 3}', '{"ctx": "a", "endings": "bcd", "label": 0}',
                '{"ctx": "", "endings": ["b", "c"], "label": 0}', '{"ctx": "a", "endings": ["b", "c"]}', "not json"):
        f = tmp_path / "bad.jsonl"
        f.write_text(good + bad + "\n")
        assert_user_error(run_inproc("claims.py", "--mode=mc", f"--ckpt={out}", f"--mc_file={f}", ok=False),
                          "bad.jsonl:2")
    assert_user_error(run_inproc("claims.py", "--mode=mc", ok=False), "--ckpt=RUN")
    assert_user_error(run_inproc("claims.py", "--mode=mc", f"--ckpt={out}", "--mc_file=nothing.jsonl", ok=False),
                      "mc_file=nothing.jsonl")


# ---- needle in a haystack

@pytest.fixture(scope="module")
def needle(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("data") / "needle")
    prepare_data.prepare(dataset="needle", out_dir=d, needle_docs=400, progress=False)
    return d


def test_training_documents_ask_for_each_needle_they_hide():
    docs = prepare_data.needle_documents(300, seed=3, max_sentences=20, max_needles=5)
    assert len(docs) == 600  # a needle document, then a copy document, each time
    for d in docs[1::2]:  # invented names, then the same names again
        words = d.split()
        assert words[:len(words) // 2] == words[len(words) // 2:] and all(w.isalpha() and w.istitle() for w in words)
        assert 4 <= len(words) // 2 <= 40
    depths, counts = [], set()
    for d in docs[::2]:
        hidden = re.findall(r"The secret number of (\w+) is (\d{4})\.", d.split(" What is")[0])
        asked = re.findall(r"What is the secret number of (\w+)\? The secret number of (\w+) is (\d{4})\.", d)
        assert [a for a, b, _ in asked] == [b for a, b, _ in asked]  # each question names one needle twice
        assert sorted(hidden) == sorted((a, n) for a, _, n in asked)  # and each needle is asked for, once
        assert len({name for name, _ in hidden}) == len(hidden)
        counts.add(len(hidden))
        filler = d.split(" What is")[0].count(".") - len(hidden)
        assert filler <= 20
        first = d.index("The secret number of")  # the depth of the first needle among the filler sentences
        if filler:
            depths.append(d[:first].count(".") / filler)
    assert counts == {1, 2, 3, 4, 5} and min(depths) == 0 and 0.1 < sum(depths) / len(depths) < 0.5
    docs = prepare_data.needle_documents(200, seed=5)  # the defaults: short documents, one needle, 4-16 names
    sizes = [(d.split(" What is")[0].count(".") - 1, d.count("The secret number of") - 1) for d in docs[::2]]
    assert {n for _, n in sizes} == {1} and {f for f, _ in sizes} == set(range(9))
    assert {len(d.split()) // 2 for d in docs[1::2]} == set(range(4, 17))


def test_needle_prompts_fill_the_context_with_the_needle_at_its_depth(needle):
    enc = load_tokenizer(needle)
    filler = evals.generated_filler(500)
    longest = max(len(enc.encode(" " + s)) for s in filler)
    for context in (40, 100, 200):
        for depth in (0, 0.5, 1):
            ids, number = evals.needle_prompt(enc, filler, random.Random(1), context, depth, enc.eot_token)
            answer = len(enc.encode(f" {number}."))
            assert ids[0] == enc.eot_token and context - longest - 2 <= len(ids) + answer <= context
            text = enc.decode(ids[1:])
            before, after = text.split("The secret number of ")[0], text.split(f" is {number}.")[1]
            n_before, n_after = before.count("."), after.count(".")  # filler sentences (the question ends in "is")
            assert round(depth * (n_before + n_after)) == n_before
            assert text.endswith(" is") and "What is the secret number of" in text
    with pytest.raises(UserError, match="too short"):
        evals.needle_prompt(enc, filler, random.Random(1), 10, 0.5, enc.eot_token)


class AnswersEarlyNeedles:
    """Answers with the needle's number when the needle lies in the first 55% of the prompt, else with a longer one."""

    def __init__(self, enc):
        self.enc = enc

    def eval(self):
        pass

    def generate(self, idx, n, temperature):
        text = self.enc.decode(idx[0, 1:].tolist())
        m = re.search(r"The secret number of \w+ is (\d+)\.", text)
        ans = m[1] if m.start() < 0.55 * len(text) else m[1] + "7"
        out = self.enc.encode(f" {ans}.")[:n]
        return torch.cat([idx, torch.tensor([out + [0] * (n - len(out))])], 1)


def test_needle_accuracy_by_context_and_depth(needle):
    enc = load_tokenizer(needle)
    acc = evals.needle_accuracy(AnswersEarlyNeedles(enc), enc, evals.generated_filler(500), [120, 240],
                                [0, 0.25, 0.5, 0.75, 1], 3, "cpu", nullcontext())
    assert acc == [[1, 1, 1, 0, 0]] * 2


def test_mode_needle_end_to_end(needle, tmp_path):
    runs = {}
    for ffn in ("stem", "swiglu"):
        runs[ffn] = str(tmp_path / ffn)
        run_inproc("train.py", f"--data_dir={needle}", f"--out_dir={runs[ffn]}", f"--ffn={ffn}", "--max_iters=2",
                   "--eval_interval=2", "--eval_facts=False", *TINY, "--block_size=256")
    filler = tmp_path / "filler.txt"
    filler.write_text("The sky is blue.  It was\nlate! Was it? " * 20)
    p = run_inproc("claims.py", "--mode=needle", f"--ckpt={runs['stem']}", f"--ckpt_swiglu={runs['swiglu']}",
                   "--needle_contexts=128,256", "--needle_depths=0,1", "--needle_trials=2", f"--input={filler}",
                   f"--plot_dir={tmp_path}")
    res = last_json(p)["needle"]
    assert res["contexts"] == [128, 256] and res["depths"] == [0, 1] and res["filler"] == str(filler)
    for k in ("acc", "acc_swiglu"):
        assert len(res[k]) == 2 and all(len(r) == 2 and all(0 <= a <= 1 for a in r) for r in res[k])
    assert res["diff_by_context"] == [a - b for a, b in zip(res["acc_by_context"], res["acc_by_context_swiglu"])]
    assert (tmp_path / "needle.png").stat().st_size > 0
    for bad, why in [("--needle_contexts=512", "block_size 256"), ("--needle_contexts=12", "at least"),
                     ("--needle_contexts=64.5", "whole numbers"), ("--needle_depths=0,2", "needle_depths"),
                     (f"--ckpt_swiglu={runs['stem']}", "must be SwiGLU"), ("--input=nothing.txt", "input=nothing.txt")]:
        assert_user_error(run_inproc("claims.py", "--mode=needle", f"--ckpt={runs['stem']}", bad, ok=False), why)
    assert_user_error(run_inproc("claims.py", "--mode=needle", f"--ckpt={runs['swiglu']}",
                                 f"--ckpt_swiglu={runs['swiglu']}", ok=False), "swapped?")
    assert_user_error(run_inproc("claims.py", "--mode=mc", f"--ckpt={runs['stem']}", ok=False), "facts")


def test_needle_summary_by_hand():
    res = evals.needle_summary([64, 128, 256], [[0.5, 0.5], [0.6, 0.6], [0.9, 0.7]],
                               [[0.5, 0.5], [0.5, 0.5], [0.6, 0.6]])
    assert res["acc_by_context"] == pytest.approx([0.5, 0.6, 0.8])
    assert res["diff_by_context"] == pytest.approx([0, 0.1, 0.2]) and res["mean_diff"] == pytest.approx(0.1)
    assert res["diff_slope"] == pytest.approx(0.1) and res["diff_shortest"] == 0
    assert res["diff_longest"] == pytest.approx(0.2)
    assert evals.needle_summary([64], [[1.0]], [[0.5]])["diff_slope"] is None


def test_prepare_needle_refuses_what_it_does_not_use(tmp_path):
    for args, why in [(["--dataset=needle", "--input=x.txt"], "--input is not used"),
                      (["--dataset=facts", "--needle_docs=100"], "--needle_docs only applies"),
                      (["--dataset=needle", "--needle_docs=5"], "out of range"),
                      (["--dataset=needle", "--entities=5"], "--entities only applies")]:
        assert_user_error(run_inproc("prepare_data.py", *args, f"--out_dir={tmp_path / 'd'}", ok=False), why)
    assert not (tmp_path / "d").exists()
