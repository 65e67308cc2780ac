"""
STEM tables in host memory, their rows fetched to the GPU a micro-batch at a time: for training and inference.

    python train.py --offload=True            # the lazy table optimizer, tables in host memory
    python sample.py --offload=True --offload_cache_rows=4096

Not a general parameter-offload library: it serves tables.py's interface (prefetch, rows, step, sync) for the
STEM tables only, so that train.py and bench.py run one loop whatever the placement.

How it works
------------
On the GPU: the whole backbone (attention, gate and down projections, embeddings, head) and its AdamW state. In host
memory: every STEM table, built on the CPU and never materialised on the GPU, packed as one tensor [vocab_size,
n_stem * ffn_hidden] (a token's rows for every STEM layer side by side: one contiguous run of W = n_stem * ffn_hidden
floats), the lazy AdamW moments beside it in the same layout, and the step's gradient.

Micro-batch j looks up k_j = unique(ids of j) rows, each STEM layer through its own (k_j, ffn_hidden) leaf tensor (own
storage: nothing written later shares its autograd version counter), by the inverse index (GPT.forward's stem_ids and
stem_tables): exactly the values a resident lookup gives. When the loop asks for j's rows, j+1's gather is queued, then
j-1's gradients (its backward is queued) go to pinned memory and the worker thread adds them into the step's host
gradient (K, W) at the rows' places among the step's K unique ids: the sums a resident leaf accumulates, in the same
order; j-1's leaves are freed. So after j's backward the device holds j's leaves, their gradients and j+1's leaves:
3 * k * W floats (device_bytes below), whatever grad_accum and however many ids the step has.

step() sends the last gradients, waits for the host thread (the step's last backward, copy and add) and takes the host
gradient's joint norm (per-row norms, as tables.joint_norm). It queues host AdamW (tables.RowAdamW) in groups ordered by
when the next step needs the rows (found at prefetch()): the rows of its micro-batch 0, then that micro-batch's gather,
then the rows of its micro-batch 1, and so on; rows it does not use last: a row is current whenever it is read. So at a
step boundary the GPU idles from the last backward until step() returns and the caller queues more work (train.py: the
backbone's clip and AdamW, independent of the tables); the next micro-batch 0 waits for the update of its rows, their
gather and copy, which overlap the backbone's AdamW (bench.py times such steps).

    compute stream | fwd+bwd j ...................... | fwd+bwd j+1 ...
    H2D stream     |  rows of j+1 -> device           |  rows of j+2
    D2H stream     |                                  | grads of j -> pinned
    worker thread  |  gather j+1 (pinned)             | gather j+2 | add grads of j into the step's ...
    at step()      | (last grads) | norm | AdamW rows of next micro 0 | gather | AdamW rows of next micro 1 | ...

The worker runs its tasks in order, so every host read follows the writes it depends on; a failed task is raised by the
host's next wait (for a micro-batch's rows, in step(), sync()). One pinned block (grown to the largest micro-batch
seen, rounded up to the allocator's power of two) holds two planes for rows and two for gradients; micro-batch j of a
step uses planes j % 2. The worker refills a row plane after the copy out of it (waiting on its event, made blocking: it
sleeps rather than spins), a gradient plane after the add that read it (normally long done). Gradient planes of their
own let j+1's gather run before j-1's add; they double the pinned block: 4 * k * W floats (GPT-2-small's preset: 1 GiB
at about 5,000 ids a micro-batch, 2 GiB at most). Leaves are allocated on the H2D stream and recorded on the compute
stream, gradients recorded on the D2H stream: the caching allocator reuses neither while a copy or a kernel reads it.

Inference: prefill runs the prompt chunk by chunk (prefill_chunk), fetching the next chunk's rows while the current
chunk computes. Decoding has no lookahead (the next id is the token just sampled), so a GPU cache of hot rows serves it:
LFU, ties broken by least recent use (Zipf: frequency predicts reuse; LRU would let a burst of rare tokens evict "the"
and ","). Its hit rate is reported. Never refreshed after an update, training refuses it.

Without CUDA the same code runs with host and device both the CPU (no pinning, streams or events): the CPU tests
exercise the ids, the per-micro-batch rows, the host accumulation, the worker's order, the update groups, the cache.
"""

import os
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Optional

import torch

from configurator import require
from model import GPT
from tables import RowAdamW, Tables, _single_thread, capacity, joint_norm, mark_dynamic, nbytes, to_device


def device_bytes(cfg, batch_size, block_size=None, grad_accum=1, unique_per_micro=None, unique_per_step=None):
    """Bytes the STEM tables hold on a CUDA device in training, predicted without allocating: resident lazy (tables,
    moments, RowAdamW's gather block, the step's leaves and their gradients) and offload (three micro-batches of leaves,
    or two and one of gradients). unique_per_micro and unique_per_step (the ids a micro-batch and a step look up)
    default to their bounds: min(vocab, tokens). Not counted: ids and inverse indices, the same in both."""
    T = block_size or cfg.block_size
    with torch.device("meta"):  # no memory: the layers with a table, as the model finds them (GPT.stem_layers)
        W = cfg.ffn_hidden * len(GPT(cfg).stem_layers)
    k = unique_per_micro or min(cfg.vocab_size, batch_size * T)
    K = unique_per_step or min(cfg.vocab_size, batch_size * T * grad_accum)
    return dict(resident_lazy=4 * W * (3 * cfg.vocab_size + 2 * K + 3 * capacity(K)), offload=4 * W * 3 * k)


@dataclass
class Micro:
    """One micro-batch's (or one prompt chunk's) rows."""
    uniq: torch.Tensor  # (k,) sorted unique ids
    inverse: torch.Tensor  # (B, T): position -> row of uniq
    pos: torch.Tensor  # (k,) their rows among the step's unique ids
    plane: int = 0  # its pinned staging planes: rows plane, gradients 2 + plane
    loaded: Any = None  # future -> (leaves, CUDA event or None), until the leaves are handed out
    leaves: Optional[list] = None  # per layer (k, ffn_hidden), handed to the model, until its gradient is sent


@dataclass
class Job:
    """One step's rows: its unique ids and micro-batches."""
    uniq: torch.Tensor  # (K,)
    micros: list
    acc: Optional[int]  # which of the two host gradient buffers the step sums into (training)
    gathered: int = 0  # micro-batches whose gather has been queued
    last: Any = None  # future of the last host task that adds into the gradient
    groups: Optional[list] = None  # the update: (first micro-batch of the next step needing them, rows | task)


class OffloadedTables(Tables):
    def __init__(self, model, device, optimizer="lazy", train=True, weight_decay=0.1, betas=(0.9, 0.95),
                 eps=1e-8, cache_rows=0, threads=None):
        ffns = model.stem_ffns()
        require(ffns, f"offload needs STEM tables, and this model has none (ffn={model.cfg.ffn}): drop --offload")
        require(not train or optimizer == "lazy",
                "offload trains only with the lazy table optimizer: --table_optimizer=lazy")
        require(not (train and cache_rows), "the decode row cache is for inference: it is never refreshed after a "
                "training update, so it cannot be used while training")
        super().__init__(model, optimizer, weight_decay, betas, eps)
        self.V, self.h = ffns[0].table.shape
        self.W = self.n * self.h
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.table = torch.empty(self.V, self.W)  # host memory, allocated there directly
        for part, f in zip(self.layers(self.table), ffns):
            part.copy_(f.table.detach())
            f.table = None  # the module no longer owns a table: .to(device) moves none, state_dict() lists none
        model.to(self.device)
        self.train = train
        # the host's copies and updates run in shards over `threads` threads (one thread's copies do not fill
        # the host's memory bandwidth). Without CUDA the host is the device, and the model's own threads already
        # use every core: one thread then (unless told), rather than competing with them (oversubscription)
        self.threads = threads or (min(8, os.cpu_count() or 1) if self.cuda else 1)
        self.opt = RowAdamW(self.table, self.threads) if train else None  # its m, v: the moments
        self.worker = ThreadPoolExecutor(max_workers=1, initializer=None if self.cuda else _single_thread)
        self.pool = ThreadPoolExecutor(self.threads, initializer=_single_thread)  # the worker's shards
        self.h2d, self.d2h = [torch.cuda.Stream(self.device) for _ in range(2)] if self.cuda else [None, None]
        self.stage = None  # pinned (4, n, rows, h): two planes for rows, two for gradients (CUDA)
        self.plane_events, self.readers = [None, None], [None, None]  # row planes' last copies, grad planes' adds
        self.tasks, self.handed = deque(), []  # the worker's futures not yet checked; weakrefs to the leaves
        self.acc, self.acc_rows, self.n_jobs = [None, None], [(), ()], 0  # host gradients (rows, W), by step parity
        self.queued, self.current, self.updating = None, None, None  # steps: prefetched, running, being updated
        self.cache = RowCache(self, min(cache_rows, self.V)) if cache_rows else None  # more slots than rows: pointless
        self.prompt_jobs, self._chunks = {}, []

    def describe(self):
        return f"{self.n} ({self.optimizer} AdamW, {self.table.numel() / 2**18:.1f} MiB + moments on host, offloaded)"

    def layers(self, t):
        """Per STEM layer, its (rows, ffn_hidden) view of t, a tensor (rows, W) in the packed layout."""
        return t.split(self.h, dim=1)

    def held_bytes(self):
        """Bytes of the device tensors alive now: leaves fetched and not handed out, those handed out that something
        still references, their gradients, the decode cache (device_bytes predicts it for training)."""
        fetched = [leaf for j in (self.current, self.queued) if j for m in j.micros if m.loaded is not None
                   for leaf in self._wait(m.loaded)[0]]
        alive = [t for r in self.handed for t in [r()] if t is not None]
        return nbytes(fetched + alive + [t.grad for t in alive] + [getattr(self.cache, "buf", None)])

    # ---- buffers ------------------------------------------------------------------------------

    def _plan(self, xs, acc=None):
        """A step's (or a prompt chunk's) ids: the step's unique ids, and per micro-batch its own unique ids,
        the inverse index into them and their places among the step's. Sizes the buffers for it; a training
        step sums its gradient into host buffer `acc` (0 or 1: consecutive steps alternate)."""
        ids = [torch.unique(x, sorted=True, return_inverse=True) for x in xs]
        uniq = torch.unique(torch.cat([u for u, _ in ids]))  # (K,) sorted
        job = Job(uniq, [Micro(u, inv, torch.searchsorted(uniq, u), j % 2) for j, (u, inv) in enumerate(ids)], acc)
        rows = max(len(u) for u, _ in ids)
        if self.cuda and (self.stage is None or self.stage.size(2) < rows):
            self._wait(self._submit(lambda: None))  # no host task still uses the old planes
            self.stage, self.plane_events, self.readers = None, [None, None], [None, None]
            torch.cuda.synchronize(self.device)  # nor any copy: the pinned allocator may free the old block now
            torch.accelerator.empty_host_cache()  # growth frees what it replaces: the pinned allocator caches it
            row_bytes = 4 * self.n * self.h * 4  # one block, four planes: rounded up to a power of two, fill it
            cap = (1 << (rows * row_bytes - 1).bit_length()) // row_bytes
            self.stage = torch.empty(4, self.n, cap, self.h, pin_memory=True)
        if acc is not None and (self.acc[acc] is None or self.acc[acc].size(0) < len(uniq)):
            self.sync()  # the update reading the old buffer is done
            self.acc[acc] = torch.empty(capacity(len(uniq)), self.W)
            self.acc_rows[acc] = () if self.opt.gather else self.acc[acc].unbind(0)  # made once
        return job

    def _load(self, mb):
        """Worker: micro-batch mb's rows into fresh per-layer device leaves (k, ffn_hidden). On CUDA: gathered
        into its pinned plane, then asynchronous copies; returns the leaves and the event after the copies."""
        tables = self.layers(self.table)
        if not self.cuda:
            return [t.index_select(0, mb.uniq) for t in tables], None
        k, plane = len(mb.uniq), self.stage[mb.plane]
        if self.plane_events[mb.plane] is not None:
            self.plane_events[mb.plane].synchronize()  # the plane's last copy out is done

        def gather(a, b):  # rows a..b of every layer into the plane
            for t, staged in zip(tables, plane):
                torch.index_select(t, 0, mb.uniq[a:b], out=staged[a:b])
        self._split(k, gather)
        with torch.cuda.stream(self.h2d):
            leaves = [torch.empty(k, self.h, device=self.device) for _ in range(self.n)]
            for leaf, staged in zip(leaves, plane):
                leaf.copy_(staged[:k], non_blocking=True)
            ev = self.plane_events[mb.plane] = torch.cuda.Event(blocking=True)
            ev.record(self.h2d)
        return leaves, ev

    # ---- training: prefetch, rows, step -------------------------------------------------------

    def prefetch(self, xs):
        """Plan the step whose micro-batches are xs (list of (B, T) CPU id tensors), one step ahead of the
        step that runs (anywhere in its loop). Its rows are fetched now if no step runs, else as that step's update
        allows (step()): the update's groups are found here."""
        if self.queued is not None:
            raise RuntimeError("prefetch() twice without rows() between: the pipeline runs one step ahead at most")
        self.queued = job = self._plan(xs, self.n_jobs % 2 if self.train else None)
        self.n_jobs += 1
        if self.current is None:
            return self._gather(job, 1)  # its first two micro-batches
        cur, need = self.current, torch.full((len(self.current.uniq),), len(job.micros))
        for j, mb in reversed(list(enumerate(job.micros))):
            need[torch.isin(cur.uniq, mb.uniq)] = j  # the first micro-batch of the next step needing each row
        cur.groups = [(j, (need == j).nonzero().flatten()) for j in need.unique().tolist()]

    def _gather(self, job, upto):
        """Queue the gathers of job's micro-batches up to `upto` not yet queued, in order and once, each after the
        update of the rows it needs (the rows no micro-batch needs go with the last)."""
        for j in range(job.gathered, min(upto + 1, len(job.micros))):
            self._flush(None if j == len(job.micros) - 1 else j)
            job.micros[j].loaded = self._submit(self._load, job.micros[j])
            job.gathered = j + 1

    def _submit(self, fn, *args):
        self.tasks.append(self.worker.submit(fn, *args))
        return self.tasks[-1]

    def _wait(self, fut):
        """Wait for worker task fut and return its result, raising first the failure of any task queued before
        it (the worker runs them in order: when fut is done, they are)."""
        wait([fut] if fut else [])
        while self.tasks and self.tasks[0].done():
            self.tasks.popleft().result()  # re-raises a failed host task
        return fut and fut.result()

    def _leaves(self, mb):
        (leaves, ev), mb.loaded = self._wait(mb.loaded), None  # the engine keeps no reference but mb.leaves
        self.handed = [r for r in self.handed if r() is not None] + [weakref.ref(leaf) for leaf in leaves]
        if ev is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(ev)
            for leaf in leaves:
                leaf.record_stream(stream)  # allocated on the H2D stream, read on this one
        mb.leaves = mark_dynamic([leaf.requires_grad_(self.train) for leaf in leaves])
        return mb.leaves

    def rows(self):
        """The queued step's rows: per micro-batch (stem_ids, stem_tables) for GPT.forward, the inverse index
        and the per-layer (k, ffn_hidden) leaves. An iterator: each micro-batch's rows are handed out when the
        loop reaches it (after the previous one's backward is queued): at most three on the device at a time."""
        if self.queued is None:
            raise RuntimeError("rows() before prefetch(): queue the step's ids first")
        self.current, self.queued = self.queued, None
        if self.train:  # the step's gradient sums from zero (after the last update that read this buffer)
            acc = self.acc[self.current.acc]
            self._submit(self._split, len(self.current.uniq), lambda a, b: acc[a:b].zero_())
        return self._micro_batches(self.current)

    def _micro_batches(self, job):
        for j, mb in enumerate(job.micros):
            self._gather(job, j + 1)  # queued before the add below: a gather never waits for an add
            if j:
                self._send(job, job.micros[j - 1])  # its backward is queued: its gradient goes to the host
            yield to_device(mb.inverse, self.device), self._leaves(mb)

    def _send(self, job, mb):
        """Micro-batch mb's gradients to the host and into the step's gradient buffer (worker)."""
        if mb.leaves is None or not self.train:
            return  # sent, or never handed out
        grads, ev = [leaf.grad for leaf in mb.leaves], None
        for leaf in mb.leaves:  # its memory goes now, whoever holds the tensor (zip keeps a loop's last item)
            leaf.grad = None
            leaf.untyped_storage().resize_(0)  # its backward is queued (on CUDA: recorded on that stream)
        mb.leaves = None
        if self.cuda:
            k, plane = len(mb.uniq), self.stage[2 + mb.plane]
            self._wait(self.readers[mb.plane])  # the add that last read the plane is done (and raised no error)
            self.d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.d2h):
                for g, staged in zip(grads, plane):
                    staged[:k].copy_(g, non_blocking=True)
                    g.record_stream(self.d2h)  # allocated on the compute stream, read on this one
                ev = torch.cuda.Event(blocking=True)
                ev.record(self.d2h)
            grads = [staged[:k] for staged in plane]
        job.last = self.readers[mb.plane] = self._submit(self._add, job, mb, grads, ev)

    def _add(self, job, mb, grads, ev):
        """Worker: add a micro-batch's (k, ffn_hidden) gradients into the step's (K, W) buffer at its rows. A
        row's sum runs over the micro-batches in order, from zero, as a resident leaf's gradient accumulates."""
        acc = self.acc[job.acc]
        if ev is not None:
            ev.synchronize()  # the copies to pinned memory have landed

        def add(a, b):  # rows a..b of the micro-batch, every layer: disjoint rows of acc, one thread each
            for part, g in zip(self.layers(acc), grads):
                part.index_add_(0, mb.pos[a:b], g[a:b])
        self._split(len(mb.pos), add)

    def _split(self, n, fn):
        """Worker: fn(a, b) on the row ranges [a, b) of n rows, one per thread of the pool."""
        cuts = [n * i // self.threads for i in range(self.threads + 1)]
        for job in [self.pool.submit(fn, a, b) for a, b in zip(cuts, cuts[1:]) if b > a]:
            job.result()

    def step(self, lr, max_norm):
        """After backward: the last gradients to the host, the joint norm there, and the update queued in
        groups in the order the next step needs its rows. Returns the gradient norm, on the device."""
        job, self.current = self.current, None
        for mb in job.micros:
            self._send(job, mb)
        self._wait(job.last)  # the step's gradient is summed (re-raises any failed host task)
        K, acc = len(job.uniq), self.acc[job.acc]
        norm, coef = joint_norm(self.layers(acc[:K]), max_norm)
        self.steps += 1
        self._flush()  # the previous step's update, if a step without a successor left any behind
        hyper = (coef, self.steps, lr)
        job.groups = [(j, (self._update, job, rows, *hyper)) for j, rows in job.groups or [(0, torch.arange(K))]]
        self.updating = job
        self._gather(self.queued, 1) if self.queued is not None else self._flush()  # next step: micro-batches 0, 1
        return to_device(norm, self.device)  # where the loss is (train.py stacks them); pinned: no host stall

    def _update(self, job, rows, coef, step, lr):
        """Worker: host AdamW on the step's rows `rows` (positions among its unique ids), clipped by coef."""
        acc = self.acc[job.acc]
        if self.opt.gather:  # narrow rows: gathered, as RowAdamW gathers them
            self.opt.update(job.uniq[rows], acc.index_select(0, rows).mul_(coef), step, lr, **self.hyper)
            return
        g_rows = [self.acc_rows[job.acc][r] for r in rows.tolist()]
        self._split(len(g_rows), lambda a, b: torch._foreach_mul_(g_rows[a:b], coef))  # elementwise: g.mul_'s bits
        self.opt.update(job.uniq[rows], None, step, lr, **self.hyper, g_rows=g_rows)

    def _flush(self, j=None):
        """Queue the rest of the last step's update: all, or the groups the next step's micro-batches 0..j need."""
        prev = self.updating
        while prev is not None and prev.groups and (j is None or prev.groups[0][0] <= j):
            self._submit(*prev.groups.pop(0)[1])

    def sync(self):
        """Every update done (the host table is current) and the device's queued work: before saving, for timing."""
        self._flush()
        self._wait(self._submit(lambda: None))  # re-raises any failed host task
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---- plain lookups (evaluation) and generation ------------------------------------------

    def lookup(self, ids):
        """(stem_ids, stem_tables) for ids (any shape), synchronously: the inverse index, the unique rows."""
        uniq, inv = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
        rows = self.table.index_select(0, uniq).to(self.device)
        return inv.to(self.device), self.layers(rows)

    def prefetch_prompt(self, stem_ids, chunk):
        """Queue the prompt's first two chunks; stem_fn serves each and queues the next while one computes."""
        self.prompt_jobs = {}
        self._chunks = [(pos, stem_ids[:, pos:pos + chunk].cpu()) for pos in range(0, stem_ids.size(1), chunk)]
        for _ in range(2):
            self._queue_chunk()

    def _queue_chunk(self):
        if self._chunks:
            pos, ids = self._chunks.pop(0)
            job = self._plan([ids])
            job.micros[0].plane = len(self._chunks) % 2  # consecutive chunks alternate
            self._gather(job, 0)
            self.prompt_jobs[pos] = (ids, job.micros[0])

    def stem_fn(self, ids, pos):
        """For GPT.generate(stem_fn=...): prefill chunks from their fetched rows (or a lookup), decode from cache."""
        if ids.size(1) == 1 and self.cache is not None:
            return self.cache.rows(ids)
        queued = self.prompt_jobs.pop(pos, None)
        self._queue_chunk()  # the chunk after next, while this one computes
        if queued is None or not torch.equal(queued[0], ids.cpu()):
            return self.lookup(ids)
        return to_device(queued[1].inverse, self.device), self._leaves(queued[1])

    # ---- checkpoints: the same keys and formats as a resident model ---------------------------

    def state_dict(self, model):
        self.sync()
        sd = model.state_dict()
        for name, t in zip(self.names, self.layers(self.table)):
            sd[name] = t.clone()
        return sd

    def optimizer_state_dict(self, lr):
        """The lazy table optimizer's state in the resident format: a resident run resumes from it, and the reverse."""
        self.sync()
        m, v = self.layers(self.opt.m), self.layers(self.opt.v)
        return self._lazy_state([(m[l].clone(), v[l].clone()) for l in range(self.n)], lr)

    def load_optimizer_state_dict(self, sd):
        self._check_loadable(sd, " without --offload" if self.optimizer == "lazy" else "")
        for l, st in sd["state"].items():
            self.layers(self.opt.m)[int(l)].copy_(st["exp_avg"])
            self.layers(self.opt.v)[int(l)].copy_(st["exp_avg_sq"])


class RowCache:
    """GPU cache of table rows for decoding: LFU, ties broken by least recent use."""

    def __init__(self, off, n):
        self.off, self.n = off, n
        self.buf = torch.empty(n, off.W, device=off.device)
        self.slot_of = {}  # token id -> slot
        self.id_of = torch.full((n,), -1, dtype=torch.long)  # slot -> token id (-1: empty)
        self.freq = torch.zeros(n, dtype=torch.long)  # uses since the row came in
        self.last = torch.zeros(n, dtype=torch.long)  # step of the last use
        self.clock = self.hits = self.misses = 0

    def rows(self, ids):
        """(stem_ids, stem_tables) for one decode step's ids (B, 1): cache slots, and the cache."""
        flat = ids.reshape(-1).tolist()
        needed = set(flat)
        require(len(needed) <= self.n, f"offload_cache_rows={self.n} is smaller than the {len(needed)} distinct ids "
                f"of one decode step: raise --offload_cache_rows")
        self.clock += 1
        missing = [t for t in dict.fromkeys(flat) if t not in self.slot_of]
        n_miss = sum(t not in self.slot_of for t in flat)
        self.misses, self.hits = self.misses + n_miss, self.hits + len(flat) - n_miss
        if missing:
            # victims: empty slots first, then least frequently used, then least recently used; never one read now
            key = torch.where(self.id_of < 0, -1, self.freq * (self.clock + 1) + self.last)
            for t in needed & self.slot_of.keys():
                key[self.slot_of[t]] = torch.iinfo(torch.long).max
            slots = torch.topk(key, len(missing), largest=False).indices
            for s, t in zip(slots.tolist(), missing):
                if self.id_of[s] >= 0:
                    del self.slot_of[int(self.id_of[s])]
                self.id_of[s], self.freq[s], self.slot_of[t] = t, 0, s
            rows = self.off.table[torch.tensor(missing)]
            self.buf[slots.to(self.off.device)] = rows.to(self.off.device)
        idx = torch.tensor([self.slot_of[t] for t in flat])
        self.freq.index_add_(0, idx, torch.ones_like(idx))
        self.last[idx] = self.clock
        idx = idx.to(self.off.device).view(ids.shape)
        return idx, self.off.layers(self.buf)

    def hit_rate(self):
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else float("nan")
