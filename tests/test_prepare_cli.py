"""prepare_data.py's command line: the same config mechanism as train.py, sample.py and bench.py
(a dataclass, --key=value / --key value / a bare --flag, repeatable --input, -h/--help, one error line).
python -m pytest -q tests/test_prepare_cli.py"""
import dataclasses
import inspect
import json
import os
import re
import types

import numpy as np
import pytest

import prepare_data as P
import tokenizer as T  # noqa: E402
from conftest import assert_user_error, run_inproc

EOT = "<|endoftext|>"


def snapshot(folder):
    return {n: (open(os.path.join(folder, n), "rb").read(), os.stat(os.path.join(folder, n)).st_mtime_ns)
            for n in sorted(os.listdir(folder))}


def assert_error_after_progress(p, *needles):
    """assert_user_error for an error found midway: tqdm's progress bars (stderr) may come first."""
    err = "\n".join(ln for ln in p.stderr.splitlines() if not re.match(r"(bpe merges|tokenizing):", ln))
    assert_user_error(types.SimpleNamespace(returncode=p.returncode, stdout=p.stdout, stderr=err), *needles)
    assert p.stderr.rstrip().splitlines()[-1].startswith("error: ")


def comments():
    """Each PrepareConfig key's comment, as written beside it in the source."""
    src = inspect.getsource(P.PrepareConfig)
    return {f.name: re.search(rf"^\s+{f.name}:.*?#\s*(.+)$", src, re.M).group(1).strip()
            for f in dataclasses.fields(P.PrepareConfig)}


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_lists_every_key_with_its_comment(flag):
    p = run_inproc("prepare_data.py", flag)
    assert "Traceback" not in p.stderr
    lines = p.stdout.splitlines()
    assert "python prepare_data.py --entities=400 --out_dir=data/facts400" in p.stdout  # the docstring
    for key, comment in comments().items():
        line = next((ln for ln in lines if ln.strip().startswith(f"--{key}=")), None)
        assert line is not None and comment in line, (key, p.stdout)
    assert f"default {P.DEFAULT_ENTITIES})" in comments()["entities"]  # the comment is not computed


def test_docstring_usage_uses_the_config_keys():
    keys = {f.name for f in dataclasses.fields(P.PrepareConfig)}
    usage = [ln for ln in P.__doc__.splitlines() if ln.strip().startswith("python prepare_data.py")]
    assert usage
    for ln in usage:
        for key in re.findall(r"--(\w+)", ln.split("#")[0]):
            assert key in keys | {"help"}, ln


@pytest.mark.parametrize("args", [["--entities=8", "--seed=3"], ["--entities", "8", "--seed", "3"]])
def test_key_equals_value_and_key_space_value(tmp_path, args):
    out = tmp_path / "f"
    p = run_inproc("prepare_data.py", *args, "--out_dir", str(out))
    assert "entity names single-token: 8/8, capitals: 8/8" in p.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["inputs"]["entities"] == 8 and meta["inputs"]["seed"] == 3
    assert json.loads((out / "facts.json").read_text())["num_entities"] == 8


def test_input_is_repeatable(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the first file, a few words of it. " * 20, encoding="utf-8")
    b.write_text("and then the second one, other words. " * 20, encoding="utf-8")
    out = tmp_path / "o"
    # both forms in one command; with val_fraction 0.5 the 2nd document (b.txt) is validation
    run_inproc("prepare_data.py", "--dataset=text", "--input", str(a), f"--input={b}", "--tokenizer=bpe:270",
        "--val_fraction=0.5", f"--out_dir={out}")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["inputs"]["input"] == [str(a), str(b)] and meta["inputs"]["files"] == 2
    enc = T.load_tokenizer(str(out))
    for split, f in [("train", a), ("val", b)]:
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
        assert enc.decode(ids) == f.read_text(encoding="utf-8") + EOT


@pytest.mark.parametrize("args,needles", [
    (["--bogus=1"], ["unknown config key 'bogus'", "valid keys", "entities"]),
    (["--seed=x"], ["--seed=x", "int"]),
    (["--entities", "many"], ["--entities=many", "int"]),
    (["--force=maybe"], ["--force=maybe", "bool"]),
    (["--seed"], ["--seed needs a value"]),
    (["--entities=0"], ["--entities 0 is out of range", "1 to 5000"]),
    (["--entities=6000"], ["out of range"]),
    (["--dataset=text", "--input=SRC", "--val_fraction=1.5"], ["--val_fraction 1.5", "between 0 and 1"]),
    (["--val_fraction=1.5"], ["--val_fraction 1.5", "between 0 and 1"]),  # facts too, though it draws its own split
    (["--dataset=text", "--input=SRC", "--entities=8"], ["--entities only applies to --dataset facts"]),
    (["--out_dir="], ["--out_dir is empty"]),
    (["--tokenizer="], ["--tokenizer is empty"]),
])
def test_bad_values_are_one_error_line_and_touch_nothing(tmp_path, args, needles):
    out = tmp_path / "data"
    out.mkdir()
    (out / "meta.json").write_text("old")
    src = tmp_path / "src.txt"
    src.write_text("some text. " * 50)
    before = snapshot(out)
    args = [a.replace("SRC", str(src)) for a in args]
    assert_user_error(run_inproc("prepare_data.py", f"--out_dir={out}", *args, ok=False), *needles)
    assert snapshot(out) == before


def test_too_small_facts_vocab_suggests_one_that_works(tmp_path):
    # 8 entities: BPE runs out of pairs (at ~560 tokens) before the default vocabulary's size; the
    # suggestion must still be given, and work
    out = tmp_path / "x"
    p = run_inproc("prepare_data.py", "--entities=8", "--tokenizer", "bpe:300", f"--out_dir={out}", ok=False)
    assert_error_after_progress(p, "with --tokenizer bpe:300 some names are split", "raise N", "works")
    assert not out.exists()
    suggested = re.search(r"\(--tokenizer (bpe:\d+) works\)", p.stderr).group(1)
    p = run_inproc("prepare_data.py", "--entities=8", "--tokenizer", suggested, f"--out_dir={out}")
    assert "entity names single-token: 8/8, capitals: 8/8" in p.stdout
    # and it is the smallest multiple of 128 that works
    smaller = f"bpe:{int(suggested[4:]) - 128}"
    assert_error_after_progress(run_inproc("prepare_data.py", "--entities=8", f"--tokenizer={smaller}",
                                    f"--out_dir={tmp_path / 'y'}", ok=False), "raise N")


def test_refuses_other_inputs_unless_force(tmp_path):
    out = tmp_path / "facts"
    first = ["--entities=8", "--seed=1", f"--out_dir={out}"]
    run_inproc("prepare_data.py", *first)
    before = snapshot(out)
    p = run_inproc("prepare_data.py", "--entities=8", "--seed", "2", "--out_dir", str(out), ok=False)
    assert_user_error(p, str(out), "seed 1 there, 2 now", "--out_dir=OTHER", "--force")
    assert snapshot(out) == before
    # the same inputs: nothing to do, nothing touched
    assert "already prepared" in run_inproc("prepare_data.py", *first).stdout and snapshot(out) == before
    # a bare --force (followed by another option) replaces it
    run_inproc("prepare_data.py", "--force", "--entities=8", "--seed=2", f"--out_dir={out}")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["inputs"]["seed"] == 2 and snapshot(out) != before
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_refuses_a_folder_it_did_not_prepare_unless_force(tmp_path):
    out = tmp_path / "nanogpt_data"  # say nanoGPT's: train.bin, val.bin and meta.pkl, no meta.json
    out.mkdir()
    for name in ("train.bin", "meta.pkl"):
        (out / name).write_bytes(b"precious")
    before = snapshot(out)
    p = run_inproc("prepare_data.py", "--entities=8", f"--out_dir={out}", ok=False)
    assert_user_error(p, "holds files but no meta.json", "another folder", f"--out_dir={out} --force")
    assert snapshot(out) == before
    run_inproc("prepare_data.py", "--entities=8", f"--out_dir={out}", "--force")
    assert (out / "meta.json").exists() and (out / "meta.pkl").read_bytes() == b"precious"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_user_error(run_inproc("prepare_data.py", "--entities=8", f"--out_dir={afile}", ok=False), "is a file")
