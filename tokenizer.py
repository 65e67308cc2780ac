"""
The tokenizer: a byte-level BPE trainer, tiktoken's file format, and loading a data folder's
tokenizer. It is not the corpus reader (prepare_data.py) and holds nothing about STEM.

    python prepare_data.py --tokenizer=bpe:4096 ...     # trains one with train_bpe() on the training split
    from tokenizer import load_tokenizer; enc = load_tokenizer("data/facts")    # what the scripts do

Our BPE learns merges the way GPT-2's did (GPT-2's pre-tokenizer cuts text into pieces, merges
never cross pieces) and saves them in tiktoken's file format, so tiktoken's fast Rust encoder runs
our vocabulary: training is the Python below, encoding is tiktoken (tests/test_data.py checks it
against the same algorithm in plain Python).
"""
import base64
import heapq
import json
import os
from collections import Counter, defaultdict

import regex
import tiktoken
from tqdm import tqdm

from configurator import UserError

EOT = "<|endoftext|>"
# GPT-2's pre-tokenizer, exactly as tiktoken's gpt2/r50k_base encodings define it: text is first cut
# into pieces (words with their leading space, numbers, punctuation runs, whitespace) and BPE never
# merges across pieces. Using the same pattern lets tiktoken's fast Rust encoder run our vocabulary.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


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


def tiktoken_bytes(ranks):
    # tiktoken's file format: one "base64(token bytes) rank" line per token, in rank order
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in by_rank).encode()


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
    """The tiktoken Encoding a prepared data folder was made with (its tokenizer.tiktoken)."""
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        raise UserError(f"no prepared data in {data_dir} (meta.json missing): prepare it first "
                        f"(python prepare_data.py --help)")
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        enc = make_encoding(load_ranks(os.path.join(data_dir, meta["tokenizer"]["file"])))
        assert enc.eot_token == meta["eot_id"], "the tokenizer file and meta.json disagree"
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise UserError(f"{data_dir} is damaged (its tokenizer is missing or unreadable): prepare it again "
                        f"(python prepare_data.py ... --out_dir={data_dir} --force)") from None
    return enc
