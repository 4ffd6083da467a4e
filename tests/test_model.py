"""Tests for model.py: batch composition does not change a result, the two attention paths agree, the training
step computes the same function as before the loader-built layout (commit bfe73ee), the flex path is one compiled
graph, gradients reach every parameter, the loss and the metric."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
from conftest import with_linefits

# conftest.py hides the GPUs from the suite unless ICEAGGR_CUDA_TESTS=1 (tests/gpu_check.sh sets it)
NEEDS_CUDA = 'needs CUDA: ICEAGGR_CUDA_TESTS=1 python -m pytest -q tests/test_model.py -k cuda on a GPU machine'


# -----------------------------------------------------------------------------
# fake batches in exactly prepare.pack_batch's format

def fake_events(rng, n_events, max_doms=40, big_dom=None):
    """List of events; each a list of DOMs (sensor, pos (3,), times (k,), charges (k,), aux (k,))."""
    events = []
    for _ in range(n_events):
        n_doms = int(rng.integers(1, max_doms))
        doms = []
        sensors = rng.choice(5160, size=n_doms, replace=False)
        for s in np.sort(sensors):
            k = int(min(rng.geometric(0.55), 30))
            if big_dom is not None and rng.random() < 0.05:
                k = big_dom
            t = np.sort(rng.uniform(0, 5000, size=k)).astype(np.float32)
            doms.append((int(s), rng.uniform(-500, 500, size=3).astype(np.float32), t,
                         rng.gamma(2.0, 0.6, size=k).astype(np.float32) + 0.025,
                         (rng.random(k) < 0.3).astype(np.float32)))
        events.append(doms)
    return events


def pack(events, P, D, E, directions=None):
    b = dict(pulse_time=np.zeros(P, np.float32), pulse_charge=np.zeros(P, np.float32),
             pulse_aux=np.zeros(P, np.float32), pulse_rank=np.zeros(P, np.int32),
             pulse_dom=np.full(P, -1, np.int32), dom_pos=np.zeros((D, 3), np.float32),
             dom_sensor=np.full(D, -1, np.int32), dom_event=np.full(D, -1, np.int32),
             dom_n_pulses=np.zeros(D, np.int32), event_dir=np.zeros((E, 3), np.float32),
             event_index=np.full(E, -1, np.int64), event_n_pulses=np.zeros(E, np.int32),
             event_n_doms=np.zeros(E, np.int32), event_fit_dir=np.zeros((E, 3), np.float32),
             event_fit_rlogl=np.zeros(E, np.float32), event_track=np.full(E, np.nan, np.float32),
             event_log_energy=np.full(E, np.nan, np.float32))
    p = d = 0
    for e, doms in enumerate(events):
        for (s, pos, t, q, a) in doms:
            k = len(t)
            sl = slice(p, p + k)
            b['pulse_time'][sl], b['pulse_charge'][sl], b['pulse_aux'][sl] = t, q, a
            b['pulse_rank'][sl] = np.arange(k)
            b['pulse_dom'][sl] = d
            b['dom_pos'][d], b['dom_sensor'][d], b['dom_event'][d], b['dom_n_pulses'][d] = pos, s, e, k
            p += k
            d += 1
        b['event_index'][e] = e
        b['event_n_pulses'][e] = sum(len(x[2]) for x in doms)
        b['event_n_doms'][e] = len(doms)
        v = directions[e] if directions is not None else np.array([0.0, 0.0, 1.0])
        b['event_dir'][e] = v
        # the quick fit prepare.py stores, a property of the event: tilted off the truth towards its first DOM
        fit = v + 0.1 * doms[0][1] / np.linalg.norm(doms[0][1])
        b['event_fit_dir'][e], b['event_fit_rlogl'][e] = fit / np.linalg.norm(fit), 6.0 + len(doms) % 5
        b['event_track'][e], b['event_log_energy'][e] = e % 2, 2.0 + 0.25 * e
    assert p <= P and d <= D and len(events) <= E
    b['n_pulses'], b['n_doms'], b['n_events'] = p, d, len(events)
    return with_linefits(b)


def tensors(b, path='sdpa'):
    return M.model_inputs(b, path)


def small_model(**kw):
    args = dict(t1_dim=32, t1_layers=2, t1_heads=2, t2_dim=32, t2_layers=2, t2_heads=2, attn='sdpa')
    args.update(kw)
    torch.manual_seed(0)
    return M.IceModel(**args).eval()


@pytest.fixture(scope='module')
def data():
    rng = np.random.default_rng(1)
    events = fake_events(rng, 12, big_dom=200)
    b = pack(events, P=4000, D=400, E=16)
    return events, b


# -----------------------------------------------------------------------------

def test_t1_packed_equals_alone(data):
    events, b = data
    m = small_model()
    def embed(batch):
        t = M.model_inputs(batch, 'sdpa', with_features=True)  # T1 alone: its inputs from the features
        return m.embed_doms(t, M.attention_layouts(t)[0])

    with torch.no_grad():
        packed = embed(b)
        d = 0
        for e, doms in enumerate(events):
            for j, dom in enumerate(doms):
                if j % 3 == 0 or len(dom[2]) > 5:  # a sample of DOMs and every big one
                    alone = embed(pack([[dom]], P=300, D=3, E=2))
                    assert torch.allclose(packed[d], alone[0], atol=2e-5), (e, j)
                d += 1
    assert torch.all(packed[d:] == 0)


def test_t2_packed_equals_alone(data):
    events, b = data
    m = small_model()
    with torch.no_grad():
        packed = m(tensors(b))
        for e in range(len(events)):
            alone = m(tensors(pack([events[e]], P=1000 + 7 * e, D=64 + e, E=1 + e % 3)))
            assert torch.allclose(packed[e], alone[0], atol=2e-5), e
        # a different set of companions
        alone2 = m(tensors(pack(events[5:9], P=2000, D=300, E=5)))
        assert torch.allclose(packed[5:9], alone2[:4], atol=2e-5)
    assert torch.isfinite(packed).all()  # padding event slots too


def streams(lengths):
    """Documents of the given lengths in both attention layouts: (src, doc, layout) per path, the stream's tokens
    taken from rows of a token table in document order (row N_tokens is padding)."""
    lengths = np.asarray(lengths)
    n = int(lengths.sum())
    n_slots = -(-(n + 1) // M.BLOCK) * M.BLOCK
    out = {}
    for path in ('flex', 'sdpa'):
        src, doc, _, layout = M._stream(lengths, np.arange(n), path, n_slots, n)
        if path == 'flex':
            lo, hi, block_doc = (torch.from_numpy(a) for a in layout)
            doc_t = torch.from_numpy(doc)
            layout = M.block_mask(lo, hi, block_doc, lambda b, h, q, kv: doc_t[q] == doc_t[kv])
        out[path] = torch.from_numpy(src), torch.from_numpy(doc), layout
    return out


@pytest.mark.parametrize('compiled', [False, True])
def test_attention_paths_agree(compiled, monkeypatch):
    """attend() with the FlexAttention block mask (forward; CPU) equals the grouped-SDPA path and a dense reference.
    Document lengths chosen to straddle blocks, fill whole blocks (full blocks) and be single tokens."""
    lengths = [1, 1, 300, 5, 128, 1, 2, 256, 17, 1, 3, 40, 5]
    n = sum(lengths)
    if not compiled:
        monkeypatch.setattr(M, '_flex_compiled', M.flex_attention)  # the unfused reference on the CPU
    q, k, v = (torch.randn(n + 1, 2, 16) for _ in range(3))
    q[n] = k[n] = v[n] = 0  # the padding row
    doc_of = torch.from_numpy(np.repeat(np.arange(len(lengths)), lengths))
    mask = doc_of[:, None] == doc_of[None, :]
    qh, kh, vh = (t[:n].transpose(0, 1) for t in (q, k, v))
    ref = (torch.softmax((qh @ kh.transpose(-1, -2)) / 4.0 + torch.where(mask, 0.0, -math.inf), -1) @ vh).transpose(0, 1)
    for path, (src, doc, layout) in streams(lengths).items():
        # q, k and v as Block gives them: strided views of one (N, 3, H, hd) projection
        out = M.attend(*torch.stack([q[src], k[src], v[src]], 1).unbind(1), layout)
        real = src < n
        diff = (out[real] - ref[src[real]]).abs().max().item()
        print(f"attention {path} (compiled flex={compiled}): max abs diff from the dense reference {diff:.2e}")
        assert diff < 1e-5
        if path == 'sdpa':  # queries at each document's first token alone (T2's last block: the CLS tokens)
            lens = np.repeat(*zip(*layout))
            first = torch.from_numpy(np.cumsum(lens) - lens)
            out = M.attend(q[src][first], *torch.stack([k[src], v[src]], 1).unbind(1), layout)
            assert out.shape[0] == len(lengths) and (out - ref[src[first]]).abs().max() < 1e-5


def test_group_attention_node_equals_sdpa_calls():
    """attend's CPU path (GroupAttention: the flash kernel's forward and backward called group by group, one autograd
    node) computes what the same groups through F.scaled_dot_product_attention compute: the output and the gradients
    of q, k and v bitwise, for every token's queries and for each document's first token alone (T2's last block),
    with a group of one-token documents (which skip the kernel)."""
    lengths = [1, 1, 300, 5, 128, 1, 2, 256, 17, 1, 3, 40, 5]
    layout = streams(lengths)['sdpa'][2]
    n = sum(lengths)
    lens = np.repeat(*zip(*layout))
    first = torch.from_numpy(np.cumsum(lens) - lens)
    weight = torch.randn(n, 2, 16)
    for per_doc in (False, True):
        results = []
        for attention in (M.GroupAttention.apply, M.sdpa_groups):
            torch.manual_seed(0)
            qkv = torch.randn(n, 3, 2, 16, requires_grad=True)
            q, k, v = qkv.unbind(1)  # strided views, as Block gives them
            out = attention(q[first] if per_doc else q, k, v, layout)
            (out * weight[:out.shape[0]]).sum().backward()
            results.append((out.detach(), qkv.grad))
        (out_a, grad_a), (out_b, grad_b) = results
        assert out_a.shape == (len(lengths) if per_doc else n, 2, 16)
        assert torch.equal(out_a, out_b) and torch.equal(grad_a, grad_b), per_doc
        assert grad_a[:, 0].abs().sum() > 0 and grad_a[:, 1].abs().sum() > 0  # q and k reached, not only v


def dense_flex(monkeypatch):
    """FlexAttention's unfused reference (eager: it materialises the scores and differentiates the dense math) in
    place of the compiled kernel. torch refuses its backward on the CPU at the door (_validate_device); the dense
    math itself runs there."""
    import torch.nn.attention.flex_attention as FA
    monkeypatch.setattr(FA, '_validate_device', lambda *args: None, raising=False)
    monkeypatch.setattr(M, '_flex_compiled', M.flex_attention)


def forward_backward(b, path, device='cpu', compiled=False):
    """The small model's prediction for the batch's events and every parameter's gradient of the training loss
    (through torch.compile with compiled=True)."""
    t = M.model_inputs(b, path, device, with_features=False)
    m = small_model(attn=path).to(device).train()
    pred = (torch.compile(m) if compiled else m)(t)
    M.loss_fn(pred, t['event_dir'], t['event_index'] >= 0, angular_weight=0.5).backward()
    return pred[:b['n_events']].detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}


def grad_diffs(ga, gb):
    """Each parameter's max |difference| relative to its largest gradient, the worst first."""
    rel = {k: ((ga[k] - gb[k]).abs().max() / ga[k].abs().max().clamp(min=1e-12)).item() for k in ga}
    return sorted(rel.items(), key=lambda kv: -kv[1])


def test_model_paths_agree(data, monkeypatch):
    """The whole model computes the same function and the same gradients with the flex layout (FlexAttention's
    unfused reference, forward and backward) and the sdpa layout."""
    _, b = data
    dense_flex(monkeypatch)
    (pa, ga), (pf, gf) = forward_backward(b, 'sdpa'), forward_backward(b, 'flex')
    diff, worst = (pa - pf).abs().max().item(), grad_diffs(ga, gf)
    print(f"model sdpa vs flex: max abs diff {diff:.2e}; worst relative gradient diffs {worst[:4]}")
    assert diff < 1e-5
    assert set(ga) == set(gf) and worst[0][1] < 1e-4, worst[:4]


def test_step_equals_bfe73ee():
    """The training step on a fixed batch equals the one before the loader-built stream layout and features (commit
    bfe73ee, stored in tests/data/step_bfe73ee.pt by running that commit's model on this batch): the network's own
    vMF, its loss and every parameter's gradient, within float32 tolerance (the sums now run in another order).
    The seed's weight in the prediction (IceModel.with_seed, issue 18) came later: its loss must reach no other
    parameter, so the network trains as before. The blocks' linears lost their biases later (028c1ea); the stored
    weights are those at initialisation, where the biases are zero, so the function is the same."""
    ref = torch.load(os.path.join(os.path.dirname(__file__), 'data', 'step_bfe73ee.pt'), weights_only=True)
    # the batch is stored as tensors: numpy 2's pickles of arrays name numpy._core, which numpy 1.23-1.25 lack
    batch = {k: v.numpy() if torch.is_tensor(v) else v for k, v in ref['batch'].items()}
    widths = {name: ref['state'][key].shape[1] for name, key in (('N_PULSE_FEATURES', 'pulse_embed.weight'),
              ('N_DOM_FEATURES', 'dom_embed.0.weight'), ('N_EVENT_FEATURES', 'event_embed.weight'))}
    changed = [f"{name} = {getattr(M, name)}, the stored step's {n}" for name, n in widths.items() if getattr(M, name) != n]
    if changed:  # a fork that added an input: the stored weights do not fit it (a size mismatch in load_state_dict)
        pytest.skip(f"model.py's inputs are not the stored step's ({'; '.join(changed)}): it pins that model's function")
    m = M.IceModel(**ref['args']).train()
    keys = m.load_state_dict(ref['state'], strict=False)
    assert keys.missing_keys and all(k.startswith(('combine.', 'truth_head.')) for k in keys.missing_keys)
    assert keys.unexpected_keys and all(k.split('.')[-2] in ('qkv', 'proj', 'fc', 'fc_out') and k.endswith('.bias')
                                        and not ref['state'][k].any() for k in keys.unexpected_keys)
    # the stored batch predates the quick fit in the data (a seed of the prediction only): any direction will do
    # nor the LineFits, which prepare.py stores now: the model computed them on the batch then (with_linefits)
    t = tensors(with_linefits({**batch, 'event_fit_dir': batch['event_dir'],
                               'event_fit_rlogl': np.ones(len(batch['event_dir']), np.float32)}))
    pred = m(t)
    real = t['event_index'] >= 0
    M.loss_fn(pred, t['event_dir'], real, 0.5).backward()
    n = batch['n_events']
    own_loss = M.loss_fn(pred[:, 3:6].detach(), t['event_dir'], real, 0.5)
    assert abs(own_loss.item() - ref['loss'].item()) < 1e-5 and torch.allclose(pred[:n, 3:6], ref['pred'], atol=1e-5), (
        "the network's vMF is not the stored step's: a bug, or model.py's function changed on purpose (an input changed "
        "in place, a layer), which this test cannot tell apart")
    for name, p in m.named_parameters():
        if name.startswith('combine.'):
            assert p.grad.abs().max() > 0, name
            continue
        if name.startswith('truth_head.'):  # the track and energy heads came later, with a loss of their own
            assert p.grad is None or not p.grad.any(), name
            continue
        scale = ref['grads'][name].abs().max()
        assert (p.grad - ref['grads'][name]).abs().max() <= 1e-4 * scale + 1e-7, name


def test_flex_path_is_one_graph_without_recompiles(data, monkeypatch):
    """train.py's compile=True on the flex path: the forward (features included, as on CUDA) is one graph with no
    graph break, computes the function of the eager sdpa path, and batches of other contents do not recompile.
    (Once T1's and T2's block masks were closures of one function traced into one graph, they got mixed up: the
    compiled model computed another function, on CUDA with T1's gradients 94% off.)"""
    _, b = data
    b2 = pack(fake_events(np.random.default_rng(5), 9, big_dom=120), P=4000, D=400, E=16)
    m = small_model()
    inputs = lambda batch: M.model_inputs(batch, 'flex', with_features=False)
    with torch.no_grad():
        explained = torch._dynamo.explain(m)(inputs(b))
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        with torch.autocast('cpu', dtype=torch.bfloat16):  # as train.py runs it on CUDA: the float32 heads stay in it
            explained = torch._dynamo.explain(m)(inputs(b))
        assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        cm = torch.compile(m)
        for batch in (b, b2, b):
            n = batch['n_events']
            diff = (cm(inputs(batch))[:n] - m(tensors(batch))[:n]).abs().max().item()
            assert diff < 1e-5, diff
            monkeypatch.setattr(torch._dynamo.config, 'error_on_recompile', True)  # from the second call on


def test_importing_the_scripts_starts_no_compiler():
    """torch.compile's first call imports dynamo and inductor, 1.7 s at each start of train.py, sample.py,
    prepare.py and every loader or test process; model.py makes its compiled flex_attention only when the flex path
    first runs (flex())."""
    code = "import sys, model, prepare, sample, classical, simulate; sys.exit('torch._dynamo' in sys.modules)"
    p = subprocess.run([sys.executable, '-c', code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, "importing the scripts imported torch._dynamo"


def test_block_mask_blocks():
    """Full and partial blocks of the mask built from the loader's block ranges match the dense document mask."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 400, size=20)
    src, doc, bm = streams(lengths)['flex']
    N = len(doc)
    dense = (doc[:, None] == doc[None, :]).view(N // 128, 128, N // 128, 128)
    any_ = dense.any(3).any(1)
    all_ = dense.all(3).all(1)
    kv_num, kv_idx = bm.kv_num_blocks[0, 0], bm.kv_indices[0, 0]
    f_num, f_idx = bm.full_kv_num_blocks[0, 0], bm.full_kv_indices[0, 0]
    for i in range(N // 128):
        part = set(kv_idx[i, :kv_num[i]].tolist())
        full = set(f_idx[i, :f_num[i]].tolist())
        assert full == set(torch.nonzero(all_[i]).flatten().tolist())
        assert part == set(torch.nonzero(any_[i] & ~all_[i]).flatten().tolist())


def test_cls_query_block_mask(data):
    """T2's last block, whose queries are the CLS tokens alone: its BlockMask's key blocks (forward) and query blocks
    (backward) are exactly the blocks where a query meets a key of its own event, and the mask_mod says which
    tokens; the square masks' query blocks are their key blocks (symmetric); every index tensor is contiguous."""
    _, b = data
    t = M.model_inputs(b, 'flex')
    t1, t2, cls = M.attention_layouts(t)
    q_doc, doc = t['t2_query_doc'], t['t2_doc']
    assert len(t['t2_query']) % M.BLOCK == 0 and (doc[t['t2_query']] == q_doc).all()
    assert (torch.sort(t['t2_query'][:b['n_events']]).values == t['t2_query'][:b['n_events']]).all()
    dense = q_doc[:, None] == doc[None, :]
    nq, nkv = dense.shape[0] // M.BLOCK, dense.shape[1] // M.BLOCK
    any_ = dense.view(nq, M.BLOCK, nkv, M.BLOCK).any(3).any(1)
    kv_num, kv_idx, q_num, q_idx = cls.kv_num_blocks[0, 0], cls.kv_indices[0, 0], cls.q_num_blocks[0, 0], cls.q_indices[0, 0]
    assert not cls.full_kv_num_blocks.any() and not cls.full_q_num_blocks.any()
    for i in range(nq):
        assert set(kv_idx[i, :kv_num[i]].tolist()) == set(torch.nonzero(any_[i]).flatten().tolist())
    for j in range(nkv):
        assert set(q_idx[j, :q_num[j]].tolist()) == set(torch.nonzero(any_[:, j]).flatten().tolist())
    qi, kvi = torch.meshgrid(torch.arange(dense.shape[0]), torch.arange(dense.shape[1]), indexing='ij')
    assert torch.equal(cls.mask_mod(0, 0, qi, kvi), dense)
    for square in (t1, t2):
        assert torch.equal(square.q_indices, square.kv_indices) and torch.equal(square.q_num_blocks, square.kv_num_blocks)
    # CUDA's kernels read a row of block indices at stride 1: with the q side's transposed strides the compiled
    # backward read other rows' blocks (dK and dV off on the H200, the forward and dQ right; notes section 14)
    for mask in (t1, t2, cls):
        for name in ('kv_num_blocks', 'kv_indices', 'full_kv_num_blocks', 'full_kv_indices', 'q_num_blocks', 'q_indices',
                     'full_q_num_blocks', 'full_q_indices'):
            assert getattr(mask, name).is_contiguous(), name


def _block_rows(num, idx, n_cols):
    """A BlockMask's (num, indices) pair as a boolean (rows, n_cols) matrix of the blocks each row lists."""
    out = np.zeros((num.shape[-1], n_cols), bool)
    for i, (k, row) in enumerate(zip(num[0, 0].tolist(), idx[0, 0].numpy())):
        out[i, row[:k]] = True
    return out


def test_block_masks_on_random_batches():
    """The three BlockMasks (T1, T2, T2's CLS queries) against dense masks made from the batch alone, on random
    batches at budgets the fixed batch above misses: more than BLOCK events (several CLS query blocks, as
    config/baseline_1m.py's 512 and train.py's 256 have), budgets exactly filled and one over, not multiples of BLOCK,
    and a T2 stream with no padding at all. A query block lists exactly the key blocks holding a key of its
    documents, as full only those where every pair is; the backward's lists are the transpose; the mask_mod is the
    dense mask. (A scratch fuzz of this and the packing over hundreds of random batches found nothing wrong.)"""
    rng = np.random.default_rng(11)
    events = fake_events(rng, 300, max_doms=4)
    n_d = np.cumsum([len(ev) for ev in events])
    n_p = np.cumsum([sum(len(dom[2]) for dom in ev) for ev in events])
    full = next(k for k in range(M.BLOCK + 1, 300) if (n_d[k - 1] + k) % M.BLOCK == 0)  # DOMs + CLS tokens: whole blocks
    # (events, P, D, E): every budget filled; one pulse and DOM to spare, three query blocks; odd budgets, two query
    # blocks; one event alone
    cases = [(full, n_p[full - 1], n_d[full - 1], full), (200, n_p[199] + 1, n_d[199] + 1, 257), (40, 1000, 333, 129),
             (1, n_p[0], n_d[0], 1)]
    for k, P, D, E in cases:
        b = pack(events[:k], int(P), int(D), int(E))
        t = M.model_inputs(b, 'flex')
        t1_src, t2_src, query = t['t1_src'].numpy(), t['t2_src'].numpy(), t['t2_query'].numpy()
        assert np.array_equal(np.sort(t1_src[t1_src < P]), np.arange(b['n_pulses']))
        assert np.array_equal(np.sort(t2_src[t2_src < D + E]), np.r_[np.arange(b['n_doms']), D + np.arange(k)])
        pulse_doc = np.r_[b['pulse_dom'], -1][t1_src]  # padding: -1, a document of its own
        event_doc = np.r_[b['dom_event'], np.arange(E), -1][t2_src]
        if k == full:
            assert (event_doc >= 0).all(), "the case needs a T2 stream without padding"
        for mask, q_doc, kv_doc in zip(M.attention_layouts(t), (pulse_doc, event_doc, event_doc[query]),
                                       (pulse_doc, event_doc, event_doc)):
            dense = q_doc[:, None] == kv_doc[None, :]
            nq, nkv = len(q_doc) // M.BLOCK, len(kv_doc) // M.BLOCK
            blocks = dense.reshape(nq, M.BLOCK, nkv, M.BLOCK)
            part = _block_rows(mask.kv_num_blocks, mask.kv_indices, nkv)
            whole = _block_rows(mask.full_kv_num_blocks, mask.full_kv_indices, nkv)
            assert np.array_equal(part | whole, blocks.any((1, 3))) and not (part & whole).any(), (k, mask.seq_lengths)
            assert not (whole & ~blocks.all((1, 3))).any(), (k, mask.seq_lengths)
            assert np.array_equal(_block_rows(mask.q_num_blocks, mask.q_indices, nq), part.T)
            assert np.array_equal(_block_rows(mask.full_q_num_blocks, mask.full_q_indices, nq), whole.T)
            qi, kvi = torch.meshgrid(torch.arange(len(q_doc)), torch.arange(len(kv_doc)), indexing='ij')
            assert np.array_equal(mask.mask_mod(0, 0, qi, kvi).numpy(), dense), (k, mask.seq_lengths)


def test_event_features_and_seeds_read_each_fit_in_its_place(data):
    """The CLS features hold the plain LineFit's direction, then the improved one's, and the prediction's seeds are
    the improved LineFit, then the quick fit, beside the fit's rlogl and the two seeds' cosine: the order a checkpoint's
    weights read them in. On the batch of test_step_equals_bfe73ee both LineFits agree, so only this batch, where they
    differ, tells them apart."""
    _, b = data
    n = b['n_events']
    f = M.features(tensors(b))
    lf = -torch.nn.functional.normalize(torch.from_numpy(b['event_lf_v'][:n]), dim=1)
    ilf, fit = torch.from_numpy(b['event_ilf_dir'][:n]), torch.from_numpy(b['event_fit_dir'][:n])
    assert M.direction_error(lf, ilf).max() > 0.5 and M.direction_error(ilf, fit).min() > 0.1  # the case that matters
    torch.testing.assert_close(f['event_feats'][:n, 3:9], torch.cat([lf, ilf], 1))
    torch.testing.assert_close(f['seed_dirs'][:n], torch.stack([ilf, fit], 1))
    torch.testing.assert_close(f['seed_feats'][:n], torch.stack([torch.from_numpy(b['event_fit_rlogl'][:n]) / 10, (ilf * fit).sum(1)], 1))


def test_prediction_is_the_product_of_the_network_and_seed_vmfs(data):
    """IceModel.with_seed: the prediction is the sum of the mean vectors of the network's vMF and of one vMF around
    each seed (their product), in that order, each scaled by its weight exp(COMBINE_GAIN * combine(...)); the weights
    see the cosine between the network's direction and each seed, whatever the network's kappa."""
    _, b = data
    m, t = small_model(), tensors(b)
    inputs = []
    m.combine.register_forward_hook(lambda mod, inp, out: inputs.append(inp[0]))
    with torch.no_grad():
        m.combine[2].weight.zero_()
        m.combine[2].bias.copy_(torch.tensor([1.0, -2.0, 0.5]) / M.COMBINE_GAIN)
        out, f = m(t), M.features(t)
    own, seeds = out[:, 3:6], f['seed_dirs']
    torch.testing.assert_close(out[:, :3], math.e * own + math.exp(-2.0) * seeds[:, 0] + math.exp(0.5) * seeds[:, 1])
    d = m.head.in_features  # the inputs: the embedding, the network's log kappa, then the cosines
    assert own.norm(dim=1).max() > 1.5 * own.norm(dim=1).min()  # kappas that differ: the case that matters
    torch.testing.assert_close(inputs[0][:, d + 1:d + 1 + M.N_SEEDS], (torch.nn.functional.normalize(own, dim=1)[:, None] * seeds).sum(2))


def test_gradients_reach_every_parameter(data):
    _, b = data
    m = small_model().train()
    t = tensors(b)
    pred = m(t)
    loss = M.loss_fn(pred, t['event_dir'], t['event_index'] >= 0, angular_weight=0.5)
    (loss + M.truth_loss(pred, t['event_track'], t['event_log_energy']).mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bf16_autocast_forward(data):
    _, b = data
    m = small_model()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(tensors(b))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_bf16_autocast_keeps_the_directions_float32(data):
    """Under autocast the network's 3-vector is the float32 head of its embedding: in bf16 each component is rounded
    to 8 bits, a direction off by up to 0.1 deg, as much as the best tracks' resolution."""
    _, b = data
    m = small_model()
    emb = []
    m.t2_ln.register_forward_hook(lambda mod, inp, out: emb.append(out))
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(tensors(b))
    want = torch.nn.functional.linear(emb[0].float(), m.head.weight, m.head.bias)
    assert torch.allclose(out[:, 3:6], want, rtol=1e-5, atol=1e-7)


class _Tf32Matmuls(torch.overrides.TorchFunctionMode):
    """CUDA's TF32 on the CPU: every float32 matmul's inputs rounded to 10 bits of mantissa, as train.py allows."""
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.nn.functional.linear, torch.matmul, torch.mm, torch.addmm, torch.Tensor.__matmul__):
            args = [a.view(torch.int32).add(1 << 12).bitwise_and(~0x1FFF).view(torch.float32)
                    if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args]
        return func(*args, **(kwargs or {}))


def test_fourier_phases_stay_float32(data):
    """The Fourier features' phases are tens of radians: bf16 (autocast) or a TF32 matmul (CUDA, as train.py allows)
    would move them by up to 0.1 or 0.02 rad, so they are sums of products, exact in float32 either way."""
    _, b = data
    m = small_model()
    with torch.no_grad():
        spacetime = M.features(tensors(b))['dom_spacetime']
        phase = spacetime.double() @ m.spacetime_freq.weight.double().t()
        want = torch.cat([torch.cos(phase), torch.sin(phase)], 1)
        assert phase.abs().max() > 10  # the case that matters
        with _Tf32Matmuls():
            assert (m.fourier(spacetime).double() - want).abs().max() < 1e-4
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert (m.fourier(spacetime).double() - want).abs().max() < 1e-4


def test_log_c3_and_vmf():
    k = torch.tensor([0.0, 1e-8, 1e-3, 0.0099, 0.0101, 0.1, 1.0, 10.0, 100.0, 1e4], dtype=torch.float64)
    ref = torch.log(k / (4 * math.pi * torch.sinh(k)))
    ref[0] = ref[1] = -math.log(4 * math.pi)
    assert torch.allclose(M.log_c3(k)[:-1], ref[:-1], atol=1e-9)
    assert torch.isfinite(M.log_c3(k.float())).all()
    # finite gradient at zero output and at large kappa
    pred = torch.zeros(4, 3, requires_grad=True)
    target = torch.tensor([[0.0, 0.0, 1.0]] * 4)
    M.vmf_nll(pred, target).sum().backward()
    assert torch.isfinite(pred.grad).all()
    # aligned with larger kappa is better; anti-aligned is worse
    t = torch.tensor([[0.0, 0.0, 1.0]])
    assert M.vmf_nll(torch.tensor([[0, 0, 5.0]]), t) < M.vmf_nll(torch.tensor([[0, 0, 1.0]]), t)
    assert M.vmf_nll(torch.tensor([[0, 0, -5.0]]), t) > M.vmf_nll(torch.tensor([[0, 0, 1.0]]), t)
    # masking: NaN targets in padding / test slots do not leak
    pred = torch.randn(3, 3, requires_grad=True)
    tgt = torch.tensor([[0, 0, 1.0], [math.nan] * 3, [0, 0, 0.0]])
    loss = M.loss_fn(pred, tgt, torch.tensor([True, False, False]), angular_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_truth_loss():
    """The track and energy heads' loss: cross-entropy and squared error where the truth is known, nothing (and no
    NaN in the gradient) where it is not: real data has no truth, padding slots none either."""
    pred = torch.randn(4, 8, requires_grad=True)
    track = torch.tensor([1.0, 0.0, math.nan, 1.0])
    log_energy = torch.tensor([3.0, 5.5, math.nan, math.nan])
    per = M.truth_loss(pred, track, log_energy)
    p = torch.sigmoid(pred[:, 6].detach())
    want = torch.stack([-torch.log(p[0]) + (pred[0, 7] - 3.0) ** 2, -torch.log(1 - p[1]) + (pred[1, 7] - 5.5) ** 2,
                        torch.tensor(0.0), -torch.log(p[3])]).detach()
    assert torch.allclose(per.detach(), want, atol=1e-5)
    per.sum().backward()
    assert torch.isfinite(pred.grad).all() and not pred.grad[2].any() and not pred.grad[:, :6].any()
    assert pred.grad[3, 6] != 0 and pred.grad[3, 7] == 0


def kaggle_reference(az_true, zen_true, az_pred, zen_pred):
    # the competition's angular_dist_score
    sa1, ca1, sz1, cz1 = np.sin(az_true), np.cos(az_true), np.sin(zen_true), np.cos(zen_true)
    sa2, ca2, sz2, cz2 = np.sin(az_pred), np.cos(az_pred), np.sin(zen_pred), np.cos(zen_pred)
    scalar_prod = sz1 * sz2 * (ca1 * ca2 + sa1 * sa2) + (cz1 * cz2)
    return np.average(np.abs(np.arccos(np.clip(scalar_prod, -1, 1))))


def test_metric_matches_reference():
    rng = np.random.default_rng(0)
    n = 1000
    az1, az2 = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
    z1, z2 = np.arccos(rng.uniform(-1, 1, n)), np.arccos(rng.uniform(-1, 1, n))
    z1[:50], z2[25:75] = 0.0, np.pi  # poles
    az2[100:200] = az1[100:200] + 2 * np.pi  # wrap-around: same direction
    z2[100:200] = z1[100:200]
    az2[200:300] = az1[200:300] - 2 * np.pi + 1e-9
    z2[200:300] = z1[200:300]
    assert abs(M.mean_angular_error(az1, z1, az2, z2) - kaggle_reference(az1, z1, az2, z2)) < 1e-8
    errs = M.angular_errors(az1, z1, az2, z2)
    assert np.all(errs[100:300] < 1e-6)
    assert abs(M.mean_angular_error([0.0], [0.0], [1.0], [np.pi]) - np.pi) < 1e-12
    assert M.mean_angular_error([0.3], [0.0], [2.0], [0.0]) == 0.0  # azimuth is irrelevant at the pole
    with pytest.raises(ValueError):
        M.mean_angular_error([0.0, np.nan], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0])
    with pytest.raises(ValueError):
        M.mean_angular_error([0.0], [0.0], [np.inf], [0.0])
    with pytest.raises(ValueError):  # one prediction is not broadcast over two events
        M.mean_angular_error([0.0, 1.0], [0.0, 1.0], [0.0], [0.0])
    with pytest.raises(ValueError):  # no events: no mean (numpy's is nan)
        M.mean_angular_error([], [], [], [])
    # round trip of the angle helpers, numpy and torch
    v = M.angles_to_vector(az1, z1)
    a, z = M.vector_to_angles(v * 3.0)
    assert np.allclose(M.angles_to_vector(a, z), v, atol=1e-12)
    vt = M.angles_to_vector(torch.tensor(az1), torch.tensor(z1))
    assert torch.allclose(vt, torch.tensor(v))



def test_direction_error_is_the_metric_for_any_length():
    """train.py's val error (direction_error, torch) is the metric's angle whatever the length (kappa) of the
    prediction, and reads only its first 3-vector: a kappa of 20 or of 0.05 changes nothing."""
    rng = np.random.default_rng(2)
    n = 200
    az1, az2 = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
    z1, z2 = np.arccos(rng.uniform(-1, 1, n)), np.arccos(rng.uniform(-1, 1, n))
    want = M.angular_errors(az1, z1, az2, z2)
    kappa = np.exp(rng.uniform(np.log(0.05), np.log(20), n))[:, None]
    pred = np.concatenate([kappa * M.angles_to_vector(az2, z2), rng.normal(size=(n, 5))], 1)
    got = M.direction_error(torch.tensor(pred, dtype=torch.float32), torch.tensor(M.angles_to_vector(az1, z1), dtype=torch.float32))
    assert got.shape == (n,)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-3)


def test_vector_to_angles_ranges():
    """The submission's angles: azimuth in [0, 2 pi) and zenith in [0, pi], for directions all round the sphere
    (numpy and torch), whatever the vector's length."""
    rng = np.random.default_rng(4)
    v = rng.normal(size=(2000, 3)) * rng.uniform(0.01, 50, (2000, 1))
    v[:4] = [[1.0, -1e-18, 0.3], [-1.0, -0.0, 0.0], [0.0, -2.0, -1.0], [0.0, 0.0, -3.0]]
    for x in (v, torch.tensor(v)):
        az, zen = (np.asarray(a) for a in M.vector_to_angles(x))
        assert (az >= 0).all() and (az < 2 * np.pi).all() and (zen >= 0).all() and (zen <= np.pi).all()
        assert (az[v[:, 1] < -1e-9] > np.pi).all()  # the lower half-plane is pi..2 pi, not negative
        np.testing.assert_allclose(M.angles_to_vector(az, zen), v / np.linalg.norm(v, axis=1, keepdims=True), atol=1e-9)

def ieee_float32():
    """float32 matmuls in full precision on CUDA, cuBLAS and FlexAttention's kernel alike. The kernel reads its own
    setting when it is compiled: torch 2.13 follows set_float32_matmul_precision, but an earlier published version of
    the flex lowering took TF32 unless matmul.fp32_precision was 'ieee'. Prints what the kernel will use, since a
    TF32 kernel against an IEEE reference differs by about 1e-3."""
    torch.set_float32_matmul_precision('highest')
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if hasattr(torch.backends.cuda.matmul, 'fp32_precision'):
        torch.backends.cuda.matmul.fp32_precision = 'ieee'
    try:
        from torch._inductor.kernel.flex.flex_attention import get_float32_precision
        print(f"torch {torch.__version__}: the flex kernel's float32 precision {get_float32_precision()}")
    except ImportError:
        print(f"torch {torch.__version__}: no get_float32_precision to ask")


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
def test_cuda_flex_equals_sdpa_forward_and_backward(data, monkeypatch):
    """On CUDA the model trains through compiled FlexAttention: its output and every parameter's gradient equal
    those of the padded-SDPA path and of FlexAttention's unfused reference (float32, TF32 off), and bf16 autocast
    stays close. All three are printed before any assertion, so one run says which path is off and where.
    (On an H200, torch 2.11, 2026-12-04: the output agreed, the kernel's gradients were off by up to 3,563x, its
    dK and dV read the backward's block indices at the wrong strides; notes, section 14.)"""
    _, b = data
    ieee_float32()
    results = {path: forward_backward(b, path, 'cuda') for path in ('sdpa', 'flex')}
    with monkeypatch.context() as mp:
        dense_flex(mp)
        results['unfused'] = forward_backward(b, 'flex', 'cuda')
    pairs = (('unfused', 'sdpa'), ('unfused', 'flex'), ('sdpa', 'flex'))
    diffs = {pair: ((results[pair[0]][0] - results[pair[1]][0]).abs().max().item(),
                    grad_diffs(results[pair[0]][1], results[pair[1]][1])) for pair in pairs}
    for (a, c), (diff, worst) in diffs.items():
        print(f"{a} vs {c}: max |pred diff| {diff:.2e}; worst relative gradient diffs {worst[:6]}")
    for pair, (diff, worst) in diffs.items():
        assert diff < 1e-4 and worst[0][1] < 1e-3, (pair, diff, worst[:6])
        ga, gb = results[pair[0]][1], results[pair[1]][1]
        for k in ga:
            assert torch.allclose(ga[k], gb[k], atol=1e-4, rtol=1e-3), (pair, k)
    m = small_model(attn='flex').cuda()
    t = M.model_inputs(b, 'flex', 'cuda', with_features=False)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
        pb = m(t)[:b['n_events']]
    assert (pb - results['sdpa'][0]).abs().max() < 5e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
def test_cuda_flex_kernel_per_layout(data, monkeypatch):
    """Compiled FlexAttention's output and its q, k and v gradients equal its unfused reference on each of the
    model's three block masks (T1's DOMs, T2's events, T2's CLS queries): a failure names the mask and the tensor."""
    _, b = data
    ieee_float32()
    t = M.model_inputs(b, 'flex', 'cuda', with_features=False)
    torch.manual_seed(0)
    failed = []
    for name, layout in zip(('t1', 't2', 'cls'), M.attention_layouts(t)):
        n_q, n_kv = layout.seq_lengths
        q = torch.randn(n_q, 2, 16, device='cuda', requires_grad=True)
        k, v = (torch.randn(n_kv, 2, 16, device='cuda', requires_grad=True) for _ in range(2))
        w = torch.randn(n_q, 2, 16, device='cuda')
        res = {}
        for kernel in ('compiled', 'unfused'):
            with monkeypatch.context() as mp:
                if kernel == 'unfused':
                    dense_flex(mp)
                out = M.attend(q, k, v, layout)
                res[kernel] = (out.detach(), *torch.autograd.grad((out * w).sum(), (q, k, v)))
        rel = {what: ((a - c).abs().max() / a.abs().max()).item()
               for what, a, c in zip(('out', 'dq', 'dk', 'dv'), res['unfused'], res['compiled'])}
        print(f"{name} ({n_q} queries, {n_kv} keys): compiled vs unfused, relative max diffs {rel}")
        failed += [(name, what, r) for what, r in rel.items() if not r < 1e-4]
    assert not failed, failed


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)
def test_cuda_compiled_equals_eager(data):
    """torch.compile (train.py's compile=True) must not change the function or its gradients."""
    _, b = data
    ieee_float32()
    (pe, ge), (pc, gc) = (forward_backward(b, 'flex', 'cuda', compiled) for compiled in (False, True))
    rel = {k: ((ge[k] - gc[k]).norm() / ge[k].norm().clamp(min=1e-12)).item() for k in ge}
    worst = sorted(rel.items(), key=lambda kv: -kv[1])[:8]
    print(f"compiled vs eager: max |pred diff| {(pe - pc).abs().max().item():.2e}; worst relative grad diffs {worst}")
    assert (pe - pc).abs().max() < 1e-4
    assert max(rel.values()) < 1e-3, worst


def test_a_feature_added_without_its_constant_is_named(monkeypatch):
    """Adding a pulse (DOM, event) feature means changing N_PULSE_FEATURES (N_DOM_FEATURES, N_EVENT_FEATURES) too: the
    features say so in one line instead of a matmul shape error deep in the model."""
    pulse_features = M.pulse_features

    def with_one_more(b):
        feats, summaries = pulse_features(b)
        return torch.cat([feats, feats[:, :1]], 1), summaries
    monkeypatch.setattr(M, 'pulse_features', with_one_more)
    t = tensors(pack(fake_events(np.random.default_rng(0), 4, 6), 512, 64, 8))
    n = M.N_PULSE_FEATURES  # (not a number written here: a fork that added a feature fails nothing here)
    with pytest.raises(ValueError, match=rf"pulse_features gives {n + 1} features, but model.N_PULSE_FEATURES = {n}: set N_PULSE_FEATURES = {n + 1}"):
        small_model()(t)
    monkeypatch.setattr(M, 'N_PULSE_FEATURES', n + 1)
    assert small_model()(t).shape == (8, 8)


def test_an_argument_added_to_the_model_is_kept_in_its_args(tmp_path):
    """IceModel.args, which a checkpoint keeps (model_args) to build the model again in sample.py and a resume,
    holds every argument of the signature: a model.py edited as a fork would (an MLP ratio of T2's own) keeps the new
    one too. With the arguments listed by hand the new one was lost: the checkpoint it trained failed to load."""
    import importlib.util
    source = open(M.__file__).read()
    for old, new in (("mlp_ratio=4, attn='auto'):", "mlp_ratio=4, attn='auto', t2_mlp_ratio=4):"),
                     ("Block(t2_dim, t2_heads, mlp_ratio)", "Block(t2_dim, t2_heads, t2_mlp_ratio)")):
        assert source.count(old) == 1, old
        source = source.replace(old, new)
    (tmp_path / 'edited_model.py').write_text(source)
    spec = importlib.util.spec_from_file_location('edited_model', tmp_path / 'edited_model.py')
    edited = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(edited)
    m = edited.IceModel(t1_dim=16, t1_layers=1, t1_heads=2, t2_dim=32, t2_layers=1, t2_heads=2, t2_mlp_ratio=3)
    assert m.args == dict(t1_dim=16, t1_layers=1, t1_heads=2, t2_dim=32, t2_layers=1, t2_heads=2, mlp_ratio=4,
                          attn='auto', t2_mlp_ratio=3)
    edited.IceModel(**m.args).load_state_dict(m.state_dict())  # as sample.py builds it from the checkpoint


def test_heads_that_do_not_split_the_width_are_named():
    """bench.py and other callers of IceModel get the reason, not a view's shape error in the first forward."""
    with pytest.raises(ValueError, match=r"t2_dim=64 is not a multiple of t2_heads=3"):
        M.IceModel(t2_dim=64, t2_heads=3)
    with pytest.raises(ValueError, match=r"t1_dim=32 is not a multiple of t1_heads=0"):
        M.IceModel(t1_dim=32, t1_heads=0)


def test_pulses_cut_by_the_per_dom_cap_are_seen_only_as_a_count(data):
    """pack_batch keeps each DOM's first max_pulses_per_dom pulses and records how many it had before the cap in
    dom_n_pulses: a DOM's T1 embedding is the mean over the pulses it kept (not its pulses before the cap: the
    cut ones have no output to sum), and of the DOM features only the count itself may change; the improved
    LineFit's share of direct pulses is a share of the kept ones. The batches built here (and the stored step's)
    keep every pulse, where dom_n_pulses equals the kept count and such a mix-up changed no output."""
    _, b = data
    capped = {**b, 'dom_n_pulses': b['dom_n_pulses'].copy()}
    capped['dom_n_pulses'][:b['n_doms']:2] += 7  # as if every other DOM had 7 more pulses cut by the cap
    m = small_model()
    with torch.no_grad():
        t, tc = M.model_inputs(b, 'sdpa', with_features=True), M.model_inputs(capped, 'sdpa', with_features=True)
        dom_emb, dom_emb_capped = (m.embed_doms(x, M.attention_layouts(x)[0]) for x in (t, tc))
    torch.testing.assert_close(dom_emb_capped, dom_emb, rtol=0, atol=1e-6)
    changed = ((t['dom_feats'] - tc['dom_feats']).abs() > 1e-6).any(0)
    assert int(changed.sum()) == 1, f"DOM feature columns that changed with the count before the cap: {changed.nonzero().flatten().tolist()}"
    torch.testing.assert_close(tc['event_feats'], t['event_feats'])


def test_cls_queries_reach_a_document_whose_last_token_opens_a_block():
    """T2's last block on the flex path: each block of CLS queries attends the key blocks up to the one holding its
    last document's last token. An event of BLOCK DOMs (the CLS token and 128 DOM tokens) ends on the first token of
    the next block: a range computed one token short left that block and the event's last DOM out of the CLS
    token's attention, on CUDA only; the random batches above never end a document there."""
    events = [[(int(s), np.array([0.0, 0.0, 10.0 * s + 5.0], np.float32), np.array([s], np.float32), np.array([1.0], np.float32),
                np.zeros(1, np.float32)) for s in range(M.BLOCK)]]
    b = pack(events, P=M.BLOCK + 8, D=M.BLOCK + 8, E=4)
    t = M.model_inputs(b, 'flex')
    cls = M.attention_layouts(t)[2]
    event_doc = np.r_[b['dom_event'], np.arange(4), -1][t['t2_src'].numpy()]
    dense = event_doc[t['t2_query'].numpy()][:, None] == event_doc[None, :]
    nq, nkv = dense.shape[0] // M.BLOCK, dense.shape[1] // M.BLOCK
    assert dense[:, M.BLOCK:].any(), "the case needs the event to reach the second key block"
    listed = _block_rows(cls.kv_num_blocks, cls.kv_indices, nkv) | _block_rows(cls.full_kv_num_blocks, cls.full_kv_indices, nkv)
    np.testing.assert_array_equal(listed, dense.reshape(nq, M.BLOCK, nkv, M.BLOCK).any((1, 3)))
