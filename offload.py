"""
STEM tables in host memory, their rows prefetched to the GPU: for training and for inference.

    python train.py --offload=True --table_optimizer=lazy
    python sample.py --offload=True --offload_cache_rows=4096

How it works
------------
What stays on the GPU: the whole backbone (attention, gate and down projections, embeddings, head)
and its AdamW state. What stays in host memory: every STEM table, packed as one tensor
[vocab_size, n_stem * ffn_hidden], and for training the lazy AdamW moments beside it in the same
layout. The copies to and from the GPU go through persistent pinned buffers (pinned once: pinning
on the fly is slow); the table itself is ordinary memory, read only by the CPU. The packing puts one token's rows for every STEM layer next to
each other, so fetching a token is one contiguous run of n_stem * ffn_hidden floats rather than
n_stem scattered copies. The tables are never materialised on the GPU.

What moves each step: only the unique ids of the batch. A step of B x T tokens touches
K = unique(ids) rows, usually far fewer than B x T on real text (Zipf), and every STEM layer reads
the same ids. So per step: torch.unique gives the K ids and the inverse index (position -> row);
the K rows are gathered into a persistent pinned staging buffer (a background thread) and copied
host -> device with non_blocking=True on a dedicated CUDA stream into one of two GPU buffers (double
buffering: step i computes out of one while step i+1's rows land in the other). The STEM layers read
them through the inverse index: rows[inverse], a GPU gather, exactly the values a resident lookup
gives. In training the compact buffer is a leaf tensor, so backward leaves a (K, n_stem * ffn_hidden)
gradient: it is clipped on the GPU (the same joint norm as the resident lazy optimizer), copied back
to pinned host memory, and the lazy AdamW of model.py (adamw_rows_) updates exactly those K rows of
the host table and moments, on the background thread.

Order, and what waits for what. One worker thread runs every host task in submission order:
the gather for step i+1, the update for step i, the gather for step i+2, ... so a gather never
reads a row that an earlier update has yet to write. Rows of step i+1 that step i is about to
update cannot be prefetched early; they are marked stale, and the update of step i does them first,
then copies them into step i+1's buffer, then updates the rest of its rows while the GPU already
runs step i+1. Correctness wins over overlap exactly where the two steps share rows.
CUDA events guard the buffers: the compute stream waits for the copy's event before reading a
buffer; the copy stream waits for the event recorded after the backward that last read the buffer
before overwriting it; the worker waits for a staging buffer's previous copy before refilling it;
gradients copied on the side stream are kept alive until their copy completes (record_stream).
Without these, a buffer can be overwritten mid-read, which shows up as silent garbage or NaNs.

Inference: prefill runs the prompt chunk by chunk (prefill_chunk) and prefetches the next chunk's
rows while the current chunk computes. Decoding has no lookahead (the next id is the token just
sampled), so a GPU cache of hot rows serves it: LFU, ties broken by least recent use. Token
frequencies follow Zipf's law and are stable, so frequency is the better predictor of reuse: an
LRU cache would let a burst of rare tokens evict "the" and ",". The hit rate is reported.

What it costs: GPU memory drops by the table bytes (and by twice that again for the moments in
training); each step moves K x n_stem x ffn_hidden x 4 bytes each way, and the host update reads
and writes about 28 bytes per table value touched. bench.py measures it.

On a machine without CUDA the same code runs with host and device both the CPU (no pinning, no
streams, events or staging copies), so the CPU tests exercise the gather, the inverse index, the
ordering of the worker thread, the host update and the cache.
"""

import collections
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F

from model import adamw_rows_, clip_joint_norm_


class OffloadError(ValueError):
    pass


class Job:
    """One step's (or one prompt chunk's) rows: unique ids, inverse index, where they land."""

    def __init__(self, uniq, inverses, slot):
        self.uniq, self.inverses, self.slot = uniq, inverses, slot
        self.stale = None  # bool mask over uniq: rows an earlier step is still to update
        self.event = None  # CUDA event after the last copy into the slot
        self.fresh = None  # future of the early gather
        self.done = None  # future set when every row has landed


class Offload:
    def __init__(self, model, device, train=False, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                 cache_rows=0):
        ffns = model.stem_ffns()
        if not ffns:
            raise OffloadError("offload needs STEM layers, and this model has none (ffn=swiglu): drop --offload")
        self.V, self.h = ffns[0].table.shape
        self.n, self.W = len(ffns), len(ffns) * self.h
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.names = [f"blocks.{i}.ffn.table" for i in model.stem_layers]
        # allocated in host memory directly. Not pinned: only the CPU reads it (copies to the GPU go
        # through the pinned staging buffers), and the pinned allocator rounds sizes up to a power
        # of two, which could lock up to twice the table in RAM.
        self.table = torch.empty(self.V, self.W)
        for l, f in enumerate(ffns):
            self.table[:, l * self.h:(l + 1) * self.h] = f.table.detach()
            f.table = None  # the module no longer owns a table: .to(device) moves none, state_dict() lists none
        self.train = train
        if train:
            self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.table), torch.zeros_like(self.table)
            self.steps, self.hyper = 0, (betas[0], betas[1], eps, weight_decay)
        self.worker = ThreadPoolExecutor(max_workers=1)  # one thread: host tasks run in order
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots = [dict(), dict()]  # per slot: dev, staging, grad_host, free (event)
        self.next_slot, self.queue, self.current, self._last_update = 0, collections.deque(), None, None
        self.cache = RowCache(self, cache_rows) if cache_rows else None
        self.prompt_jobs = {}

    # ---- buffers ------------------------------------------------------------------------------

    def _buffers(self, slot, K):
        s = self.slots[slot]
        if "dev" not in s or s["dev"].size(0) < K:  # grows to the largest step seen, then is reused
            if self.cuda:
                torch.cuda.synchronize(self.device)  # no stream may still use the old ones
            s["dev"] = torch.empty(K, self.W, device=self.device)
            s["staging"] = torch.empty(K, self.W, pin_memory=True) if self.cuda else None
            s["grad_host"] = torch.empty(K, self.W, pin_memory=True) if self.cuda else None
        return s

    def _gather_copy(self, job, positions):
        """Gather host rows uniq[positions] and land them at those positions of the job's buffer."""
        s = self.slots[job.slot]
        ids = job.uniq[positions]
        if not self.cuda:
            s["dev"][positions] = self.table[ids]
            return
        if s.get("copied") is not None:
            s["copied"].synchronize()  # the staging buffer's previous copy must be done before refilling
        staging = s["staging"][:len(ids)]
        torch.index_select(self.table, 0, ids, out=staging)
        with torch.cuda.stream(self.stream):
            if s.get("free") is not None:
                self.stream.wait_event(s["free"])  # the step that last read this buffer is done
            dst = torch.empty(len(ids), self.W, device=self.device) if len(ids) != len(job.uniq) else None
            if dst is None:
                s["dev"][:len(ids)].copy_(staging, non_blocking=True)
            else:
                dst.copy_(staging, non_blocking=True)
                s["dev"].index_copy_(0, positions.pin_memory().to(self.device, non_blocking=True), dst)
            job.event = s["copied"] = torch.cuda.Event()
            job.event.record(self.stream)

    # ---- training: prefetch, rows, step -------------------------------------------------------

    def _new_job(self, xs, pending=None):
        """Unique ids and inverse index of the id tensors xs, a buffer slot, and the early gather of
        every row except those in `pending` (rows an earlier step is still to update: stale)."""
        ids = torch.cat([x.reshape(-1).cpu() for x in xs])
        uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        inverses = [inv.view(x.shape) for inv, x in zip(inverse.split([x.numel() for x in xs]), xs)]
        job = Job(uniq, inverses, self.next_slot)
        self.next_slot ^= 1
        self._buffers(job.slot, len(uniq))
        job.stale = torch.isin(uniq, pending) if pending is not None else torch.zeros(len(uniq), dtype=torch.bool)
        job.fresh = self.worker.submit(self._gather_copy, job, (~job.stale).nonzero().flatten())
        return job

    def _mark_free(self, slot):
        """Record, on the compute stream, the point after which the slot's buffer may be refilled."""
        if self.cuda:
            self.slots[slot]["free"] = torch.cuda.Event()
            self.slots[slot]["free"].record(torch.cuda.current_stream(self.device))

    def prefetch(self, xs):
        """Queue the rows for a step whose micro-batches are xs (list of (B, T) id tensors).
        Rows the running step will update are left for that update to fill (stale)."""
        pending = self.current.uniq if (self.current is not None and self.train) else None
        self.queue.append(self._new_job(xs, pending))

    def rows(self):
        """The next queued step's rows, one list of per-layer (B, T, ffn_hidden) tensors per
        micro-batch, ready for GPT.forward(stem_rows=...)."""
        self.current = self.queue.popleft()
        return self._collect(self.current)

    def _collect(self, job):
        job.fresh.result()
        if job.done is not None:
            job.done.result()  # the stale rows, landed by the previous step's update
        if self.cuda and job.event is not None:
            torch.cuda.current_stream(self.device).wait_event(job.event)
        job.leaf = self.slots[job.slot]["dev"][:len(job.uniq)].detach().requires_grad_(self.train)
        return [self._expand(inv, job.leaf) for inv in job.inverses]

    def _expand(self, inv, rows):
        """Per-layer (B, T, ffn_hidden) rows through the inverse index, made one layer at a time as
        the forward pass asks for them (a generator), so that only the live layer's rows exist."""
        if self.cuda:
            inv = inv.pin_memory().to(self.device, non_blocking=True)  # pageable would sync the stream
        else:
            inv = inv.to(self.device)
        return (F.embedding(inv, rows[:, l * self.h:(l + 1) * self.h]) for l in range(self.n))

    def step(self, lr, max_norm):
        """After backward: clip the compact gradient, send it to the host, and queue the lazy AdamW
        update of exactly these rows. Returns the gradient norm (as the resident path computes it)."""
        if self._last_update is not None:
            self._last_update.result()  # re-raises a failed host update here rather than never
        job, s = self.current, self.slots[self.current.slot]
        g = job.leaf.grad  # (K, n_stem * ffn_hidden)
        blocks = [g[:, l * self.h:(l + 1) * self.h].contiguous() for l in range(self.n)]
        norm = clip_joint_norm_(blocks, [g], max_norm)
        self._mark_free(job.slot)  # this buffer's readers (forward and backward) are queued
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                s["grad_host"][:len(job.uniq)].copy_(g, non_blocking=True)
                g.record_stream(self.stream)  # keep g's memory alive until the copy has run
                ev = torch.cuda.Event()
                ev.record(self.stream)
            g_host = s["grad_host"][:len(job.uniq)]
        else:
            ev, g_host = None, g
        job.leaf = None
        self.steps += 1
        nxt = self.queue[0] if self.queue else None
        if nxt is not None:
            nxt.done = Future()  # set by the update once nxt's stale rows have landed
        self._last_update = self.worker.submit(self._update, job, nxt, g_host, ev, self.steps, lr)
        self.current = None
        return norm

    def _update(self, job, nxt, g, ev, step, lr):
        try:
            if ev is not None:
                ev.synchronize()  # the gradient has arrived in host memory
            first = torch.isin(job.uniq, nxt.uniq) if nxt is not None else torch.zeros(len(job.uniq), dtype=torch.bool)
            self._adamw(job.uniq, first, g, step, lr)  # the rows the next step needs, first
            if nxt is not None:
                if nxt.stale.any():
                    self._gather_copy(nxt, nxt.stale.nonzero().flatten())  # now current: land them
                nxt.done.set_result(True)
            self._adamw(job.uniq, ~first, g, step, lr)  # the rest overlaps the next step's compute
        except BaseException as e:  # never leave the main thread waiting on a dead worker
            if nxt is not None and not nxt.done.done():
                nxt.done.set_exception(e)
            raise

    def _adamw(self, uniq, part, g, step, lr):
        k = part.nonzero().flatten()
        if len(k):
            ids = uniq[k]
            p, m, v = self.table[ids], self.exp_avg[ids], self.exp_avg_sq[ids]  # gathered copies
            adamw_rows_(p, g[k.to(g.device)].to(p.device), m, v, step, lr, *self.hyper)
            self.table[ids], self.exp_avg[ids], self.exp_avg_sq[ids] = p, m, v

    def sync(self):
        """Wait for every queued host task (before evaluating, saving or reading the tables)."""
        self.worker.submit(lambda: None).result()
        if self._last_update is not None:
            self._last_update.result()
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---- plain lookups (evaluation) and generation ------------------------------------------

    def lookup(self, ids):
        """Synchronous per-layer rows for ids (any shape): gather, copy, index."""
        uniq, inv = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
        rows = self.table[uniq].to(self.device, non_blocking=False)
        inv = inv.to(self.device)
        return [F.embedding(inv, rows[:, l * self.h:(l + 1) * self.h]) for l in range(self.n)]

    def prefetch_prompt(self, stem_ids, chunk):
        """Queue the prompt's chunks; stem_rows_fn serves each from its prefetched buffer, and asks
        for the chunk after next while the current one computes."""
        self.prompt_jobs = {}
        self._chunks = [(pos, stem_ids[:, pos:pos + chunk]) for pos in range(0, stem_ids.size(1), chunk)]
        for pos, ids in self._chunks[:2]:
            self._queue_chunk(pos, ids)

    def _queue_chunk(self, pos, ids):
        self.prompt_jobs[pos] = (ids.cpu(), self._new_job([ids]))

    def stem_rows_fn(self, ids, pos):
        """For GPT.generate(stem_rows_fn=...): prefill chunks from prefetched buffers (or a plain
        lookup), decode steps (one token) through the row cache."""
        if ids.size(1) == 1 and self.cache is not None:
            return self.cache.rows(ids)
        queued = self.prompt_jobs.pop(pos, None)
        if queued is None or not torch.equal(queued[0], ids.cpu()):
            return self.lookup(ids)
        job = queued[1]
        rows = list(self._collect(job)[0])  # expanded copies: the chunk no longer reads the buffer
        self._mark_free(job.slot)
        later = [c for c in self._chunks if c[0] > pos and c[0] not in self.prompt_jobs]
        if later:  # into this chunk's buffer, now that its reads are queued
            self._queue_chunk(*later[0])
        return rows

    # ---- checkpoints: the same keys as a resident model ---------------------------------------

    def state_dict(self, model):
        self.sync()
        sd = model.state_dict()
        for l, name in enumerate(self.names):
            sd[name] = self.table[:, l * self.h:(l + 1) * self.h].clone()
        return sd

    def optimizer_state_dict(self, lr):
        """The lazy table optimizer's state in TableAdamW's own format, so that a resident run can
        resume from an offloaded checkpoint and the reverse."""
        self.sync()
        b1, b2, eps, wd = self.hyper
        state = {}
        if self.steps:
            for l in range(self.n):
                sl = slice(l * self.h, (l + 1) * self.h)
                state[l] = {"step": torch.tensor(float(self.steps)), "exp_avg": self.exp_avg[:, sl].clone(),
                            "exp_avg_sq": self.exp_avg_sq[:, sl].clone()}
        group = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, lazy=True, params=list(range(self.n)))
        return {"state": state, "param_groups": [group]}

    def load_optimizer_state_dict(self, sd):
        if not sd["param_groups"][0].get("lazy", False):
            raise OffloadError("this checkpoint's tables were trained with the dense optimizer; "
                               "offload continues only lazy runs: resume with --table_optimizer=dense without --offload")
        g = sd["param_groups"][0]  # as torch's load_state_dict: the saved hyperparameters win
        self.hyper = (g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"])
        for l, st in sd["state"].items():
            sl = slice(int(l) * self.h, (int(l) + 1) * self.h)
            self.exp_avg[:, sl] = st["exp_avg"]
            self.exp_avg_sq[:, sl] = st["exp_avg_sq"]
            self.steps = int(st["step"].item())


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
        """Per-layer (B, 1, ffn_hidden) rows for one decode step's ids (B, 1)."""
        flat = ids.reshape(-1).tolist()
        needed = set(flat)
        if len(needed) > self.n:
            raise OffloadError(f"offload_cache_rows={self.n} is smaller than the {len(needed)} distinct ids "
                               f"of one decode step: raise --offload_cache_rows")
        self.clock += 1
        missing = [t for t in dict.fromkeys(flat) if t not in self.slot_of]
        n_miss = sum(t not in self.slot_of for t in flat)
        self.misses += n_miss
        self.hits += len(flat) - n_miss
        if missing:
            # victims: empty slots first, then least frequently used, then least recently used;
            # never a slot this step reads
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
        h = self.off.h
        return [F.embedding(idx, self.buf[:, l * h:(l + 1) * h]) for l in range(self.off.n)]

    def hit_rate(self):
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")
