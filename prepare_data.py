"""python prepare_data.py --dataset facts|shakespeare|text [--input FILE] [--tokenizer SPEC] [--out_dir DIR]

Turns text into the token files the training script reads: data/<name>/train.bin and val.bin
(flat arrays of token ids, documents separated by <|endoftext|>), meta.json, and the tokenizer
itself (tokenizer.tiktoken), so that a data folder is self-contained.

Datasets:
  facts        (default) a synthetic world of invented countries and their capital, language,
               currency and continent. STEM stores knowledge per token, so every country and
               capital name is made a single token, and validation states the same facts in
               wordings never seen in training: a low val loss means recalled facts, not copied text.
  shakespeare  Tiny Shakespeare (downloaded, or --input FILE for a local copy)
  text         any UTF-8 file given with --input FILE
Tokenizers (--tokenizer):
  bpe:N        byte-level BPE with N ids (256 bytes + merges + <|endoftext|>), trained here on the
               training split with GPT-2's pre-tokenizer (default: bpe:8192, or a small N for facts)
  gpt2         GPT-2's own tokenizer via tiktoken (downloads it once)
  PATH.tiktoken  ranks from a local tiktoken file, e.g. GPT-2's r50k_base.tiktoken
"""
import argparse
import base64
import heapq
import json
import math
import os
import random
import sys
import time
import urllib.request
from collections import Counter, defaultdict

import numpy as np
import regex
import tiktoken
from tqdm import tqdm

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer, exactly as tiktoken's gpt2/r50k_base encodings define it: text is first cut
# into pieces (words with their leading space, numbers, punctuation runs, whitespace) and BPE never
# merges across pieces. Using the same pattern lets tiktoken's fast Rust encoder run our vocabulary.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class DataError(Exception):
    """A problem with the user's inputs; main() prints it as one 'error: ...' line."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


# ----------------------------------------------------------------------------- BPE tokenizer

def _merge(word, pair, new_id):
    # replace every non-overlapping occurrence of `pair`, left to right ("aaa" -> "aa" "a")
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_bpe(text, vocab_size, progress=True):
    """Learn byte-level BPE ranks (bytes -> id) on `text`; id vocab_size-1 is left for <|endoftext|>.

    Each step merges the most frequent adjacent pair (ties: the pair with the smallest ids). The
    naive loop recounts every pair of the corpus each step; here the counts are updated only for
    the words that contain the merged pair, and a heap finds the maximum.
    """
    if vocab_size < 257:
        raise ValueError("vocab_size must be >= 257 (256 byte tokens + <|endoftext|>)")
    # Pre-tokenize once: a word that occurs 500 times is stored once with frequency 500.
    word_counts = Counter(regex.findall(GPT2_SPLIT_PATTERN, text))
    words = [list(w.encode("utf-8")) for w in word_counts]
    freqs = list(word_counts.values())
    vocab = [bytes([i]) for i in range(256)]  # id -> bytes; id == rank
    ranks = {b: i for i, b in enumerate(vocab)}

    pair_counts = defaultdict(int)  # (left id, right id) -> occurrences in the corpus
    where = defaultdict(set)  # pair -> indices of the words that (may) contain it
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += f
            where[pair].add(wi)
    # Max-heap via negated counts. Entries are never updated in place: when a count changes a new
    # entry is pushed, and a popped entry whose count is out of date is simply skipped.
    heap = [(-c, pair) for pair, c in pair_counts.items()]
    heapq.heapify(heap)

    bar = tqdm(total=vocab_size - 257, desc="bpe merges", disable=not progress)
    while len(vocab) < vocab_size - 1:
        if not heap:
            count = 0
        else:
            neg, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if -neg != count:
                continue  # stale entry
        if count < 2:
            bar.close()
            print(f"bpe: no pair occurs twice any more; stopping early with {len(vocab) + 1} tokens "
                  f"instead of {vocab_size}")
            break
        merged = vocab[pair[0]] + vocab[pair[1]]
        new_id = ranks.get(merged)
        if new_id is None:  # a new token; if the bytes exist already (made from another split), reuse
            new_id = len(vocab)
            vocab.append(merged)
            ranks[merged] = new_id
            bar.update()
        changed = set()
        for wi in where.pop(pair):
            old = words[wi]
            new = _merge(old, pair, new_id)
            if len(new) == len(old):
                continue  # the index is lazy too: this word lost the pair in an earlier merge
            f = freqs[wi]
            for p in zip(old, old[1:]):
                pair_counts[p] -= f
                changed.add(p)
            for p in zip(new, new[1:]):
                pair_counts[p] += f
                changed.add(p)
                where[p].add(wi)
            words[wi] = new
        for p in changed:
            if pair_counts[p] > 0:
                heapq.heappush(heap, (-pair_counts[p], p))
            else:
                del pair_counts[p]
    bar.close()
    return ranks


def bpe_encode_reference(text, ranks):
    """Plain-Python BPE encoding, the same algorithm as tiktoken (used by the tests to check it)."""
    ids = []
    for piece in regex.findall(GPT2_SPLIT_PATTERN, text):
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


def save_tiktoken(ranks, path):
    # tiktoken's file format: one "base64(token bytes) rank" line per token, in rank order
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    _write_atomic(path, "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in by_rank).encode())


def load_ranks(path):
    # Same format as tiktoken.load.load_tiktoken_bpe, parsed here because that function caches
    # files by their path (in /tmp/data-gym-cache) and would return a stale vocabulary after
    # prepare_data.py rewrites the tokenizer file of a data folder.
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def make_encoding(ranks, name="nanostem"):
    return tiktoken.Encoding(name=name, pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})


def load_tokenizer(data_dir):
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        name = os.path.basename(os.path.normpath(data_dir))
        ds = name if name in ("facts", "shakespeare") else "facts|shakespeare|text"
        raise FileNotFoundError(f"{meta_path} not found: prepare the data first with "
                                f"python prepare_data.py --dataset {ds} --out_dir {data_dir}")
    with open(meta_path) as f:
        meta = json.load(f)
    enc = make_encoding(load_ranks(os.path.join(data_dir, meta["tokenizer"]["file"])))
    if enc.eot_token != meta["eot_id"]:
        raise ValueError(f"{data_dir}: tokenizer file and meta.json disagree; re-run prepare_data.py")
    return enc


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

    def new_name():  # a fresh invented word, e.g. "Velmora" (2-3 syllables)
        while True:
            name = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                           for _ in range(rng.choice([2, 3]))).capitalize()
            if name.lower() not in taken:
                taken.add(name.lower())
                return name

    entities = []
    for _ in range(num_entities):
        ent = {"name": new_name(), "capital": new_name()}
        ent.update({attr: rng.choice(pool) for attr, pool in POOLS.items()})
        entities.append(ent)

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


# ----------------------------------------------------------------------------- the whole job

def _write_atomic(path, data):
    # write then rename: a crash or error never leaves a half-written file under the final name
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise DataError(f"--input {path} is not UTF-8 text; convert it to UTF-8 first") from None
    except OSError as e:
        raise DataError(f"cannot read --input {path} ({e.strerror or e}); pass an existing text file") from None


def _parse_tokenizer_spec(spec):
    if spec.startswith("bpe:"):
        if not regex.fullmatch(r"[0-9]+", spec[4:]) or int(spec[4:]) < 257:
            raise DataError(f"bad --tokenizer {spec}: bpe:N needs a whole number N >= 257, e.g. bpe:8192")
        return "bpe", int(spec[4:])
    if spec.endswith(".tiktoken") and not os.path.isfile(spec):
        raise DataError(f"tokenizer file {spec} not found; pass an existing .tiktoken file")
    if spec == "gpt2" or spec.endswith(".tiktoken"):
        return spec, None
    raise DataError(f"unknown --tokenizer {spec}; use bpe:N (e.g. bpe:8192), gpt2, or a PATH.tiktoken file")


def _build_ranks(spec, train_text, progress):
    kind, n = _parse_tokenizer_spec(spec)
    if kind == "bpe":
        return train_bpe(train_text, n, progress=progress)
    if kind == "gpt2":
        try:
            return dict(tiktoken.get_encoding("gpt2")._mergeable_ranks)
        except Exception as e:
            raise DataError(f"could not load tiktoken's gpt2 tokenizer ({type(e).__name__}); without network "
                            "use --tokenizer PATH.tiktoken with a local copy of r50k_base.tiktoken") from None
    try:
        ranks = load_ranks(spec)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read tokenizer file {spec} ({e}); pass a file in tiktoken's format") from None
    # every byte must be a token (else some text cannot be encoded) and ids must be 0..n-1
    if any(bytes([i]) not in ranks for i in range(256)) or sorted(ranks.values()) != list(range(len(ranks))):
        raise DataError(f"{spec} is not a byte-level vocabulary with ranks 0..N-1; pass a GPT-2-style .tiktoken file")
    return ranks


def _chunks(text, size=1 << 16):
    # Cut the text for the progress bar only where the pre-tokenizer cuts too, and never right after
    # whitespace (the split pattern treats whitespace at the end of a string specially), so
    # encoding chunk by chunk gives exactly the tokens of encoding the whole text at once.
    start = 0
    for m in regex.finditer(GPT2_SPLIT_PATTERN, text):
        if m.start() - start >= size and not text[m.start() - 1].isspace():
            yield text[start:m.start()]
            start = m.start()
    yield text[start:]


def prepare(dataset="facts", input=None, tokenizer=None, out_dir=None, seed=1337, entities=None,
            val_fraction=0.1, progress=True):
    # 1. the text, split into training and validation documents
    facts = None
    if dataset == "facts":
        if input is not None:
            raise DataError("--input is not used by --dataset facts (the facts are generated); drop it")
        num = DEFAULT_ENTITIES if entities is None else entities
        if not 1 <= num <= 5000:
            raise DataError(f"--entities {num} is out of range; use 1 to 5000")
        facts = make_facts(num, seed)
        train_docs, val_docs = facts["train_docs"], facts["val_docs"]
        name, tokenizer = "facts", tokenizer or f"bpe:{default_facts_vocab(num)}"
    elif dataset in ("shakespeare", "text"):
        if entities is not None:
            raise DataError("--entities only applies to --dataset facts; drop it")
        if not 0 < val_fraction < 1:
            raise DataError(f"--val_fraction {val_fraction} must be between 0 and 1, e.g. 0.1")
        tokenizer = tokenizer or "bpe:8192"
        _parse_tokenizer_spec(tokenizer)  # fail on a bad spec before a download
        if input is not None:
            text = _read_text(input)
        elif dataset == "text":
            raise DataError("--dataset text needs --input FILE (a UTF-8 text file)")
        else:
            try:
                print(f"downloading {SHAKESPEARE_URL}")
                with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                    text = r.read().decode("utf-8")
            except Exception as e:
                raise DataError(f"could not download Tiny Shakespeare ({e}); download input.txt yourself "
                                f"from {SHAKESPEARE_URL} and pass --input FILE") from None
        name = "shakespeare" if dataset == "shakespeare" else os.path.splitext(os.path.basename(input))[0]
        cut = int(len(text) * (1 - val_fraction))  # the last part of the text is validation
        if cut == 0 or cut == len(text) or not text[:cut].strip() or not text[cut:].strip():
            raise DataError(f"the input ({len(text)} characters) is too short to split into train and val; "
                            "use a larger file")
        train_docs, val_docs = [text[:cut]], [text[cut:]]
    else:
        raise DataError(f"unknown --dataset {dataset}; use facts, shakespeare or text")
    out_dir = out_dir or os.path.join("data", name)

    # 2. the tokenizer, trained (for bpe:N) on the training split only
    t0 = time.time()
    ranks = _build_ranks(tokenizer, "\n".join(train_docs), progress)
    bpe_seconds = time.time() - t0 if tokenizer.startswith("bpe:") else None
    enc = make_encoding(ranks)
    if facts is not None:
        names = [e["name"] for e in facts["entities"]]
        capitals = [e["capital"] for e in facts["entities"]]
        n_names = sum(len(enc.encode_ordinary(" " + s)) == 1 for s in names)
        n_caps = sum(len(enc.encode_ordinary(" " + s)) == 1 for s in capitals)
        print(f"entity names single-token: {n_names}/{len(names)}, capitals: {n_caps}/{len(capitals)}")
        if n_names < len(names) or n_caps < len(capitals):
            kind, n = _parse_tokenizer_spec(tokenizer)
            fix = f"bpe:{n + 512}" if kind == "bpe" else f"bpe:{default_facts_vocab(len(names))}"
            raise DataError(f"with --tokenizer {tokenizer} some names are split into several tokens; "
                            f"raise N in --tokenizer bpe:N (e.g. --tokenizer {fix})")

    # 3. token ids. facts: short documents, each ended by <|endoftext|> so that they never run into
    # each other; shakespeare/text: one long document, encoded in chunks only for the progress bar
    def encode(docs, split):
        pieces = docs if facts is not None else list(_chunks(docs[0]))
        ids = []
        for piece in tqdm(pieces, desc=f"tokenizing {split}", disable=not progress):
            ids.extend(enc.encode_ordinary(piece))
            if facts is not None:
                ids.append(enc.eot_token)
        return ids

    train_ids, val_ids = encode(train_docs, "train"), encode(val_docs, "val")
    vocab_size = enc.n_vocab
    dtype = np.uint16 if vocab_size <= 65536 else np.uint32

    # 4. write everything (each file to a temporary name first, then renamed into place)
    meta = {"dataset": dataset, "tokenizer": {"spec": tokenizer, "file": "tokenizer.tiktoken"},
            "vocab_size": vocab_size, "eot_id": enc.eot_token, "train_tokens": len(train_ids),
            "val_tokens": len(val_ids), "dtype": np.dtype(dtype).name, "seed": seed, "bpe_seconds": bpe_seconds}
    try:
        os.makedirs(out_dir, exist_ok=True)
        _write_atomic(os.path.join(out_dir, "train.bin"), np.array(train_ids, dtype=dtype).tobytes())
        _write_atomic(os.path.join(out_dir, "val.bin"), np.array(val_ids, dtype=dtype).tobytes())
        save_tiktoken(ranks, os.path.join(out_dir, "tokenizer.tiktoken"))
        facts_path = os.path.join(out_dir, "facts.json")
        if facts is not None:
            facts_json = {"seed": seed, "num_entities": len(facts["entities"]), "entities": facts["entities"],
                          "probes": facts["probes"], "chance": facts["chance"],
                          "train_templates": TRAIN_TEMPLATES, "val_templates": VAL_TEMPLATES}
            _write_atomic(facts_path, json.dumps(facts_json, indent=1).encode())
        elif os.path.exists(facts_path):
            os.remove(facts_path)  # left over from an earlier facts run into this folder
        _write_atomic(os.path.join(out_dir, "meta.json"), json.dumps(meta, indent=2).encode())
    except OSError as e:
        raise DataError(f"cannot write to {out_dir} ({e.strerror or e}); choose another --out_dir") from None

    bpe_time = f"{bpe_seconds:.2f} s" if bpe_seconds is not None else "none (pretrained)"
    print(f"dataset: {dataset}" + (f" ({len(facts['entities'])} entities)" if facts else ""))
    print(f"tokenizer: {tokenizer}, vocab size {vocab_size} (eot id {enc.eot_token}), BPE training {bpe_time}")
    print(f"tokens: {len(train_ids):,} train, {len(val_ids):,} val ({meta['dtype']})")
    print(f"wrote {out_dir}")
    return out_dir


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors also become one "error: ..." line, exit code 1
        die(f"{message} (see python prepare_data.py --help)")


def main(argv=None):
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="facts", choices=["facts", "shakespeare", "text"])
    p.add_argument("--input", help="local text file (shakespeare: a local copy; text: required)")
    p.add_argument("--tokenizer", help="bpe:N, gpt2 or PATH.tiktoken (default: bpe:8192; small N for facts)")
    p.add_argument("--out_dir", help="default data/<name>")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--entities", type=int, help=f"facts: number of countries (default {DEFAULT_ENTITIES})")
    p.add_argument("--val_fraction", type=float, default=0.1, help="shakespeare/text: last fraction is validation")
    args = p.parse_args(argv)
    try:
        prepare(args.dataset, args.input, args.tokenizer, args.out_dir, args.seed, args.entities, args.val_fraction)
    except DataError as e:
        die(str(e))


if __name__ == "__main__":
    main()
