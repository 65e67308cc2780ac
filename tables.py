"""
The STEM tables and their optimizer, behind one interface, wherever the tables live.

    tables = ResidentTables(model, device, optimizer="lazy")   # or offload.OffloadedTables(model, device)
    tables.prefetch(xs)       # the ids of the next step's micro-batches: known before its forward pass
    batches = tables.rows()   # per micro-batch (stem_ids, stem_tables) for GPT.forward: the inverse index and unique
                              # rows per layer (offload: the micro-batch's; resident lazy: the step's), or (None, None)
    ... forward and backward of each micro-batch ...
    tables.step(lr, max_norm) # clip the tables' gradient by its own norm (authors' code), AdamW on them
    tables.sync()             # before evaluating or saving, and for timing: every queued update has landed

Both placements place the model on the device themselves (offload must take the tables out first) and write
checkpoints with the same keys, so a run can switch placement on resume.

Two table optimizers (the paper trains its tables with AdamW like every other weight):
- dense: torch.optim.AdamW over whole tables, the paper's recipe. Rows absent from the batch still move (momentum,
  weight decay): every row is read and written each step, and backward builds a (vocab, ffn_hidden) gradient per table.
- lazy: a row-sparse AdamW, a different optimizer and the one that makes offload cheap: only the rows whose ids are in
  the step change, weight decay included; absent rows' moments are untouched. No (vocab, ffn_hidden) gradient is built:
  per step, torch.unique gives the K unique ids and the inverse index (position -> row); each STEM layer looks up, by
  the inverse index, a (K, ffn_hidden) leaf tensor of its table's rows (GPT.forward's stem_ids, stem_tables: a plain
  lookup's F.embedding, into a smaller table). Backward leaves a compact (K, ffn_hidden) gradient per layer; `RowAdamW`
  updates exactly those K rows in place. offload.py fetches each micro-batch's rows alone, sums their gradients into the
  step's K rows on the host and runs the same RowAdamW: the placements are bit-identical on the CPU (tested).

Under DDP (resident only) the ranks agree on the union of their ids before the step, so that the compact gradients
line up row for row and can be all-reduced; every rank updates the same rows.
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

NARROW = 1024  # RowAdamW: rows narrower than this many values are gathered, wider ones updated in place


def adamw_(params, grads, exp_avgs, exp_avg_sqs, step, lr, betas, eps, weight_decay):
    """One AdamW step, in place, on lists of matching tensors, with the fused kernel that torch.optim.AdamW(fused=True)
    runs (decoupled weight decay, bias correction by `step`). The kernel is elementwise and cuts its work at multiples
    of 16 values, so a value's result does not depend on how the rows are grouped into tensors (row views, gathered
    blocks, packed layers) when the row widths are multiples of 16, as every width in this repo is."""
    if params:
        steps = [torch.full((), float(step), device=params[0].device)] * len(params)  # read, not written
        torch._fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=betas[0],
                            beta2=betas[1], weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False)


def joint_norm(grads, max_norm):
    """The joint norm of grads (per layer (K, ffn_hidden), or views) and torch's clip factor min(1, max_norm / norm),
    summed from per-row norms: a row's norm has the same bits in a (K, ffn_hidden) block (resident) as in a packed
    (K, n_stem * ffn_hidden) buffer (offload), where a whole-tensor reduction's would not."""
    rows = torch.cat([torch.linalg.vector_norm(g, dim=1) for g in grads])  # (n_stem * K,)
    total = torch.linalg.vector_norm(rows)
    return total, torch.clamp(max_norm / (total + 1e-6), max=1.0)


def clip_joint_norm_(grads, max_norm):
    """Scale grads in place by the clip factor (as torch.nn.utils.clip_grad_norm_) and return the norm."""
    total, coef = joint_norm(grads, max_norm)
    torch._foreach_mul_(grads, coef)  # elementwise: the bits of g.mul_(coef)
    return total


def mark_dynamic(leaves):
    """K changes every step: dynamic, so that a compiled model compiles once (if compile loaded dynamo: seconds)."""
    for leaf in leaves if "torch._dynamo" in sys.modules else []:
        torch._dynamo.maybe_mark_dynamic(leaf, 0)  # no error where K is 1 (then specialised)
    return leaves


def nbytes(tensors):
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)  # 0 once offload freed a leaf


def capacity(K):
    return K + K // 4 + 16  # rows of a buffer grown for K: room for larger steps, so that it is rarely reallocated


def _single_thread():
    torch.set_num_threads(1)  # per thread: the main thread keeps its own intra-op threads


class RowAdamW:
    """Lazy AdamW on chosen rows of a (V, W) table `p`, with moments m and v beside it.

    Two ways, the same bits (the kernel is elementwise; see adamw_):
    - wide rows on the CPU (W >= 1,024 values: 4 KiB and up, e.g. offload's packed rows): in place on row views of p, m,
      v (made once: a microsecond or two a row), split over `threads` threads, one intra-op thread each: the fused
      kernel opens a parallel region per tensor, costing more than a row's work when a row is a few KiB.
    - narrow rows on the CPU, and every row on CUDA: gather the rows of p, m, v into a persistent block, run the
      kernel once, scatter them back. For narrow rows the per-row kernel calls cost more than the copies (measured
      on a 2-core CPU: the crossover near 1,024 values, the gather about twice as fast at 512); the GPU's memory
      is fast enough that the copies cost nothing next to the step."""

    def __init__(self, p, threads=None):
        self.p, self.m, self.v = p, torch.zeros_like(p), torch.zeros_like(p)
        self.gather = p.is_cuda or p.size(1) < NARROW
        self.block = None  # (3, rows, W): the gathered p, m, v, grown to the largest step seen
        self.threads = None  # the gather runs on the caller's thread (and its intra-op threads)
        if not self.gather:
            self.views = [t.unbind(0) for t in (self.p, self.m, self.v)]
            self.threads = threads or min(8, os.cpu_count() or 1)
            self.pool = ThreadPoolExecutor(self.threads, initializer=_single_thread)

    @torch.no_grad()
    def update(self, ids, g, step, lr, betas, eps, weight_decay, g_rows=None):
        """AdamW on rows ids (K,) of p, m, v with their gradient g (K, W). g_rows: instead of g, its rows as views
        made once by a caller that reuses its buffer (offload.py): making 10,000 views costs a third of their update."""
        hyper = (step, lr, betas, eps, weight_decay)
        if self.gather:
            ids, K = ids.to(self.p.device), len(ids)
            if self.block is None or self.block.size(1) < K:
                self.block = torch.empty(3, capacity(K), self.p.size(1), device=self.p.device)
            block = self.block[:, :K].unbind(0)  # each (K, W), contiguous
            for t, rows in zip((self.p, self.m, self.v), block):
                torch.index_select(t, 0, ids, out=rows)
            adamw_([block[0]], [g], [block[1]], [block[2]], *hyper)
            for t, rows in zip((self.p, self.m, self.v), block):
                t.index_copy_(0, ids, rows)
            return
        ids = ids.tolist()
        g = g if g_rows is None else g_rows  # sliced below: a tensor or a tuple of its rows
        cuts = [len(ids) * k // self.threads for k in range(self.threads + 1)]  # a thread's share: rows a..b
        list(self.pool.map(lambda a, b: self._rows(ids[a:b], g[a:b], hyper), cuts, cuts[1:]))  # re-raises an error

    def _rows(self, ids, g, hyper):
        """One thread's share of the rows: views of p, m, v (made once) and of g (made here unless given)."""
        P, M, V = self.views
        gs = list(g.unbind(0)) if torch.is_tensor(g) else list(g)
        adamw_([P[i] for i in ids], gs, [M[i] for i in ids], [V[i] for i in ids], *hyper)


def unique_ids(xs):
    """The sorted unique ids (K,) of a step's micro-batches xs (list of (B, T) CPU tensors), and each one's inverse."""
    ids = torch.cat([x.reshape(-1) for x in xs])
    uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return uniq, [inv.view(x.shape) for inv, x in zip(inverse.split([x.numel() for x in xs]), xs)]


def to_device(t, device):
    """A CPU tensor to the device without stalling the host: pinned, then an asynchronous copy."""
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t


class Tables:
    """What both placements share: the hyperparameters, the step count and the lazy optimizer's checkpoint format
    (one entry per STEM layer: step, exp_avg, exp_avg_sq, as a resident run's: placements interchange on resume)."""

    def __init__(self, model, optimizer, weight_decay, betas, eps):
        if optimizer not in ("dense", "lazy"):
            raise ValueError(f"table_optimizer={optimizer!r} is not one of 'dense', 'lazy'")
        self.optimizer, self.lazy = optimizer, optimizer == "lazy"
        self.hyper = dict(betas=betas, eps=eps, weight_decay=weight_decay)
        self.names = [f"blocks.{i}.ffn.table" for i in model.stem_layers]
        self.n, self.steps = len(self.names), 0

    def describe(self):
        return f"{self.n} ({self.optimizer} AdamW, on the device)"

    def _lazy_state(self, moments, lr):
        """moments: per layer (exp_avg, exp_avg_sq), CPU tensors."""
        state = {l: {"step": torch.tensor(float(self.steps)), "exp_avg": m, "exp_avg_sq": v}
                 for l, (m, v) in enumerate(moments)} if self.steps else {}
        group = dict(lr=lr, **self.hyper, lazy=True, params=list(range(self.n)))
        return {"state": state, "param_groups": [group]}

    def _check_loadable(self, sd, hint):
        saved = "lazy" if sd["param_groups"][0].get("lazy", False) else "dense"
        if saved != self.optimizer:
            raise ValueError(f"this checkpoint's tables were trained with the {saved} optimizer; "
                             f"resume with --table_optimizer={saved}{hint}")
        g = sd["param_groups"][0]  # as torch's load_state_dict: the saved hyperparameters win
        self.hyper = dict(betas=tuple(g["betas"]), eps=g["eps"], weight_decay=g["weight_decay"])
        for st in sd["state"].values():
            self.steps = int(st["step"].item())


class ResidentTables(Tables):
    """The tables are parameters of the model, on the device."""

    def __init__(self, model, device, optimizer="dense", weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8,
                 ddp=False, threads=None):
        super().__init__(model, optimizer, weight_decay, betas, eps)
        model.to(device)
        self.device, self.ddp, self.V = device, ddp, model.cfg.vocab_size
        self.tables = [f.table for f in model.stem_ffns()]
        self.pending, self.current = None, None
        if not self.tables:
            return
        if self.lazy:
            for t in self.tables:  # updated by RowAdamW through compact leaves, never by autograd
                t.requires_grad_(False)
            # on the CPU the model's own threads already use every core: one update thread, not several
            self.opts = [RowAdamW(t.data, threads or (None if t.is_cuda else 1)) for t in self.tables]
        else:  # the paper's second AdamW, over whole tables, so that they clip by their own norm
            self.opt = torch.optim.AdamW([dict(params=self.tables, lazy=False)], lr=0.0, betas=betas, eps=eps,
                                         weight_decay=weight_decay)

    def prefetch(self, xs):
        if self.pending is not None:
            raise RuntimeError("prefetch() twice before rows(): one step ahead at most")
        self.pending = (len(xs), self._ids(xs) if self.lazy and self.tables else None)

    def _ids(self, xs):
        uniq, inverses = unique_ids(xs)
        if self.ddp:  # the union of every rank's ids, so that the compact gradients line up
            mask = torch.zeros(self.V, device=self.device)
            mask[uniq.to(self.device)] = 1
            dist.all_reduce(mask)
            uniq = mask.nonzero().flatten().cpu()
            inverses = [torch.searchsorted(uniq, x) for x in xs]
        return to_device(uniq, self.device), [to_device(inv, self.device) for inv in inverses]

    def rows(self):
        (n_micro, ids), self.pending = self.pending, None
        if ids is None:
            return [(None, None)] * n_micro  # dense (or no STEM layers): the model looks its rows up itself
        uniq, inverses = ids
        # (K, ffn) per layer; index_select, not t[uniq]: advanced indexing is ~20x slower on the CPU
        leaves = mark_dynamic([t.index_select(0, uniq).requires_grad_() for t in self.tables])
        self.current = (uniq, leaves)
        return [(inv, leaves) for inv in inverses]

    def step(self, lr, max_norm):
        """After backward: clip and update; returns the tables' gradient norm (a tensor)."""
        if not self.tables:
            return torch.zeros((), device=self.device)
        self.steps += 1
        if not self.lazy:
            norm = torch.nn.utils.clip_grad_norm_(self.tables, max_norm)  # whole tables: torch's own, as the authors
            self.opt.param_groups[0]["lr"] = lr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            return norm
        (uniq, leaves), self.current = self.current, None
        grads = [leaf.grad for leaf in leaves]
        if self.ddp:  # averaged over ranks, as DDP averages the backbone's gradients
            for g in grads:
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
        norm = clip_joint_norm_(grads, max_norm)
        for opt, g in zip(self.opts, grads):
            opt.update(uniq, g, self.steps, lr, **self.hyper)
        return norm

    def sync(self):  # resident updates run in the caller's order: nothing queued behind here
        pass

    def lookup(self, ids):
        return None, None  # the model looks its rows up itself

    def held_bytes(self):
        """Bytes of the tensors held on the device now (lazy): tables, moments, update block, the step's leaves and
        their gradients; offload.device_bytes predicts it. Ids are not counted."""
        leaves = self.current[1] if self.current else []
        opts = [t for o in self.opts for t in (o.m, o.v, o.block)] if self.lazy and self.tables else []
        return nbytes(self.tables + opts + leaves + [x.grad for x in self.tables + leaves])

    stem_fn = None  # for GPT.generate: plain lookups

    def state_dict(self, model):
        return model.state_dict()

    def optimizer_state_dict(self, lr):
        if not self.tables:
            return None
        if not self.lazy:
            return self.opt.state_dict()
        return self._lazy_state([(o.m.cpu(), o.v.cpu()) for o in self.opts], lr)

    def load_optimizer_state_dict(self, sd):
        if sd is None or not self.tables:
            return
        self._check_loadable(sd, "")
        if not self.lazy:
            self.opt.load_state_dict(sd)
            return
        for l, st in sd["state"].items():
            self.opts[int(l)].m.copy_(st["exp_avg"])
            self.opts[int(l)].v.copy_(st["exp_avg_sq"])
