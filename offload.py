"""
STEM tables in host memory, their rows prefetched to the GPU: for training and for inference.

    python train.py --offload=True            # the lazy table optimizer, tables in host memory
    python sample.py --offload=True --offload_cache_rows=4096

How it works
------------
What stays on the GPU: the whole backbone (attention, gate and down projections, embeddings, head)
and its AdamW state. What stays in host memory: every STEM table, packed as one tensor
[vocab_size, n_stem * ffn_hidden], and for training the lazy AdamW moments beside it in the same
layout. The packing puts one token's rows for every STEM layer side by side, so fetching a token is
one contiguous run of n_stem * ffn_hidden floats. The table is ordinary memory, read only by the CPU:
copies to and from the GPU go through persistent pinned buffers (pinned once: pinning on the fly is
slow, and the pinned allocator rounds sizes up to a power of two). The tables are built on the CPU
and never materialised on the GPU. OffloadedTables has the methods of tables.ResidentTables, so
train.py and bench.py run one loop whatever the placement.

A step touches K = unique(ids) rows, and every STEM layer reads the same ids (tables.unique_ids).
The GPU holds the step's K rows in one of two buffer slots (double buffering: step i computes out
of slot i % 2 while step i+1's rows land in the other). Each layer reads its columns of the slot as
its own leaf tensor (one leaf per layer, so backward writes a compact (K, ffn_hidden) gradient per
layer and nothing is zero-filled), looked up by the inverse index (GPT.forward's stem_ids and
stem_tables): exactly the values a resident lookup gives.

Where each row is updated. Consecutive steps share many rows (about half on real text). A row
that step i+1 also needs must not wait for a trip through host memory, so it stays on the device:
  - rows step i shares with step i-1 or step i+1 are updated on the GPU, with their AdamW moments
    on the GPU; those it shares with step i+1 are then copied into step i+1's slot (device to device);
  - every other row of step i is updated on the host: its gradient goes to pinned memory and
    RowAdamW (tables.py: fused kernel, in place, several threads) updates the host table;
  - rows that leave the device (in step i-1 and i, not in i+1) are written back: p, m, v to host.
A row's host copy is current whenever the row is not on the device, so the host only ever reads
current rows: rows new in step i+1 are not in step i, and the host tasks of step i-1 (the last
ones that could touch them) run before the gather of step i+1 (one worker thread, in order).

One step, as a timeline (step i on the compute stream; the worker thread is a host thread):

    compute stream   | fwd+bwd i .................. | AdamW(shared rows) carry->slot(i+1) | fwd+bwd i+1 ...
    H2D stream       | rows new in i+1 -> slot(i+1); m, v of rows i shares with i+1 -> slot(i) |
    D2H stream       |                                                  | grads(host rows), write-back i |
    worker thread    | host AdamW i-1, write-back i-1 | gather i+1 |     | host AdamW i, write-back i ...
    RowAdamW threads |   (shards of the host AdamW)   |

CUDA events guard the buffers: the compute stream waits for a slot's copy-in before reading it
(each event is recorded before it is handed to another thread); copies into a slot wait for the event
recorded after the last step that used it; the worker waits for a staging buffer's previous copy
before refilling it; D2H copies out of temporaries keep them alive with record_stream; the main
thread waits for the host task reading a pinned output buffer before filling it again. Without
these, a buffer can be overwritten mid-read, which shows up as silent garbage or NaNs.

Inference: prefill runs the prompt chunk by chunk (prefill_chunk) and prefetches the next chunk's
rows while the current chunk computes. Decoding has no lookahead (the next id is the token just
sampled), so a GPU cache of hot rows serves it: LFU, ties broken by least recent use. Token
frequencies follow Zipf's law and are stable, so frequency is the better predictor of reuse: an
LRU cache would let a burst of rare tokens evict "the" and ",". The hit rate is reported. The cache
is for inference only: it is never refreshed after a training update, so training refuses it.

On a machine without CUDA the same code runs with host and device both the CPU (no pinning, no
streams or events), so the CPU tests exercise the ids, the carry between steps, the split between
device and host updates, the ordering of the worker thread, the write-back and the cache.
"""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from configurator import UserError
from tables import RowAdamW, Tables, _single_thread, adamw_, clip_joint_norm_, to_device, unique_ids


@dataclass
class Slot:
    """One of the two buffer sets; step i uses slot i % 2. Planes: 0 rows (p), 1 and 2 their AdamW
    moments (m, v; training only). `out` planes: 0 the gradient of host-updated rows, 1-3 p, m, v of
    rows written back."""
    dev: Optional[torch.Tensor] = None  # (planes, K, W) on the device
    stage: Optional[torch.Tensor] = None  # (planes, K, W) pinned: gathered rows on their way in
    out: Optional[torch.Tensor] = None  # (4, K, W), pinned on CUDA: gradients and write-backs on their way out
    g_rows: tuple = ()  # the row views of out[0], the host rows' gradients, made once (RowAdamW takes them)
    staged: Any = None  # CUDA event: the last copy out of `stage` is done (it may be refilled)
    free: Any = None  # CUDA event on the compute stream: the last step that used `dev` is done with it
    out_busy: Any = None  # future of the host task that reads `out`


@dataclass
class Job:
    """One step's (or one prompt chunk's) rows."""
    uniq: torch.Tensor  # (K,) sorted unique ids
    inverses: list  # per micro-batch (B, T): position -> row of uniq
    slot: int
    from_prev: torch.Tensor  # (K,) bool: rows carried from the previous step's slot (device to device)
    prev_pos: torch.Tensor  # their positions in the previous step's slot
    to_next: Optional[torch.Tensor] = None  # (K,) bool: rows the next step shares (set by its prefetch)
    loaded: Any = None  # future -> CUDA event (or None): the rows have landed
    leaves: Optional[list] = None  # per-layer (K, ffn_hidden) leaves while the step runs


class OffloadedTables(Tables):
    def __init__(self, model, device, optimizer="lazy", train=True, weight_decay=0.1, betas=(0.9, 0.95),
                 eps=1e-8, cache_rows=0, threads=None):
        ffns = model.stem_ffns()
        if not ffns:
            raise UserError(f"offload needs STEM tables, and this model has none (ffn={model.cfg.ffn}): drop --offload")
        if train and optimizer != "lazy":
            raise UserError("offload trains only with the lazy table optimizer: --table_optimizer=lazy")
        if train and cache_rows:
            raise UserError("the decode row cache is for inference: it is never refreshed after a training "
                               "update, so it cannot be used while training")
        super().__init__(model, optimizer, weight_decay, betas, eps)
        self.V, self.h = ffns[0].table.shape
        self.W = self.n * self.h
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.table = torch.empty(self.V, self.W)  # host memory, allocated there directly
        for l, f in enumerate(ffns):
            self.table[:, self.cols(l)] = f.table.detach()
            f.table = None  # the module no longer owns a table: .to(device) moves none, state_dict() lists none
        model.to(self.device)
        self.train = train
        self.planes = 3 if train else 1
        # without CUDA the host is the device, and the model's own threads already use every core:
        # the host side then runs on one thread, rather than competing with them (oversubscription)
        self.opt = RowAdamW(self.table, threads if self.cuda else 1) if train else None  # its m, v: the host moments
        self.worker = ThreadPoolExecutor(max_workers=1, initializer=None if self.cuda else _single_thread)
        self.h2d = torch.cuda.Stream(self.device) if self.cuda else None
        self.d2h = torch.cuda.Stream(self.device) if self.cuda else None
        self.slots = [Slot(), Slot()]
        self.next_slot, self.queued, self.current, self._last_host = 0, None, None, None
        self.counts = dict(device=0, host=0, written_back=0)  # rows updated where, summed over steps
        self.cache = RowCache(self, min(cache_rows, self.V)) if cache_rows else None  # more slots than rows: pointless
        self.prompt_jobs, self._chunks, self._reading = {}, [], None

    def describe(self):
        mib = self.table.numel() * 4 / 2**20
        return f"{self.n} ({self.optimizer} AdamW, {mib:.1f} MiB + moments in host memory, offloaded)"

    def cols(self, l):
        """Layer l's columns in the packed layout."""
        return slice(l * self.h, (l + 1) * self.h)

    # ---- buffers ------------------------------------------------------------------------------

    def _buffers(self, slot, K):
        s = self.slots[slot]
        if s.dev is None or s.dev.size(1) < K:  # grows to the largest step seen (plus a margin), then is reused
            if s.out_busy is not None:
                s.out_busy.result()
            if self.cuda:
                torch.cuda.synchronize(self.device)  # no stream may still use the old ones
            K = int(K * 1.25) + 16
            s.dev = torch.empty(self.planes, K, self.W, device=self.device)
            if self.cuda:
                s.stage = torch.empty(self.planes, K, self.W, pin_memory=True)
                s.staged = None
            if self.train:  # on the CPU only the gradients go out through it (plane 0)
                s.out = torch.empty(4 if self.cuda else 1, K, self.W, pin_memory=self.cuda)
                s.g_rows = () if self.opt.gather else s.out[0].unbind(0)  # a gathering RowAdamW needs none
        return s

    def _land(self, s, plane, positions, src, rows):
        """Copy host rows src[rows] into plane `plane` of slot s's device buffer at `positions`
        (worker thread). On CUDA: gathered into pinned staging, then an asynchronous copy."""
        if not self.cuda:
            s.dev[plane].index_copy_(0, positions, src.index_select(0, rows))
            return
        staging = s.stage[plane][:len(rows)]
        torch.index_select(src, 0, rows, out=staging)
        dst = s.dev[plane]
        if len(positions) == dst.size(0) or bool((positions == torch.arange(len(positions))).all()):
            dst[:len(positions)].copy_(staging, non_blocking=True)  # all rows, in order: one copy
        else:
            dst.index_copy_(0, to_device(positions, self.device), staging.to(self.device, non_blocking=True))

    def _load(self, job, prev, mv_rows):
        """Worker: the rows of `job` that do not come from the previous slot, and the moments of the
        previous step's rows that the job shares (they are updated on the device). Returns the CUDA
        event after the copies, recorded before it is handed to the main thread."""
        s = self.slots[job.slot]
        new = (~job.from_prev).nonzero().flatten()
        copies = [(s, 0, new, self.table, job.uniq[new])]
        if mv_rows is not None and len(mv_rows):
            ps = self.slots[prev.slot]
            ids = prev.uniq[mv_rows]
            copies += [(ps, 1, mv_rows, self.opt.m, ids), (ps, 2, mv_rows, self.opt.v, ids)]
        if not self.cuda:
            for c in copies:
                self._land(*c)
            return None
        for slot in {id(c[0]): c[0] for c in copies}.values():
            if slot.staged is not None:
                slot.staged.synchronize()  # the staging buffer's previous copy is done: it may be refilled
        with torch.cuda.stream(self.h2d):
            if s.free is not None:
                self.h2d.wait_event(s.free)  # the step that last used this slot is done with it
            for c in copies:
                self._land(*c)
            ev = torch.cuda.Event()
            ev.record(self.h2d)
        for c in copies:
            c[0].staged = ev
        return ev

    # ---- training: prefetch, rows, step -------------------------------------------------------

    def prefetch(self, xs):
        """Queue the rows of the step whose micro-batches are xs (list of (B, T) CPU id tensors):
        one step ahead of the step that runs."""
        if self.queued is not None:
            raise RuntimeError("prefetch() twice without rows() between: the pipeline runs one step ahead at most")
        self.queued = self._job(xs, self.current if self.train else None)

    def _job(self, xs, prev):
        uniq, inverses = unique_ids(xs)
        from_prev = torch.zeros(len(uniq), dtype=torch.bool)
        prev_pos, mv_rows = None, None
        if prev is not None:
            from_prev = torch.isin(uniq, prev.uniq)
            prev_pos = torch.searchsorted(prev.uniq, uniq[from_prev])
            prev.to_next = torch.isin(prev.uniq, uniq)
            # the previous step updates its shared rows on the device: those it did not itself carry in
            # need their moments there (their host copies are current: no host task touches them)
            mv_rows = (prev.to_next & ~prev.from_prev).nonzero().flatten()
        job = Job(uniq, inverses, self.next_slot, from_prev, prev_pos)
        self.next_slot ^= 1
        self._buffers(job.slot, len(uniq))
        job.loaded = self.worker.submit(self._load, job, prev, mv_rows)
        return job

    def _leaves(self, job):
        ev = job.loaded.result()  # re-raises a failed host task here
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        rows = self.slots[job.slot].dev[0][:len(job.uniq)]
        return [rows[:, self.cols(l)].detach().requires_grad_(self.train) for l in range(self.n)]

    def rows(self):
        """The queued step's rows: per micro-batch (stem_ids, stem_tables) for GPT.forward, the
        inverse index and the per-layer (K, ffn_hidden) leaves."""
        if self.queued is None:
            raise RuntimeError("rows() before prefetch(): queue the step's ids first")
        job, self.queued = self.queued, None
        job.leaves = self._leaves(job)
        self.current = job
        return [(to_device(inv, self.device), job.leaves) for inv in job.inverses]

    def _mark_free(self, s):
        if self.cuda:
            s.free = torch.cuda.Event()
            s.free.record(torch.cuda.current_stream(self.device))

    def step(self, lr, max_norm):
        """After backward: clip the compact gradient, update the shared rows on the device, carry
        them into the next step's slot, and send the rest to the host. Returns the gradient norm."""
        if self._last_host is not None and self._last_host.done():
            self._last_host.result()  # re-raises a failed host update here rather than never
        job, self.current = self.current, None
        s, K = self.slots[job.slot], len(job.uniq)
        grads = [leaf.grad for leaf in job.leaves]  # per layer (K, ffn_hidden)
        job.leaves = None
        norm = clip_joint_norm_(grads, max_norm)
        self.steps += 1
        g = torch.cat(grads, dim=1)  # (K, W), the packed layout
        nxt = self.queued
        to_next = job.to_next if job.to_next is not None else torch.zeros(K, dtype=torch.bool)
        on_dev = job.from_prev | to_next
        # 1. rows shared with a neighbouring step: AdamW on the device (their moments are there)
        dev_rows = on_dev.nonzero().flatten()
        if len(dev_rows):
            if nxt is not None:
                ev = nxt.loaded.result()  # the moments of the rows this step carried in fresh
                if ev is not None:
                    torch.cuda.current_stream(self.device).wait_event(ev)
            pos = to_device(dev_rows, self.device)
            pmv = s.dev[:, :K].index_select(1, pos)  # (3, rows, W): p, m, v
            p, m, v = pmv.unbind(0)
            adamw_([p], [g.index_select(0, pos)], [m], [v], self.steps, lr, **self.hyper)
            s.dev[:, :K].index_copy_(1, pos, pmv)
        # 2. the rows the next step shares: into its slot, device to device, in stream order
        if nxt is not None and nxt.from_prev.any():
            dst = to_device(nxt.from_prev.nonzero().flatten(), self.device)
            self.slots[nxt.slot].dev.index_copy_(1, dst, s.dev.index_select(1, to_device(nxt.prev_pos, self.device)))
        # 3. out to the host: gradients of the host-updated rows, p, m, v of the rows leaving the device
        host_rows = (~on_dev).nonzero().flatten()
        wb_rows = (job.from_prev & ~to_next).nonzero().flatten()
        for k, rows in (("device", dev_rows), ("host", host_rows), ("written_back", wb_rows)):
            self.counts[k] += len(rows)
        wb_out = s.dev[:, :K].index_select(1, to_device(wb_rows, self.device))
        if s.out_busy is not None:
            s.out_busy.result()  # the host task of two steps ago has read this slot's `out`
        ev, n = None, len(host_rows)
        if not self.cuda:
            torch.index_select(g, 0, host_rows, out=s.out[0][:n])
        else:
            g_out = g.index_select(0, to_device(host_rows, self.device))
            self.d2h.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.d2h):
                s.out[0][:n].copy_(g_out, non_blocking=True)
                # plane by plane, each contiguous: a strided pinned view would be copied through a
                # pageable temporary, and that blocks the host until the copy (and the step) is done
                for j in range(3):
                    s.out[1 + j][:len(wb_rows)].copy_(wb_out[j], non_blocking=True)
                for t in (g_out, wb_out):
                    t.record_stream(self.d2h)  # allocated on the compute stream, read on this one
                ev = torch.cuda.Event()
                ev.record(self.d2h)
            wb_out = s.out[1:][:, :len(wb_rows)]
        self._mark_free(s)  # every use of this slot's device buffer is queued by now
        s.out_busy = self._last_host = self.worker.submit(  # the gradients: out[0][:n] and its row views
            self._host_update, job.uniq[host_rows], s.out[0][:n], s.g_rows[:n], job.uniq[wb_rows], wb_out, ev,
            self.steps, lr)
        return norm

    def _host_update(self, ids, g, g_rows, wb_ids, wb, ev, step, lr):
        """Worker: host AdamW on the rows that did not stay on the device, and the write-back."""
        if ev is not None:
            ev.synchronize()  # the copies to pinned memory have landed
        self.opt.update(ids, g, step, lr, **self.hyper, g_rows=g_rows)
        if len(wb_ids):
            self._write_back(wb_ids, wb)

    def _write_back(self, ids, pmv):
        """Rows ids of the host table and moments <- pmv (3, rows, W): p, m, v from the device."""
        for t, rows in zip((self.table, self.opt.m, self.opt.v), pmv.unbind(0)):
            t.index_copy_(0, ids, rows)

    def drain(self):
        """Wait for every queued host task and the device's queued work: a barrier for timing
        (bench.py). Unlike sync() it copies nothing back, so the host tables may still be stale."""
        self.worker.submit(lambda: None).result()
        if self._last_host is not None:
            self._last_host.result()
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def sync(self):
        """Wait for every queued host task, then make the host copies current: rows carried into the
        queued step live on the device, so their p, m, v are copied back (the device keeps them).
        Call before evaluating, saving or reading the tables."""
        self.drain()
        nxt = self.queued
        if self.train and nxt is not None and nxt.from_prev.any():
            ev = nxt.loaded.result()
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)
            pos = nxt.from_prev.nonzero().flatten()
            vals = self.slots[nxt.slot].dev.index_select(1, to_device(pos, self.device)).cpu()  # waits for it
            self._write_back(nxt.uniq[pos], vals)

    # ---- plain lookups (evaluation) and generation ------------------------------------------

    def lookup(self, ids):
        """(stem_ids, stem_tables) for ids (any shape), synchronously: the unique rows gathered and
        copied, and the inverse index into them."""
        uniq, inv = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
        rows = self.table.index_select(0, uniq).to(self.device)
        return inv.to(self.device), [rows[:, self.cols(l)] for l in range(self.n)]

    def prefetch_prompt(self, stem_ids, chunk):
        """Queue the prompt's chunks; stem_fn serves each from its prefetched slot, and asks for the
        chunk after next while the current one computes."""
        self.prompt_jobs, self._reading = {}, None
        self._chunks = [(pos, stem_ids[:, pos:pos + chunk]) for pos in range(0, stem_ids.size(1), chunk)]
        for pos, ids in self._chunks[:2]:
            self._queue_chunk(pos, ids)

    def _queue_chunk(self, pos, ids):
        self.prompt_jobs[pos] = (ids.cpu(), self._job([ids.cpu()], None))

    def stem_fn(self, ids, pos):
        """For GPT.generate(stem_fn=...): (stem_ids, stem_tables) for prefill chunks from prefetched
        slots (or a plain lookup), for decode steps (one token) from the row cache."""
        if self._reading is not None:  # the previous chunk's forward pass is queued: its slot may be refilled
            self._mark_free(self._reading)
            self._reading = None
            later = [c for c in self._chunks if c[0] >= pos and c[0] not in self.prompt_jobs]
            if later:
                self._queue_chunk(*later[0])
        if ids.size(1) == 1 and self.cache is not None:
            return self.cache.rows(ids)
        queued = self.prompt_jobs.pop(pos, None)
        if queued is None or not torch.equal(queued[0], ids.cpu()):
            return self.lookup(ids)
        job = queued[1]
        self._reading = self.slots[job.slot]
        return to_device(job.inverses[0], self.device), self._leaves(job)

    # ---- checkpoints: the same keys and formats as a resident model ---------------------------

    def state_dict(self, model):
        self.sync()
        sd = model.state_dict()
        for l, name in enumerate(self.names):
            sd[name] = self.table[:, self.cols(l)].clone()
        return sd

    def optimizer_state_dict(self, lr):
        """The lazy table optimizer's state in the resident format, so that a resident run can
        resume from an offloaded checkpoint and the reverse."""
        self.sync()
        return self._lazy_state([(self.opt.m[:, self.cols(l)].clone(), self.opt.v[:, self.cols(l)].clone())
                                 for l in range(self.n)], lr)

    def load_optimizer_state_dict(self, sd):
        self._check_loadable(sd, " without --offload" if self.optimizer == "lazy" else "")
        for l, st in sd["state"].items():
            self.opt.m[:, self.cols(int(l))] = st["exp_avg"]
            self.opt.v[:, self.cols(int(l))] = st["exp_avg_sq"]


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
        if len(needed) > self.n:
            raise UserError(f"offload_cache_rows={self.n} is smaller than the {len(needed)} distinct ids "
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
        return idx, [self.buf[:, self.off.cols(l)] for l in range(self.off.n)]

    def hit_rate(self):
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")
