"""sample.py's command line: values checked before the checkpoint is read, prompts from files, prompts
longer than the model's window, stopping at end-of-text, edits it cannot honour, and the tokenizer's
provenance."""
import json
import os
import re
import shutil

import pytest
import torch

from conftest import assert_user_error, run_inproc
from configurator import UserError
import tokenizer as T  # noqa: E402


def _names(facts, n=3):
    return [e["name"] for e in json.load(open(os.path.join(facts, "facts.json")))["entities"][:n]]


# ---- values in range, checked before the checkpoint is looked for --------------------------------

@pytest.mark.parametrize("arg, needle", [
    ("--num_samples=0", "num_samples=0 must be at least 1"),
    ("--num_samples=-2", "num_samples=-2 must be at least 1"),
    ("--top_k=0", "top_k=0 must be at least 1"),
    ("--top_k=-5", "top_k=-5 must be at least 1"),
    ("--temperature=-1", "temperature=-1.0 must be 0 or more"),
    ("--max_new_tokens=-3", "max_new_tokens=-3 must be 0 or more"),
    ("--offload_cache_rows=-1", "offload_cache_rows=-1"),
    ("--prefill_chunk=0", "prefill_chunk=0 must be at least 1"),
    ("--prefill_chunk=-4", "prefill_chunk=-4 must be at least 1"),
    ("--edit_align=bogus", "edit_align='bogus' is not one of"),
    ("--edit=A=B=C", "one '='"),
    ("--edit==B", "text on both sides"),
    ("--edit=A=", "text on both sides"),
    ("--edit=Tunbo=<|endoftext|>", "special tokens"),
    ("--edit=A=B --edit=A=C", "Source more than once"),
    ("--eval_facts --edit=A=B", "drop --edit"),
])
def test_bad_values_refused_before_the_checkpoint(arg, needle, tmp_path):
    import sample
    # tmp_path holds no checkpoint: were the value checked only after loading, this would say "no checkpoint at"
    with pytest.raises(UserError, match=re.escape(needle)):
        sample.main([f"--out_dir={tmp_path}", *arg.split()])


# ---- the prompt ------------------------------------------------------------------------------

def test_start_file_not_utf8(trained, tmp_path):
    out, _ = trained
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("The capital of Ålby is".encode("latin-1"))
    assert_user_error(run_inproc("sample.py", f"--out_dir={out}", f"--start=FILE:{bad}", ok=False), "is not UTF-8",
                      str(bad))
    assert_user_error(run_inproc("sample.py", f"--out_dir={out}", f"--start=FILE:{tmp_path}", ok=False),
                      "is a folder")
    assert_user_error(run_inproc("sample.py", f"--out_dir={out}", f"--start=FILE:{tmp_path}/none", ok=False),
                      "no such file")


def test_long_prompt_is_cut_with_a_note(trained, facts):
    out, _ = trained
    a, b, _ = _names(facts)
    long = f"The capital of {a} is far away. " + "The capital of " * 20 + f"{b} is"  # well over block_size=32
    p = run_inproc("sample.py", f"--out_dir={out}", f"--start={long}", "--greedy", "--num_samples=1",
                   "--max_new_tokens=2")
    m = re.search(r"kept its last (\d+) tokens of (\d+)", p.stdout)
    assert m and m.group(1) == "32" and int(m.group(2)) > 32, p.stdout
    assert p.stdout.count("note: the prompt is longer") == 1
    # a Source that only occurs in the part cut away would be edited nowhere: said, not silently ignored
    assert_user_error(run_inproc("sample.py", f"--out_dir={out}", f"--start={long}", "--edit", f"{a}={b}",
                                 ok=False),
                      f"{a!r} does not occur in the last 32 tokens of the prompt")


# ---- stopping at end-of-text -------------------------------------------------------------------

def test_until_eot():
    import sample
    assert sample.until_eot([5, 6, 9, 7, 9], 9) == [5, 6]
    assert sample.until_eot([9, 1], 9) == []
    assert sample.until_eot([1, 2], 9) == [1, 2]


def test_sample_stops_at_eot(trained, facts, monkeypatch, capsys):
    """generate() is replaced by one that writes a, b, end-of-text, c: the sample must end before c."""
    import sample
    from model import GPT
    out, _ = trained
    enc = T.load_tokenizer(facts)
    a, b, c = _names(facts)
    new = [enc.encode(" " + a)[0], enc.encode(" " + b)[0], enc.eot_token, enc.encode(" " + c)[0]]

    def fake_generate(self, idx, max_new_tokens, **kw):
        return torch.cat([idx, torch.tensor([new] * idx.size(0))], 1)
    monkeypatch.setattr(GPT, "generate", fake_generate)
    args = [f"--out_dir={out}", "--start=The capital of", "--num_samples=1", "--max_new_tokens=4", "--device=cpu"]
    sample.main(args)
    text = capsys.readouterr().out.split("---")[0]
    assert f"The capital of {a} {b}" in text and c not in text and "<|endoftext|>" not in text
    sample.main(args + ["--stop_at_eot=False"])
    text = capsys.readouterr().out.split("---")[0]
    assert f"The capital of {a} {b}<|endoftext|> {c}" in text


# ---- edits it cannot honour --------------------------------------------------------------------

def test_edit_target_longer_than_source(trained, facts):
    out, _ = trained
    a, b, c = _names(facts)  # single-token names in the facts tokenizer: Target "b c" is two tokens
    common = [f"--out_dir={out}", f"--start=The capital of {a} is", "--greedy", "--num_samples=1",
              "--max_new_tokens=2", "--edit", f"{a}={b} {c}"]
    for align in ("left_pad", "copy"):  # would keep one of Target's two tokens
        assert_user_error(run_inproc("sample.py", *common, f"--edit_align={align}", ok=False),
                          "Target is 2 tokens and Source 1", "--edit_align=average")
    p = run_inproc("sample.py", *common, "--edit_align=average")  # the mean of both rows: every Target token counts
    assert f"=== with edit {a}={b} {c} ===" in p.stdout


# ---- tokenizer provenance ----------------------------------------------------------------------

def test_tokenizer_prepared_again_is_refused(trained, facts, tmp_path):
    out, _ = trained
    copy = str(tmp_path / "facts")
    shutil.copytree(facts, copy)
    args = [f"--out_dir={out}", f"--data_dir={copy}", "--start=The capital of", "--num_samples=1", "--max_new_tokens=2"]
    run_inproc("sample.py", *args)  # the same tokenizer in another folder is fine
    meta_path = os.path.join(copy, "meta.json")
    meta = json.load(open(meta_path))
    meta["tokenizer_sha256"] = "0" * 64
    json.dump(meta, open(meta_path, "w"))
    assert_user_error(run_inproc("sample.py", *args, ok=False), "tokenizer_sha256", "prepared again")


def test_out_dir_that_names_the_checkpoint_file(trained):
    out, _ = trained
    assert_user_error(run_inproc("sample.py", f"--out_dir={out}/ckpt.pt", ok=False), "is a file", f"--out_dir={out}")


@pytest.mark.parametrize("damage, needle", [
    ("{", "is damaged"), ('{"probes": 5, "chance": {"capital": 0.1}}', "is damaged"),
    ('[1]', "is damaged"), ('{"probes": [{"prompt": "x"}], "chance": {"a": 1}}', "is damaged"),
    (None, "is damaged"), ("text", "is not a facts dataset")])
def test_eval_facts_on_a_damaged_or_other_data_folder(trained, facts, tmp_path, damage, needle):
    out, _ = trained
    d = tmp_path / "data"
    shutil.copytree(facts, d)  # the same tokenizer: only facts.json is in question
    os.remove(d / "facts.json")
    if damage == "text":  # data of another kind: no facts.json, and meta.json says so
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps(dict(meta, dataset="text")))
    elif damage is not None:
        (d / "facts.json").write_text(damage)
    p = run_inproc("sample.py", f"--out_dir={out}", f"--data_dir={d}", "--eval_facts", "--device=cpu", ok=False)
    assert_user_error(p, needle, str(d))
