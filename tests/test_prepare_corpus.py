"""Tests for prepare_data.py on text corpora (corpus.py): several files and folders, documents, .jsonl and
.parquet shards, streaming, the validation split, and never replacing a prepared folder silently.
python -m pytest -q tests/test_prepare_corpus.py"""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import corpus as C
import prepare_data as P
import tokenizer as T
from configurator import UserError
from conftest import GPT2_BPE, assert_user_error, run_inproc

EOT = "<|endoftext|>"


def reference_documents(path):
    """The document rule, written plainly: a line that is exactly <|endoftext|> ends a document (the
    line breaks around it go with it); empty documents are dropped."""
    docs, lines = [], []
    for line in Path(path).read_text(encoding="utf-8").split("\n"):
        if line == EOT:
            docs.append("\n".join(lines))
            lines = []
        else:
            lines.append(line)
    docs.append("\n".join(lines))
    return [d for d in docs if d]


def reference_ids(files, enc, every):
    """Each document encoded at once, in one process, followed by <|endoftext|>; every `every`-th
    document (the every-th, 2*every-th, ...) is validation."""
    docs = [d for f in files for d in reference_documents(f)]
    ids = {"train": [], "val": []}
    for i, d in enumerate(docs):
        ids["val" if i % every == every - 1 else "train"] += enc.encode_ordinary(d) + [enc.eot_token]
    return docs, ids


def read_ids(out):
    meta = json.loads((Path(out) / "meta.json").read_text())
    return {s: np.fromfile(Path(out) / f"{s}.bin", dtype=meta["dtype"]).tolist() for s in ("train", "val")}


@pytest.fixture
def corpus(tmp_path):
    """A folder of .txt files (one in a subfolder, one empty, one with Windows line breaks) holding
    documents separated by <|endoftext|> lines, with the tricky cases at the edges."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    facts = P.make_facts(6, seed=4)["train_docs"]
    long_doc = " ".join(facts) + "\n\n   " + "\n".join(facts[:40]) + "  \n\t\n"  # ~10k characters
    tricky = ["Le cœur a ses raisons. 日本語のテキスト 🙂🚀 e\u0301\n", "  leading spaces and trailing   ",
              f"an {EOT} inside a line is ordinary text", f" {EOT}\n{EOT}x\nnot separators either",
              "\n\nblank lines first", "ends with blank lines\n\n\n", "it's 2024, isn't it? 3.50$"]
    (root / "a.txt").write_text(f"{EOT}\n" + "\n<|endoftext|>\n".join(facts[:25]) + f"\n{EOT}\n{EOT}\n",
                                encoding="utf-8")
    (root / "b.txt").write_text(long_doc, encoding="utf-8")  # a file without separators: one document
    (root / "c.txt").write_text("\n<|endoftext|>\n".join(tricky + [long_doc] + facts[25:40]), encoding="utf-8")
    (root / "d.txt").write_text("", encoding="utf-8")
    (root / "sub" / "e.txt").write_bytes("\r\n<|endoftext|>\r\n".join(facts[40:60]).replace("\n", "\r\n").encode())
    (root / "notes.md").write_text("not a .txt file: not part of the corpus")
    return root


def corpus_files(root):
    return [root / "a.txt", root / "b.txt", root / "c.txt", root / "d.txt", root / "sub" / "e.txt"]


def snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(Path(folder).iterdir())}


def test_documents_rule(tmp_path):
    f = tmp_path / "dump.txt"
    f.write_text(f"{EOT}\na\n{EOT}\nb\n\n{EOT}\n{EOT}\nc {EOT} d\n {EOT}\n{EOT}e\n{EOT}", encoding="utf-8")
    assert reference_documents(f) == ["a", "b\n", f"c {EOT} d\n {EOT}\n{EOT}e"]
    assert [t for t, ends in C._file_pieces(str(f))] == reference_documents(f)


@pytest.mark.parametrize("read_chars", [1, 7, 64, 1 << 20])
def test_pieces_follow_the_rule_at_any_read_size(corpus, monkeypatch, read_chars):
    # bounded reading: whatever the block size, the pieces put together are exactly the documents,
    # and no piece is much longer than a block
    monkeypatch.setattr(C, "READ_CHARS", read_chars)
    for f in corpus_files(corpus):
        docs, doc = [], ""
        for text, ends in C._file_pieces(str(f)):
            assert len(text) <= 2 * read_chars + 64
            doc += text
            if ends:
                docs.append(doc)
                doc = ""
        assert doc == "" and docs == reference_documents(f), f


def test_exact_ids_folder_and_small_reads(corpus, tmp_path, monkeypatch):
    # 1) the folder with the default block sizes
    out = P.prepare(dataset="text", input=str(corpus), tokenizer="bpe:400", out_dir=str(tmp_path / "out"),
                    val_fraction=0.25, progress=False)
    enc = T.load_tokenizer(out)
    docs, ref = reference_ids(corpus_files(corpus), enc, every=4)
    assert len(docs) > 60
    assert read_ids(out) == ref
    meta = json.loads((Path(out) / "meta.json").read_text())
    assert meta["train_tokens"] == len(ref["train"]) and meta["val_tokens"] == len(ref["val"])
    assert meta["inputs"]["files"] == 5 and not [f for f in os.listdir(out) if f.endswith(".tmp")]
    # 2) the same corpus read 16 characters at a time, in tiny encoding batches, by worker processes
    # (which a corpus this small would not get): the same bytes
    monkeypatch.setattr(C, "READ_CHARS", 16)
    monkeypatch.setattr(C, "BATCH_BYTES", 50)
    monkeypatch.setattr(C, "PARALLEL_MIN_BYTES", 0)
    small = P.prepare(dataset="text", input=[str(f) for f in corpus_files(corpus)], tokenizer="bpe:400",
                      out_dir=str(tmp_path / "small"), val_fraction=0.25, progress=False)
    for name in ["train.bin", "val.bin", "tokenizer.tiktoken"]:
        assert (Path(small) / name).read_bytes() == (Path(out) / name).read_bytes(), name


@GPT2_BPE
def test_exact_ids_with_gpt2_tokenizer(corpus, tmp_path, monkeypatch):
    r50k = os.environ["NANOSTEM_GPT2_BPE"]
    monkeypatch.setattr(C, "READ_CHARS", 100)
    out = P.prepare(dataset="text", input=str(corpus), tokenizer=r50k, out_dir=str(tmp_path / "g"), progress=False)
    enc = T.make_encoding(T.load_ranks(r50k))
    _, ref = reference_ids(corpus_files(corpus), enc, every=10)
    assert read_ids(out) == ref and len(ref["val"]) > 0


def test_validation_is_whole_documents_spread_evenly():
    for f in [0.1, 0.05, 0.25, 0.3, 0.5, 0.9]:
        for n in [1, 9, 10, 11, 57, 1000]:
            val = [i for i in range(n) if C._is_val(i, f)]
            assert len(val) == math.floor(n * f)
    assert [i for i in range(40) if C._is_val(i, 0.1)] == [9, 19, 29, 39]


def test_few_documents_for_the_val_fraction(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i}, " * 50)
    with pytest.raises(UserError, match="no val text: the corpus has 3 documents"):
        P.prepare(dataset="text", input=str(tmp_path), tokenizer="bpe:300", out_dir=str(tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_bpe_trains_on_a_bounded_sample(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "BPE_SAMPLE_BYTES", 3000)
    out = P.prepare(dataset="text", input=str(corpus), tokenizer="bpe:300", out_dir=str(tmp_path / "o"),
                    progress=False)
    assert "bpe: training on a sample, the first" in capsys.readouterr().out
    # the sample: training documents in order, each followed by a line break, until 3000 bytes
    docs, _ = reference_ids(corpus_files(corpus), T.load_tokenizer(out), every=10)
    sample, size = "", 0
    for i, d in enumerate(docs):
        if i % 10 != 9 and size < 3000:
            sample, size = sample + d + "\n", size + len(d.encode())
    assert T.load_ranks(os.path.join(out, "tokenizer.tiktoken")) == T.train_bpe(sample, 300, progress=False)


def test_failure_midway_leaves_nothing(corpus, tmp_path, monkeypatch):
    # an error while encoding (here a file that is not UTF-8, found late) touches no prepared folder
    # and leaves no temporary files
    out = tmp_path / "out"
    P.prepare(dataset="text", input=str(corpus), tokenizer="bpe:300", out_dir=str(out), progress=False)
    before = snapshot(out)
    (corpus / "sub" / "z.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="z.txt is not UTF-8"):
        P.prepare(dataset="text", input=str(corpus), tokenizer="bpe:300", out_dir=str(out), progress=False, force=True)
    assert snapshot(out) == before
    with pytest.raises(UserError, match="not UTF-8"):
        P.prepare(dataset="text", input=str(corpus), tokenizer="bpe:300", out_dir=str(tmp_path / "new"), progress=False)
    assert not (tmp_path / "new").exists()


def test_several_inputs_on_the_command_line(corpus, tmp_path):
    out = tmp_path / "two"
    r = run_inproc("prepare_data.py", "--dataset", "text", "--input", str(corpus / "a.txt"), "--input",
                   str(corpus / "c.txt"), "--tokenizer", "bpe:300", "--out_dir", str(out))
    assert "documents: 44 train, 4 val (every 10th)" in r.stdout
    _, ref = reference_ids([corpus / "a.txt", corpus / "c.txt"], T.load_tokenizer(str(out)), every=10)
    assert read_ids(out) == ref


def test_refuses_to_replace_other_data(corpus, tmp_path):
    out = tmp_path / "data"
    text = ["--dataset", "text", "--input", str(corpus), "--tokenizer", "bpe:300", "--out_dir", str(out)]
    run_inproc("prepare_data.py", *text)
    before = snapshot(out)
    # the same inputs: nothing to do, nothing touched
    assert "already prepared" in run_inproc("prepare_data.py", *text).stdout and snapshot(out) == before
    # other inputs: one error line, exit code 1, nothing touched
    (corpus / "a2.txt").write_text("another file\n")
    for args in [text, text[:-2] + ["--out_dir", str(out), "--val_fraction", "0.2"],
                 ["--dataset", "text", "--input", str(corpus / "b.txt"), "--out_dir", str(out)],
                 ["--entities", "10", "--out_dir", str(out)]]:
        assert_user_error(run_inproc("prepare_data.py", *args, ok=False), str(out), "--out_dir=OTHER", "--force")
        assert snapshot(out) == before
    # --force replaces it
    run_inproc("prepare_data.py", *text, "--force")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["inputs"]["files"] == 6 and not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_refuses_other_facts_and_a_changed_file(tmp_path):
    out = str(tmp_path / "facts")
    P.prepare(dataset="facts", out_dir=out, entities=10, seed=1, progress=False)
    before = snapshot(out)
    for kw in [dict(seed=2), dict(entities=11), dict(tokenizer="bpe:1000")]:
        with pytest.raises(UserError, match="holds data prepared from other inputs"):
            P.prepare(dataset="facts", out_dir=out, progress=False, **{"entities": 10, "seed": 1, **kw})
    assert snapshot(out) == before
    # a text file edited after preparing counts as another input
    src = tmp_path / "t.txt"
    src.write_text("some text to split. " * 30)
    P.prepare(dataset="text", input=str(src), tokenizer="bpe:270", out_dir=str(tmp_path / "t"), progress=False)
    os.utime(src, ns=(0, 10**9))
    with pytest.raises(UserError, match="input files' sizes or modification times differ"):
        P.prepare(dataset="text", input=str(src), tokenizer="bpe:270", out_dir=str(tmp_path / "t"), progress=False)
    # a folder made by the previous prepare_data.py records no inputs: refused too
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    del meta["inputs"]
    (tmp_path / "t" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="records no inputs"):
        P.prepare(dataset="text", input=str(src), tokenizer="bpe:270", out_dir=str(tmp_path / "t"), progress=False)


def test_fingerprint_and_tokenizer_hash(tmp_path):
    out = Path(P.prepare(dataset="facts", out_dir=str(tmp_path / "a"), entities=10, seed=1, progress=False))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == hashlib.sha256((out / "tokenizer.tiktoken").read_bytes()).hexdigest()
    assert len(meta["fingerprint"]) == 16 and int(meta["fingerprint"], 16) >= 0
    again = P.prepare(dataset="facts", out_dir=str(out), entities=10, seed=1, progress=False, force=True)
    assert json.loads((Path(again) / "meta.json").read_text())["fingerprint"] == meta["fingerprint"]
    other = P.prepare(dataset="facts", out_dir=str(tmp_path / "b"), entities=10, seed=2, progress=False)
    assert json.loads((Path(other) / "meta.json").read_text())["fingerprint"] != meta["fingerprint"]


def test_too_small_facts_vocab_suggests_one_that_works(tmp_path):
    with pytest.raises(UserError, match="raise N") as e:
        P.prepare(dataset="facts", tokenizer="bpe:300", out_dir=str(tmp_path / "x"), entities=30, progress=False)
    suggested = str(e.value).split("(--tokenizer ")[1].split(" works")[0]
    assert suggested.startswith("bpe:") and not (tmp_path / "x").exists()
    P.prepare(dataset="facts", tokenizer=suggested, out_dir=str(tmp_path / "x"), entities=30, progress=False)
    # and it is the smallest multiple of 128 that works
    smaller = f"bpe:{int(suggested[4:]) - 128}"
    with pytest.raises(UserError, match="raise N"):
        P.prepare(dataset="facts", tokenizer=smaller, out_dir=str(tmp_path / "y"), entities=30, progress=False)


# ---- shards: .jsonl and .parquet files, one document a row

def shard_rows():
    """Rows with the tricky cases: an <|endoftext|> line or literal inside a row is ordinary text, empty
    and null rows are no documents, long rows, Unicode, leading and trailing whitespace."""
    facts = P.make_facts(5, seed=3)["train_docs"]
    tricky = [f"first part\n{EOT}\nsecond part, the same document", f"an {EOT} inside", "", None,
              "Le cœur a ses raisons. 日本語 🙂 e\u0301", "  leading and trailing spaces  ", "\n\nblank lines\n\n",
              " ".join(facts[:30]) + "\n" + "\n".join(facts[30:60])]  # ~5k characters
    return tricky + facts[60:100]


def documents_of(rows):
    return [r for r in rows if r]


def write_jsonl(path, rows, field="text", **other):
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"id": i, field: r, **other}) + ("\n\n" if i == 3 else "\n"))  # (a blank line)
        f.write("   \n")


def write_parquet(path, columns, row_group_size=7):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size)


def rows_reference(docs, enc, every):
    """Each document encoded alone, in one process, followed by <|endoftext|>; every every-th is validation."""
    ids = {"train": [], "val": []}
    for i, d in enumerate(docs):
        ids["val" if i % every == every - 1 else "train"] += enc.encode_ordinary(d) + [enc.eot_token]
    return ids


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_shards_exact_ids(tmp_path, monkeypatch, kind):
    rows = shard_rows()
    f = tmp_path / f"rows.{kind}"
    if kind == "jsonl":
        write_jsonl(f, rows)
    else:
        write_parquet(f, {"text": rows, "n": list(range(len(rows)))})
    out = P.prepare(dataset="text", input=str(f), tokenizer="bpe:400", out_dir=str(tmp_path / "out"),
                    progress=False)
    docs = documents_of(rows)
    ref = rows_reference(docs, T.load_tokenizer(out), every=10)
    assert len(docs) == 46 and read_ids(out) == ref
    meta = json.loads((Path(out) / "meta.json").read_text())
    assert meta["inputs"]["text_field"] == "text" and meta["train_tokens"] == len(ref["train"])
    # read in tiny blocks (long rows cut into pieces), a few rows at a time, encoded by worker processes
    # in tiny batches: the same bytes
    for name, value in [("READ_CHARS", 64), ("BATCH_BYTES", 50), ("PARALLEL_MIN_BYTES", 0), ("PARQUET_ROWS", 3)]:
        monkeypatch.setattr(C, name, value)
    pieces, doc = [], ""
    for text, ends in C._file_pieces(str(f)):
        assert len(text) <= 64
        doc += text
        if ends:
            pieces.append(doc)
            doc = ""
    assert pieces == docs
    small = P.prepare(dataset="text", input=str(f), tokenizer="bpe:400", out_dir=str(tmp_path / "small"),
                      progress=False)
    for name in ["train.bin", "val.bin", "tokenizer.tiktoken"]:
        assert (Path(small) / name).read_bytes() == (Path(out) / name).read_bytes(), name


@GPT2_BPE
def test_shards_exact_ids_with_gpt2_tokenizer(tmp_path):
    rows = shard_rows()
    write_jsonl(tmp_path / "a.jsonl", rows[:20])
    write_parquet(tmp_path / "b.parquet", {"text": rows[20:]})
    r50k = os.environ["NANOSTEM_GPT2_BPE"]
    out = P.prepare(dataset="text", input=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet")], tokenizer=r50k,
                    out_dir=str(tmp_path / "g"), progress=False)
    assert read_ids(out) == rows_reference(documents_of(rows), T.make_encoding(T.load_ranks(r50k)), every=10)


def test_folder_of_txt_jsonl_and_parquet(corpus, tmp_path):
    rows = shard_rows()
    write_jsonl(corpus / "b2.jsonl", rows[:25])
    write_parquet(corpus / "sub" / "f.parquet", {"text": rows[25:]})
    out = tmp_path / "mixed"
    run_inproc("prepare_data.py", "--dataset=text", f"--input={corpus}", "--tokenizer=bpe:400", f"--out_dir={out}",
               "--val_fraction=0.25")
    # sorted paths: a.txt, b.txt, b2.jsonl, c.txt, d.txt, sub/e.txt, sub/f.parquet
    txt = [reference_documents(f) for f in corpus_files(corpus)]
    docs = [d for ds in txt[:2] for d in ds] + documents_of(rows[:25]) + [d for ds in txt[2:] for d in ds] \
        + documents_of(rows[25:])
    assert read_ids(out) == rows_reference(docs, T.load_tokenizer(str(out)), every=4)
    assert json.loads((out / "meta.json").read_text())["inputs"]["files"] == 7


def test_text_field_and_the_record(corpus, tmp_path):
    rows = documents_of(shard_rows())
    write_jsonl(tmp_path / "c.jsonl", rows[:20], field="content", text="a decoy in the default field")
    write_parquet(tmp_path / "c.parquet", {"text": ["decoy"] * 26, "content": rows[20:]})
    out = tmp_path / "out"
    args = ["--dataset=text", f"--input={tmp_path / 'c.jsonl'}", f"--input={tmp_path / 'c.parquet'}",
            "--tokenizer=bpe:300", f"--out_dir={out}"]
    run_inproc("prepare_data.py", *args, "--text_field=content")
    assert read_ids(out) == rows_reference(rows, T.load_tokenizer(str(out)), every=10)
    assert json.loads((out / "meta.json").read_text())["inputs"]["text_field"] == "content"
    # another field is another input: refused, not replaced silently
    assert_user_error(run_inproc("prepare_data.py", *args, ok=False), "text_field", "--force")
    # a folder of .txt files records no text_field: data prepared before shards were read stays prepared
    txt = P.prepare(dataset="text", input=str(corpus), tokenizer="bpe:300", out_dir=str(tmp_path / "t"),
                    progress=False)
    assert "text_field" not in json.loads((Path(txt) / "meta.json").read_text())["inputs"]
    assert "already prepared" in run_inproc("prepare_data.py", "--dataset=text", f"--input={corpus}",
                                            "--tokenizer=bpe:300", f"--out_dir={txt}", "--text_field=other").stdout


def test_one_row_is_one_document_split_by_characters(tmp_path):
    text = " ".join(P.make_facts(3, seed=5)["train_docs"])
    write_jsonl(tmp_path / "one.jsonl", [text])
    out = P.prepare(dataset="text", input=str(tmp_path / "one.jsonl"), tokenizer="bpe:300",
                    out_dir=str(tmp_path / "o"), progress=False)
    enc, cut = T.load_tokenizer(out), int(len(text) * 0.9)
    assert read_ids(out) == {"train": enc.encode_ordinary(text[:cut]), "val": enc.encode_ordinary(text[cut:])}


def test_parquet_progress_total_is_about_the_text(tmp_path):
    rows = documents_of(shard_rows())
    write_parquet(tmp_path / "p.parquet", {"n": list(range(len(rows))), "text": rows})
    text_bytes = sum(len(r.encode()) for r in rows)
    assert text_bytes <= C.input_bytes([str(tmp_path / "p.parquet")]) <= 1.1 * text_bytes + 1000


def shard_error(tmp_path, name, *needles, extra=()):
    out = tmp_path / "never"
    p = run_inproc("prepare_data.py", "--dataset=text", f"--input={tmp_path / name}", "--tokenizer=bpe:300",
                   f"--out_dir={out}", *extra, ok=False)
    assert_user_error(p, *needles)
    assert not out.exists()


def test_shard_errors_are_one_line(tmp_path):
    good = json.dumps({"text": "fine"})
    (tmp_path / "notjson.jsonl").write_text(f"{good}\n\n{{'text': 'single quotes'}}\n")
    shard_error(tmp_path, "notjson.jsonl", "notjson.jsonl:3 is not a JSON object")
    (tmp_path / "list.jsonl").write_text(f'{good}\n["text"]\n')
    shard_error(tmp_path, "list.jsonl", "list.jsonl:2 has no field 'text'", "--text_field=NAME")
    (tmp_path / "nofield.jsonl").write_text(f'{good}\n{{"body": "x", "id": 2}}\n')
    shard_error(tmp_path, "nofield.jsonl", "nofield.jsonl:2 has no field 'text' (it has: body, id)",
                "--text_field=NAME")
    shard_error(tmp_path, "nofield.jsonl", "nofield.jsonl:1 has no field 'body'", extra=["--text_field=body"])
    (tmp_path / "number.jsonl").write_text('{"text": 3}\n')
    shard_error(tmp_path, "number.jsonl", "number.jsonl:1: field 'text' holds a JSON int, not text")
    (tmp_path / "half.jsonl").write_text('{"text": "a \\ud83d b"}\n')
    shard_error(tmp_path, "half.jsonl", "half.jsonl:1: field 'text' holds an unpaired")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}\n'.encode("latin-1"))
    shard_error(tmp_path, "latin1.jsonl", "latin1.jsonl is not UTF-8")
    write_parquet(tmp_path / "cols.parquet", {"body": ["a", "b"], "n": [1, 2]})
    shard_error(tmp_path, "cols.parquet", "cols.parquet has no column 'text' (its columns: body, n)",
                "--text_field=NAME")
    shard_error(tmp_path, "cols.parquet", "column 'n' of", "holds int64, not text", extra=["--text_field=n"])
    (tmp_path / "fake.parquet").write_text("not parquet at all")
    shard_error(tmp_path, "fake.parquet", "cannot read --input", "fake.parquet as Parquet")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    rows = documents_of(shard_rows())
    write_parquet(tmp_path / "p.parquet", {"text": rows})
    write_jsonl(tmp_path / "j.jsonl", rows)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    shard_error(tmp_path, "p.parquet", f"reading {tmp_path / 'p.parquet'} (.parquet) needs pyarrow: "
                                       "pip install pyarrow")
    # .txt and .jsonl input need no pyarrow, and prepare_data.py does not import it
    run_inproc("prepare_data.py", "--dataset=text", f"--input={tmp_path / 'j.jsonl'}", "--tokenizer=bpe:300",
               f"--out_dir={tmp_path / 'j'}")
    p = subprocess.run([sys.executable, "-c", "import sys, prepare_data; print(sorted(sys.modules))"],
                       capture_output=True, text=True, cwd=os.path.dirname(P.__file__), check=True)
    assert "'tiktoken'" in p.stdout and "pyarrow" not in p.stdout
