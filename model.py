"""
A Llama-style GPT whose FFN layers are either SwiGLU or STEM, in one file.

    SwiGLU: y = W_down(silu(W_gate x) * (W_up x))
    STEM:   y = W_down(silu(W_gate x) * U_l[token_id])      U_l: (vocab_size, ffn_hidden)

STEM (Sadhukhan et al., "STEM: Scaling Transformers with Embedding Modules", arXiv 2601.10639) deletes the
up-projection in chosen layers and looks up a per-layer table row by the position's input token id instead. In
the forward pass the change is the `STEM` class below (next to `SwiGLU`) and the one line in `Block.__init__`
that picks between them; besides that, the tables get their own initialisation (`reset_parameters`) and their
own optimizer (tables.py). Token-indexed per-layer tables were already used as "value embeddings" in
modded-nanogpt (Keller Jordan et al., 2024). The paper's ablations (the table in place of the gate, the table
added to a kept up-projection, a hash-routed MoE) follow the two FFNs, for comparison only (--ffn=stem_gate,
stem_add, hash_moe).

Read top to bottom: norm -> rotary -> attention -> FFNs -> block -> config -> GPT -> optimizer.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # computed in float32 whatever the autocast dtype, as Llama does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight).type_as(x)


def rotary_tables(head_dim, max_len, theta):
    # RoPE (Su et al. 2021): rotate pairs of channels by a position-dependent angle
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)  # (hs/2,)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x: (B, nh, T, hs), cos/sin: (T, hs/2); rotate-half convention
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, nh, T, hs)
        mask, causal = None, True
        if cache is not None:
            # KV cache for generation: write this chunk at [pos, pos+T), attend to [0, pos+T)
            cache[0][:B, :, pos:pos + T] = k
            cache[1][:B, :, pos:pos + T] = v
            k, v = cache[0][:B, :, :pos + T], cache[1][:B, :, :pos + T]
            if pos > 0:  # a chunk after the first: causal within the chunk, all of the past
                causal = False
                at = torch.arange(pos + T, device=x.device)
                mask = at[None, :] <= at[pos:, None]  # (T, pos + T): key j visible to query pos + i if j <= pos + i
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T > 1)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


# -----------------------------------------------------------------------------
# the two FFNs: same signature forward(x, ids, table), one line in Block picks one


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x, ids, table=None):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class STEM(nn.Module):
    # the up-projection W_up x is replaced by a row of this layer's own table, chosen by token id
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)
        self.table = nn.Parameter(torch.empty(cfg.vocab_size, cfg.ffn_hidden))  # U_l: (V, ffn)

    def forward(self, x, ids, table=None):
        # ids: (B, T) indices into the table (the token ids, or into `table`: a batch's unique rows, tables.py and
        # offload.py). The row is used raw, in the gate's dtype (bf16 under autocast, where x is float32), as SwiGLU's
        u = F.embedding(ids, self.table if table is None else table)  # (B, T, ffn): the row replaces W_up x
        g = F.silu(self.gate(x))  # (B, T, ffn)
        return self.down(g * u.to(g.dtype))


# -----------------------------------------------------------------------------
# the paper's ablations (--ffn=stem_gate, stem_add, hash_moe), for comparison only: each replaces
# STEM in the same layers (stem_layers). The two table variants hold a `table` like STEM's, found,
# initialised, optimised and offloaded the same way (tables.py, offload.py).


class STEMGate(nn.Module):
    # the table replaces the gate projection instead of the up-projection:
    # y = W_down(silu(U_l[t]) * (W_up x)). Reported worse than dense.
    def __init__(self, cfg):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)
        self.table = nn.Parameter(torch.empty(cfg.vocab_size, cfg.ffn_hidden))  # (V, ffn), as STEM's

    def forward(self, x, ids, table=None):
        u, up = F.embedding(ids, self.table if table is None else table), self.up(x)  # ids, table: as in STEM
        return self.down(F.silu(u.to(up.dtype)) * up)  # dtypes: as in STEM


class STEMAdd(SwiGLU):
    # the up-projection is kept and the row is added to it: y = W_down(silu(W_gate x) * (W_up x + U_l[t])).
    # More parameters and FLOPs than STEM, reported no better. The table has STEM's xavier-normal init,
    # not zeros, so that it differs from STEM in one thing only; its rows (std sqrt(2 / (V + ffn)))
    # are already small next to W_up x (std about 1), so the layer starts close to SwiGLU either way.
    def __init__(self, cfg):
        super().__init__(cfg)  # SwiGLU's gate, up and down, then the table
        self.table = nn.Parameter(torch.empty(cfg.vocab_size, cfg.ffn_hidden))

    def forward(self, x, ids, table=None):
        u, up = F.embedding(ids, self.table if table is None else table), self.up(x)
        return self.down(F.silu(self.gate(x)) * (up + u.to(up.dtype)))  # dtypes: as in STEM


HASH_SEED = 1234  # fixes HashMoE's id -> expert map


class HashMoE(nn.Module):
    # hash-routed mixture of experts (Roller et al. 2021, "Hash Layers"): moe_experts SwiGLU experts,
    # each token runs the one (top-1) that a fixed random hash of its id picks: SwiGLU's FLOPs per
    # token, moe_experts times its weights. No table: routed by `ids`, the token ids (stem_ids when
    # GPT.forward is given them; tables.py never hands this layer an inverse index, it has no table).
    def __init__(self, cfg):
        super().__init__()
        self.experts = nn.ModuleList(SwiGLU(cfg) for _ in range(cfg.moe_experts))
        # id -> expert: a seeded random map, not id % E, so that the frequent ids (BPE's small ids) spread over the
        # experts; the same map in every layer. A persistent buffer (not a parameter: not trained, not counted): a
        # checkpoint carries its routing and loads with it even if the recipe (seed, torch's generator) changes.
        g = torch.Generator().manual_seed(HASH_SEED)
        self.register_buffer("expert_of", torch.randint(cfg.moe_experts, (cfg.vocab_size,), generator=g))

    def forward(self, x, ids, table=None):
        e = self.expert_of[ids]  # (B, T): the expert of each position
        y = torch.zeros_like(x)
        for k, expert in enumerate(self.experts):  # plain and correct, not fast: one masked pass per expert
            at = e == k
            y[at] = expert(x[at], None).to(y.dtype)
        return y


FFNS = dict(swiglu=SwiGLU, stem=STEM, stem_gate=STEMGate, stem_add=STEMAdd, hash_moe=HashMoE)  # --ffn values


class Block(nn.Module):
    def __init__(self, cfg, ffn="swiglu"):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.ffn = FFNS[ffn](cfg)  # <- the STEM switch: "stem" in the STEM layers, "swiglu" elsewhere

    def forward(self, x, cos, sin, ids, table=None, cache=None, pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, pos)
        return x + self.ffn(self.ffn_norm(x), ids, table)


# -----------------------------------------------------------------------------
# config


@dataclass
class GPTConfig:
    vocab_size: int = 4096  # overwritten from the data's meta.json by train.py
    block_size: int = 128  # context length; also sizes the rotary tables and the KV cache
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    ffn_hidden: int = 512  # SwiGLU inner width, and the row width of every STEM table
    ffn: str = "stem"  # "stem" or "swiglu" (then there are no STEM layers); ablations: stem_gate, stem_add, hash_moe
    stem_layers: str = "all"  # "third" (1,4,7..), "half" (odd), "all" (all but 0: authors' default), or "1,4,7"
    # (the layers of any ffn but swiglu, ablations included; the other layers are SwiGLU)
    moe_experts: int = 16  # ffn=hash_moe only: SwiGLU experts per layer, one runs per token (the paper: 16)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # the paper unties input and output embeddings


def parse_stem_layers(spec, n_layer, ffn="stem"):
    """Which layer indices are STEM layers (or the ablation's layers, for another ffn than swiglu), as
    a sorted list. Raises ValueError on a bad spec."""
    if ffn == "swiglu":
        return []
    if ffn not in FFNS:
        raise ValueError(f"ffn={ffn!r} is not one of {', '.join(map(repr, FFNS))}")
    named = {"third": range(1, n_layer, 3), "half": range(1, n_layer, 2), "all": range(1, n_layer)}
    if spec in named:
        return list(named[spec])
    try:
        layers = sorted({int(s) for s in str(spec).split(",") if s.strip()})
    except ValueError:
        layers = None
    if not layers or layers[0] < 0 or layers[-1] >= n_layer:
        raise ValueError(f"stem_layers={spec!r} is invalid: use third, half, all, or a comma list of "
                         f"layer indices in 0..{n_layer - 1} such as 1,3")
    return layers


# -----------------------------------------------------------------------------
# the model


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.ffn_layers = parse_stem_layers(cfg.stem_layers, cfg.n_layer, cfg.ffn)  # cfg.ffn's layers
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, cfg.ffn if i in self.ffn_layers else "swiglu")
                                     for i in range(cfg.n_layer)])
        # the layers with a table (STEM's, or an ablation's): what stem_ids/stem_tables and tables.py address
        self.stem_layers = [i for i in self.ffn_layers if hasattr(self.blocks[i].ffn, "table")]
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)  # not in the checkpoint: derived
        self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        # as the authors' (Lingua) code: truncated normal, std d^-0.5 for input projections,
        # ffn_hidden^-0.5 for the FFN down; STEM tables xavier normal over the whole (V, ffn)
        # matrix, std sqrt(2 / (V + ffn)), much smaller than a unit-variance embedding. The small
        # tables matter: with N(0, 1) rows the untied input embedding, not the table, ends up
        # carrying a token's identity and editing by row swaps stops working (a 4-layer d 96 prototype on
        # 400 entities, 1000 steps: 57% edit success with xavier-normal tables, 1% with N(0, 1)).
        d, h = self.cfg.n_embd, self.cfg.ffn_hidden
        for name, p in self.named_parameters():
            if name.endswith("table"):
                nn.init.xavier_normal_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            else:
                std = h ** -0.5 if name.endswith("down.weight") else d ** -0.5
                nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)

    def stem_ffns(self):
        return [self.blocks[i].ffn for i in self.stem_layers]

    def forward(self, idx, targets=None, stem_ids=None, stem_tables=None, cache=None, pos=0):
        # idx: (B, T) token ids. stem_ids: the ids the STEM tables are indexed with (default idx):
        # knowledge editing keeps the text and changes only these. stem_tables: optional list, one
        # (rows, ffn_hidden) tensor per STEM layer, looked up instead of the layer's own table, with
        # stem_ids indexing into it (unique rows: offload.py a micro-batch's, tables.py's lazy optimizer a step's).
        B, T = idx.shape
        assert pos + T <= self.cfg.block_size, f"sequence length {pos + T} > block_size {self.cfg.block_size}"
        ids = idx if stem_ids is None else stem_ids
        cos, sin = self.cos[pos:pos + T], self.sin[pos:pos + T]
        x = self.wte(idx)
        tables = iter(stem_tables) if stem_tables is not None else None
        for i, block in enumerate(self.blocks):
            table = next(tables) if tables is not None and i in self.stem_layers else None
            x = block(x, cos, sin, ids, table, None if cache is None else cache[i], pos)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # inference: only the last position
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # ---- accounting -------------------------------------------------------------------------

    def param_counts(self):
        """Parameter breakdown; the first five entries sum exactly to the module's parameter count.
        A hash-MoE model also has `experts_idle`: the expert weights (within matmul) a token does not run."""
        c = dict(embedding=0, head=0, tables=0, matmul=0, norms=0)
        for name, p in self.named_parameters():  # tied weights are listed once
            if name == "wte.weight":
                c["embedding"] += p.numel()
            elif name == "lm_head.weight":
                c["head"] += p.numel()
            elif name.endswith("table"):
                c["tables"] += p.numel()
            elif p.dim() == 1:
                c["norms"] += p.numel()
            else:
                c["matmul"] += p.numel()
        c["total"] = sum(c.values())
        # the paper's convention (s. 4): active per token = everything but the tables (one row
        # per table is read per token, a lookup, not a matmul), and for hash-MoE one expert of each layer
        idle = sum(p.numel() for b in self.blocks if isinstance(b.ffn, HashMoE)
                   for e in b.ffn.experts[1:] for p in e.parameters())
        if idle:
            c["experts_idle"] = idle
        c["active"] = c["total"] - c["tables"] - idle
        return c

    def flops_per_token(self, T=None):
        """Forward FLOPs per token: 2 per matmul weight (the blocks and the output head) plus the
        attention scores and weighted sum over a context of T (default block_size), counted over the
        full T x T square as nanoGPT/PaLM do. Embeddings and STEM tables are lookups: 0 FLOPs; a
        hash-MoE layer runs one expert per token. Training costs three times this (forward + backward)."""
        T = T or self.cfg.block_size
        head = self.cfg.vocab_size * self.cfg.n_embd  # a tied head still does its matmul
        c = self.param_counts()
        return 2 * (c["matmul"] - c.get("experts_idle", 0) + head) + 4 * self.cfg.n_layer * T * self.cfg.n_embd

    # ---- generation -------------------------------------------------------------------------

    def new_cache(self, batch_size, device, dtype):
        hs = self.cfg.n_embd // self.cfg.n_head
        shape = (batch_size, self.cfg.n_head, self.cfg.block_size, hs)
        return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in range(self.cfg.n_layer)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stem_ids=None,
                 stem_fn=None, generator=None, prefill_chunk=None):
        """Continue idx (B, T) by max_new_tokens. temperature=0 is greedy. stem_ids (B, T) overrides
        the STEM lookup ids of the prompt; generated tokens use their own ids. stem_fn(ids, pos) ->
        (stem_ids, stem_tables) replaces the lookups (offload.py, averaged edits). KV cache: the prompt is
        run once, then one token per step; when the cache is full, the last block_size // 2
        tokens are run again as a fresh prompt (rotary positions are relative, so this is exact
        for what the model can see)."""
        ids = idx if stem_ids is None else stem_ids
        dtype = self.lm_head.weight.dtype
        if torch.is_autocast_enabled(idx.device.type):
            dtype = torch.get_autocast_dtype(idx.device.type)
        cache = self.new_cache(idx.size(0), idx.device, dtype)
        bs = self.cfg.block_size
        if idx.size(1) > bs:
            idx, ids = idx[:, -bs:], ids[:, -bs:]
        out, chunk, chunk_ids, pos = idx, idx, ids, 0
        for _ in range(max_new_tokens):
            if pos + chunk.size(1) > bs:  # cache full: restart from the recent half window
                keep = bs // 2
                chunk, chunk_ids, pos = out[:, -keep:], torch.cat([ids, out[:, ids.size(1):]], 1)[:, -keep:], 0
            step = prefill_chunk or chunk.size(1)
            while True:  # the prompt in pieces of prefill_chunk (one piece by default), then one token
                s_ids, tables = chunk_ids[:, :step], None
                if stem_fn is not None:
                    s_ids, tables = stem_fn(s_ids, pos)
                logits, _ = self(chunk[:, :step], stem_ids=s_ids, stem_tables=tables, cache=cache, pos=pos)
                if chunk.size(1) <= step:
                    break
                chunk, chunk_ids, pos = chunk[:, step:], chunk_ids[:, step:], pos + step
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            pos += chunk.size(1)
            out = torch.cat([out, nxt], dim=1)
            chunk = chunk_ids = nxt
        return out


# -----------------------------------------------------------------------------
# optimizer: AdamW for the backbone (tables.py owns the STEM tables and their optimizer)


def configure_optimizer(model, learning_rate, weight_decay, betas=(0.9, 0.95)):
    """AdamW over every parameter but the STEM tables. Weight decay on matrices and embeddings, not
    on norm gains (nanoGPT's convention). The tables sit in an optimizer of their own, as in the
    authors' code, so that their gradients clip by their own norm and their update can be lazy."""
    tables = {id(f.table) for f in model.stem_ffns() if f.table is not None}  # none when offloaded
    rest = [p for p in model.parameters() if id(p) not in tables]
    groups = [dict(params=[p for p in rest if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in rest if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=1e-8)
