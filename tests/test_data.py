"""Tests for prepare_data.py: python -m pytest -q tests/test_data.py"""
import io
import json
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex

import corpus as C
import prepare_data as P
import tokenizer as T
from configurator import UserError
from conftest import GPT2_BPE, SHAKESPEARE, assert_user_error, run_inproc

MULTILINGUAL = """The quick brown fox jumps over the lazy dog. It's 2024, isn't it? Prices: $3.50, 12% off!
Le cœur a ses raisons que la raison ne connaît point. Ça va très bien, merci.
Über den Wolken muss die Freiheit wohl grenzenlos sein. Straße, Größe, Füße.
日本語のテキストと中文字符，还有한국어 문장도 있습니다。 Emoji: 🙂🚀👋🏽 café naïve e\u0301
    indented line\twith tab
\n\nlast line   with   runs of spaces
"""


def naive_train_bpe(text, vocab_size):
    # The textbook algorithm: recount every pair of the whole corpus at every step. Same rules as
    # train_bpe (most frequent pair, ties to the smallest ids, reuse existing bytes, stop below 2).
    vocab = [bytes([i]) for i in range(256)]
    ranks = {b: i for i, b in enumerate(vocab)}
    words = [(list(w.encode()), f) for w, f in Counter(regex.findall(T.GPT2_SPLIT_PATTERN, text)).items()]
    while len(vocab) < vocab_size - 1:
        counts = Counter()
        for w, f in words:
            for pair in zip(w, w[1:]):
                counts[pair] += f
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        if counts[pair] < 2:
            break
        merged = vocab[pair[0]] + vocab[pair[1]]
        if merged not in ranks:
            ranks[merged] = len(vocab)
            vocab.append(merged)
        new_words = []
        for w, f in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == pair:
                    out.append(ranks[merged])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append((out, f))
        words = new_words
    return ranks


@pytest.fixture(scope="module")
def corpus():
    return "\n".join(P.make_facts(8, seed=0)["train_docs"]) + "\n" + MULTILINGUAL * 3


@pytest.fixture(scope="module")
def small_ranks(corpus):
    return T.train_bpe(corpus, 400, progress=False)


def random_strings(n, seed=0):
    rng = random.Random(seed)
    ranges = [(0x20, 0x7E), (0xA0, 0x2FF), (0x300, 0x36F), (0x400, 0x4FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x0, 0xD7FF), (0xE000, 0x10FFFF)]  # no surrogates
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)) if rng.random() < 0.8 else rng.choice(" \n\t  'sx"))
        out.append("".join(chars))
    return out


SAMPLES = ["", "Hello, world!", "👋🏽🚀 emoji 🙂", "日本語のテキスト，中文字符", "e\u0301 a\u0308 n\u0303 combining",
           "   \t\n\n  \r\n   ", "trailing spaces   ", "\n\n\nnewlines\n", "they'll've 'S 's '   x",
           "numbers 1234567890 3.14159", "Zurgilpil is a country in Vireth.", "<|endoftext|> as plain text"]


def bpe_encode_reference(text, ranks):
    """Plain-Python BPE encoding, the same algorithm as tiktoken: the independent reference for its encoder."""
    ids = []
    for piece in regex.findall(T.GPT2_SPLIT_PATTERN, text):
        parts = [bytes([x]) for x in piece.encode("utf-8")]
        while len(parts) > 1:
            # merge the adjacent pair whose concatenation has the lowest rank (leftmost on ties):
            # low ranks were learned first, so this replays the training merges in order
            candidates = [(ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                          if parts[i] + parts[i + 1] in ranks]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


def test_split_pattern_is_tiktokens_gpt2():
    import tiktoken_ext.openai_public as op
    assert T.GPT2_SPLIT_PATTERN == op.r50k_pat_str


def test_bpe_round_trips_unicode(small_ranks):
    enc = T.make_encoding(small_ranks)
    for s in SAMPLES + [MULTILINGUAL] + random_strings(300):
        ids = enc.encode_ordinary(s)
        assert all(0 <= i < len(small_ranks) for i in ids)
        assert enc.decode_bytes(ids).decode("utf-8") == s


def test_eot_is_last_id_and_special(small_ranks):
    enc = T.make_encoding(small_ranks)
    assert enc.eot_token == len(small_ranks) == enc.n_vocab - 1
    ids = enc.encode("a<|endoftext|>b", allowed_special={"<|endoftext|>"})
    assert ids == enc.encode_ordinary("a") + [enc.eot_token] + enc.encode_ordinary("b")


def test_tiktoken_matches_reference_encoder(small_ranks):
    enc = T.make_encoding(small_ranks)
    unseen = "Completely unseen words: xylophone, quixotic zephyrs, Kafkaesque 𝔘𝔫𝔦𝔠𝔬𝔡𝔢."
    for s in SAMPLES + [MULTILINGUAL, unseen] + random_strings(200, seed=1):
        assert enc.encode_ordinary(s) == bpe_encode_reference(s, small_ranks), repr(s)


def test_train_bpe_hand_computed_merges():
    # Pieces: "aaab" once and " aaab" nine times. Pair counts: aa 20, ab 10, " a" 9 -> merge "aa".
    # Then (aa,a) 10 ties (a,b) 10: the smaller ids (97,98) win -> "ab"; then (aa,ab) 10 -> "aaab";
    # then (" ",aaab) 9 -> " aaab"; then no pair is left, so training stops early at 260 ranks.
    ranks = T.train_bpe(" ".join(["aaab"] * 10), 300, progress=False)
    merges = sorted((r, b) for b, r in ranks.items() if r >= 256)
    assert merges == [(256, b"aa"), (257, b"ab"), (258, b"aaab"), (259, b" aaab")]
    assert all(ranks[bytes([i])] == i for i in range(256))


def test_train_bpe_equals_naive_algorithm(corpus):
    ranks = T.train_bpe(corpus, 420, progress=False)
    assert ranks == naive_train_bpe(corpus, 420)
    assert sorted(ranks.values()) == list(range(len(ranks))) and len(ranks) == 419
    assert all(ranks[bytes([i])] == i for i in range(256))
    assert len(set(ranks)) == len(ranks)  # no duplicate byte strings


def test_save_and_load_ranks(tmp_path, small_ranks):
    path = str(tmp_path / "t.tiktoken")
    open(path, "wb").write(T.tiktoken_bytes(small_ranks))
    assert T.load_ranks(path) == small_ranks
    import tiktoken.load
    assert tiktoken.load.load_tiktoken_bpe(path) == small_ranks  # really tiktoken's format
    # rewriting the file in place must give the new ranks (tiktoken's loader would cache the old)
    smaller = {b: r for b, r in small_ranks.items() if r < 300}
    open(path, "wb").write(T.tiktoken_bytes(smaller))
    assert T.load_ranks(path) == smaller


@GPT2_BPE
def test_r50k_file_encodes_like_gpt2():
    ranks = T.load_ranks(os.environ["NANOSTEM_GPT2_BPE"])
    enc = T.make_encoding(ranks, name="gpt2_local")
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode_ordinary("Hello world") == [15496, 995]  # GPT-2's well-known ids
    assert enc.encode_ordinary(" the") == [262]
    s = "Hello world! It's a test of GPT-2's tokenizer, café 🙂\n\n  ok"
    assert enc.encode_ordinary(s) == bpe_encode_reference(s, ranks)
    assert enc.decode(enc.encode(s + "<|endoftext|>", allowed_special="all")) == s + "<|endoftext|>"


def test_make_facts_deterministic_and_unique():
    a, b, c = P.make_facts(40, seed=7), P.make_facts(40, seed=7), P.make_facts(40, seed=8)
    assert a == b
    assert a["entities"] != c["entities"] and a["train_docs"] != c["train_docs"]
    names = [e["name"] for e in a["entities"]] + [e["capital"] for e in a["entities"]]
    assert len(set(n.lower() for n in names)) == len(names) == 80
    other_words = {w.lower() for t in [*P.TRAIN_TEMPLATES.values(), *P.VAL_TEMPLATES.values()] for s in t
                   for w in regex.findall(r"\p{L}+", s)} | {w.lower() for pool in P.POOLS.values() for w in pool}
    assert not other_words & {n.lower() for n in names}
    assert len(a["train_docs"]) == 40 * P.TRAIN_DOCS_PER_ENTITY and len(a["val_docs"]) == 40 * P.VAL_DOCS_PER_ENTITY
    assert a["chance"]["capital"] == 1 / 40
    assert a["chance"]["continent"] == 1 / len({e["continent"] for e in a["entities"]})


def test_validation_wording_never_in_training():
    facts = P.make_facts(30, seed=3)
    train = "\n".join(facts["train_docs"]).lower()
    train_words = set(regex.findall(r"\p{L}+", train))
    for attr, templates in P.VAL_TEMPLATES.items():
        assert len(templates) >= 2 and len(P.TRAIN_TEMPLATES[attr]) >= 4
        for t in templates:
            chunks = [c.strip(" .,") for c in regex.split(r"\{[ea]\}", t)]
            for chunk in filter(None, chunks):  # as whole words: "find the" is not in "find Thezes"
                assert not regex.search(r"\b" + regex.escape(chunk.lower()) + r"\b", train), (t, chunk)
            # ...but its words are known, so val loss measures recall rather than spelling
            assert set(regex.findall(r"\p{L}+", t.replace("{e}", "").replace("{a}", "").lower())) <= train_words
    for doc in facts["val_docs"]:
        for sentence in regex.split(r"(?<=\.) ", doc):
            assert sentence.lower() not in train


def test_probes_end_before_answer_and_occur_in_training():
    facts = P.make_facts(30, seed=5)
    ents = {e["name"]: e for e in facts["entities"]}
    assert len(facts["probes"]) == 30 * 4
    for p in facts["probes"]:
        assert p["answer"] == " " + ents[p["entity"]][p["attribute"]]
        assert not p["prompt"].endswith(" ") and p["entity"] in p["prompt"]
        assert p["answer"].strip() not in p["prompt"]
        sentence = p["prompt"] + p["answer"] + "."
        # templates are dealt out evenly, so every probe sentence is trained on several times
        times = sum(sentence in d for d in facts["train_docs"])
        assert times >= P.TRAIN_DOCS_PER_ENTITY // len(P.TRAIN_TEMPLATES[p["attribute"]]), sentence


def test_prepare_facts_end_to_end(tmp_path, capsys):
    out = P.prepare(dataset="facts", out_dir=str(tmp_path / "facts"), entities=30, seed=1, progress=False)
    assert "entity names single-token: 30/30, capitals: 30/30" in capsys.readouterr().out
    files = {"train.bin", "val.bin", "meta.json", "tokenizer.tiktoken", "facts.json"}
    assert files <= set(os.listdir(out)) and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    meta = json.load(open(os.path.join(out, "meta.json")))
    for key in ["dataset", "tokenizer", "vocab_size", "eot_id", "train_tokens", "val_tokens", "dtype", "seed"]:
        assert key in meta
    assert meta["tokenizer"] == {"spec": f"bpe:{P.default_facts_vocab(30)}", "file": "tokenizer.tiktoken"}
    assert meta["dtype"] == "uint16" and meta["eot_id"] == meta["vocab_size"] - 1
    enc = T.load_tokenizer(out)
    assert enc.n_vocab == meta["vocab_size"]
    facts = P.make_facts(30, seed=1)
    for split, docs in [("train", facts["train_docs"]), ("val", facts["val_docs"])]:
        ids = np.fromfile(os.path.join(out, f"{split}.bin"), dtype=np.uint16)
        assert len(ids) == meta[f"{split}_tokens"]
        assert enc.decode(ids.tolist()) == "".join(d + "<|endoftext|>" for d in docs)
    saved = json.load(open(os.path.join(out, "facts.json")))
    assert saved["probes"] == facts["probes"] and saved["num_entities"] == 30
    for e in facts["entities"]:
        assert len(enc.encode_ordinary(" " + e["name"])) == 1 and len(enc.encode_ordinary(" " + e["capital"])) == 1


def test_prepare_facts_too_small_vocab(tmp_path):
    with pytest.raises(UserError, match="raise N"):
        P.prepare(dataset="facts", tokenizer="bpe:300", out_dir=str(tmp_path), entities=10, progress=False)
    assert not os.listdir(tmp_path)


def test_load_tokenizer_missing(tmp_path):
    with pytest.raises(UserError, match="no prepared data in .* .meta.json missing.: prepare it first"):
        T.load_tokenizer(str(tmp_path / "facts"))


def test_prepare_text_dataset(tmp_path):
    text = (MULTILINGUAL + "\n".join(P.make_facts(5, seed=2)["train_docs"])) * 2
    src = tmp_path / "mybook.txt"
    src.write_text(text, encoding="utf-8")
    out = P.prepare(dataset="text", input=str(src), tokenizer="bpe:500", out_dir=str(tmp_path / "out"),
                    val_fraction=0.2, progress=False)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["dataset"] == "text" and meta["vocab_size"] == 500
    assert not os.path.exists(os.path.join(out, "facts.json"))
    enc = T.load_tokenizer(out)
    cut = int(len(text) * 0.8)
    train = np.fromfile(os.path.join(out, "train.bin"), dtype=np.uint16).tolist()
    val = np.fromfile(os.path.join(out, "val.bin"), dtype=np.uint16).tolist()
    assert enc.decode(train) == text[:cut] and enc.decode(val) == text[cut:]
    # the tokenizer saw the training part only, and chunked encoding equals whole-text encoding
    assert T.load_ranks(os.path.join(out, "tokenizer.tiktoken")) == T.train_bpe(text[:cut], 500, progress=False)
    assert train == enc.encode_ordinary(text[:cut])


def read_pieces(text, read_chars, monkeypatch):
    monkeypatch.setattr(C, "READ_CHARS", read_chars)
    return list(C._read_pieces(io.StringIO(text)))


@SHAKESPEARE
def test_pieces_encode_like_the_whole_on_shakespeare(small_ranks, monkeypatch):
    # one long document, read in blocks and handed on in pieces: the pieces' tokens are the whole's
    text = Path(os.environ["NANOSTEM_SHAKESPEARE"]).read_text(encoding="utf-8")
    enc = T.make_encoding(small_ranks)
    pieces = read_pieces(text, 4096, monkeypatch)
    assert len(pieces) > 100 and "".join(t for t, _ in pieces) == text
    assert [ends for _, ends in pieces] == [False] * (len(pieces) - 1) + [True]
    assert max(len(t) for t, _ in pieces) <= 2 * 4096  # bounded, whatever the document's length
    assert [i for t, _ in pieces for i in enc.encode_ordinary(t)] == enc.encode_ordinary(text)


def test_pieces_encode_like_the_whole_on_whitespace(monkeypatch):
    # whitespace at the very end of a string is pre-tokenized differently ("  \n" is one piece there,
    # "  " + "\n" before a word), so pieces must never end in whitespace
    rng = random.Random(0)
    text = "".join(rng.choice(["word", " x", "  ", "\n", "\n\n", " \t", "!", "'s"]) for _ in range(3000))
    enc = T.make_encoding(T.train_bpe(text, 300, progress=False))  # merges whitespace runs too
    assert len(enc.encode_ordinary("  \n")) == 1
    for size in [1, 3, 10]:
        pieces = [t for t, _ in read_pieces(text, size, monkeypatch)]
        assert len(pieces) > 100 and "".join(pieces) == text
        assert [i for c in pieces for i in enc.encode_ordinary(c)] == enc.encode_ordinary(text)


@pytest.mark.parametrize("args", [
    ["--dataset", "text"],
    ["--dataset", "text", "--input", "no/such/file.txt"],
    ["--dataset", "shakespeare", "--input", "no/such/file.txt"],
    ["--dataset", "text", "--input", "NONUTF8"],
    ["--tokenizer", "bpe:abc"],
    ["--tokenizer", "bpe:100"],
    ["--tokenizer", "wordpiece"],
    ["--tokenizer", "no/such/vocab.tiktoken"],
    ["--dataset", "poems"],
    ["--entities", "0"],
])
def test_cli_errors_are_one_line_and_overwrite_nothing(tmp_path, args):
    out = tmp_path / "data"
    out.mkdir()
    (out / "meta.json").write_text("old")
    (out / "train.bin").write_bytes(b"old")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    args = [str(bad) if a == "NONUTF8" else a for a in args]
    assert_user_error(run_inproc("prepare_data.py", *args, "--out_dir", str(out), ok=False))
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin"]
    assert (out / "meta.json").read_text() == "old" and (out / "train.bin").read_bytes() == b"old"


def test_cli_default_facts_runs(tmp_path):
    r = run_inproc("prepare_data.py", "--out_dir", str(tmp_path / "f"), "--entities", "20")
    assert "entity names single-token: 20/20, capitals: 20/20" in r.stdout
    assert json.load(open(tmp_path / "f" / "meta.json"))["dataset"] == "facts"
