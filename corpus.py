"""
Reading text corpora (.txt, .jsonl, .parquet) as documents, and encoding them on all cores in bounded
memory: what prepare_data.py does with --dataset text and shakespeare. No torch here.

    python prepare_data.py --dataset=text --input=books/ --input=notes.txt --tokenizer=gpt2
    python prepare_data.py --dataset=text --input=shards/ --text_field=content

Inputs (--input, repeatable):
  FILE.txt      UTF-8 text (any name other than .jsonl or .parquet): a line holding only <|endoftext|>
                ends a document, and so does the end of the file
  FILE.jsonl    one JSON object a line; its field text_field ("text") is one document
  FILE.parquet  the column text_field, one document a row, read about 8 MB of rows at a time (needs pyarrow)
  FOLDER        its .txt, .jsonl and .parquet files, sorted, subfolders too
A row's text is one document whatever it holds: an <|endoftext|> in it is ordinary text, as in a .txt
document. Empty documents (and null rows) are dropped.
"""
import io
import json
import math
import multiprocessing
import multiprocessing.pool
import os
import sys
import time
from collections import deque

import numpy as np
import regex
from tqdm import tqdm

from configurator import UserError
from tokenizer import EOT, make_encoding

# A line holding only <|endoftext|> ends a document. The line break before it and the one after it go
# with it, so that "\n<|endoftext|>\n".join(documents) reads back as exactly those documents.
SEPARATOR = regex.compile(r"\n?^<\|endoftext\|>$\n?", regex.MULTILINE)
READ_CHARS = 1 << 20  # characters read at a time, and about the longest piece of a document handed on
BATCH_BYTES = 1 << 20  # text per encoding task: large enough to hide the per-task cost, small enough for flat memory
BPE_SAMPLE_BYTES = 10 << 20  # bpe:N on a text corpus trains on at most this much of its training text
PARALLEL_MIN_BYTES = 16 << 20  # smaller corpora are encoded without worker processes
SHARD_SUFFIXES = (".jsonl", ".parquet")  # files of rows, one document each; any other file is text
PARQUET_BYTES = 8 << 20  # text read from a .parquet file at a time (on average): all that is held of it,
PARQUET_ROWS = 2048  # and at most this many rows


# ----------------------------------------------------------------------------- reading a corpus

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


def _row_pieces(text):
    """One document held whole (a row) as (text, ends_document) pieces of at most about READ_CHARS, cut by
    _safe_cut as _read_pieces cuts a long document, so that one encoding task never gets a huge row."""
    start = 0
    while len(text) - start > READ_CHARS:
        # (a cut inside the window is safe in the whole text: _safe_cut looks only at the characters at p-1 and p)
        cut = _safe_cut(text[start:start + READ_CHARS], READ_CHARS)
        if not cut:
            break  # a million characters without a space or line break: the rest goes whole
        yield text[start:start + cut], False
        start += cut
    yield text[start:], True


def _is_unicode(text):
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _jsonl_pieces(f, path, text_field):
    for n, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{n} is not a JSON object ({e}); a .jsonl file holds one object a line") from None
        if not isinstance(row, dict) or text_field not in row:
            fields = ", ".join(map(str, row)) if isinstance(row, dict) else f"a JSON {type(row).__name__}, no fields"
            raise UserError(f"{path}:{n} has no field {text_field!r} (it has: {fields}); "
                            f"pass --text_field=NAME to read another field")
        text = row[text_field]
        if text is not None and not isinstance(text, str):
            raise UserError(f"{path}:{n}: field {text_field!r} holds a JSON {type(text).__name__}, not text; "
                            f"pass --text_field=NAME of a text field")
        if text and ("\\ud" in line or "\\uD" in line) and not _is_unicode(text):
            # JSON can escape half a surrogate pair, which is no character: tiktoken could not encode it
            raise UserError(f"{path}:{n}: field {text_field!r} holds an unpaired \\ud800-\\udfff escape, not text; "
                            "repair or drop that line")
        if text:  # empty and null texts are no documents
            yield from _row_pieces(text)


def _parquet_file(path, text_field):
    """pyarrow's ParquetFile for path, with its column text_field checked (close it when done)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # only .parquet input needs pyarrow
        raise UserError(f"reading {path} (.parquet) needs pyarrow: pip install pyarrow") from None
    try:
        # a column chunk read a block at a time, not whole (pyarrow's default, pre_buffer, reads it whole,
        # and a row group may be the whole file: 200 MB for a 300 MB corpus): memory stays at a batch of rows
        pf = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except (OSError, ValueError) as e:  # (pyarrow's errors are OSError or ValueError)
        raise UserError(f"cannot read --input {path} as Parquet ({str(e).splitlines()[0]}); "
                        "pass a .parquet file") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise UserError(f"{path} has no column {text_field!r} (its columns: {', '.join(names)}); "
                        "pass --text_field=NAME to read another column")
    kind = pf.schema_arrow.field(text_field).type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise UserError(f"column {text_field!r} of {path} holds {kind}, not text; "
                        "pass --text_field=NAME of a text (string) column")
    return pf


def _column_bytes(pf, text_field):
    """The column's uncompressed size in the file's metadata: about its text (it also counts a 4-byte length
    a row and the page headers)."""
    meta = pf.metadata
    return sum(rg.column(j).total_uncompressed_size for rg in map(meta.row_group, range(meta.num_row_groups))
               for j in range(rg.num_columns) if rg.column(j).path_in_schema == text_field)


def _parquet_pieces(path, text_field):
    pf = _parquet_file(path, text_field)
    try:
        with pf:
            row_bytes = _column_bytes(pf, text_field) / max(pf.metadata.num_rows, 1)
            rows = max(1, min(PARQUET_ROWS, int(PARQUET_BYTES / max(row_bytes, 1))))  # fewer rows when rows are long
            # (what is read whole is a dictionary page: pyarrow's writer fills one with up to 1024 rows before
            # it falls back to plain pages, 5 MB of 5 KB documents but a GB of 1 MB books; write such files
            # with use_dictionary=False)
            for batch in pf.iter_batches(batch_size=rows, columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    if text:  # empty and null texts are no documents
                        yield from _row_pieces(text)
    except (OSError, ValueError) as e:  # a damaged file
        raise UserError(f"cannot read --input {path} as Parquet ({str(e).splitlines()[0]}); "
                        "pass an intact .parquet file") from None
    finally:
        # pyarrow's allocator keeps the memory it freed, and worker processes forked later would start with
        # it: hundreds of MB when a large dictionary page was read
        import pyarrow
        pyarrow.default_memory_pool().release_unused()


def _file_pieces(source, text_field="text"):
    """A source's documents as (text, ends_document) pieces, each document's pieces in order."""
    if isinstance(source, io.StringIO):  # text already in memory (the downloaded Tiny Shakespeare)
        source.seek(0)
        yield from _read_pieces(source)
        return
    if source.endswith(".parquet"):
        yield from _parquet_pieces(source, text_field)
        return
    try:
        with open(source, encoding="utf-8") as f:
            yield from _jsonl_pieces(f, source, text_field) if source.endswith(".jsonl") else _read_pieces(f)
    except UnicodeDecodeError:
        raise UserError(f"--input {source} is not UTF-8 text; convert it to UTF-8 first") from None
    except OSError as e:
        raise UserError(f"cannot read --input {source} ({e.strerror or e}); pass an existing text file") from None


def _is_val(i, val_fraction):
    # every 1/val_fraction-th document (0.1: the 10th, 20th, ...): spread evenly over the corpus,
    # and exactly floor(n * val_fraction) of n documents
    return math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)


def single_document_chars(sources, text_field="text"):
    """The corpus's length in characters if it is one document (one file, no separator line, or one row), else None."""
    if len(sources) != 1:
        return None
    chars = docs = 0
    for text, ends in _file_pieces(sources[0], text_field):
        chars += len(text)
        docs += ends
        if docs > 1:
            return None
    return chars


def text_pieces(sources, val_fraction, single_chars, text_field="text"):
    """The corpus as (split, text, eot) pieces, in order; eot: a document ends here and gets <|endoftext|>."""
    if single_chars is not None:
        # One document (e.g. Tiny Shakespeare) cannot be split by documents: as before, its last
        # val_fraction of characters is validation, each part encoded on its own, no <|endoftext|>.
        cut, pos = int(single_chars * (1 - val_fraction)), 0
        for text, _ in _file_pieces(sources[0], text_field):
            if pos < cut:
                yield "train", text[:cut - pos], False
            if pos + len(text) > cut:
                yield "val", text[max(cut - pos, 0):], False
            pos += len(text)
        return
    i = 0
    for source in sources:
        for text, ends in _file_pieces(source, text_field):
            yield ("val" if _is_val(i, val_fraction) else "train"), text, ends
            i += ends


def nbytes(text):
    return len(text) if text.isascii() else len(text.encode("utf-8"))  # isascii is O(1) on str


def bpe_sample(pieces):
    """The first BPE_SAMPLE_BYTES of training text (a line break after each document) and whether that is all of it."""
    parts, size = [], 0
    for split, text, eot in pieces:
        if split != "train":
            continue
        if size >= BPE_SAMPLE_BYTES:
            return "".join(parts), False
        parts.append(text + "\n" if eot else text)
        size += nbytes(text)
    return "".join(parts), True


def input_files(inputs):
    """The files that --input names, in order; a folder stands for its .txt, .jsonl and .parquet files
    (sorted, subfolders too)."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, n) for d, _, names in os.walk(path) for n in names
                           if n.endswith((".txt",) + SHARD_SUFFIXES))
            if not found:
                raise UserError(f"--input {path} is a folder without .txt, .jsonl or .parquet files; "
                                "pass text files or a folder of them")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"cannot read --input {path} (no such file or folder); pass an existing text file")
    return files


def input_bytes(files, text_field="text"):
    """About how many bytes of text the files hold, for the progress bar and the MB/s: a file's size, and
    for a .parquet file its text column's uncompressed size (approximate, see _column_bytes). Also checks
    a .parquet file's column before any work."""
    total = 0
    for path in files:
        if path.endswith(".parquet"):
            with _parquet_file(path, text_field) as pf:
                total += _column_bytes(pf, text_field)
        else:
            total += os.path.getsize(path)
    return total


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


def write_ids(ranks, pieces, paths, dtype, total_bytes, progress):
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
            batch_bytes[split] += nbytes(text)
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
