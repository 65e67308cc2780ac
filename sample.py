"""
Sample from a trained model, and edit what it knows about a token.

    python sample.py                                         # out/ckpt.pt, samples from an empty prompt
    python sample.py --start="The capital of Velmora is" --greedy
    python sample.py --start="The capital of Velmora is" --greedy --edit "Velmora=Korvath"
    python sample.py --eval_facts                            # fact recall on the facts probes

Knowledge editing (STEM paper, s. 5): the text stays the same, but at the positions of Source's
tokens every STEM layer looks up Target's rows. When the two differ in token count, --edit_align
says how to line them up: left_pad (Target right-aligned over Source, spare positions get the
end-of-text row), copy (Target's tokens stretched over Source's positions) or average (every
Source position gets the mean of Target's rows).
"""

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

import prepare_data
from common import (UserError, die, edit_probes, fact_recall, load_checkpoint, model_from_checkpoint, parse_config,
                   resolve_device)


@dataclass
class SampleConfig:
    out_dir: str = "out"  # where ckpt.pt is
    data_dir: Optional[str] = None  # tokenizer and facts.json; None = the checkpoint's training data
    start: str = ""  # prompt text, or FILE:path; "" starts from the end-of-text token
    num_samples: int = 2
    max_new_tokens: int = 60
    temperature: float = 0.8
    top_k: Optional[int] = 200
    greedy: bool = False  # argmax decoding (temperature 0)
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    edit: list = field(default_factory=list)  # "Source=Target", repeatable
    edit_align: str = "left_pad"  # left_pad | copy | average, when Source and Target token counts differ
    eval_facts: bool = False  # print fact recall on the facts probes and exit
    offload: bool = False  # STEM tables stay in host memory; rows are fetched per chunk / per token
    offload_cache_rows: int = 4096  # GPU rows cache for decoding with --offload (LFU)
    prefill_chunk: Optional[int] = None  # run the prompt in pieces of this many tokens (offload prefetches the next)


def find_tokens(enc, ids, word):
    """Token ids of `word` as it is written in the prompt (with or without a leading space) and the
    start positions where that run occurs in ids."""
    for form in (" " + word, word):
        toks = enc.encode(form)
        starts = [i for i in range(len(ids) - len(toks) + 1) if ids[i:i + len(toks)] == toks]
        if starts:
            return toks, starts, form
    return None, [], None


def plan_edits(enc, ids, edits, align, eot_id):
    """-> (stem_ids, averaged): stem_ids is the prompt's lookup id stream with the edits applied
    (left_pad, copy); averaged lists (positions, target ids) whose rows are replaced by the mean of
    the target rows (average)."""
    stem_ids, averaged = list(ids), []
    for e in edits:
        src, eq, tgt = e.partition("=")
        if not eq or not src.strip() or not tgt.strip():
            raise UserError(f"--edit {e!r} is not Source=Target, e.g. --edit \"Velmora=Korvath\"")
        src, tgt = src.strip(), tgt.strip()
        s_toks, starts, form = find_tokens(enc, ids, src)
        if not starts:
            raise UserError(f"--edit {e}: {src!r} does not occur in the prompt; put it in --start or fix the spelling")
        t_toks = enc.encode(form[:len(form) - len(src)] + tgt)  # the same leading-space form as Source
        ns, nt = len(s_toks), len(t_toks)
        for s in starts:
            if align == "average":
                averaged.append((list(range(s, s + ns)), t_toks))
            elif align == "copy" or ns == nt:  # stretch Target over Source's positions
                for i in range(ns):
                    stem_ids[s + i] = t_toks[i * nt // ns]
            else:  # left_pad: right-align; spare Source positions look up the end-of-text row
                aligned = ([eot_id] * (ns - nt) + t_toks)[-ns:]
                stem_ids[s:s + ns] = aligned
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
    if sc.edit_align not in ("left_pad", "copy", "average"):
        raise UserError(f"edit_align={sc.edit_align!r} is not one of left_pad, copy, average")
    device, dtype, ctx, note = resolve_device(sc.device, sc.dtype)
    ckpt_path = os.path.join(sc.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path)
    model = model_from_checkpoint(ckpt, ckpt_path).eval()  # on the CPU until the tables are placed
    engine, stem_fn = None, None
    if sc.offload:
        import offload
        try:
            engine = offload.OffloadedTables(model, device, train=False, cache_rows=sc.offload_cache_rows)
        except offload.OffloadError as e:
            raise UserError(str(e)) from None
        stem_fn = engine.stem_fn
    model.to(device)
    data_dir = sc.data_dir or ckpt["config"]["train"]["data_dir"]
    try:
        enc = prepare_data.load_tokenizer(data_dir)
    except FileNotFoundError as e:
        raise UserError(f"tokenizer not found: {e}") from None
    print(f"{note}; checkpoint {ckpt_path} (step {ckpt['iter']}, STEM layers {model.stem_layers or 'none'})")

    if sc.eval_facts:
        facts_path = os.path.join(data_dir, "facts.json")
        if not os.path.isfile(facts_path):
            raise UserError(f"{data_dir} is not a facts dataset (no facts.json): --eval_facts needs one")
        facts = json.load(open(facts_path))
        rec = fact_recall(model, enc, facts["probes"], device, ctx, stem_fn=stem_fn)
        print(f"fact recall {rec['recall']:.3f} over {len(facts['probes'])} probes (" +
              ", ".join(f"{k} {v:.2f}" for k, v in rec.items() if k != "recall") + ")")
        if model.stem_layers:  # swap A's rows for B's: how often does the answer become B's?
            probes = edit_probes(facts, enc)
            rec = fact_recall(model, enc, probes, device, ctx, stem_fn=stem_fn)
            print(f"edit success {rec['recall']:.3f} over {len(probes)} edited probes (100 random entity pairs; " +
                  ", ".join(f"{k} {v:.2f}" for k, v in rec.items() if k != "recall") + ")")
        report_cache(engine)
        return

    start = sc.start
    if start.startswith("FILE:"):
        path = start[5:]
        if not os.path.isfile(path):
            raise UserError(f"--start=FILE:{path}: no such file")
        start = open(path, encoding="utf-8").read()
    ids = enc.encode(start, allowed_special={"<|endoftext|>"}) if start else [enc.eot_token]
    if max(ids) >= model.cfg.vocab_size:
        raise UserError(f"the prompt encodes to id {max(ids)}, outside the model's vocabulary of "
                        f"{model.cfg.vocab_size}: is --data_dir the data this model was trained on?")
    if sc.edit and engine is not None and sc.edit_align == "average":
        raise UserError("--edit_align=average writes rows and needs the tables on the device: drop --offload "
                        "or use --edit_align=left_pad|copy")
    if sc.edit and not model.stem_layers:
        raise UserError(f"--edit needs STEM layers, and {ckpt_path} is a ffn={model.cfg.ffn} model without any")
    stem_ids, averaged = plan_edits(enc, ids, sc.edit, sc.edit_align, enc.eot_token)

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
        for row in y.tolist():
            print(enc.decode(row[len(ids):] if not start else row))
            print("---")
    report_cache(engine)


def report_cache(engine):
    if engine is not None and engine.cache is not None:
        c = engine.cache
        if c.hits + c.misses:
            print(f"offload row cache: {c.n} rows, hit rate {c.hit_rate():.3f} ({c.hits} hits, {c.misses} misses)")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        die(str(e))
