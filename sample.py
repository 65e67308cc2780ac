"""
Sample from a trained model, and edit what it knows about a token. It does not train (train.py) or time anything
(bench.py); fact recall over many probes is --eval_facts here and claims.py.

    python sample.py                                         # out/ckpt.pt, samples from an empty prompt
    python sample.py --start="The capital of Zurgilpil is" --greedy
    python sample.py --start="The capital of Zurgilpil is" --greedy --edit "Zurgilpil=Kemel"
    python sample.py --eval_facts                            # fact recall on the facts probes

Knowledge editing (STEM paper, s. 5): the text stays the same, but at the positions of Source's tokens every STEM
layer looks up Target's rows. When the two differ in token count, --edit_align says how to line them up: left_pad
(Target right-aligned over Source, spare positions get the end-of-text row), copy (Target's tokens stretched over
Source's positions) or average (every Source position gets the mean of Target's rows). A Target of more tokens than
Source fits only with average: left_pad and copy would drop some of its tokens, so they refuse it.

A sample ends at the first end-of-text token the model writes (--stop_at_eot=False prints on to max_new_tokens). A
prompt longer than the model's block_size is cut to its last block_size tokens, with a note saying so. The tokenizer
comes from --data_dir (default: the data the checkpoint was trained on); one whose hash differs from the
checkpoint's record is refused.
"""

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

import offload
from common import (check_provenance, edit_probes, fact_recall, load_checkpoint, load_facts, load_meta,
                    model_from_checkpoint, resolve_device)
from configurator import UserError, die, parse_config, require
from tokenizer import load_tokenizer


@dataclass
class SampleConfig:
    out_dir: str = "out"  # where ckpt.pt is
    data_dir: Optional[str] = None  # tokenizer and facts.json; None = the checkpoint's training data
    start: str = ""  # prompt text, or FILE:path (UTF-8); "" starts from the end-of-text token
    num_samples: int = 2
    max_new_tokens: int = 60  # 0 prints the prompt only
    temperature: float = 0.8  # 0 is greedy
    top_k: Optional[int] = 200  # sample among the k likeliest tokens; None = all
    stop_at_eot: bool = True  # a sample ends at the first end-of-text token the model writes (end of document)
    greedy: bool = False  # argmax decoding (temperature 0)
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    edit: list = field(default_factory=list)  # "Source=Target", repeatable
    edit_align: str = "left_pad"  # left_pad | copy | average, when Source and Target token counts differ
    eval_facts: bool = False  # print fact recall on the facts probes and exit
    offload: bool = False  # STEM tables stay in host memory; rows are fetched per chunk / per token
    offload_cache_rows: int = 4096  # GPU row cache for decoding with --offload (LFU; at most the vocabulary); 0 = none
    prefill_chunk: Optional[int] = None  # run the prompt in pieces of this many tokens (offload prefetches the next)


def check_config(sc):
    """Every value in range before the checkpoint is read: one error line otherwise."""
    require(sc.num_samples >= 1, f"num_samples={sc.num_samples} must be at least 1")
    require(sc.max_new_tokens >= 0, f"max_new_tokens={sc.max_new_tokens} must be 0 or more (0 prints the prompt only)")
    require(sc.temperature >= 0, f"temperature={sc.temperature} must be 0 or more (0 is greedy, as --greedy)")
    require(sc.top_k is None or sc.top_k >= 1, f"top_k={sc.top_k} must be at least 1, or None for no cut")
    require(sc.offload_cache_rows >= 0, f"offload_cache_rows={sc.offload_cache_rows} must be 0 (no cache) or more")
    require(sc.prefill_chunk is None or sc.prefill_chunk >= 1,
            f"prefill_chunk={sc.prefill_chunk} must be at least 1, or None for the whole prompt at once")
    require(sc.edit_align in ("left_pad", "copy", "average"),
            f"edit_align={sc.edit_align!r} is not one of left_pad, copy, average")
    sources = [parse_edit(e)[0] for e in sc.edit]
    twice = sorted({x for x in sources if sources.count(x) > 1})
    require(not twice, f"--edit names {', '.join(twice)} as Source more than once: one Target per Source")
    require(not (sc.edit and sc.offload and sc.edit_align == "average"), "--edit_align=average writes rows and needs "
            "the tables on the device: drop --offload or use --edit_align=left_pad|copy")
    require(not (sc.eval_facts and sc.edit), "--eval_facts measures the model as trained (and prints its own edit "
            "test over 100 entity pairs): drop --edit, or drop --eval_facts to sample with the edit")


def parse_edit(e):
    """"Source=Target" -> (source, target), or one line saying what is wrong with it."""
    src, eq, tgt = e.partition("=")
    if not eq or not src.strip() or not tgt.strip() or "=" in tgt:
        raise UserError(f"--edit {e!r} is not Source=Target (one '=', text on both sides), "
                        f"e.g. --edit \"Zurgilpil=Kemel\"; repeat --edit for more than one")
    if "<|" in e and "|>" in e:
        raise UserError(f"--edit {e!r}: special tokens such as <|endoftext|> have no row to swap; edit words")
    return src.strip(), tgt.strip()


def read_prompt(start):
    """The prompt text: --start itself, or the contents of the file after FILE:."""
    if not start.startswith("FILE:"):
        return start
    path = start[5:]
    if not os.path.isfile(path):
        raise UserError(f"--start=FILE:{path}: " + ("is a folder: name a text file in it" if os.path.isdir(path) else
                                                     "no such file"))
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"--start=FILE:{path} is not UTF-8 text (byte {e.start} cannot be decoded): "
                        f"save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"--start=FILE:{path}: cannot read it ({e.strerror})") from None


def until_eot(tokens, eot_id):
    """The tokens before the first end-of-text: the model ended the document there."""
    return tokens[:tokens.index(eot_id)] if eot_id in tokens else tokens


def plan_edits(enc, ids, edits, align, eot_id, where="the prompt"):
    """-> (stem_ids, averaged): the prompt's lookup ids with the left_pad / copy edits applied, and the
    (positions, target ids) of the average edits, whose rows become the mean of the target rows."""
    stem_ids, averaged = list(ids), []
    for e in edits:
        src, tgt = parse_edit(e)
        for form in (" " + src, src):  # Source as the prompt writes it: with or without a leading space
            s_toks = enc.encode(form)
            starts = [i for i in range(len(ids) - len(s_toks) + 1) if ids[i:i + len(s_toks)] == s_toks]
            if starts:
                break
        else:
            raise UserError(f"--edit {e}: {src!r} does not occur in {where}; put it in --start or fix the spelling")
        t_toks = enc.encode(form[:len(form) - len(src)] + tgt)  # the same leading-space form as Source
        ns, nt = len(s_toks), len(t_toks)
        if nt > ns and align != "average":  # Source's positions cannot hold every Target token
            raise UserError(f"--edit {e}: Target is {nt} tokens and Source {ns}, so --edit_align={align} would drop "
                            f"{nt - ns} of Target's tokens: use --edit_align=average (each Source position gets "
                            f"the mean of Target's rows) or a shorter Target")
        for s in starts:
            if align == "average":
                averaged.append((list(range(s, s + ns)), t_toks))
            elif align == "copy" or ns == nt:  # stretch Target over Source's positions
                for i in range(ns):
                    stem_ids[s + i] = t_toks[i * nt // ns]
            else:  # left_pad (nt < ns): right-align; spare Source positions look up the end-of-text row
                stem_ids[s:s + ns] = [eot_id] * (ns - nt) + t_toks
    return stem_ids, averaged


def averaged_stem_fn(model, averaged, prompt_len):
    """stem_fn for generate(): for the prompt, every table gets one extra row per averaged edit (the
    mean of Target's rows) and the edited positions look it up; plain lookups for everything after."""
    done = [False]

    def fn(ids, pos):
        if done[0] or pos != 0 or ids.size(1) != prompt_len:
            return ids, None
        done[0] = True
        ids, V = ids.clone(), model.cfg.vocab_size
        for j, (positions, _) in enumerate(averaged):
            ids[:, positions] = V + j  # the j-th extra row
        tables = [torch.cat([f.table, torch.stack([f.table[t_toks].mean(0) for _, t_toks in averaged])])
                  for f in model.stem_ffns()]
        return ids, tables
    return fn


def main(argv=None):
    sc = SampleConfig()
    parse_config(sys.argv[1:] if argv is None else argv, sc, doc=__doc__)
    check_config(sc)
    start = read_prompt(sc.start)
    device, dtype, ctx, note = resolve_device(sc.device, sc.dtype)
    ckpt_path = os.path.join(sc.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path)
    # the tokenizer must be the one the model was trained with: a folder prepared again since may hold another
    data_dir = sc.data_dir or ckpt["config"]["train"]["data_dir"]
    check_provenance(ckpt, load_meta(data_dir), data_dir, ckpt_path, key="tokenizer_sha256")
    enc = load_tokenizer(data_dir)
    model = model_from_checkpoint(ckpt, ckpt_path).eval()  # on the CPU until the tables are placed
    engine = (offload.OffloadedTables(model, device, train=False, cache_rows=sc.offload_cache_rows)
              if sc.offload else None)
    stem_fn = engine.stem_fn if engine is not None else None
    model.to(device)
    print(f"{note}; checkpoint {ckpt_path} (step {ckpt['iter']}, STEM layers {model.stem_layers or 'none'})")

    if sc.eval_facts:
        facts = load_facts(data_dir, "--eval_facts needs one")
        tests = [("fact recall", facts["probes"], "probes (")]
        if model.stem_layers:  # swap A's rows for B's: how often does the answer become B's?
            tests.append(("edit success", edit_probes(facts, enc), "edited probes (100 random entity pairs; "))
        for name, probes, what in tests:
            rec = fact_recall(model, enc, probes, device, ctx, stem_fn=stem_fn)
            print(f"{name} {rec['recall']:.3f} over {len(probes)} {what}"
                  + ", ".join(f"{k} {v:.2f}" for k, v in rec.items() if k != "recall") + ")")
        report_cache(engine)
        return

    ids = enc.encode(start, allowed_special={"<|endoftext|>"}) if start else [enc.eot_token]
    require(max(ids) < model.cfg.vocab_size, f"the prompt encodes to id {max(ids)}, outside the model's vocabulary of "
            f"{model.cfg.vocab_size}: is --data_dir the data this model was trained on?")
    if sc.edit and not model.stem_layers:
        raise UserError(f"--edit needs STEM layers, and {ckpt_path} is a ffn={model.cfg.ffn} model without any")
    where, bs = "the prompt", model.cfg.block_size
    if len(ids) > bs:  # the model sees at most block_size tokens: keep the end of the prompt, and say so
        print(f"note: the prompt is longer than the model's block_size: kept its last {bs} tokens of {len(ids)}")
        ids, where = ids[-bs:], f"the last {bs} tokens of the prompt (the part the model sees)"
    stem_ids, averaged = plan_edits(enc, ids, sc.edit, sc.edit_align, enc.eot_token, where)

    x = torch.tensor([ids] * sc.num_samples, device=device)
    temperature = 0.0 if sc.greedy else sc.temperature
    runs = [("", x, stem_fn)]
    if sc.edit:
        fn = averaged_stem_fn(model, averaged, len(ids)) if averaged else stem_fn
        runs = [("without edit", x, stem_fn),
                ("with edit " + ", ".join(sc.edit), torch.tensor([stem_ids] * sc.num_samples, device=device), fn)]
    for title, s_ids, fn in runs:
        if title:
            print(f"=== {title} ===")
        if engine is not None and sc.prefill_chunk:
            engine.prefetch_prompt(s_ids, sc.prefill_chunk)
        gen = torch.Generator(device=device).manual_seed(sc.seed)  # same draws with and without edit
        with ctx:
            y = model.generate(x, sc.max_new_tokens, temperature=temperature, top_k=sc.top_k, stem_ids=s_ids,
                               stem_fn=fn, generator=gen, prefill_chunk=sc.prefill_chunk)
        for row in y.tolist():  # generate() runs on to max_new_tokens; what follows an end-of-text is dropped
            new = until_eot(row[len(ids):], enc.eot_token) if sc.stop_at_eot else row[len(ids):]
            print(enc.decode((ids if start else []) + new))
            print("---")
    report_cache(engine)


def report_cache(engine):
    c = engine.cache if engine is not None else None
    if c is not None and c.hits + c.misses:
        print(f"offload row cache: {c.n} rows, hit rate {c.hit_rate():.3f} ({c.hits} hits, {c.misses} misses)")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        die(str(e))
