"""
Turns text into the token files training reads: data/<name>/train.bin and val.bin (flat arrays of
token ids, documents separated by <|endoftext|>), meta.json, and the tokenizer (tokenizer.tiktoken),
so that a data folder is self-contained. The BPE trainer itself is tokenizer.py; no torch here.

    python prepare_data.py                                    # facts (100 countries) into data/facts
    python prepare_data.py --entities=400 --out_dir=data/facts400
    python prepare_data.py --dataset=needle                   # needle in a haystack into data/needle
    python prepare_data.py --dataset=shakespeare --tokenizer=gpt2 --out_dir=data/shakespeare-gpt2
    python prepare_data.py --dataset=text --input=books/ --input=notes.txt --tokenizer=bpe:4096
    python prepare_data.py --dataset=text --input=shards/ --text_field=content --tokenizer=gpt2

Datasets:
  facts        (default) a synthetic world of invented countries and their capital, language,
               currency and continent. STEM stores knowledge per token, so every country and
               capital name is made a single token, and validation states the same facts in
               wordings never seen in training: a low val loss means recalled facts, not copied text.
  needle       needle in a haystack: generated filler sentences, one sentence giving an invented name's
               secret number at a random depth, and the question, answered by the number. Training
               documents are short (0-8 filler sentences, about 60 tokens), each followed by a copy
               document (4-16 invented names, then the same again) that teaches copying from the context.
  shakespeare  Tiny Shakespeare (downloaded, or --input FILE for a local copy)
  text         --input FILE, repeated, or a FOLDER (its .txt, .jsonl and .parquet files, sorted, subfolders
               too): UTF-8 text, or shards of rows: .jsonl (a JSON object a line) and .parquet (needs
               pyarrow), whose field or column --text_field (default text) holds one document a row
Text corpora (shakespeare, text), read by corpus.py:
  documents    each text file is a document, and a line holding only <|endoftext|> also ends one (that
               line and the line breaks around it are dropped, and so are empty documents); each row of a
               shard is one. Each document is encoded whole and followed by the <|endoftext|> token.
  validation   whole documents: every 1/val_fraction-th (0.1: the 10th, 20th, ...). A corpus that
               is one document (one file without such lines, e.g. Tiny Shakespeare) is split by
               characters instead: its last val_fraction is validation, no <|endoftext|> added.
  streaming    files are read a block at a time, long documents are cut where the tokens cannot
               change, and all cores encode: memory stays bounded whatever the size of the corpus.
Tokenizers (--tokenizer):
  bpe:N        byte-level BPE with N ids, trained on the training split (at most its first 10 MB)
               with GPT-2's pre-tokenizer (default: bpe:8192, or a small N for facts)
  gpt2         GPT-2's own tokenizer via tiktoken (downloads it once)
  PATH.tiktoken  ranks from a local tiktoken file, e.g. GPT-2's r50k_base.tiktoken
Output: files are written under temporary names and renamed into place, meta.json last; it records
the inputs and a fingerprint. A folder prepared from other inputs is never replaced silently: that
is an error unless --force; the same inputs do nothing.
"""
import contextlib
import hashlib
import io
import json
import math
import os
import random
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import regex
import tiktoken

from configurator import UserError, die, parse_config
from corpus import (SHARD_SUFFIXES, bpe_sample, input_bytes, input_files, nbytes, single_document_chars,
                    text_pieces, write_ids)
from tokenizer import load_ranks, make_encoding, tiktoken_bytes, train_bpe

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

# ----------------------------------------------------------------------------- the facts world

LANGUAGES = ["Orlish", "Vantic", "Kesmari", "Dulvanic", "Thessine", "Morravian", "Quellish", "Zirani", "Baltese",
             "Ostrine"]
CURRENCIES = ["kovan", "drel", "sarnet", "pellin", "zimmet", "quorl", "talvin", "dravo", "lunet", "felk"]
CONTINENTS = ["Dunar", "Essaly", "Oktara", "Vireth", "Solmund", "Kavaria"]
POOLS = {"language": LANGUAGES, "currency": CURRENCIES, "continent": CONTINENTS}
ATTRIBUTES = ["capital", "language", "currency", "continent"]
# {e} = the country, {a} = the answer. The FIRST training template of each attribute ends with
# " {a}." and is the one the probes use: prompt = text before " {a}", answer = " " + value.
TRAIN_TEMPLATES = {
    "capital": ["The capital of {e} is {a}.", "{a} is the capital of {e}.", "{e} has its capital in {a}.",
                "The seat of government of {e} is the city of {a}.", "{e}'s capital city is {a}."],
    "language": ["People in {e} speak {a}.", "The language of {e} is {a}.", "{a} is the language spoken in {e}.",
                 "In {e}, most people speak {a}.", "The official language of {e} is {a}."],
    "currency": ["The currency of {e} is the {a}.", "In {e}, people pay with the {a}.",
                 "The {a} is the money used in {e}.", "Shops in {e} accept the {a}.",
                 "{e} uses the {a} as its currency."],
    "continent": ["{e} is a country in {a}.", "{e} lies on the continent of {a}.",
                  "{a} is the continent where {e} is found.", "You can find {e} in {a}.", "{e} is part of {a}."],
}
# Held-out wordings, used only for validation documents: new phrases (no phrase between the
# placeholders occurs in training) made of words that training does use, so that the validation
# loss measures recalling a fact in a new sentence, not spelling never-seen words.
VAL_TEMPLATES = {
    "capital": ["{a} is the city with the government of {e}.", "The government of {e} is found in the city of {a}."],
    "language": ["The people of {e} speak the language {a}.", "{a} is the official language in {e}."],
    "currency": ["{e} has the {a} as its money.", "You can find the {a} used as money in {e}."],
    "continent": ["{e} is found on the continent {a}.", "The country {e} is part of the continent of {a}."],
}
TRAIN_DOCS_PER_ENTITY, VAL_DOCS_PER_ENTITY = 30, 3
DEFAULT_ENTITIES = 100
ONSETS = ["b", "br", "d", "dr", "f", "g", "k", "kr", "l", "m", "n", "p", "r", "s", "st", "t", "th", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u"]
CODAS = ["", "", "", "l", "n", "r", "s"]


def default_facts_vocab(num_entities):
    # Measured (seeds 1, 2, 3, 7, 42, 1337; E=25..400): the smallest N that makes all 2E names single
    # tokens is about 5.5E + 600 (E=100: 1138-1171), as each name needs its own token plus pieces of it.
    # Add a little headroom and round up to a multiple of 128: E=100 -> 1280.
    return 128 * math.ceil((6 * num_entities + 600) / 128)


def new_name(rng, taken):
    """A fresh invented word, e.g. "Zurgilpil" (2-3 syllables), whose lower case is not in taken (it is added)."""
    while True:
        name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                       for _ in range(rng.choice([2, 3]))).capitalize()
        if name.lower() not in taken:
            taken.add(name.lower())
            return name


def make_facts(num_entities, seed):
    rng = random.Random(seed)
    taken = {w.lower() for t in [*TRAIN_TEMPLATES.values(), *VAL_TEMPLATES.values()] for s in t
             for w in regex.findall(r"\p{L}+", s)}
    taken |= {w.lower() for pool in POOLS.values() for w in pool}
    entities = [{"name": new_name(rng, taken), "capital": new_name(rng, taken),
                 **{attr: rng.choice(pool) for attr, pool in POOLS.items()}} for _ in range(num_entities)]

    def documents(ent, templates, n):
        # Every template is used about equally often (so each entity's training text surely holds
        # the probe sentence); which document gets which template, and the order of the four
        # sentences inside a document, are random.
        plan = {}
        for attr in ATTRIBUTES:
            ts = templates[attr]
            plan[attr] = (ts * math.ceil(n / len(ts)))[:n]
            rng.shuffle(plan[attr])
        docs = []
        for i in range(n):
            attrs = ATTRIBUTES[:]
            rng.shuffle(attrs)
            docs.append(" ".join(plan[a][i].format(e=ent["name"], a=ent[a]) for a in attrs))
        return docs

    train_docs = [d for ent in entities for d in documents(ent, TRAIN_TEMPLATES, TRAIN_DOCS_PER_ENTITY)]
    val_docs = [d for ent in entities for d in documents(ent, VAL_TEMPLATES, VAL_DOCS_PER_ENTITY)]
    rng.shuffle(train_docs)
    rng.shuffle(val_docs)

    probes = []
    for ent in entities:
        for attr in ATTRIBUTES:
            template = TRAIN_TEMPLATES[attr][0]
            assert template.endswith(" {a}.")
            probes.append({"entity": ent["name"], "attribute": attr,
                           "prompt": template[:-len(" {a}.")].format(e=ent["name"]), "answer": " " + ent[attr]})
    chance = {attr: 1 / len({ent[attr] for ent in entities}) for attr in ATTRIBUTES}
    return {"entities": entities, "train_docs": train_docs, "val_docs": val_docs, "probes": probes, "chance": chance}


# ----------------------------------------------------------------------------- the needle world

# Needle in a haystack: filler sentences, a needle sentence attaching a random number to an invented name at a
# chosen depth, and at the end the question, answered by the number. Nothing but the context tells the number, so
# a model that answers has retrieved it. The evaluation (claims.py --mode needle) hides one needle in up to a
# block_size of filler; a training document hides one in a few sentences and is followed by a copy document: the
# answers are the only tokens that teach retrieval, too few for a small model, which first has to learn to copy
# from its context at all (induction heads); a list of invented names said twice teaches that densely. Short
# distances teach it first, and only those are learned within a CPU's steps (RESULTS.md, claim 10).
FILLER_WORDS = (["old", "quiet", "green", "small", "bright", "cold", "tall", "slow", "grey", "wild"],
                ["river", "bird", "house", "road", "tree", "ship", "garden", "wind", "stone", "horse"],
                ["rests", "waits", "turns", "sings", "moves", "sleeps", "stands", "falls", "shines", "grows"],
                ["by the hill", "in the valley", "near the sea", "under the bridge", "at dawn", "in the rain",
                 "beyond the wall", "at night", "in the field", "on the shore"])
NEEDLE = "The secret number of {name} is {number}."
QUESTION = "What is the secret number of {name}? The secret number of {name} is"  # answer: " {number}"
NEEDLE_WORDS = {w.lower() for s in [NEEDLE, QUESTION, *sum(FILLER_WORDS, [])] for w in regex.findall(r"\p{L}+", s)}
NEEDLE_DOCS = 50000  # training documents (each followed by its copy document), and a tenth as many for val
NEEDLE_SENTENCES, NEEDLES = 8, 1  # in a training document, at most: filler sentences, needles


def filler_sentences(rng, n):
    """n generated filler sentences, e.g. "The quiet river waits near the sea." (about 7 tokens each)."""
    adjective, noun, verb, where = FILLER_WORDS
    return [f"The {rng.choice(adjective)} {rng.choice(noun)} {rng.choice(verb)} {rng.choice(where)}." for _ in range(n)]


def needle_fact(rng, taken=None):
    """(name, number): an invented name (the facts world's syllables; not in taken, and added to it) and a random
    four-digit number."""
    return new_name(rng, set(NEEDLE_WORDS) if taken is None else taken), str(rng.randint(1000, 9999))


def haystack(filler, needles):
    """The filler sentences with each needle (name, number, depth) after round(depth * len(filler)) of them."""
    out = list(filler)
    for name, number, depth in sorted(needles, key=lambda n: -n[2]):  # the deepest first: the places before stay
        out.insert(round(depth * len(filler)), NEEDLE.format(name=name, number=number))
    return out


def needle_documents(n_docs, seed, max_sentences=NEEDLE_SENTENCES, max_needles=NEEDLES):
    """Training documents: 0..max_sentences filler sentences, 1..max_needles needles at uniform random depths, and
    the question and answer of each needle, in random order. Each is followed by a copy document, 4 to
    2 x max_sentences invented names said twice."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        taken = set(NEEDLE_WORDS)  # names differ within a document
        needles = [(*needle_fact(rng, taken), rng.random()) for _ in range(rng.randint(1, max_needles))]
        filler = filler_sentences(rng, rng.randint(0, max_sentences))
        questions = [f"{QUESTION.format(name=name)} {number}." for name, number, _ in rng.sample(needles, len(needles))]
        docs.append(" ".join(haystack(filler, needles) + questions))
        passage = [new_name(rng, set(NEEDLE_WORDS)) for _ in range(rng.randint(4, 2 * max_sentences))]
        docs.append(" ".join(passage + passage))  # every name's second time can be copied from its first
    return docs


def _needle_pieces(num, seed):
    """(pieces, their bytes, the BPE sample) of --dataset needle: num training documents, and a tenth as many for
    validation from a generator of their own."""
    pieces = [(split, d, True) for split, n, s in [("train", num, seed), ("val", num // 10, seed + 1)]
              for d in needle_documents(n, s)]
    # the few words, syllables and digits there are: 2000 documents show them all
    return pieces, sum(nbytes(d) for _, d, _ in pieces), "\n".join(d for _, d, _ in pieces[:2000])


# ----------------------------------------------------------------------------- the whole job

FORMAT = 2  # recorded with the inputs; raise it when the same inputs would give other token ids


def _parse_tokenizer_spec(spec):
    if spec.startswith("bpe:"):
        if not regex.fullmatch(r"[0-9]+", spec[4:]) or int(spec[4:]) < 257:
            raise UserError(f"bad --tokenizer {spec}: bpe:N needs a whole number N >= 257, e.g. bpe:8192")
        return "bpe", int(spec[4:])
    if spec.endswith(".tiktoken") and not os.path.isfile(spec):
        raise UserError(f"tokenizer file {spec} not found; pass an existing .tiktoken file")
    if spec == "gpt2" or spec.endswith(".tiktoken"):
        return spec, None
    raise UserError(f"unknown --tokenizer {spec}; use bpe:N (e.g. bpe:8192), gpt2, or a PATH.tiktoken file")


def _build_ranks(spec, train_text, progress):
    kind, n = _parse_tokenizer_spec(spec)
    if kind == "bpe":
        return train_bpe(train_text, n, progress=progress)
    if kind == "gpt2":
        try:
            return dict(tiktoken.get_encoding("gpt2")._mergeable_ranks)
        except Exception as e:
            raise UserError(f"could not load tiktoken's gpt2 tokenizer ({type(e).__name__}); without network "
                            "use --tokenizer PATH.tiktoken with a local copy of r50k_base.tiktoken") from None
    try:
        ranks = load_ranks(spec)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read tokenizer file {spec} ({e}); pass a file in tiktoken's format") from None
    # every byte must be a token (else some text cannot be encoded) and ids must be 0..n-1
    if any(bytes([i]) not in ranks for i in range(256)) or sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{spec} is not a byte-level vocabulary with ranks 0..N-1; pass a GPT-2-style .tiktoken file")
    return ranks


def _working_facts_vocab(train_text, names, n, num_entities):
    """The smallest multiple of 128 above n with which every name is one token (None if none is found)."""
    # BPE training is greedy, so the vocabulary of size N is the first N-1 ranks of a larger one:
    # train one large vocabulary and try its prefixes.
    with contextlib.redirect_stdout(io.StringIO()):  # (it may stop early, and would say so)
        big = train_bpe(train_text, 2 * max(n, default_facts_vocab(num_entities)), progress=False)
    # (a size past len(big) + 1 holds all of big: training stopped early, for want of pairs, and a
    # bpe:N that large stops at the same place, so the first multiple of 128 beyond it is tried too)
    for size in range(128 * (n // 128 + 1), len(big) + 129, 128):
        enc = make_encoding({b: r for b, r in big.items() if r < size - 1})
        if all(len(enc.encode_ordinary(" " + s)) == 1 for s in names):
            return size
    return None


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _inputs_record(dataset, tokenizer, inputs, files, count, seed, val_fraction, text_field="text"):
    """What meta.json records as the data's inputs: only data made from the same record replaces a folder silently."""
    record = {"format": FORMAT, "dataset": dataset}
    if dataset == "facts":
        record.update(entities=count, seed=seed)
    elif dataset == "needle":
        record.update(docs=count, seed=seed, sentences=NEEDLE_SENTENCES, needles=NEEDLES)
    elif files is None:
        record.update(input=[SHAKESPEARE_URL], val_fraction=val_fraction)
    else:
        # files by path, size and modification time (as make does): instant, where hashing a large
        # corpus would not be; a tokenizer file by its content, as it is small
        h = hashlib.sha256()
        for path in files:
            st = os.stat(path)
            h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        record.update(input=[os.path.abspath(p) for p in inputs], files=len(files),
                      bytes=sum(os.path.getsize(p) for p in files), files_sha256=h.hexdigest()[:16],
                      val_fraction=val_fraction)
        if any(p.endswith(SHARD_SUFFIXES) for p in files):  # (so a folder prepared from .txt files stays prepared)
            record.update(text_field=text_field)
    record["tokenizer"] = tokenizer
    if tokenizer.endswith(".tiktoken"):
        with open(tokenizer, "rb") as f:
            record["tokenizer"] = "file sha256:" + _sha256(f.read())[:16]
    return record


def _already_prepared(out_dir, record, force):
    """True if out_dir holds intact data made from `record`. Data made from anything else is an error,
    unless force (then it is replaced)."""
    path = os.path.join(out_dir, "meta.json")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"out_dir {out_dir} is a file, not a folder: choose another --out_dir")
    if not force and not os.path.exists(path) and os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"{out_dir} holds files but no meta.json, so not data prepare_data.py made (or a preparation "
                        f"that was interrupted): prepare into another folder to keep them, or write over them with "
                        f"`python prepare_data.py ... --out_dir={out_dir} --force`")
    if force or not os.path.exists(path):
        return False
    try:
        with open(path) as f:
            meta = json.load(f)
        old = meta["inputs"]
        int(meta["vocab_size"]), meta["eot_id"], meta["fingerprint"]  # what the scripts read: damaged without them
    except (OSError, ValueError, TypeError, KeyError):
        meta, old = None, None
    if old == record:
        try:
            itemsize = np.dtype(meta["dtype"]).itemsize
            with open(os.path.join(out_dir, meta["tokenizer"]["file"]), "rb") as f:
                return (_sha256(f.read()) == meta["tokenizer_sha256"]
                        and os.path.getsize(os.path.join(out_dir, "train.bin")) == meta["train_tokens"] * itemsize
                        and os.path.getsize(os.path.join(out_dir, "val.bin")) == meta["val_tokens"] * itemsize)
        except (OSError, KeyError, TypeError):
            return False  # same inputs, damaged files: preparing again makes what was meant to be there
    if old is None:
        why = "its meta.json records no inputs: an older prepare_data.py made it, or it is damaged"
    else:
        keys = [k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)]
        why = "; ".join("the input files' sizes or modification times differ" if k == "files_sha256" else
                        f"{k} {json.dumps(old.get(k))[:60]} there, {json.dumps(record.get(k))[:60]} now" for k in keys)
    raise UserError(f"{out_dir} holds data prepared from other inputs ({why}); pass --out_dir=OTHER to keep it, "
                    "or --force to replace it")


def prepare(dataset="facts", input=None, tokenizer=None, out_dir=None, seed=1337, entities=None,
            val_fraction=0.1, progress=True, force=False, text_field="text", needle_docs=None):
    """Prepares out_dir (default data/<name>) and returns it. input: a path or a list of paths."""
    # 1. what the data is made from, checked before anything is read or written
    inputs = [input] if isinstance(input, str) else list(input or [])
    files = num = single = None  # single: a text corpus's length in characters, if it is one document
    if not 0 < val_fraction < 1:  # every dataset: a value out of range is a mistake even where it is not used
        raise UserError(f"--val_fraction {val_fraction} must be between 0 and 1, e.g. 0.1")
    if inputs and dataset in ("facts", "needle"):
        raise UserError(f"--input is not used by --dataset {dataset} (its documents are generated); drop it")
    if needle_docs is not None and dataset != "needle":
        raise UserError("--needle_docs only applies to --dataset needle; drop it")
    if dataset == "facts":
        num = DEFAULT_ENTITIES if entities is None else entities
        if not 1 <= num <= 5000:
            raise UserError(f"--entities {num} is out of range; use 1 to 5000")
        name, tokenizer = "facts", tokenizer or f"bpe:{default_facts_vocab(num)}"
    elif entities is not None:
        raise UserError("--entities only applies to --dataset facts; drop it")
    elif dataset == "needle":
        num = NEEDLE_DOCS if needle_docs is None else needle_docs
        if not 10 <= num <= 10 ** 6:
            raise UserError(f"--needle_docs {num} is out of range; use 10 to 1000000")
        name, tokenizer = "needle", tokenizer or "bpe:1024"
    elif dataset in ("shakespeare", "text"):
        tokenizer = tokenizer or "bpe:8192"
        if inputs:
            files = input_files(inputs)
        elif dataset == "text":
            raise UserError("--dataset text needs --input FILE or FOLDER (UTF-8 text)")
        name = "shakespeare" if dataset == "shakespeare" else \
            os.path.splitext(os.path.basename(os.path.normpath(inputs[0])))[0]
    else:
        raise UserError(f"unknown --dataset {dataset}; use facts, needle, shakespeare or text")
    _parse_tokenizer_spec(tokenizer)  # fail on a bad spec before a download
    record = _inputs_record(dataset, tokenizer, inputs, files, num, seed, val_fraction, text_field)
    out_dir = out_dir or os.path.join("data", name)
    if _already_prepared(out_dir, record, force):
        print(f"{out_dir} is already prepared from these inputs; nothing to do (--force prepares it again)")
        return out_dir

    # 2. the documents, as (split, text, eot) pieces, and the text the tokenizer trains on
    facts = None
    if dataset == "facts":
        facts = make_facts(num, seed)
        pieces = [("train", d, True) for d in facts["train_docs"]] + [("val", d, True) for d in facts["val_docs"]]
        total_bytes = sum(nbytes(d) for _, d, _ in pieces)
        sample = "\n".join(facts["train_docs"])  # all of it: every name must be seen (E <= 5000: < 30 MB)
    elif dataset == "needle":
        pieces, total_bytes, sample = _needle_pieces(num, seed)
    else:
        if files is None:
            try:
                print(f"downloading {SHAKESPEARE_URL}")
                with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                    sources = [io.StringIO(r.read().decode("utf-8"))]
            except Exception as e:
                raise UserError(f"could not download Tiny Shakespeare ({e}); download input.txt yourself "
                                f"from {SHAKESPEARE_URL} and pass --input FILE") from None
            total_bytes = len(sources[0].getvalue().encode())
        else:
            sources, total_bytes = files, input_bytes(files, text_field)
        single = single_document_chars(sources, text_field)
        if single is not None and int(single * (1 - val_fraction)) in (0, single):
            raise UserError(f"the input ({single} characters) is too short to split into train and val; "
                            "use a larger file")
        pieces = text_pieces(sources, val_fraction, single, text_field)
        sample = ""
        if tokenizer.startswith("bpe:"):
            sample, complete = bpe_sample(text_pieces(sources, val_fraction, single, text_field))
            if not complete:
                print(f"bpe: training on a sample, the first {nbytes(sample) / 1e6:.1f} MB of the training text "
                      f"(of about {total_bytes * (1 - val_fraction) / 1e6:,.0f} MB)")

    # 3. the tokenizer, trained (for bpe:N) on training text only
    t0 = time.time()
    ranks = _build_ranks(tokenizer, sample, progress)
    bpe_seconds = time.time() - t0 if tokenizer.startswith("bpe:") else None
    del sample
    enc = make_encoding(ranks)
    if facts is not None:
        names, capitals = ([e[k] for e in facts["entities"]] for k in ("name", "capital"))
        n_names, n_caps = (sum(len(enc.encode_ordinary(" " + s)) == 1 for s in ws) for ws in (names, capitals))
        print(f"entity names single-token: {n_names}/{len(names)}, capitals: {n_caps}/{len(capitals)}")
        if n_names < len(names) or n_caps < len(capitals):
            kind, n = _parse_tokenizer_spec(tokenizer)
            fix = _working_facts_vocab("\n".join(facts["train_docs"]), names + capitals,
                                       n if kind == "bpe" else 256, num)
            raise UserError(f"with --tokenizer {tokenizer} some names are split into several tokens; raise N in "
                            f"--tokenizer bpe:N" + (f" (--tokenizer bpe:{fix} works)" if fix else ""))
    dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
    tokenizer_bytes = tiktoken_bytes(ranks)

    # 4. token ids, streamed into temporary files; then everything is renamed into place, meta.json
    # last, so that a crash never leaves a half-prepared folder under the real names
    names = ["train.bin", "val.bin", "tokenizer.tiktoken"] + (["facts.json"] if facts else []) + ["meta.json"]
    tmp = {n: os.path.join(out_dir, n + ".tmp") for n in names}
    made_dir = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        tokens, docs = write_ids(ranks, pieces, {"train": tmp["train.bin"], "val": tmp["val.bin"]}, dtype,
                                  total_bytes, progress)
        for split, other in [("val", "train"), ("train", "val")]:
            if tokens[split] == 0:
                raise UserError(f"no {split} text: the corpus has {docs[other]} documents and every "
                                f"{1 / val_fraction:.3g}th is validation (--val_fraction {val_fraction}); "
                                "pass more documents or another --val_fraction")
        itemsize = np.dtype(dtype).itemsize
        # what checkpoints can record to name their data: the tokenizer, the ids' sizes and the inputs
        fingerprint = _sha256(tokenizer_bytes + json.dumps(
            {"inputs": record, "train_bytes": tokens["train"] * itemsize, "val_bytes": tokens["val"] * itemsize},
            sort_keys=True).encode())[:16]
        meta = {"dataset": dataset, "tokenizer": {"spec": tokenizer, "file": "tokenizer.tiktoken"},
                "vocab_size": enc.n_vocab, "eot_id": enc.eot_token, "train_tokens": tokens["train"],
                "val_tokens": tokens["val"], "dtype": np.dtype(dtype).name, "seed": seed, "bpe_seconds": bpe_seconds,
                "inputs": record, "tokenizer_sha256": _sha256(tokenizer_bytes), "fingerprint": fingerprint}
        contents = {"tokenizer.tiktoken": tokenizer_bytes, "meta.json": json.dumps(meta, indent=2).encode()}
        if facts is not None:
            facts_json = {"seed": seed, "num_entities": len(facts["entities"]), "entities": facts["entities"],
                          "probes": facts["probes"], "chance": facts["chance"],
                          "train_templates": TRAIN_TEMPLATES, "val_templates": VAL_TEMPLATES}
            contents["facts.json"] = json.dumps(facts_json, indent=1).encode()
        for n, data in contents.items():
            with open(tmp[n], "wb") as f:
                f.write(data)
        # the old meta.json goes first: an interrupted swap leaves a folder that says it is not prepared
        for stale in ["meta.json"] + ([] if facts else ["facts.json"]):  # (facts.json of an earlier facts run)
            if os.path.exists(os.path.join(out_dir, stale)):
                os.remove(os.path.join(out_dir, stale))
        for n in names:  # meta.json last
            os.replace(tmp[n], os.path.join(out_dir, n))
    except BaseException as e:
        for path in tmp.values():
            with contextlib.suppress(OSError):
                os.remove(path)
        if made_dir:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only if empty
        if isinstance(e, OSError):
            raise UserError(f"cannot write to {out_dir} ({e.strerror or e}); choose another --out_dir") from None
        raise

    bpe_time = f"{bpe_seconds:.2f} s" if bpe_seconds is not None else "none (pretrained)"
    print(f"dataset: {dataset}" + (f" ({len(facts['entities'])} entities)" if facts else ""))
    print(f"tokenizer: {tokenizer}, vocab size {enc.n_vocab} (eot id {enc.eot_token}), BPE training {bpe_time}")
    if facts is None and single is None:
        print(f"documents: {docs['train']:,} train, {docs['val']:,} val (every {1 / val_fraction:.3g}th)")
    print(f"tokens: {tokens['train']:,} train, {tokens['val']:,} val ({meta['dtype']})")
    print(f"wrote {out_dir} (fingerprint {fingerprint})")
    return out_dir


@dataclass
class PrepareConfig:
    dataset: str = "facts"  # facts | needle | shakespeare | text
    input: list = field(default_factory=list)  # FILE or FOLDER (.txt .jsonl .parquet), repeatable (shakespeare: a copy)
    text_field: str = "text"  # .jsonl/.parquet input: the field (column) holding each document's text
    tokenizer: Optional[str] = None  # bpe:N, gpt2 or PATH.tiktoken (default: bpe:8192; a small N for facts)
    out_dir: Optional[str] = None  # default data/<name>
    seed: int = 1337  # facts: the world's seed
    entities: Optional[int] = None  # facts: number of countries (default 100)
    needle_docs: Optional[int] = None  # needle: training documents (default 50000), and a tenth as many for val
    val_fraction: float = 0.1  # not facts: every 1/val_fraction-th document is validation (one document: its last part)
    force: bool = False  # replace out_dir even if it holds data made from other inputs


def main(argv=None):
    cfg = PrepareConfig()
    try:
        keys = parse_config(sys.argv[1:] if argv is None else argv, cfg, doc=__doc__)
        for k in ("out_dir", "tokenizer"):
            if k in keys and not getattr(cfg, k):
                raise UserError(f"--{k} is empty: give a value, or leave --{k} out for the default")
        prepare(cfg.dataset, cfg.input, cfg.tokenizer, cfg.out_dir, cfg.seed, cfg.entities, cfg.val_fraction,
                force=cfg.force, text_field=cfg.text_field, needle_docs=cfg.needle_docs)
    except UserError as e:
        die(str(e))


if __name__ == "__main__":
    main()
