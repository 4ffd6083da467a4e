"""
The model: a hierarchical transformer over the pulses of IceCube events.

    pulses --T1 (attention within each DOM)--> one embedding per DOM
           --T2 (attention within each event: DOM tokens + one CLS token per event)--> 3-vector per event
           --with the seeds (IceModel.with_seed)--> the prediction

A micro-batch reaches the model in three steps, each a named function:
  prepare.pack_batch  numpy: the events' pulses, DOMs and events in fixed-shape arrays, in (event, sensor, time)
                      order (the "natural" order);
  stream_layout       numpy: where each pulse sits in T1's token stream and each DOM and CLS token in T2's, and the
                      attention layout of both streams (below);
  features            torch, no gradient: the pulse, DOM and event features (per-DOM summaries, the seeds' directions,
                      each DOM in the seed's frame, the place and time that the Fourier features encode). The fits
                      they read, both LineFits (classical.linefit_seeds) and the quick likelihood fit, prepare.py
                      computed ahead and stored; the seeds (N_SEEDS) are the improved LineFit and the quick fit.
The loader runs stream_layout ahead of the step (model_inputs); the features run in the forward pass, on the model's
device, unless the loader is asked to compute them too (model_inputs(..., with_features=True), train.py's
features='loader'): that pays only where the loader has a core of its own. IceModel.forward reads as the architecture.

A "document" is a DOM in T1 and an event (its CLS token and its DOMs) in T2; a token attends only to tokens of its
own document, so the result for a DOM or an event never depends on what else is in the batch. In both streams the
documents are contiguous and sorted by length. Two attention layouts compute the same function:
  - 'flex' (CUDA): the stream padded to a fixed length and a FlexAttention BlockMask whose block indices the loader
    computed from the document boundaries; every tensor has a fixed shape, so forward and backward are one compiled
    graph that no batch recompiles;
  - 'sdpa' (the CPU: FlexAttention has no CPU backward in torch 2.13): no padding at all, and the documents of each
    length form one (n_docs, length) view of the stream, attended by one scaled_dot_product_attention call without a
    mask; one-token documents (most DOMs) skip attention (softmax over one key is that key's value). Eager mode on
    the CPU pays nothing for the varying shapes.
tests/test_model.py checks that both give the same output, and that the step equals the one before this layout
(commit bfe73ee) on a fixed batch.

The prediction is a 3-vector per event slot: its direction is the predicted direction the neutrino comes from, its
norm kappa the von Mises-Fisher concentration (a per-event confidence). IceModel.forward returns it beside the
network's own 3-vector and the kind and energy heads' two outputs, (E, 8). Also here: the vMF loss, the angular
loss, helpers between angles and unit vectors, the metric. The seeds' fits themselves are classical.py's.
"""

import hashlib
import math
import pickle

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # FlexAttention block size; the flex layout pads each stream to a multiple of it

# this file's SHA-1, recorded in every checkpoint (train.py): an input or a step changed in place (a feature's scale,
# one feature for another) leaves every weight's shape as it was, so the weights load into the edited model.py and
# compute something else without a word; sample.py and a resume name a checkpoint of another model.py
with open(__file__, 'rb') as _source:
    SOURCE_SHA1 = hashlib.sha1(_source.read()).hexdigest()

# flex_attention through torch.compile, made at the flex path's first eager call (flex()): fused kernels need it
# (called uncompiled, flex_attention materialises the whole score matrix). Not made at import: the call to
# torch.compile alone imports dynamo and inductor, 1.7 s at the start of every script, also where nothing compiles.
_flex_compiled = None


def sum_by(index, x, n):
    """Sums of the rows of x per group, index (len(x),) in 0..n-1: every per-DOM and per-event total here."""
    return torch.zeros((n,) + x.shape[1:], dtype=x.dtype, device=x.device).index_add_(0, index, x)


def take(x, index):
    """x[index] along the first dimension, for an index tensor of any shape: index_select, 2-3x faster on the CPU
    than advanced indexing (and its backward, index_add, than index_put's)."""
    return x.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])


def _ranges(starts, lengths):
    """Concatenation of arange(s, s + n) for each (s, n), vectorised (numpy)."""
    lengths = np.asarray(lengths, np.int64)
    ends = np.cumsum(lengths)
    return np.repeat(np.asarray(starts, np.int64) - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)


# -----------------------------------------------------------------------------
# the stream layout: numpy, built by the loader ahead of the step

def block_ranges(doc):
    """The block structure of the document mask doc[q] == doc[kv], for a stream whose documents are contiguous runs in
    doc (N,), N a multiple of BLOCK: each block's documents span the key blocks lo..hi (int32 (nb,) each), and
    block_doc is the document that fills the block alone, or -1 where the block holds more than one. O(N). The
    device expands them into the BlockMask's (nb, nb) indices (block_mask), so the copy stays O(N) too."""
    new = np.r_[True, doc[1:] != doc[:-1]]
    run = np.cumsum(new) - 1
    run_start = np.flatnonzero(new)
    run_end = np.r_[run_start[1:], len(doc)]
    first, last = run[::BLOCK], run[BLOCK - 1::BLOCK]
    lo, hi = run_start[first] // BLOCK, (run_end[last] - 1) // BLOCK
    return lo.astype(np.int32), hi.astype(np.int32), np.where(first == last, first, -1).astype(np.int32)


def _stream(doc_len, doc_src, path, n_slots, pad_src):
    """One stream: documents of doc_len (n,) tokens whose source rows are doc_src (the documents' rows concatenated),
    sorted by length (stable). Returns the source row of each slot (N,), the document of each slot (n for padding),
    the slot of each document's first token (n,), and the attention layout: for 'flex' the stream is padded to
    n_slots (with pad_src rows) and the layout is block_ranges' (lo, hi, block_doc); for 'sdpa' the groups
    ((length, n_docs), ...)."""
    order = np.argsort(doc_len, kind='stable')
    src = doc_src[_ranges((np.cumsum(doc_len) - doc_len)[order], doc_len[order])]
    doc = np.repeat(order, doc_len[order])
    first = np.empty(len(doc_len), np.int64)
    first[order] = np.cumsum(doc_len[order]) - doc_len[order]
    if path == 'sdpa':  # the lengths in order: each group starts where the length changes
        sorted_len = doc_len[order]
        starts = np.flatnonzero(np.diff(sorted_len, prepend=-1))
        return src, doc, first, tuple(zip(sorted_len[starts].tolist(), np.diff(starts, append=len(order)).tolist()))
    pad = n_slots - len(src)
    src, doc = np.r_[src, np.full(pad, pad_src)], np.r_[doc, np.full(pad, len(doc_len))]
    return src, doc, first, block_ranges(doc)


def stream_layout(batch, path):
    """Adds the token streams of a pack_batch micro-batch (numpy, natural order) for the attention path 'flex' or
    'sdpa'. T1: one document per DOM, its kept pulses in time order. T2: one document per event, its CLS token then
    its DOMs. Keys (N1, N2 the stream lengths):
      t1_src (N1,)  the pulse slot of each T1 token (P, a zero row of the features, for padding)
      t1_dom (N1,)  its DOM (D for padding): the document of each T1 token, and where T1's output is pooled
      dom_n_kept (D,) kept pulses per DOM (the pooling's divisor)
      t2_src (N2,)  the row of each T2 token in [DOM tokens (D), CLS tokens (E), a zero row]
      t2_doc (N2,)  its event (E for padding)
      t2_query      the slots of the CLS tokens in stream order: the queries of T2's last block, whose outputs are
                    read only at the CLS tokens ('flex': padded to E rounded up to BLOCK with the last one)
      t2_cls (E,)   where each event's CLS token is among t2_query (0 for padding event slots)
    and the attention layout of each stream: t1_groups / t2_groups ('sdpa'; the last block's too), or t1_lo, t1_hi,
    t1_block_doc and the same for t2 ('flex', block_ranges), plus t2_query_lo, t2_query_hi (each block of 128 CLS
    queries attends the key blocks lo..hi) and t2_query_doc (each query's event). The flex layout pads T1 to P and T2
    to D + E tokens, rounded up to BLOCK, so every array has a shape fixed by the budgets."""
    P, D, E = len(batch['pulse_dom']), len(batch['dom_pos']), len(batch['event_index'])
    n_p, n_d, n_e = batch['n_pulses'], batch['n_doms'], batch['n_events']
    dom_len = np.bincount(batch['pulse_dom'][:n_p], minlength=D)
    t1_src, t1_dom, _, t1_attn = _stream(dom_len[:n_d], np.arange(n_p), path, -(-P // BLOCK) * BLOCK, P)
    ev_doms = np.bincount(batch['dom_event'][:n_d], minlength=n_e)
    # each event's CLS token (row D + event) then its DOMs: a DOM's place in that order is its index plus the CLS
    # tokens up to and including its event's
    cls_and_doms = np.arange(n_d + n_e) - np.repeat(np.arange(1, n_e + 1), 1 + ev_doms)
    cls_and_doms[np.cumsum(1 + ev_doms) - (1 + ev_doms)] = D + np.arange(n_e)
    t2_src, t2_doc, cls, t2_attn = _stream(1 + ev_doms, cls_and_doms, path, -(-(D + E) // BLOCK) * BLOCK, D + E)
    # each document starts with its CLS token, so the CLS slots in stream order are the documents' in stream order
    order = np.argsort(cls)
    query, rank = cls[order], np.empty(n_e, np.int64)
    rank[order] = np.arange(n_e)
    out = {**batch, 't1_src': t1_src, 't1_dom': np.where(t1_dom < n_d, t1_dom, D), 'dom_n_kept': dom_len.astype(np.float32),
           't2_src': t2_src, 't2_doc': np.where(t2_doc < n_e, t2_doc, E), 't2_cls': np.concatenate([rank, np.zeros(E - n_e, np.int64)])}
    for stage, attn in (('t1', t1_attn), ('t2', t2_attn)):
        if path == 'sdpa':
            out[f'{stage}_groups'] = attn
        else:
            out.update({f'{stage}_{k}': a for k, a in zip(('lo', 'hi', 'block_doc'), attn)})
    if path == 'flex':  # the queries padded with copies of the last (outputs nobody reads) to a fixed length
        query = np.r_[query, np.full(-(-E // BLOCK) * BLOCK - n_e, query[-1])]
        end = query + 1 + ev_doms[t2_doc[query]]  # one past each query's document
        out.update(t2_query_lo=(query[::BLOCK] // BLOCK).astype(np.int32),
                   t2_query_hi=((end[BLOCK - 1::BLOCK] - 1) // BLOCK).astype(np.int32), t2_query_doc=t2_doc[query])
    out['t2_query'] = query
    return out


# -----------------------------------------------------------------------------
# attention over a stream

def block_mask(lo, hi, block_doc, mask_mod, kv_blocks=None):
    """The FlexAttention BlockMask of a stream from block_ranges: key block j is in query block i's range when
    lo[i] <= j <= hi[i], "full" (no mask_mod needed) when both blocks lie inside one single document, else partial.
    Queries and keys are the same stream, unless kv_blocks says how many key blocks there are (T2's last block:
    the CLS queries, block_doc None, every block partial). Fixed (nq, nkv) shapes; the backward pass reads the
    transposed indices."""
    nq = lo.shape[0]
    nkv = nq if kv_blocks is None else kv_blocks
    j = torch.arange(nkv, device=lo.device)
    in_range = (j[None, :] >= lo[:, None]) & (j[None, :] <= hi[:, None])
    if block_doc is None:
        full = torch.zeros_like(in_range)
    else:
        full = in_range & (block_doc[:, None] >= 0) & (block_doc[:, None] == block_doc[None, :])

    def ordered(m):  # BlockMask's format: each row's count, and its blocks first in ascending order, row-major
        # contiguous: the kernel reads a row's blocks at stride 1, and argsort of the transposed masks (the backward's
        # q side) returns transposed strides; with them CUDA's compiled backward read other rows' blocks and its
        # dK, dV were wrong (the H200, notes section 14), while the forward and dQ, which read the kv side, were right
        idx = torch.argsort((~m).to(torch.int8), dim=1, stable=True)
        return m.sum(1).to(torch.int32)[None, None], idx.to(torch.int32).contiguous()[None, None]

    (num, idx), (fnum, fidx) = ordered(in_range & ~full), ordered(full)
    (qnum, qidx), (fqnum, fqidx) = ordered((in_range & ~full).T), ordered(full.T)
    return BlockMask(seq_lengths=(nq * BLOCK, nkv * BLOCK), kv_num_blocks=num, kv_indices=idx, full_kv_num_blocks=fnum,
                     full_kv_indices=fidx, q_num_blocks=qnum, q_indices=qidx, full_q_num_blocks=fqnum,
                     full_q_indices=fqidx, BLOCK_SIZE=(BLOCK, BLOCK), mask_mod=mask_mod)


def attention_layouts(b):
    """The attention layouts of T1, T2 and T2's last block (CLS queries only): the loader's groups ('sdpa'), or
    BlockMasks from the loader's block ranges ('flex'). The mask_mods are separate functions on purpose: FlexAttention
    identifies a mask_mod by its code, and inside one compiled graph two closures of one function (T1's and T2's) got
    mixed up, so the compiled model computed another function
    (tests/test_model.py::test_flex_path_is_one_graph_without_recompiles)."""
    if 't1_groups' in b:
        return b['t1_groups'], b['t2_groups'], b['t2_groups']
    t1_dom, t2_doc, query_doc = b['t1_dom'], b['t2_doc'], b['t2_query_doc']

    def same_dom(batch, head, q, kv):
        return t1_dom[q] == t1_dom[kv]

    def same_event(batch, head, q, kv):
        return t2_doc[q] == t2_doc[kv]

    def own_event(batch, head, q, kv):
        return query_doc[q] == t2_doc[kv]

    return (block_mask(b['t1_lo'], b['t1_hi'], b['t1_block_doc'], same_dom),
            block_mask(b['t2_lo'], b['t2_hi'], b['t2_block_doc'], same_event),
            block_mask(b['t2_query_lo'], b['t2_query_hi'], None, own_event, kv_blocks=b['t2_lo'].shape[0]))


def flex(q, k, v, block_mask):
    """FlexAttention's fused kernel. Inside a compiled model (train.py's compile=True) dynamo traces flex_attention
    inline into the model's graph, as it would the compiled one."""
    global _flex_compiled
    if torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask)
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled(q, k, v, block_mask=block_mask)


def attend(q, k, v, layout):
    """k, v: (N, H, hd), the keys and values of one stream, token-major; q: the queries, (N, H, hd) for every token or
    (n_docs, H, hd) for each document's first token alone (T2's last block: the CLS tokens, in stream order).
    layout: a BlockMask (flex) or the groups ((length, n_docs), ...) of a stream sorted by document length (sdpa).
    Returns q's shape: each query attends (softmax, scale 1/sqrt(hd)) over its document's tokens.
    q, k and v may be strided views (Block's slices of its qkv projection), which sdpa reads as they are: a group's
    tokens are one (n_docs, H, length, hd) view, and the CPU flash kernel, which takes any strides with hd's at 1,
    writes its output token-major, so that neither the inputs nor the output are copied (a head-major stream cost a
    copy of q, k and v and two of the output: without them sample.py's model runs 1.07-1.13x faster on one thread,
    1.03x on two, the training step 1.0-1.02x; notes section 36). FlexAttention gets contiguous head-major
    (1, H, N, hd) buffers, as checked on the H200 (4-d buffers of their own: inductor's CPU flex kernel wants them).
    On the CPU, eager, the groups are one autograd node (GroupAttention); elsewhere (CUDA's sdpa path, torch.compile)
    sdpa_groups, the same function through F.scaled_dot_product_attention."""
    if isinstance(layout, BlockMask):
        q, k, v = (t.transpose(0, 1)[None].contiguous() for t in (q, k, v))
        return flex(q, k, v, layout)[0].transpose(0, 1)
    if q.device.type == 'cpu' and not torch.compiler.is_compiling():
        return GroupAttention.apply(q, k, v, layout)
    return sdpa_groups(q, k, v, layout)


def sdpa_groups(q, k, v, layout):
    """attend's sdpa path where GroupAttention does not run (CUDA's sdpa path, and torch.compile, which traces these
    ops), a scaled_dot_product_attention call per group. The loop calls only torch's C methods (view,
    split_with_sizes), not the Python functions Tensor.unflatten and Tensor.split: while this loop was the CPU's eager
    path, that made the step 1.02x on one thread and 1.04x in train.py's two threads (section 37)."""
    H, hd = k.shape[1:]
    sizes = [length * n for length, n in layout]
    per_doc = q.shape[0] != k.shape[0]  # (all documents of one token: the same either way)
    out = []
    for (length, n), qg, kg, vg in zip(layout, q.split_with_sizes([n for _, n in layout] if per_doc else sizes),
                                       k.split_with_sizes(sizes), v.split_with_sizes(sizes)):  # one backward
        if length == 1:  # softmax over one key is that key's value
            out.append(vg)
            continue
        o = F.scaled_dot_product_attention(qg.view(n, -1, H, hd).transpose(1, 2), kg.view(n, length, H, hd).transpose(1, 2),
                                           vg.view(n, length, H, hd).transpose(1, 2))
        out.append(o.transpose(1, 2).flatten(0, 1))
    return torch.cat(out)


def _docs(t, start, n, length):
    """The (n, H, length, hd) view of rows start.. of a token-major (N, H, hd) tensor, n documents of length tokens
    each: one call where split, view and transpose are three."""
    s0, s1, s2 = t.stride()
    return t.as_strided((n, t.shape[1], length, t.shape[2]), (length * s0, s1, s0, s2), t.storage_offset() + start * s0)


def _rows(x):
    """The (n * length, H, hd) token rows of an (n, H, length, hd) output of the flash kernel, which writes it
    token-major: one call where transpose and reshape are two (and a copy, should a kernel write it otherwise)."""
    n, H, length, hd = x.shape
    if x.stride() != (length * H * hd, hd, H * hd, 1):
        return x.transpose(1, 2).reshape(-1, H, hd)
    return x.as_strided((n * length, H, hd), (H * hd, hd, 1), x.storage_offset())


class GroupAttention(torch.autograd.Function):
    """sdpa_groups on the CPU as one autograd node: the flash kernel's forward and backward, the two aten ops that
    F.scaled_dot_product_attention and its gradient call there, applied group by group. The same kernels on the same
    views, so the same floats (tests/test_model.py checks outputs and gradients bitwise), without the autograd nodes
    that the views around each call cost: some nine a group, about 90 groups a micro-batch. The step 1.04-1.05x on
    one thread (notes section 38), as each rank under torchrun runs it; train.py's two micro-batch threads run as
    before (0.97-1.01x): the backward's loop is Python, which holds the lock that autograd's own nodes release. The
    two ops are torch's private ones (their underscore): the suite passes on torch 2.11, 2.13 and 2.14.1."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

    @staticmethod
    def forward(ctx, q, k, v, layout):
        per_doc = q.shape[0] != k.shape[0]
        out, ctx.saved, ctx.ones = [], [], 0  # ones: one-token documents, whose output was their value
        start_q = start = 0
        for length, n in layout:
            length_q = 1 if per_doc else length
            if length == 1:  # softmax over one key is that key's value (the first group: they are sorted by length)
                assert start == 0, "GroupAttention: groups not sorted by length"
                out.append(v[:n])
                ctx.ones = n
            else:  # the views and the kernel's outputs kept for the backward (none an output of this node: no cycle)
                qg, kg, vg = _docs(q, start_q, n, length_q), _docs(k, start, n, length), _docs(v, start, n, length)
                o, lse = GroupAttention.flash(qg, kg, vg)
                out.append(_rows(o))
                ctx.saved.append((start_q, n, length_q, qg, kg, vg, o, lse))
            start_q, start = start_q + n * length_q, start + n * length
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad, (H, hd) = grad.contiguous(), grad.shape[1:]
        groups, ctx.saved = ctx.saved, None  # freed now, not when the graph goes (as save_for_backward's would be)
        grads = [GroupAttention.flash_backward(_docs(grad, start_q, n, length_q), *saved, 0.0, False)
                 for start_q, n, length_q, *saved in groups]
        dq, dk, dv = ([_rows(g[i]) for g in grads] for i in range(3))
        if ctx.ones:
            zeros = grad.new_zeros(ctx.ones, H, hd)
            dq, dk, dv = [zeros] + dq, [zeros] + dk, [grad[:ctx.ones]] + dv
        return torch.cat(dq), torch.cat(dk), torch.cat(dv), None


# -----------------------------------------------------------------------------
# features: everything the model computes from an event without gradient
# A new input is a line in the list of pulse_features (T1, per pulse), dom_features (T2, per DOM) or event_features
# (T2's CLS token, and the seeds' weights), and its width added to the N_* constant here, which sizes the input layer
# (check_feature_widths names one left behind). A quantity the batch lacks is a key that prepare.pack_events adds
# (tests/test_model.py's pack builds batches too). Older checkpoints no longer fit: train anew.

N_PULSE_FEATURES = 6
N_DOM_FEATURES = 31
N_EVENT_FEATURES = 16
N_SEEDS = 2  # the classical directions the prediction may lean on: the improved LineFit and the quick likelihood fit (seeds)
N_SEED_FEATURES = 2
N_SPACETIME_FREQS = 32  # learned Fourier features of each DOM's place and first-hit time (T2's input)
SPACETIME_SCALE = 100.0  # m: the unit of those coordinates (the first-hit time as a light path in ice)
C_ICE = 0.2210          # m/ns, light's group velocity in ice
C_VACUUM = 0.2998     # m/ns, the muon's speed (classical.py takes it from here)
TRACK_DELAY_FACTOR = 0.9173  # (n_g - cos theta_c) / sin theta_c: extra light path per metre of perpendicular distance (classical.py's too)


def pulse_features(b):
    """T1's inputs per pulse slot (P, N_PULSE_FEATURES), zero for padding pulses, and each DOM slot's summaries
    (D,): kept pulses, charge, first and charge-weighted pulse time, auxiliary share."""
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
    q_dom = sum_by(pd, charge * w, D + 1)
    tq = sum_by(pd, time * charge * w, D + 1) / q_dom.clamp(min=1e-6)
    aux_frac = sum_by(pd, aux * w, D + 1) / kept.clamp(min=1)
    summaries = dict(kept=kept[:D], charge=q_dom[:D], t0=t0[:D], tq=tq[:D], aux_frac=aux_frac[:D])
    return feats, summaries


def event_centres(b, s):
    """Per event (E + 1 slots, the last for padding DOMs): the charge centre p_ref and time t_ref, weighted by each
    DOM's charge times its share of non-auxiliary pulses, plus 0.001 of its charge (noise is mostly auxiliary; the
    non-auxiliary charge itself differs only on DOMs with pulses of both kinds), and a vertex p_e, t_e from the
    earliest bright hits (weights fall off over 200 ns after the event's first non-auxiliary hit)."""
    pos = b['dom_pos'].float()
    E = b['event_index'].shape[0]
    dom_ev = b['dom_event'].long()
    dreal = dom_ev >= 0
    de = torch.where(dreal, dom_ev, E)
    wq = (s['charge'] * (1 - s['aux_frac']) + 1e-3 * s['charge']) * dreal.float()
    wsum = sum_by(de, wq, E + 1).clamp(min=1e-6)
    t_ref = sum_by(de, wq * s['t0'], E + 1) / wsum
    p_ref = sum_by(de, wq[:, None] * pos, E + 1) / wsum[:, None]
    has_clean = (s['aux_frac'] < 1) & dreal
    t_min = torch.full((E + 1,), 1e9, device=pos.device).scatter_reduce(
        0, de, torch.where(has_clean, s['t0'], 1e9), 'amin', include_self=True)
    we = wq * torch.exp(-((s['t0'] - t_min[de]) / 200.0).clamp(min=0.0, max=50.0))
    wes = sum_by(de, we, E + 1).clamp(min=1e-12)
    p_e = sum_by(de, we[:, None] * pos, E + 1) / wes[:, None]
    t_e = sum_by(de, we * s['t0'], E + 1) / wes
    return dict(de=de, dreal=dreal, wq=wq, wsum=wsum, t_ref=t_ref, p_ref=p_ref, p_e=p_e, t_e=t_e)


def seed_fits(b, s):
    """The two LineFits of the batch's events, as prepare.py stored them (classical.linefit_seeds): both directions
    (E + 1, 3; the last row, for padding DOMs, zero), the plain fit's speed, and each DOM's share of pulses the
    improved fit keeps as direct light."""
    D = b['dom_pos'].shape[0]
    pdom = b['pulse_dom'].long()
    pad = (0, 0, 0, 1)
    v = F.pad(b['event_lf_v'].float(), pad)  # m/ns
    speed = torch.linalg.vector_norm(v, dim=1)
    lf_dir = -v / speed.clamp(min=1e-6)[:, None]
    dom_direct = sum_by(torch.where(pdom >= 0, pdom, D), b['pulse_direct'].float(), D + 1)[:D] / s['kept'].clamp(min=1)
    return lf_dir, F.pad(b['event_ilf_dir'].float(), pad), speed, dom_direct


def dom_features(b, s, c, ilf_dir, dom_direct):
    """T2's DOM features (D, N_DOM_FEATURES): place and first-hit time, and the same seen from the charge centre, the
    early-hit vertex and the improved LineFit track; each DOM's place and first-hit time around the charge centre as
    (x, y, z, c_ice t) / SPACETIME_SCALE (D, 4), the Fourier features' input; and each DOM's unit vector from the
    charge centre and from the early-hit vertex (D, 3 each), which the event's charge dipoles sum."""
    pos = b['dom_pos'].float()
    de, dreal, t_ref, t0 = c['de'], c['dreal'], c['t_ref'][c['de']][:, None], s['t0'][:, None]
    rel = pos - c['p_ref'][de]
    dp = rel / 300.0
    dt = ((t0 - t_ref) / 1000.0).clamp(-10.0, 10.0)
    dist = torch.linalg.vector_norm(rel, dim=1, keepdim=True)
    unit = rel / dist.clamp(min=1.0)
    resid = ((t0 - t_ref - dist / C_ICE) / 1000.0).clamp(-10.0, 10.0)  # light spreading from the charge centre at t_ref
    rel_e = pos - c['p_e'][de]
    dist_e = torch.linalg.vector_norm(rel_e, dim=1, keepdim=True)
    unit_e = rel_e / dist_e.clamp(min=1.0)
    resid_e = ((t0 - c['t_e'][de][:, None] - dist_e / C_ICE) / 1000.0).clamp(-10.0, 10.0)
    # in the frame of the improved LineFit track through the charge centre: distance along it and from it, and the
    # first-hit residual against direct Cherenkov light, t_ref + (along + TRACK_DELAY_FACTOR d) / c
    mu_dir = -ilf_dir[de]
    along = (rel * mu_dir).sum(1, keepdim=True)
    perp = torch.sqrt(((rel ** 2).sum(1, keepdim=True) - along ** 2).clamp(min=1e-6))
    resid_lf = ((t0 - t_ref - (along + TRACK_DELAY_FACTOR * perp) / C_VACUUM) / 1000.0).clamp(-10.0, 10.0)
    feats = torch.cat([
        pos / 500.0,
        dp,
        (t0 / 3000.0).clamp(max=10.0),
        dt,
        dp * dt,                                  # this DOM's term of a LineFit through the first hits
        dist / 300.0, unit, resid,                # distance and direction from the charge centre, time residual
        dist_e / 300.0, unit_e, resid_e,          # the same from the early-hit vertex
        along / 300.0, perp / 300.0, resid_lf,    # the same in the frame of the improved LineFit track
        torch.log1p((s['tq'] - s['t0']).clamp(min=0) / 10.0)[:, None] / 4.0,
        torch.log1p(s['charge'])[:, None] / 2.0,
        torch.log1p(b['dom_n_pulses'].float())[:, None] / 2.0,
        torch.log1p(s['kept'])[:, None] / 2.0,
        s['aux_frac'][:, None],
        dom_direct[:, None],                      # share of its pulses the improved LineFit keeps (direct)
        # meant as DeepCore, it marks the central strings' DOMs above z = -160 m (on the real geometry 111 DOMs, 33 on
        # DeepCore strings, 3 of its 400 deep ones): left as trained, positions tell the rest (notes, section 18)
        (pos[:, 2:3] > -160).float() * (torch.linalg.vector_norm(pos[:, :2], dim=1, keepdim=True) < 80).float(),
    ], dim=1) * dreal.float()[:, None]
    spacetime = (torch.cat([rel, C_ICE * (t0 - t_ref)], dim=1) / SPACETIME_SCALE).clamp(-20.0, 20.0)
    return feats, spacetime, unit, unit_e


def event_features(b, s, c, lf_dir, ilf_dir, speed, unit, unit_e):
    """T2's CLS features (E, N_EVENT_FEATURES): size, both LineFits' directions, charge dipoles, the LineFit speed."""
    E = b['event_index'].shape[0]
    de, wq, wsum = c['de'], c['wq'], c['wsum']
    return torch.cat([
        torch.log1p(b['event_n_pulses'].float())[:, None] / 5.0,
        torch.log1p(b['event_n_doms'].float())[:, None] / 5.0,
        torch.log1p(sum_by(de, s['charge'] * c['dreal'].float(), E + 1)[:E])[:, None] / 5.0,
        lf_dir[:E],
        ilf_dir[:E],
        (sum_by(de, wq[:, None] * unit, E + 1) / wsum[:, None])[:E],    # charge dipole around the charge centre
        (sum_by(de, wq[:, None] * unit_e, E + 1) / wsum[:, None])[:E],  # ... and around the early-hit vertex
        (speed[:E] / 0.3).clamp(max=3.0)[:, None],
    ], dim=1)


@torch.no_grad()
def features(b):
    """The model's inputs that need no gradient, from a batch of tensors with its stream layout (model_inputs):
    t1_x (N1, N_PULSE_FEATURES) the pulse features in T1's stream order, dom_feats, dom_spacetime, event_feats, and
    the seeds of the prediction (seeds()).
    Float32 whatever the autocast: times of tens of microseconds and phases of tens of radians need it."""
    with torch.autocast(b['dom_pos'].device.type, enabled=False):
        pulse, s = pulse_features(b)
        c = event_centres(b, s)
        lf_dir, ilf_dir, speed, dom_direct = seed_fits(b, s)
        dom_feats, spacetime, unit, unit_e = dom_features(b, s, c, ilf_dir, dom_direct)
        t1_x = take(F.pad(pulse, (0, 0, 0, 1)), b['t1_src'])  # row P is zero: T1's padding tokens
        out = dict(t1_x=t1_x, dom_feats=dom_feats, dom_spacetime=spacetime,
                   event_feats=event_features(b, s, c, lf_dir, ilf_dir, speed, unit, unit_e), **seeds(b, ilf_dir))
        check_feature_widths(out)
        return out


def check_feature_widths(f):
    """A feature added to (or taken from) pulse_features, dom_features, event_features or seeds needs its N_* constant
    changed too, which sizes IceModel's input layers: named here, rather than as a matmul shape error in the model."""
    for key, name, n, fn in (('t1_x', 'N_PULSE_FEATURES', N_PULSE_FEATURES, 'pulse_features'),
                             ('dom_feats', 'N_DOM_FEATURES', N_DOM_FEATURES, 'dom_features'),
                             ('event_feats', 'N_EVENT_FEATURES', N_EVENT_FEATURES, 'event_features'),
                             ('seed_feats', 'N_SEED_FEATURES', N_SEED_FEATURES, 'seeds')):
        if f[key].shape[-1] != n:
            raise ValueError(f"model.{fn} gives {f[key].shape[-1]} features, but model.{name} = {n}: "
                             f"set {name} = {f[key].shape[-1]} (and train anew: older checkpoints have the old width)")
    if f['seed_dirs'].shape[1] != N_SEEDS:
        raise ValueError(f"model.seeds gives {f['seed_dirs'].shape[1]} seed directions, but model.N_SEEDS = {N_SEEDS}: "
                         f"set N_SEEDS = {f['seed_dirs'].shape[1]}")


def seeds(b, ilf_dir):
    """The classical directions the prediction may lean on (IceModel.with_seed): seed_dirs (E, N_SEEDS, 3), the
    improved LineFit and the quick likelihood fit that prepare.py stored with each event (classical.time_fit), and
    seed_feats (E, N_SEED_FEATURES): the fit's reduced log-likelihood (how well a track explains the hit times) and
    the cosine between the two seeds."""
    fit_dir = b['event_fit_dir'].float()
    ilf = ilf_dir[:-1]
    rlogl = (b['event_fit_rlogl'].float().clamp(-5.0, 25.0) / 10.0)[:, None]
    return dict(seed_dirs=torch.stack([ilf, fit_dir], 1),
                seed_feats=torch.cat([rlogl, (ilf * fit_dir).sum(1, keepdim=True)], 1))


# -----------------------------------------------------------------------------
# the model

class Block(nn.Module):
    """Pre-norm transformer block over a stream (no positional encoding: tokens are a set)."""

    def __init__(self, dim, n_head, mlp_ratio=4):
        super().__init__()
        self.n_head = n_head
        # no biases in the block's linears (as nanoGPT's bias=False and most recent transformers): on the CPU an addmm
        # first copies its bias into every output row, and without them the toy step ran 1.09-1.11x faster
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, mlp_ratio * dim, bias=False)
        self.fc_out = nn.Linear(mlp_ratio * dim, dim, bias=False)

    def forward(self, x, layout, queries=None):
        """x (N, C) -> (N, C); or with queries (slots of the stream: T2's last block, whose output is read only at the
        CLS tokens) only those tokens' outputs, which is the same function: the other tokens are keys and values
        alone, and skip the queries' projection, the output projection and the MLP (at mlp_ratio 2, three quarters
        of the block's matmul FLOPs: such a token costs a quarter, its keys and values)."""
        N, C = x.shape
        H, h = self.n_head, self.ln1(x)
        if queries is None:
            q, k, v = self.qkv(h).view(N, 3, H, C // H).unbind(1)  # (N, H, hd) each, views
        else:
            x = take(x, queries)
            q = F.linear(take(h, queries), self.qkv.weight[:C]).view(-1, H, C // H)
            k, v = F.linear(h, self.qkv.weight[C:]).view(N, 2, H, C // H).unbind(1)
        x = x + self.proj(attend(q, k, v, layout).reshape(x.shape[0], C))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


# Adam moves each weight by about the learning rate per step, and the seed's log weight has to travel from 0 to
# about 6 for a bright track (a kappa of hundreds) and well below 0 for a cascade within a few thousand steps: the
# weights' output is scaled up, which under Adam is a learning rate this many times larger for them alone
# (at gain 1 the seed's weight on bright tracks was still near 1 against the network's kappa of 24 after 13 minutes)
COMBINE_GAIN = 10.0


class IceModel(nn.Module):
    """T1 over each DOM's pulses, T2 over each event's DOMs plus a CLS token, head -> the network's vMF per event,
    combined with one around each of the N_SEEDS seeds -> the prediction. train.py gives every argument (its settings,
    or a checkpoint's model_args on resume; sample.py the checkpoint's): the defaults here shape no trained model."""

    def __init__(self, t1_dim=64, t1_layers=2, t1_heads=4, t2_dim=128, t2_layers=4, t2_heads=4,
                 mlp_ratio=4, attn='auto'):
        super().__init__()
        # every argument as given, first (before any other local), which a checkpoint keeps (model_args) for sample.py
        # and a resume to build this model again: one added to the signature is kept too, where a list written out
        # here lost a new one, and the model it trained then failed to load ('its weights do not fit'), or with an
        # argument that shapes no weight came back as another model without a word
        self.args = {k: v for k, v in locals().items() if k not in ('self', '__class__')}
        if t2_layers < 1:
            raise ValueError(f"IceModel: t2_layers={t2_layers}: T2 needs at least one block (its last reads the CLS tokens)")
        for stage, dim, heads in (('t1', t1_dim, t1_heads), ('t2', t2_dim, t2_heads)):
            if heads < 1 or dim % heads:
                raise ValueError(f"IceModel: {stage}_dim={dim} is not a multiple of {stage}_heads={heads} (the heads split the width)")
        self.attn = attn  # 'flex', 'sdpa' or 'auto' (flex on CUDA, sdpa elsewhere): the layout model_inputs builds
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
        self.head = nn.Linear(t2_dim, 3)  # the network's own vMF: direction times kappa
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * max(t1_layers, t2_layers)) if name.endswith(('proj.weight', 'fc_out.weight')) else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith('bias'):
                nn.init.zeros_(p)
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.spacetime_freq.weight, std=1.0)  # wavelengths from about 2 * SPACETIME_SCALE up
        # log weights of the network's vMF and the seeds' in the prediction (with_seed), made last: the network's
        # initial weights are those of a model without them
        n_in = t2_dim + 1 + N_SEEDS + N_SEED_FEATURES + N_EVENT_FEATURES
        self.combine = nn.Sequential(nn.Linear(n_in, 64), nn.GELU(), nn.Linear(64, 1 + N_SEEDS))
        for layer in (self.combine[0], self.combine[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        # what the event is: a track's logit and log10(energy / GeV), learned where the truth has them (simulation):
        # sample.py calibrates the error circles per predicted kind and energy, where the model's kappa means
        # different things (notes, section 9). Made last, like combine; the energy starts at 1 TeV.
        self.truth_head = nn.Linear(t2_dim, 2)
        nn.init.normal_(self.truth_head.weight, std=0.02)
        with torch.no_grad():
            self.truth_head.bias.copy_(torch.tensor([0.0, 3.0]))

    def path(self, device):
        if self.attn != 'auto':
            return self.attn
        return 'flex' if torch.device(device).type == 'cuda' else 'sdpa'

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def fourier(self, spacetime):
        """Learned Fourier features [cos, sin](W (x, y, z, c_ice t)) of each DOM's place and first-hit time: the dot
        product of two DOMs' features is a function of their separation in space and time, which attention can use
        to weigh DOMs by where and when they were hit relative to each other. On the toy data the val error went from
        0.915 to 0.78-0.86 of LineFit's with them (notes/experiments.md). The phases, tens of radians, are float32 sums
        of four products, not a matmul, which autocast would take in bf16 and CUDA in TF32 (train.py allows it): their
        8 or 10 bits of mantissa put up to 0.02-0.1 rad into a phase of tens of radians. Written out as four (D, F)
        products, the same floats as a (D, 4, F) product summed over its middle dimension, whose reduction and
        backward took the CPU 1.5x as long (the step 1.01x; notes section 37)."""
        x, w = spacetime.float(), self.spacetime_freq.weight  # (D, 4), (F, 4)
        phase = x[:, 0:1] * w[:, 0] + x[:, 1:2] * w[:, 1] + x[:, 2:3] * w[:, 2] + x[:, 3:4] * w[:, 3]  # (D, F)
        return torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)

    def embed_doms(self, b, layout):
        """T1: the pulses of each DOM -> the mean of their outputs, one embedding per DOM slot (D, t1_dim)."""
        x = self.pulse_embed(b['t1_x']).float()  # the residual streams stay float32 under autocast
        for blk in self.t1:
            x = blk(x, layout)
        D = b['dom_pos'].shape[0]
        return sum_by(b['t1_dom'], self.t1_ln(x).float(), D + 1)[:D] / b['dom_n_kept'].clamp(min=1)[:, None]

    def encode(self, b):
        """T1, then T2 over a token per DOM and a CLS token per event -> the CLS token's output (E, t2_dim)."""
        t1_layout, t2_layout, cls_layout = attention_layouts(b)
        dom_emb = self.embed_doms(b, t1_layout)
        dom_tok = self.dom_embed(b['dom_feats']) + self.t1_to_t2(dom_emb) + self.spacetime_embed(self.fourier(b['dom_spacetime']))
        cls_tok = self.cls + self.event_embed(b['event_feats'])
        x = take(torch.cat([dom_tok.float(), cls_tok.float(), dom_emb.new_zeros(1, dom_tok.shape[1])]), b['t2_src'])
        for blk in self.t2[:-1]:
            x = blk(x, t2_layout)
        x = self.t2[-1](x, cls_layout, b['t2_query'])  # only the CLS tokens' outputs are read
        return self.t2_ln(take(x, b['t2_cls']))

    def forward(self, b):
        """-> (E, 8): the prediction's vMF mean vector (direction times kappa), the network's own, then the event's
        track logit and log10(energy / GeV) (truth_head)."""
        if 'event_feats' not in b:  # the loader did not compute them: here, on the device, in the same graph
            b = {**b, **features(b)}
        x = self.encode(b)
        # the heads and the seeds' weights in float32 whatever the autocast: bf16 rounds each output to 8 bits, which
        # turned the direction by up to 0.1 deg (as much as the best tracks' resolution) and each seed's weight by 4%
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            own = self.head(x)
            pred = self.with_seed(x, own, b['seed_dirs'], b['seed_feats'], b['event_feats'])
            return torch.cat([pred, own, self.truth_head(x)], 1)

    def with_seed(self, x, own, seed_dirs, seed_feats, event_feats):
        """The prediction: the product of the network's vMF and one around each seed, the improved LineFit and the
        quick likelihood fit (a product of vMFs is the vMF of the sum of their mean vectors), each with a per-event
        weight from a small MLP of the event's embedding, the network's log kappa, how far the network agrees with
        each seed, the seeds' own features (seeds()) and the event's features. On bright tracks the fit is the most
        precise of the three, on cascades the network. Everything upstream is seen through detach, so this loss only
        teaches the weights and the network trains exactly as without it: with the seed in the network's own output,
        in every way tried, it learned to lean on the seed and cascades got worse (notes, section 11)."""
        own = own.detach()
        kappa = own.norm(dim=1, keepdim=True)
        agree = (F.normalize(own, dim=1, eps=1e-6)[:, None] * seed_dirs).sum(2)  # (E, N_SEEDS): where two disagree, one is off
        inputs = torch.cat([x.detach(), torch.log(kappa + 1e-3), agree, seed_feats, event_feats], 1)
        log_w = COMBINE_GAIN * self.combine(inputs)
        w = log_w.clamp(-8.0, 9.0).exp()
        return w[:, :1] * own + (w[:, 1:, None] * seed_dirs).sum(1)


def read_checkpoint(path, keys):
    """A checkpoint of train.py (a dict of tensors and plain values) read without running code: torch.load's
    weights_only unpickler refuses any other object, where a full unpickle of a file from elsewhere runs whatever
    it names. ValueError saying why it cannot be read: damaged (a truncated zip, garbage), unreadable (no permission),
    other objects in it, or without one of keys."""
    try:
        ck = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text starts with advice to unpickle fully: the reason is inside
        lines = [line.strip() for line in str(e).splitlines()]
        foreign = next((line for line in lines if 'GLOBAL' in line), None)
        if foreign:
            raise ValueError(f"it holds objects other than tensors and plain values, which train.py never writes, and "
                             f"reading them could run code ({foreign.rstrip('.')}); not read") from None
        reason = next((line for line in lines if line.startswith('Unsupported') or 'truncated' in line), lines[0] if lines else '')
        raise ValueError(f"damaged (UnpicklingError: {reason})") from None
    except Exception as e:  # truncated zip, no permission: the error's first line
        raise ValueError(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
    if not isinstance(ck, dict):
        raise ValueError(f"a {type(ck).__name__}, not a checkpoint of train.py")
    missing = [k for k in keys if k not in ck]
    if missing:
        raise ValueError(f"no {', '.join(missing)}: not a checkpoint of train.py")
    return ck


def load_weights(model, state, path, who, model_sha1=None):
    """A checkpoint's weights into model, or one line naming the checkpoint when they do not fit: one written by
    another version of model.py, whose inputs or head differ. Returns True where they fit but model_sha1, the SHA-1
    the checkpoint keeps of the model.py that trained it (None in one older than that), is not this file's: the one
    place that judges a checkpoint's model.py; each caller says so in its own words."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = (str(e).splitlines()[1:] or [str(e)])[0].strip().rstrip('.')
        raise SystemExit(f"{who}: error: {path}: its weights do not fit this model.py ({detail}): it was written by "
                         f"another version; train a new model, or use the commit that wrote it") from None
    return model_sha1 is not None and model_sha1 != SOURCE_SHA1


def model_inputs(batch, path, device='cpu', with_features=False):
    """A prepare.pack_batch micro-batch (dict of numpy arrays and ints) -> the dict the model reads: its stream layout
    for the attention path ('flex' or 'sdpa'), as tensors on device (ints stay ints), and with_features the no-grad
    features, computed here on the CPU (else IceModel.forward computes them on its device)."""
    b = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in stream_layout(batch, path).items()}
    if with_features:
        b.update(features(b))
    return to_device(b, device)


def to_device(b, device):
    if torch.device(device).type == 'cpu':
        return b
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}


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
    """vMF NLL + angular_weight * angle per event slot, summed over pred's first two 3-vectors (IceModel's
    prediction and its network's own); 0 where not real. Padding slots and unknown (NaN) targets are masked with where, so no
    NaN leaks into the gradient. The direction's loss in training (train.py's event_losses sums it; loss_fn is its
    mean for bench.py and the tests): another loss goes here. The vMF term alone trains kappa, the vectors' norm, which
    the seeds' weights (with_seed) and sample.py's error circles read: a loss of the angle or 1 - cos alone leaves
    kappa untrained."""
    target = torch.where(real[:, None], target, torch.zeros_like(target)).float()
    per = 0.0
    for vec in pred[:, :6].float().split(3, dim=1):  # the prediction and the network's own vMF: each its own loss
        per = per + vmf_nll(vec, target)
        if angular_weight:
            per = per + angular_weight * angle_between(vec, target)
    return torch.where(real, per, torch.zeros_like(per))


def truth_loss(pred, track, log_energy):
    """Per event slot: the binary cross-entropy of the track logit (pred[:, 6]) against track (1 track, 0 cascade)
    plus the squared error of the log10 energy (pred[:, 7]); 0 where the truth is unknown (NaN: real data, padding),
    masked before the loss so that no NaN reaches the gradient."""
    known_kind, known_energy = torch.isfinite(track), torch.isfinite(log_energy)
    bce = F.binary_cross_entropy_with_logits(pred[:, 6].float(), torch.where(known_kind, track, 0.0), reduction='none')
    sq = (pred[:, 7].float() - torch.where(known_energy, log_energy, 0.0)) ** 2
    return torch.where(known_kind, bce, 0.0) + torch.where(known_energy, sq, 0.0)


def loss_fn(pred, target, real, angular_weight=0.0):
    """Mean over real event slots of per_event_loss (bench.py's step and the tests; train.py sums per_event_loss)."""
    return per_event_loss(pred, target, real, angular_weight).sum() / real.sum().clamp(min=1)


def direction_error(pred, target):
    """The metric's per-event angle, arccos(clip(u_true . u_pred, -1, 1)), for tensors (no gradient use)."""
    return torch.acos((F.normalize(pred[..., :3].float(), dim=-1, eps=1e-12) * target).sum(-1).clamp(-1.0, 1.0))


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
    """Per-event angle (rad) between true and predicted directions; non-finite input, no events, or inputs of other
    shapes (numpy would broadcast one prediction over all events, or a length-1 truth) are errors."""
    arrs = [np.asarray(a, dtype=np.float64) for a in (az_true, zen_true, az_pred, zen_pred)]
    if len({a.shape for a in arrs}) > 1 or arrs[0].size == 0:
        raise ValueError(f"angular error: azimuths and zeniths of one shape and at least one event expected, got shapes "
                         f"{[a.shape for a in arrs]}")
    for name, a in zip(('az_true', 'zen_true', 'az_pred', 'zen_pred'), arrs):
        if not np.all(np.isfinite(a)):
            raise ValueError(f"angular error: {name} has {int((~np.isfinite(a)).sum())} non-finite values")
    dot = (angles_to_vector(arrs[0], arrs[1]) * angles_to_vector(arrs[2], arrs[3])).sum(-1)
    return np.arccos(np.clip(dot, -1.0, 1.0))


def mean_angular_error(az_true, zen_true, az_pred, zen_pred):
    """The competition metric: mean over events of arccos(clip(u_true . u_pred, -1, 1)), in radians."""
    return float(np.mean(angular_errors(az_true, zen_true, az_pred, zen_pred)))
