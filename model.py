"""
The model: a hierarchical transformer over the pulses of IceCube events.

    pulses --T1 (attention within each DOM)--> one embedding per DOM
           --T2 (attention within each event, + DOM x,y,z and summaries, + one CLS token per event)--> 3-vector

Both stages run the same packed transformer Block over one flat token stream holding every token of the
micro-batch. A "document" is a DOM in T1 and an event in T2; a token attends only to tokens of its own
document, so the result for a DOM or an event never depends on what else is in the batch.

Attention, one function `attend(q, k, v, docs)` with two interchangeable document layouts, built once per
stage per batch (not per layer):
  - flex_docs(): on CUDA, a FlexAttention BlockMask built directly from the document boundaries
    (vectorised, no mask_mod evaluation over the N x N grid, fixed shapes so no recompile per batch);
  - padded_docs(): on the CPU (FlexAttention has no CPU backward in torch 2.13), the documents are gathered
    into groups padded to the next power of two (or 1.5 x one) of their length and run through scaled_dot_product_attention;
    one-token documents (most DOMs) skip attention altogether (softmax over one key is that key's value).
Both compute the same function; tests/test_model.py checks it in the forward pass on the CPU.

The input is a batch from prepare.pack_batch / prepare.BatchLoader (dict of fixed-shape arrays, see
prepare.py) turned into tensors with batch_to_tensors(). The output is a 3-vector per event slot: its
direction is the predicted direction the neutrino comes from, its norm kappa the von Mises-Fisher
concentration (a per-event confidence). T2's inputs include classical seeds computed on the batch: plain
LineFit and the improved LineFit (delay cleaning + Huber, linefit_improved_packed, which classical.py uses
too), each DOM's place and time residual in the frame of the improved LineFit track, and learned Fourier
features of each DOM's place and first-hit time (the largest single gain on the toy data). Also here: the vMF
loss, the angular loss, helpers between angles and unit vectors, and the competition metric.
"""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention block size; token streams are padded to a multiple of it

# torch.compile is lazy: nothing is compiled until the flex path first runs. Fused kernels need it (called
# uncompiled, flex_attention materialises the whole score matrix).
_flex_compiled = torch.compile(flex_attention, dynamic=False)


def sum_by(index, x, n):
    """Sums of the rows of x per group, index (len(x),) in 0..n-1: every per-DOM and per-event total here."""
    return torch.zeros((n,) + x.shape[1:], dtype=x.dtype, device=x.device).index_add_(0, index, x)


# -----------------------------------------------------------------------------
# documents and attention

@torch.compiler.disable
def flex_docs(doc, pad_id):
    """BlockMask for a stream whose documents are contiguous runs of equal ids in `doc` (N,), N a multiple
    of BLOCK, padding tokens carrying pad_id at the end (they form one more document). Built from the
    boundaries: a query block's documents span one contiguous range of key blocks; a key block is "full"
    (no mask_mod needed) when both blocks lie inside the same single document. Cost O(N + (N/BLOCK)^2).
    Always built eagerly, outside torch.compile (one graph break per stage): traced inside one compiled
    model, T1's and T2's mask_mod closures (same code, different doc tensors) got mixed up and the compiled
    model computed another function (tests/test_model.py::test_compiled_model_equals_eager)."""
    N = doc.numel()
    nb = N // BLOCK
    counts = sum_by(doc, torch.ones_like(doc), pad_id + 1)
    end = counts.cumsum(0)
    start = end - counts
    blk = doc.view(nb, BLOCK)
    first, last = blk[:, 0], blk[:, -1]
    lo = start[first] // BLOCK            # first key block of the query block's first document
    hi = (end[last] - 1) // BLOCK         # last key block of its last document
    j = torch.arange(nb, device=doc.device)
    in_range = (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])
    uniform = first == last
    full = in_range & uniform[:, None] & uniform[None, :] & (first[None, :] == first[:, None])
    partial = in_range & ~full

    def to_indices(m):
        num = m.sum(-1).to(torch.int32)
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)  # True columns first
        return num[None, None], idx[None, None]

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)

    def mask_mod(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(N, N))


def padded_docs(doc, pad_id):
    """Layout for the scaled_dot_product_attention path: documents bucketed by length, each bucket padded
    to a power of two L. Returns (singles, groups): singles (n1,) the positions of one-token documents;
    groups a list of (idx (n_docs, L), valid (n_docs, L)) with the stream positions of each document.
    L is a power of two or 1.5 times one, so a document is padded by less than half its length.
    Tokens with pad_id are in no document (their attention output is zero)."""
    counts = sum_by(doc, torch.ones_like(doc), pad_id + 1)[:pad_id]
    start = counts.cumsum(0) - counts
    # bucket lengths 2, 3, 4, 6, 8, 12, 16, 24, ...: powers of two and 1.5 x powers of two (waste < 50%)
    p2 = torch.ceil(torch.log2(counts.clamp(min=1).double())).long()
    bucket = 2 * p2 - ((p2 >= 2) & (counts * 4 <= 3 * (1 << p2))).long()
    singles = start[counts == 1]
    groups = []
    for b in torch.unique(bucket[counts > 1]).tolist():
        d = torch.nonzero((bucket == b) & (counts > 1)).squeeze(1)
        L = (1 << (b + 1) // 2) * 3 // 4 if b % 2 else 1 << (b // 2)
        ar = torch.arange(L, device=doc.device)
        valid = ar[None, :] < counts[d, None]
        idx = torch.where(valid, start[d, None] + ar[None, :], 0)
        groups.append((idx, valid))
    return singles, groups


def make_docs(doc, pad_id, path):
    return flex_docs(doc, pad_id) if path == 'flex' else padded_docs(doc, pad_id)


def attend(q, k, v, docs):
    """q, k, v: (N, H, hd), one packed stream, token-major. docs: a BlockMask (flex path) or the padded_docs
    layout. Returns (N, H, hd): each token attends (softmax, scale 1/sqrt(hd)) over its document's tokens."""
    if isinstance(docs, BlockMask):
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        return _flex_compiled(q, k, v, block_mask=docs)[0].transpose(0, 1)
    singles, groups = docs
    pos, vals = [singles], [v[singles]]
    for idx, valid in groups:
        qg, kg, vg = (t[idx].transpose(1, 2) for t in (q, k, v))  # (n_docs, H, L, hd)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=valid[:, None, None, :])
        pos.append(idx[valid])
        vals.append(o.transpose(1, 2)[valid])
    return torch.zeros_like(v).index_copy(0, torch.cat(pos), torch.cat(vals))


# -----------------------------------------------------------------------------
# the improved LineFit (classical.py's linefit_improved runs this too): the model's seed direction

DELAY_RADIUS = 156.0  # m: neighbours considered by the delay cleaning
DELAY_NS = 150.0      # ns of lateness beyond direct light from a neighbour that marks a scattered photon
DELAY_MAX_REFS = 32   # neighbours per event to compare with: its least-late DOMs (bounds the pair count)
HUBER_M = 153.0       # m: residual beyond which a pulse's pull grows linearly
HUBER_ITERS = 2       # 1, 3 and 5 gave the same directions on toy val events
OUTLIER_M = 150.0     # m: pulses still further from the Huber line are left out of the final fit
C_VACUUM = 0.2998     # m/ns, the muon's speed (classical.py takes it from here)
TRACK_DELAY_FACTOR = 0.9173  # (n_g - cos theta_c) / sin theta_c: extra light path per metre of perpendicular distance (classical.py's too)


def weighted_line(pos, t, w, event, n_events):
    """Weighted least-squares line r = r_mean + v (t - t_mean) per event, in torch over concatenated points
    (pos (P, 3), t (P,), weights w (P,), event (P,) in 0..n_events-1). Returns the velocity v (n_events, 3),
    v = <(r - <r>)(t - <t>)> / <(t - <t>)^2> (zero for an event whose weighted times all agree), and each point's
    distance from its event's line, its lateness against it (time minus the time the line passes closest) too."""
    def per_event(x):
        return sum_by(event, x, n_events)

    ws = per_event(w).clamp(min=1e-12)
    tc = t - (per_event(w * t) / ws)[event]
    rc = pos - (per_event(w[:, None] * pos) / ws[:, None])[event]
    var_t = per_event(w * tc * tc)
    v = torch.where(var_t[:, None] > 0, per_event((w * tc)[:, None] * rc) / var_t.clamp(min=1e-12)[:, None], 0.0)
    residual = torch.linalg.vector_norm(rc - v[event] * tc[:, None], dim=1)
    lateness = tc - (rc * v[event]).sum(1) / (v * v).sum(1).clamp(min=1e-12)[event]
    return v, residual, lateness


def linefit_improved_packed(pos, t, w, event, dom, dom_pos, n_events, n_doms):
    """The improved LineFit in torch, over pulses concatenated from many events (the form model.py has them in):
    pulse positions pos (P, 3), times t (P,), weights w (P,) (those above 0.5 count as hits; the rest only weigh
    in with w), event (P,) and DOM slot dom (P,) indices, DOM positions dom_pos (n_doms, 3). Delay cleaning
    compares each DOM with its event's DELAY_MAX_REFS least-late DOMs against the plain LineFit (the least delayed
    hits, spread along the track; this bounds the pairs to n_doms x DELAY_MAX_REFS) and with itself: a pulse goes
    when it comes more than DELAY_NS after direct light from one of their first hits could. An event left with
    fewer than 3 pulses keeps them all. DOM slots without pulses count as the last event's (model.py's padding
    slot). Returns the velocity v (n_events, 3) (the neutrino comes from -v), kept (P,), 1.0 for the pulses of
    the final fit, and the plain LineFit's velocity it started from (weights w)."""
    plain, _, lateness = weighted_line(pos, t, w, event, n_events)
    hit = w > 0.5
    inf = torch.full((n_doms,), math.inf, dtype=t.dtype, device=t.device)
    first_late = inf.scatter_reduce(0, dom, torch.where(hit, lateness, math.inf), 'amin')
    first_t = inf.scatter_reduce(0, dom, torch.where(hit, t, math.inf), 'amin')
    dom_event = torch.full((n_doms,), n_events - 1, dtype=event.dtype, device=t.device).scatter(0, dom, event)
    # each event's DOMs in order of lateness; the first DELAY_MAX_REFS with a hit are its references
    order = torch.sort(first_late, stable=True).indices
    order = order[torch.sort(dom_event[order], stable=True).indices]
    count = sum_by(dom_event, torch.ones_like(dom_event), n_events)
    rank = torch.arange(n_doms, device=t.device) - (count.cumsum(0) - count)[dom_event[order]]
    ok = (rank < DELAY_MAX_REFS) & torch.isfinite(first_late[order])
    refs = torch.full((n_events, DELAY_MAX_REFS + 1), -1, dtype=event.dtype, device=t.device)
    refs[dom_event[order], torch.where(ok, rank, DELAY_MAX_REFS)] = order  # the others into a spare column (fixed shapes)
    refs = refs[:, :DELAY_MAX_REFS]
    # per DOM, the earliest that direct light from a reference's first hit, or its own, can come
    j = refs[dom_event]
    dist = torch.linalg.vector_norm(dom_pos[:, None, :] - dom_pos[j.clamp(min=0)], dim=2)
    arrival = torch.where((j >= 0) & (dist < DELAY_RADIUS), first_t[j.clamp(min=0)] + dist / C_VACUUM, math.inf).amin(1)
    delayed = t > (torch.minimum(arrival, first_t) + DELAY_NS)[dom]

    def keep_enough(keep):
        few = sum_by(event, keep, n_events) < 3
        return torch.where(few[event], torch.ones_like(keep), keep)

    kept = keep_enough((hit & ~delayed).to(t.dtype))
    v, residual, _ = weighted_line(pos, t, w * kept, event, n_events)
    for _ in range(HUBER_ITERS):
        # Huber IRLS: weight 1 within HUBER_M, HUBER_M / residual beyond, so far pulses pull like |r|, not r^2
        v, residual, _ = weighted_line(pos, t, w * kept * (HUBER_M / residual.clamp(min=1e-9)).clamp(max=1.0), event, n_events)
    kept = keep_enough(kept * (residual < OUTLIER_M).to(t.dtype))
    return weighted_line(pos, t, w * kept, event, n_events)[0], kept, plain


# -----------------------------------------------------------------------------
# the model

class Block(nn.Module):
    """Pre-norm transformer block over a packed stream (no positional encoding: tokens are a set)."""

    def __init__(self, dim, n_head, mlp_ratio=4):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, mlp_ratio * dim)
        self.fc_out = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x, docs):
        N, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(N, 3, self.n_head, C // self.n_head).unbind(1)
        y = attend(q, k, v, docs).reshape(N, C)
        x = x + self.proj(y)
        x = x + self.fc_out(F.gelu(self.fc(self.ln2(x))))
        return x


N_PULSE_FEATURES = 6
N_DOM_FEATURES = 31
N_EVENT_FEATURES = 16
N_SPACETIME_FREQS = 32  # learned Fourier features of each DOM's place and first-hit time (T2's input)
SPACETIME_SCALE = 100.0  # m: the unit of those coordinates (the first-hit time as a light path in ice)
C_ICE = 0.2210          # m/ns, light's group velocity in ice


def pulse_features(b):
    """T1's inputs, per pulse of a batch (batch_to_tensors). Returns feats (P, N_PULSE_FEATURES), zero for
    padding pulses; pd (P,) each pulse's DOM slot, padding pulses in a dummy slot D; w (P,) 1 for real pulses;
    and per DOM slot (D + 1,) its kept pulse count and first pulse time."""
    time, charge, aux = b['pulse_time'].float(), b['pulse_charge'].float(), b['pulse_aux'].float()
    rank = b['pulse_rank'].long()
    pdom = b['pulse_dom'].long()
    P, D = pdom.shape[0], b['dom_pos'].shape[0]
    real = pdom >= 0
    pd = torch.where(real, pdom, D)  # padding pulses go to a dummy DOM slot D
    w = real.float()
    kept = sum_by(pd, w, D + 1)
    # each DOM's pulses are contiguous and time-ordered: its first pulse sits at dom_start
    dom_start = torch.searchsorted(pd, torch.arange(D + 1, device=pd.device)).clamp(max=P - 1)
    t0 = time[dom_start] * (kept > 0).float()
    dt = (time - t0[pd]).clamp(min=0)
    cq = torch.cumsum((charge * w).double(), 0) - charge * w  # charge of all earlier pulses in the stream
    q_before = (cq - cq[dom_start[pd]]).float().clamp(min=0)  # ... of earlier pulses in the same DOM
    feats = torch.stack([
        (time / 3000.0).clamp(max=10.0),          # time since the event's first kept pulse
        torch.log1p(dt / 10.0) / 4.0,             # time since the DOM's first pulse
        torch.log(charge.clamp(min=1e-3)) / 2.0,  # log charge
        aux,                                      # auxiliary flag
        torch.log1p(rank.float()) / 3.0,          # rank of the pulse within its DOM
        torch.log1p(q_before) / 3.0,              # charge the DOM saw before this pulse
    ], dim=1) * w[:, None]
    return feats, pd, w, kept, t0


class IceModel(nn.Module):
    """T1 over each DOM's pulses, T2 over each event's DOMs plus a CLS token, head -> 3-vector per event."""

    def __init__(self, t1_dim=64, t1_layers=2, t1_heads=4, t2_dim=128, t2_layers=4, t2_heads=4,
                 mlp_ratio=4, attn='auto'):
        super().__init__()
        self.args = dict(t1_dim=t1_dim, t1_layers=t1_layers, t1_heads=t1_heads, t2_dim=t2_dim,
                         t2_layers=t2_layers, t2_heads=t2_heads, mlp_ratio=mlp_ratio, attn=attn)
        self.attn = attn  # 'flex', 'sdpa' or 'auto' (flex on CUDA, sdpa elsewhere)
        self.pulse_embed = nn.Linear(N_PULSE_FEATURES, t1_dim)
        self.t1 = nn.ModuleList([Block(t1_dim, t1_heads, mlp_ratio) for _ in range(t1_layers)])
        self.t1_ln = nn.LayerNorm(t1_dim)
        self.dom_embed = nn.Sequential(nn.Linear(N_DOM_FEATURES, t2_dim), nn.GELU(), nn.Linear(t2_dim, t2_dim))
        self.t1_to_t2 = nn.Linear(t1_dim, t2_dim)
        self.spacetime_freq = nn.Linear(4, N_SPACETIME_FREQS, bias=False)
        self.spacetime_embed = nn.Linear(2 * N_SPACETIME_FREQS, t2_dim)
        self.cls = nn.Parameter(torch.zeros(t2_dim))
        self.event_embed = nn.Linear(N_EVENT_FEATURES, t2_dim)
        self.t2 = nn.ModuleList([Block(t2_dim, t2_heads, mlp_ratio) for _ in range(t2_layers)])
        self.t2_ln = nn.LayerNorm(t2_dim)
        self.head = nn.Linear(t2_dim, 3)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * max(t1_layers, t2_layers)) if name.endswith(('proj.weight', 'fc_out.weight')) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith('bias'):
                nn.init.zeros_(p)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.spacetime_freq.weight, std=1.0)  # wavelengths from about 2 * SPACETIME_SCALE up

    def path(self, device):
        if self.attn != 'auto':
            return self.attn
        return 'flex' if device.type == 'cuda' else 'sdpa'

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    # --- T1: pulses -> one embedding per DOM, plus per-DOM summaries from the pulse arrays
    def embed_doms(self, b):
        """Returns (dom_emb (D, t1_dim), summaries dict of (D,) tensors). Padding DOM slots get zeros."""
        feats, pd, w, kept, t0 = pulse_features(b)
        time, charge, aux = b['pulse_time'].float(), b['pulse_charge'].float(), b['pulse_aux'].float()
        P, D = pd.shape[0], b['dom_pos'].shape[0]
        q_dom = sum_by(pd, charge * w, D + 1)
        n_aux = sum_by(pd, aux * w, D + 1)
        tq = sum_by(pd, time * charge * w, D + 1) / q_dom.clamp(min=1e-6)

        # pad the stream to a multiple of BLOCK; padding tokens form the last document (id D)
        N = -(-P // BLOCK) * BLOCK
        doc = F.pad(pd, (0, N - P), value=D)
        x = F.pad(self.pulse_embed(feats).float(), (0, 0, 0, N - P))  # float32 residual stream under autocast
        docs = make_docs(doc, D, self.path(x.device))
        for blk in self.t1:
            x = blk(x, docs)
        x = self.t1_ln(x[:P]).float()
        dom_emb = sum_by(pd, x * w[:, None], D + 1)[:D] / kept[:D, None].clamp(min=1)
        summ = dict(kept=kept[:D], charge=q_dom[:D], t0=t0[:D], tq=tq[:D], aux_frac=n_aux[:D] / kept[:D].clamp(min=1))
        return dom_emb, summ

    # --- T2: DOM tokens + one CLS token per event -> 3-vector per event slot
    def forward(self, b):
        dom_emb, s = self.embed_doms(b)
        pos = b['dom_pos'].float()
        dev = pos.device
        D, E = pos.shape[0], b['event_index'].shape[0]
        dom_ev = b['dom_event'].long()
        dreal = dom_ev >= 0
        de = torch.where(dreal, dom_ev, E)  # padding DOMs -> dummy event slot E
        ereal = b['event_index'] >= 0
        # event reference point and time: weighted by each DOM's non-auxiliary charge (noise is mostly auxiliary)
        wq = s['charge'] * (1 - s['aux_frac']) + 1e-3 * s['charge']
        wq = wq * dreal.float()

        def per_event(x):
            return sum_by(de, x, E + 1)

        wsum = per_event(wq).clamp(min=1e-6)
        t_ref = per_event(wq * s['t0']) / wsum
        p_ref = per_event(wq[:, None] * pos) / wsum[:, None]
        ndom_pulses = b['dom_n_pulses'].float()
        rel = pos - p_ref[de]
        dp = rel / 300.0
        dt = ((s['t0'] - t_ref[de]) / 1000.0).clamp(-10.0, 10.0)[:, None]
        dist = torch.linalg.vector_norm(rel, dim=1, keepdim=True)
        unit = rel / dist.clamp(min=1.0)
        # first-hit time residual for light spreading from the charge centre at t_ref
        resid = ((s['t0'][:, None] - t_ref[de][:, None] - dist / C_ICE) / 1000.0).clamp(-10.0, 10.0)
        # a vertex estimate from the earliest bright hits (weights fall off over 200 ns after the event's first
        # non-auxiliary hit), and each DOM's distance, direction and time residual seen from it
        has_clean = (s['aux_frac'] < 1) & dreal
        t_min = torch.full((E + 1,), 1e9, device=dev).scatter_reduce(
            0, de, torch.where(has_clean, s['t0'], 1e9), 'amin', include_self=True)
        we = wq * torch.exp(-((s['t0'] - t_min[de]) / 200.0).clamp(min=0.0, max=50.0))
        wes = per_event(we).clamp(min=1e-12)
        p_e = per_event(we[:, None] * pos) / wes[:, None]
        t_e = per_event(we * s['t0']) / wes
        dist_e = torch.linalg.vector_norm(pos - p_e[de], dim=1, keepdim=True)
        unit_e = (pos - p_e[de]) / dist_e.clamp(min=1.0)
        resid_e = ((s['t0'][:, None] - t_e[de][:, None] - dist_e / C_ICE) / 1000.0).clamp(-10.0, 10.0)
        # a LineFit seed over the event's non-auxiliary pulses (all pulses where it has none), as a classical
        # reconstruction would seed a likelihood fit: v = <(r - <r>)(t - <t>)> / <(t - <t>)^2>, direction -v
        pdom = b['pulse_dom'].long()
        pd = torch.where(pdom >= 0, pdom, D)
        pe = torch.where(pdom >= 0, de[pdom.clamp(min=0)], E)
        ppos, pt = pos[pdom.clamp(min=0)], b['pulse_time'].float()
        pw = (1.0 - b['pulse_aux'].float() + 1e-3) * (pdom >= 0).float()
        # and the improved LineFit: a better seed (on toy val events 4-5 deg closer than the plain one on average),
        # and which pulses it keeps as direct light (its delay cleaning drops the scattered ones)
        v_i, kept, v = linefit_improved_packed(ppos, pt, pw, pe, pd, F.pad(pos, (0, 0, 0, 1)), E + 1, D + 1)  # m/ns
        speed = torch.linalg.vector_norm(v, dim=1)
        lf_dir = -v / speed.clamp(min=1e-6)[:, None]
        ilf_dir = -v_i / torch.linalg.vector_norm(v_i, dim=1).clamp(min=1e-6)[:, None]
        dom_kept = sum_by(pd, kept, D + 1)[:D] / s['kept'].clamp(min=1)  # padding pulses sit in slot D, dropped
        # each DOM in the frame of the improved LineFit track through the charge centre: distance along it and from
        # it, and the first-hit residual against direct Cherenkov light, t_ref + (along + 0.9173 d) / c
        mu_dir = -ilf_dir[de]
        along = (rel * mu_dir).sum(1, keepdim=True)
        perp = torch.sqrt(((rel ** 2).sum(1, keepdim=True) - along ** 2).clamp(min=1e-6))
        resid_lf = ((s['t0'][:, None] - t_ref[de][:, None] - (along + TRACK_DELAY_FACTOR * perp) / C_VACUUM) / 1000.0).clamp(-10.0, 10.0)
        dom_feats = torch.cat([
            pos / 500.0,
            dp,
            (s['t0'] / 3000.0).clamp(max=10.0)[:, None],
            dt,
            dp * dt,                                  # this DOM's term of a LineFit through the first hits
            dist / 300.0, unit, resid,                # distance and direction from the charge centre, time residual
            dist_e / 300.0, unit_e, resid_e,          # the same from the early-hit vertex
            along / 300.0, perp / 300.0, resid_lf,    # the same in the frame of the improved LineFit track
            torch.log1p((s['tq'] - s['t0']).clamp(min=0) / 10.0)[:, None] / 4.0,
            torch.log1p(s['charge'])[:, None] / 2.0,
            torch.log1p(ndom_pulses)[:, None] / 2.0,
            torch.log1p(s['kept'])[:, None] / 2.0,
            s['aux_frac'][:, None],
            dom_kept[:, None],                        # share of its pulses the delay cleaning keeps
            (pos[:, 2:3] > -160).float() * (torch.linalg.vector_norm(pos[:, :2], dim=1, keepdim=True) < 80).float(),  # DeepCore-ish
        ], dim=1) * dreal.float()[:, None]
        # each DOM's place and first-hit time around the charge centre, (x, y, z, c_ice t), as learned Fourier features
        # [cos, sin](W (x, y, z, c_ice t)): the dot product of two DOMs' features is a function of their separation in
        # space and time, which attention can use to weigh DOMs by where and when they were hit relative to each other.
        # On the toy data the val error went from 0.915 to 0.78-0.86 of LineFit's (notes/experiments.md, section 4).
        spacetime = torch.cat([rel, (C_ICE * (s['t0'] - t_ref[de]))[:, None]], dim=1) / SPACETIME_SCALE
        with torch.autocast(dev.type, enabled=False):  # phases of tens of radians: bf16's 8 bits would blur them
            phase = self.spacetime_freq(spacetime.clamp(-20.0, 20.0).float())
        fourier = torch.cat([torch.cos(phase), torch.sin(phase)], dim=1) * dreal.float()[:, None]
        dom_tok = (self.dom_embed(dom_feats) + self.t1_to_t2(dom_emb) + self.spacetime_embed(fourier)).float()
        ev_feats = torch.cat([
            torch.log1p(b['event_n_pulses'].float())[:, None] / 5.0,
            torch.log1p(b['event_n_doms'].float())[:, None] / 5.0,
            torch.log1p(per_event(s['charge'] * dreal.float())[:E])[:, None] / 5.0,
            lf_dir[:E],
            ilf_dir[:E],
            (per_event(wq[:, None] * unit) / wsum[:, None])[:E],  # charge dipole around the charge centre
            (per_event(wq[:, None] * unit_e) / wsum[:, None])[:E],  # ... and around the early-hit vertex
            (speed[:E] / 0.3).clamp(max=3.0)[:, None],
        ], dim=1)
        cls_tok = (self.cls + self.event_embed(ev_feats)).float()

        # stream layout: for each event its CLS token then its DOMs (documents contiguous), then all padding
        n_ev = ereal.sum()
        ar_d = torch.arange(D, device=dev)
        ar_e = torch.arange(E, device=dev)
        pos_dom = torch.where(dreal, ar_d + de + 1, ar_d + n_ev)
        cnt = sum_by(de, torch.ones_like(de), E + 1)[:E]
        first = cnt.cumsum(0) - cnt
        pos_cls = torch.where(ereal, first + ar_e, D + ar_e)
        N = -(-(D + E) // BLOCK) * BLOCK
        x = torch.zeros(N, dom_tok.shape[1], dtype=dom_tok.dtype, device=dev)
        x = x.index_copy(0, pos_dom, dom_tok).index_copy(0, pos_cls, cls_tok)
        doc = torch.full((N,), E, dtype=torch.long, device=dev)
        doc = doc.index_copy(0, pos_dom, torch.where(dreal, de, E)).index_copy(0, pos_cls, torch.where(ereal, ar_e, E))
        docs = make_docs(doc, E, self.path(dev))
        for blk in self.t2:
            x = blk(x, docs)
        return self.head(self.t2_ln(x[pos_cls])).float()


def batch_to_tensors(batch, device='cpu'):
    """A prepare batch (dict of numpy arrays and ints) -> dict of tensors on device (ints stay ints)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            t = torch.from_numpy(v)
            out[k] = t.to(device, non_blocking=True) if str(device) != 'cpu' else t
        else:
            out[k] = v
    return out


# -----------------------------------------------------------------------------
# losses

def log_c3(kappa):
    """log of the vMF normaliser on the unit sphere, C3(k) = k / (4 pi sinh k), stable for all k >= 0."""
    small = kappa < 1e-2
    k = torch.where(small, torch.ones_like(kappa), kappa)
    exact = torch.log(k) - math.log(2 * math.pi) - k - torch.log(-torch.expm1(-2 * k))
    k2 = kappa * kappa
    series = -math.log(4 * math.pi) - k2 / 6 + k2 * k2 / 180
    return torch.where(small, series, exact)


def vmf_nll(pred, target):
    """von Mises-Fisher negative log-likelihood per event; pred (n,3) with kappa = |pred|, target unit (n,3)."""
    kappa = torch.sqrt((pred * pred).sum(-1) + 1e-12)
    return -log_c3(kappa) - (pred * target).sum(-1)


def angle_between(pred, target):
    """Angle (rad) between pred's direction and unit target, for the loss (clamped away from +-1 so its
    gradient stays finite)."""
    cos = (F.normalize(pred, dim=-1, eps=1e-8) * target).sum(-1)
    return torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))


def per_event_loss(pred, target, real, angular_weight=0.0):
    """vMF NLL + angular_weight * angle per event slot; 0 where not real. Padding slots and unknown (NaN)
    targets are masked with where, so no NaN leaks into the gradient."""
    target = torch.where(real[:, None], target, torch.zeros_like(target)).float()
    per = vmf_nll(pred, target)
    if angular_weight:
        per = per + angular_weight * angle_between(pred, target)
    return torch.where(real, per, torch.zeros_like(per))


def loss_fn(pred, target, real, angular_weight=0.0):
    """Mean over real event slots of per_event_loss."""
    return per_event_loss(pred, target, real, angular_weight).sum() / real.sum().clamp(min=1)


def direction_error(pred, target):
    """The metric's per-event angle, arccos(clip(u_true . u_pred, -1, 1)), for tensors (no gradient use)."""
    return torch.acos((F.normalize(pred.float(), dim=-1, eps=1e-12) * target).sum(-1).clamp(-1.0, 1.0))


# -----------------------------------------------------------------------------
# angles, unit vectors and the competition metric (numpy or torch)

def angles_to_vector(azimuth, zenith):
    """(azimuth, zenith) the neutrino comes from -> unit vector (..., 3)."""
    xp = torch if isinstance(azimuth, torch.Tensor) else np
    s = xp.sin(zenith)
    return xp.stack([xp.cos(azimuth) * s, xp.sin(azimuth) * s, xp.cos(zenith)], -1)


def vector_to_angles(v):
    """(..., 3) vector of any length -> (azimuth in [0, 2pi), zenith in [0, pi]); a zero vector gives zenith pi/2."""
    xp = torch if isinstance(v, torch.Tensor) else np
    n = xp.sqrt((v * v).sum(-1))
    n = xp.where(n > 0, n, 1.0 + 0.0 * n)
    az = xp.arctan2(v[..., 1], v[..., 0]) % (2 * math.pi)
    az = xp.where(az >= 2 * math.pi, 0.0 * az, az)  # the modulo can round up to exactly 2 pi
    zen = xp.arccos(xp.clip(v[..., 2] / n, -1.0, 1.0))
    return az, zen


def angular_errors(az_true, zen_true, az_pred, zen_pred):
    """Per-event angle (rad) between true and predicted directions; non-finite input is an error."""
    arrs = [np.asarray(a, dtype=np.float64) for a in (az_true, zen_true, az_pred, zen_pred)]
    for name, a in zip(('az_true', 'zen_true', 'az_pred', 'zen_pred'), arrs):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"angular error: {name} has {int((~np.isfinite(a)).sum())} non-finite values")
    dot = (angles_to_vector(arrs[0], arrs[1]) * angles_to_vector(arrs[2], arrs[3])).sum(-1)
    return np.arccos(np.clip(dot, -1.0, 1.0))


def mean_angular_error(az_true, zen_true, az_pred, zen_pred):
    """The competition metric: mean over events of arccos(clip(u_true . u_pred, -1, 1)), in radians."""
    return float(np.mean(angular_errors(az_true, zen_true, az_pred, zen_pred)))
