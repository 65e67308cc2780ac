"""
Turns text into the token files training reads: data/<name>/train.bin and val.bin (flat arrays of
token ids, documents separated by <|endoftext|>), meta.json, and the tokenizer (tokenizer.tiktoken),
so that a data folder is self-contained. The BPE trainer itself is tokenizer.py; no torch here.

    python prepare_data.py                                    # facts (100 countries) into data/facts
    python prepare_data.py --entities=400 --out_dir=data/facts400
    python prepare_data.py --dataset=shakespeare --tokenizer=gpt2 --out_dir=data/shakespeare-gpt2
    python prepare_data.py --dataset=text --input=books/ --input=notes.txt --tokenizer=bpe:4096

Datasets:
  facts        (default) a synthetic world of invented countries and their capital, language,
               currency and continent. STEM stores knowledge per token, so every country and
               capital name is made a single token, and validation states the same facts in
               wordings never seen in training: a low val loss means recalled facts, not copied text.
  shakespeare  Tiny Shakespeare (downloaded, or --input FILE for a local copy)
  text         UTF-8 text: --input FILE, repeated, or a FOLDER (its .txt files, sorted, subfolders too)
Text corpora (shakespeare, text):
  documents    each file is a document, and a line holding only <|endoftext|> also ends one (that line
               and the line breaks around it are dropped, and so are empty documents). Each document is
               encoded whole and followed by the <|endoftext|> token.
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
import multiprocessing
import multiprocessing.pool
import os
import random
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import regex
import tiktoken
from tqdm import tqdm

from configurator import UserError, die, parse_config
from tokenizer import EOT, load_ranks, make_encoding, tiktoken_bytes, train_bpe

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


def make_facts(num_entities, seed):
    rng = random.Random(seed)
    taken = {w.lower() for t in [*TRAIN_TEMPLATES.values(), *VAL_TEMPLATES.values()] for s in t
             for w in regex.findall(r"\p{L}+", s)}
    taken |= {w.lower() for pool in POOLS.values() for w in pool}

    def new_name():  # a fresh invented word, e.g. "Zurgilpil" (2-3 syllables)
        while True:
            name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                           for _ in range(rng.choice([2, 3]))).capitalize()
            if name.lower() not in taken:
                taken.add(name.lower())
                return name

    entities = [{"name": new_name(), "capital": new_name(), **{attr: rng.choice(pool) for attr, pool in POOLS.items()}}
                for _ in range(num_entities)]

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


# ----------------------------------------------------------------------------- reading a corpus

# A line holding only <|endoftext|> ends a document. The line break before it and the one after it go
# with it, so that "\n<|endoftext|>\n".join(documents) reads back as exactly those documents.
SEPARATOR = regex.compile(r"\n?^<\|endoftext\|>$\n?", regex.MULTILINE)
READ_CHARS = 1 << 20  # characters read at a time, and about the longest piece of a document handed on
BATCH_BYTES = 1 << 20  # text per encoding task: large enough to hide the per-task cost, small enough for flat memory
BPE_SAMPLE_BYTES = 10 << 20  # bpe:N on a text corpus trains on at most this much of its training text
PARALLEL_MIN_BYTES = 16 << 20  # smaller corpora are encoded without worker processes
FORMAT = 2  # recorded with the inputs; raise it when the same inputs would give other token ids


def _safe_cut(text, end):
    """The last position p in 1..end-1 where text can be cut into text[:p] and text[p:] so that the
    two encode to exactly the tokens of the whole (0 if there is none): just before a line break or
    a space that follows a non-space character.

    Why that is safe: GPT-2's pre-tokenizer never puts a non-space character and a following space
    into one piece (a piece may only start with a space), so p is a piece boundary whatever follows,
    and the pieces before p are found the same way without the rest: only whitespace patterns look
    ahead (\\s++$, \\s+(?!\\S)) and the character before p is not whitespace. BPE never merges across
    pieces. (str.isspace is true for every character that \\s matches, so the test errs on the safe side.)
    """
    best = 0
    for ch in "\n ":
        p = text.rfind(ch, 1, end)
        while p > 0 and text[p - 1].isspace():
            p = text.rfind(ch, 1, p)
        best = max(best, p)
    return best


def _read_pieces(f):
    """The documents of an open text file as (text, ends_document) pieces, read READ_CHARS at a time.

    A document is handed on whole, or if it is longer than READ_CHARS, in pieces cut by _safe_cut,
    so memory stays at a few blocks whatever the sizes of the file and its documents (except for a
    document without a single space or line break, which is read whole). Empty documents are dropped.
    """
    buf, started, eof = "", False, False  # started: part of the current document was handed on
    while not eof:
        block = f.read(READ_CHARS)
        eof = not block
        buf += block
        start = 0
        for m in SEPARATOR.finditer(buf):
            if m.end() == len(buf) and not eof:
                break  # the line may go on in the next block: decide then
            if m.start() > start or started:
                yield buf[start:m.start()], True
            start, started = m.end(), False
        buf = buf[start:]  # starts a line, or (after a cut) with a space: SEPARATOR's ^ stays right
        if eof:
            if buf or started:
                yield buf, True
        elif len(buf) > READ_CHARS:
            # a long document: hand on what is safe, keeping the last characters, which may be the
            # beginning of a separator line
            cut = _safe_cut(buf, len(buf) - len("\n<|endoftext|>\n"))
            if cut:
                yield buf[:cut], False
                buf, started = buf[cut:], True


def _file_pieces(source):
    if isinstance(source, io.StringIO):  # text already in memory (the downloaded Tiny Shakespeare)
        source.seek(0)
        yield from _read_pieces(source)
        return
    try:
        with open(source, encoding="utf-8") as f:
            yield from _read_pieces(f)
    except UnicodeDecodeError:
        raise UserError(f"--input {source} is not UTF-8 text; convert it to UTF-8 first") from None
    except OSError as e:
        raise UserError(f"cannot read --input {source} ({e.strerror or e}); pass an existing text file") from None


def _is_val(i, val_fraction):
    # every 1/val_fraction-th document (0.1: the 10th, 20th, ...): spread evenly over the corpus,
    # and exactly floor(n * val_fraction) of n documents
    return math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)


def _single_document_chars(sources):
    """The corpus's length in characters if it is one document (one file, no separator line), else None."""
    if len(sources) != 1:
        return None
    chars = docs = 0
    for text, ends in _file_pieces(sources[0]):
        chars += len(text)
        docs += ends
        if docs > 1:
            return None
    return chars


def _text_pieces(sources, val_fraction, single_chars):
    """The corpus as (split, text, eot) pieces, in order; eot: a document ends here and gets <|endoftext|>."""
    if single_chars is not None:
        # One document (e.g. Tiny Shakespeare) cannot be split by documents: as before, its last
        # val_fraction of characters is validation, each part encoded on its own, no <|endoftext|>.
        cut, pos = int(single_chars * (1 - val_fraction)), 0
        for text, _ in _file_pieces(sources[0]):
            if pos < cut:
                yield "train", text[:cut - pos], False
            if pos + len(text) > cut:
                yield "val", text[max(cut - pos, 0):], False
            pos += len(text)
        return
    i = 0
    for source in sources:
        for text, ends in _file_pieces(source):
            yield ("val" if _is_val(i, val_fraction) else "train"), text, ends
            i += ends


def _nbytes(text):
    return len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii is O(1) on str


def _bpe_sample(pieces):
    """The first BPE_SAMPLE_BYTES of training text (a line break after each document) and whether that is all of it."""
    parts, size = [], 0
    for split, text, eot in pieces:
        if split != "train":
            continue
        if size >= BPE_SAMPLE_BYTES:
            return "".join(parts), False
        parts.append(text + "\n" if eot else text)
        size += _nbytes(text)
    return "".join(parts), True


def _input_files(inputs):
    """The files that --input names, in order; a folder stands for its .txt files (sorted, subfolders too)."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names if n.endswith(".txt"))
            if not found:
                raise UserError(f"--input {path} is a folder without .txt files; pass text files or a folder of them")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"cannot read --input {path} (no such file or folder); pass an existing text file")
    return files


# ----------------------------------------------------------------------------- encoding, on all cores

def _encode_pieces(pieces, dtype):
    """The token ids of consecutive (text, eot) pieces of one split, encoded with _worker_enc."""
    # The pieces are joined with the <|endoftext|> text between documents and encoded in one call that
    # takes it as the special token: tiktoken encodes the text between special tokens on its own, so
    # every document gets the ids of encoding it alone. A document holding "<|endoftext|>" as text is
    # encoded apart, as ordinary text (the literal cannot straddle two pieces: cuts are before spaces).
    enc, out, run = _worker_enc, [], []

    def flush():
        if run:
            out.append(enc.encode_to_numpy("".join(run), allowed_special={EOT}))
            run.clear()

    for text, eot in pieces:
        if EOT in text:
            flush()
            out.append(np.array(enc.encode_ordinary(text) + [enc.eot_token] * eot, dtype=np.uint32))
        else:
            run.append(text)
            if eot:
                run.append(EOT)
    flush()
    return np.concatenate(out).astype(dtype) if out else np.zeros(0, dtype)


_worker_enc = None  # the encoding, in each worker process (or in this process, for a small corpus)


def _init_worker(ranks):
    global _worker_enc
    _worker_enc = make_encoding(ranks)


def _write_ids(ranks, pieces, paths, dtype, total_bytes, progress):
    """Encodes the (split, text, eot) pieces on all cores and appends each split's ids to paths[split],
    in order. Returns the tokens and documents of each split."""
    # Worker processes, not threads: tiktoken does release the GIL, but on a 2-core machine two threads
    # reached 10.9 MB/s and two processes 13-16 MB/s (301 MB of text, GPT-2's tokenizer). They are
    # forked on Linux (fast, and a caller's unguarded script is not run again as with spawn), before
    # the progress bar starts its thread. A small corpus is encoded by one thread: starting processes
    # would cost more than it saves.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = cores if total_bytes >= PARALLEL_MIN_BYTES else 1
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(ranks,))
    else:
        pool = multiprocessing.pool.ThreadPool(1, initializer=_init_worker, initargs=(ranks,))
    tokens, docs = {"train": 0, "val": 0}, {"train": 0, "val": 0}
    batch, batch_bytes = {"train": [], "val": []}, {"train": 0, "val": 0}
    in_flight = deque()  # (split, result, bytes) in the order the ids must be written
    t0 = time.time()
    with pool, open(paths["train"], "wb") as ftrain, open(paths["val"], "wb") as fval, \
            tqdm(total=total_bytes, desc="tokenizing", unit="B", unit_scale=True, disable=not progress) as bar:
        files = {"train": ftrain, "val": fval}

        def write_oldest():
            split, result, nbytes = in_flight.popleft()
            ids = result.get()
            files[split].write(memoryview(ids))
            tokens[split] += len(ids)
            bar.update(nbytes)

        def submit(split):
            in_flight.append((split, pool.apply_async(_encode_pieces, (batch[split], dtype)), batch_bytes[split]))
            batch[split], batch_bytes[split] = [], 0
            if len(in_flight) > 2 * workers:  # bounded: a few batches of text and ids in memory at once
                write_oldest()

        for split, text, eot in pieces:
            batch[split].append((text, eot))
            batch_bytes[split] += _nbytes(text)
            docs[split] += eot
            if batch_bytes[split] >= BATCH_BYTES:
                submit(split)
        for split in batch:
            if batch[split]:
                submit(split)
        while in_flight:
            write_oldest()
        bar.update(max(total_bytes - bar.n, 0))  # the separator lines (and \r of \r\n) were read too
    dt = time.time() - t0
    if progress:
        print(f"tokenized {total_bytes / 1e6:,.1f} MB in {dt:.1f} s: {total_bytes / 1e6 / max(dt, 1e-9):.1f} MB/s "
              f"({workers} worker{'s' if workers > 1 else ''})")
    return tokens, docs


# ----------------------------------------------------------------------------- the whole job

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


def _inputs_record(dataset, tokenizer, inputs, files, num_entities, seed, val_fraction):
    """What meta.json records as the data's inputs: only data made from the same record replaces a folder silently."""
    record = {"format": FORMAT, "dataset": dataset}
    if dataset == "facts":
        record.update(entities=num_entities, seed=seed)
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
            val_fraction=0.1, progress=True, force=False):
    """Prepares out_dir (default data/<name>) and returns it. input: a path or a list of paths."""
    # 1. what the data is made from, checked before anything is read or written
    inputs = [input] if isinstance(input, str) else list(input or [])
    files = num = None
    if not 0 < val_fraction < 1:  # every dataset: a value out of range is a mistake even where it is not used
        raise UserError(f"--val_fraction {val_fraction} must be between 0 and 1, e.g. 0.1")
    if dataset == "facts":
        if inputs:
            raise UserError("--input is not used by --dataset facts (the facts are generated); drop it")
        num = DEFAULT_ENTITIES if entities is None else entities
        if not 1 <= num <= 5000:
            raise UserError(f"--entities {num} is out of range; use 1 to 5000")
        name, tokenizer = "facts", tokenizer or f"bpe:{default_facts_vocab(num)}"
    elif dataset in ("shakespeare", "text"):
        if entities is not None:
            raise UserError("--entities only applies to --dataset facts; drop it")
        tokenizer = tokenizer or "bpe:8192"
        if inputs:
            files = _input_files(inputs)
        elif dataset == "text":
            raise UserError("--dataset text needs --input FILE or FOLDER (UTF-8 text)")
        name = "shakespeare" if dataset == "shakespeare" else \
            os.path.splitext(os.path.basename(os.path.normpath(inputs[0])))[0]
    else:
        raise UserError(f"unknown --dataset {dataset}; use facts, shakespeare or text")
    _parse_tokenizer_spec(tokenizer)  # fail on a bad spec before a download
    record = _inputs_record(dataset, tokenizer, inputs, files, num, seed, val_fraction)
    out_dir = out_dir or os.path.join("data", name)
    if _already_prepared(out_dir, record, force):
        print(f"{out_dir} is already prepared from these inputs; nothing to do (--force prepares it again)")
        return out_dir

    # 2. the documents, as (split, text, eot) pieces, and the text the tokenizer trains on
    facts = None
    if dataset == "facts":
        facts = make_facts(num, seed)
        pieces = [("train", d, True) for d in facts["train_docs"]] + [("val", d, True) for d in facts["val_docs"]]
        total_bytes = sum(_nbytes(d) for _, d, _ in pieces)
        sample = "\n".join(facts["train_docs"])  # all of it: every name must be seen (E <= 5000: < 30 MB)
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
            sources, total_bytes = files, sum(os.path.getsize(p) for p in files)
        single = _single_document_chars(sources)
        if single is not None and int(single * (1 - val_fraction)) in (0, single):
            raise UserError(f"the input ({single} characters) is too short to split into train and val; "
                            "use a larger file")
        pieces = _text_pieces(sources, val_fraction, single)
        sample = ""
        if tokenizer.startswith("bpe:"):
            sample, complete = _bpe_sample(_text_pieces(sources, val_fraction, single))
            if not complete:
                print(f"bpe: training on a sample, the first {_nbytes(sample) / 1e6:.1f} MB of the training text "
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
        tokens, docs = _write_ids(ranks, pieces, {"train": tmp["train.bin"], "val": tmp["val.bin"]}, dtype,
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
    dataset: str = "facts"  # facts | shakespeare | text
    input: list = field(default_factory=list)  # FILE or FOLDER of .txt files, repeatable (shakespeare: a local copy)
    tokenizer: Optional[str] = None  # bpe:N, gpt2 or PATH.tiktoken (default: bpe:8192; a small N for facts)
    out_dir: Optional[str] = None  # default data/<name>
    seed: int = 1337  # facts: the world's seed
    entities: Optional[int] = None  # facts: number of countries (default 100)
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
                force=cfg.force)
    except UserError as e:
        die(str(e))


if __name__ == "__main__":
    main()
