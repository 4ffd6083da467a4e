"""
Measured throughput and scaling, each row beside its naive alternative, in one run on the same inputs
(so the ratios hold on a noisy machine). Prints one table and writes bench.json.

    python bench.py                      # CPU, the sizes in the settings below
    python bench.py --device=cuda        # FlexAttention, bf16 (and compile=True for torch.compile)
    python bench.py --rows=efficiency    # only the rows named (tests/gpu_check.sh runs this one on a GPU)

Rows:
  prepare    pulses/s of prepare.py packing one synthetic batch file without the quick fit (fit_steps=0), and of
             the packing alone (less the LineFits it stores for the model), beside pyarrow's bare read of it
  reading    events/s from the packed shards to a ready micro-batch of model tensors, beside a
             straightforward parquet loader (read the batch file, group rows by event, same tensors)
  step       events/s and peak memory of forward + backward: hierarchical model, a flat transformer of the
             same width and depth over all pulses of each event, and T1 with every DOM padded
  scaling    single events of 100 .. 100,000 pulses, hierarchical against flat
  inference  events/s of the model beside LineFit (and the likelihood fit where classical.py has one)
  efficiency per config (toy_cpu; baseline_1m, at a reduced budget on the CPU): counted FLOPs per training event and
             the step's FLOP/s beside the machine's own x @ w rate at the model's shapes in the same run, and the
             loader's events/s at the config's budgets beside the step's; with profile=True, where one pass of the
             step spends its time (on CUDA: the share of it the GPU is busy, and the largest kernels); with
             compare_commit, that commit's model.py with the same arguments, A B on the same inputs: its step, and its
             forward as its sample.py runs it (compare_events events, each commit at the budgets its sample.py packs)

The baselines of the step and scaling rows (built here, from model.py's Block):
  flat       one transformer over all pulses of an event: width t2_dim, t2_heads heads, depth t1_layers +
             t2_layers (the hierarchical model's widest width and its total depth), the same pulse features
             as IceModel plus the DOM position of each pulse, each event's pulses padded to the batch's
             longest event and attended with scaled_dot_product_attention (key-padding mask), mean-pooled to
             a 3-vector, the same vMF loss. It gets exactly the pulses the hierarchical model gets.
  padded T1  IceModel itself with its own weights, except that T1 runs every DOM of the batch padded to the
             longest DOM, one dense (n_doms, L_max) attention, instead of the packed document layout; T2 as is.
             It computes the same function (checked every run: `padded_t1_max_abs_diff`).
Peak memory: on CUDA torch.cuda.max_memory_allocated over the call; on the CPU the growth of the process's
peak resident set (Linux VmHWM, reset through /proc/self/clear_refs, after gc and malloc_trim) over its
resident set before the call: everything the call allocates (activations, gradients, attention buffers),
measured around the same calls that are timed (NaN where /proc/self/clear_refs is missing: not Linux).
The step row runs step_batches micro-batches drawn at random from the packed synthetic train split with the
training budgets of config/toy_cpu.py, the same batches for all three models. The scaling row runs single
whole events (no truncation); the flat model stops at the first size whose estimated time or memory passes
flat_max_s / flat_max_gb. On the CPU scaled_dot_product_attention takes its flash kernel (also with a mask),
so the flat model's memory grows linearly and only its time quadratically.
Torch and pyarrow run `threads` threads each (1 by default, see the setting), the same for every side of a row.
"""

import ast
import copy
import ctypes
import functools
import gc
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import classical
import model as M
import prepare
import simulate
from configurator import read_config

_HERE = os.path.dirname(os.path.abspath(__file__))  # this repository: train.py, sample.py, config/, git's history

# -----------------------------------------------------------------------------
device = 'cpu'
compile = False
work_dir = 'data/bench'        # scratch: the synthetic files the rows read
out = 'bench.json'
events_per_batch = 20000       # the synthetic batch file of the prepare and reading rows
read_events = 4096             # random events read per reading measurement
max_pulses = 16384             # micro-batch budgets of the reading row
max_doms = 8192
max_events = 256
max_pulses_per_dom = 64
seed = 1337
threads = 1                    # torch threads (0 = all cores); 1 keeps one run's ratios meaningful on a shared
                               # machine, where a thread that loses its core stalls every parallel op
dtype = 'bfloat16'             # autocast dtype on CUDA ('float32' = off); the CPU always runs float32


def train_config(name):
    """The settings train.py runs with under a config file: its name in config/ ('toy_cpu') or a path to one
    ('config/my.py'), over train.py's defaults where the file leaves a setting out (those written as plain literals,
    read from train.py's source, a script that cannot be imported)."""
    defaults = {}
    with open(os.path.join(_HERE, 'train.py')) as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.ImportFrom) and node.module == 'configurator':
                break  # the end of the settings
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    defaults[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:  # device = 'cuda' if ... else 'cpu': not a literal
                    pass
    return {**defaults, **read_config(name if name.endswith('.py') else os.path.join(_HERE, 'config', f'{name}.py'))}


# the model and the training budgets of config/toy_cpu.py, read from it, so the rows measure what the toy
# run trains (the flat model's padding makes bigger budgets very slow)
_toy = train_config('toy_cpu')
t1_dim, t1_layers, t1_heads = _toy['t1_dim'], _toy['t1_layers'], _toy['t1_heads']
t2_dim, t2_layers, t2_heads = _toy['t2_dim'], _toy['t2_layers'], _toy['t2_heads']
mlp_ratio = _toy['mlp_ratio']
# training step and inference rows: micro-batches drawn at random from the packed synthetic train split
step_batches = 8
step_max_pulses, step_max_doms = _toy['max_pulses'], _toy['max_doms']
step_max_events, step_max_pulses_per_dom = _toy['max_events'], _toy['max_pulses_per_dom']
step_repeat = 2                # best of step_repeat passes over the batches
# scaling row: one synthetic event per size, whole (no truncation)
scaling_sizes = '100,1000,10000,100000'
flat_max_s = 120.0             # the flat model skips a size whose estimated step time exceeds this ...
flat_max_gb = 8.0              # ... or whose estimated peak memory exceeds this
likelihood_events = 64         # events of the inference row for the slower classical fits
# efficiency rows: each config's model and budgets (baseline_1m's divided by cpu_budget_divisor on the CPU, where its
# 65,536-pulse batches take seconds), its FLOPs, the machine's matmul rate at its widths, the loader beside it
efficiency_configs = 'toy_cpu,baseline_1m'  # names in config/ or paths to config files (config/my.py)
cpu_budget_divisor = 8
loader_batches = 16            # batches timed per loader measurement
compare_commit = ''            # a git commit (bfe73ee; HEAD: an edit against the last commit): its model.py's step on the
                               # same batches, A B, and its sample.py's model (the forward at the budgets its sample.py packs)
compare_events = 4000          # events of that sample.py comparison (divided as the budgets are where reduced)
profile = False                # the efficiency rows also profile one pass of the step (after the timed ones): where
                               # its time goes, and on CUDA how much of it the GPU was busy at all
rows = 'prepare,reading,step,scaling,inference,efficiency'  # the rows to run (scaling and inference need step)
# -----------------------------------------------------------------------------


def timed(fn, repeat=1):
    """Best wall time of `repeat` calls (the least disturbed by the rest of the machine) and the last result."""
    best, result = float('inf'), None
    for _ in range(repeat):
        if device == 'cuda':
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = fn()
        if device == 'cuda':
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, result


def make_data():
    """Two synthetic train batch files (val needs one), packed once; reused across runs of the bench. Without the
    quick fit (the improved LineFit is the stored seed): no row's time depends on which seed the events carry, and
    the fit would take a minute of a GPU check."""
    raw, packed = f"{work_dir}/raw_{events_per_batch}", f"{work_dir}/packed_{events_per_batch}"
    simulate.simulate(out_dir=raw, n_train_batches=2, n_test_batches=0, events_per_batch=events_per_batch, seed=seed)
    if not os.path.exists(f"{packed}/train/manifest.json"):
        prepare.run(raw, packed, val_batches=1, num_proc=1, log=lambda *a: None, fit_steps=0)
    return raw, packed


def bench_prepare(raw):
    src = f"{raw}/train/batch_1.parquet"
    geometry = prepare.read_geometry(raw)
    meta = next(prepare.iter_meta(f"{raw}/train_meta.parquet", prepare.META_COLUMNS))[1]
    truth = prepare.read_truth(f"{raw}/train_truth.parquet", 1, meta['event_id'])
    shard = f"{work_dir}/prepare_row/batch_1"
    os.makedirs(os.path.dirname(shard), exist_ok=True)
    t_read, table = timed(lambda: pq.read_table(src), repeat=5)

    def pack():  # without the quick fit (fit_steps=0); shard.json says how long the LineFits took (fit_seconds)
        t = time.perf_counter()
        inputs = prepare.inputs_digest(meta, truth, 'geometry')  # prepare hashes the geometry once per run, this per shard
        prepare.write_shard((src, shard, meta, truth, geometry, True, {'steps': 0, 'ice': None}, inputs))
        with open(f"{shard}/shard.json") as f:
            return time.perf_counter() - t, json.load(f)['fit_seconds']
    runs = [pack() for _ in range(5)]
    shutil.rmtree(os.path.dirname(shard))
    t_pack, t_packing = min(t for t, _ in runs), min(t - fit for t, fit in runs)
    n = table.num_rows
    return {'pulses': n, 'pyarrow_read_s': t_read, 'prepare_s': t_pack, 'packing_s': t_packing,
            'prepare_pulses_per_s': n / t_pack, 'packing_pulses_per_s': n / t_packing, 'pyarrow_read_pulses_per_s': n / t_read}


def parquet_events(raw, meta_by_event, event_ids):
    """The straightforward loader: read each batch file the events live in (filtered to those events),
    group the rows by event and sort them, giving Split.events()'s dict without its direct flags (prepare.py's work)."""
    batch_of = meta_by_event['batch_id'][np.searchsorted(meta_by_event['event_id'], event_ids)]
    parts = []
    for b in np.unique(batch_of):
        ids = event_ids[batch_of == b]
        t = pq.read_table(f"{raw}/train/batch_{b}.parquet", filters=[('event_id', 'in', ids.tolist())])
        parts.append({c: t[c].to_numpy() for c in t.column_names})  # no zero_copy_only=: pyarrow 10-12 refuse it
    cols = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
    # requested order, then (sensor, time) within each event
    rank = np.empty(len(event_ids), np.int64)
    rank[np.argsort(event_ids)] = np.arange(len(event_ids))
    pos = rank[np.searchsorted(np.sort(event_ids), cols['event_id'])]
    order = np.lexsort((cols['time'], cols['sensor_id'], pos))
    cols = {c: v[order] for c, v in cols.items()}
    pos = pos[order]
    counts = np.bincount(pos, minlength=len(event_ids))
    new_dom = np.r_[True, (np.diff(cols['sensor_id']) != 0) | (np.diff(pos) != 0)]
    dom_start = np.flatnonzero(new_dom)
    return {'sensor_id': cols['sensor_id'], 'time': cols['time'], 'charge': cols['charge'].astype(np.float32),
            'auxiliary': cols['auxiliary'], 'pulse_offsets': np.r_[0, np.cumsum(counts)],
            'dom_offsets': np.r_[dom_start, len(pos)], 'event_dom_offsets': np.r_[0, np.cumsum(np.bincount(pos[dom_start], minlength=len(event_ids)))]}


def bench_reading(raw, split):
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(split))[:read_events]
    budgets = (max_pulses, max_doms, max_events, max_pulses_per_dom)

    def packed_loader():
        pos, n_batches = 0, 0
        while pos < len(idx):
            batch, n = prepare.pack_batch(split, idx[pos:], *budgets)
            tensors = {k: torch.from_numpy(v) for k, v in batch.items() if isinstance(v, np.ndarray)}
            pos, n_batches = pos + n, n_batches + 1
        return n_batches

    meta = pq.read_table(f"{raw}/train_meta.parquet", columns=['batch_id', 'event_id', 'azimuth', 'zenith'])
    meta = {c: meta[c].to_numpy() for c in meta.column_names}
    # the seed fits and the LineFit's direct pulses are prepare.py's work, not the reader's: read ahead, untimed
    groups = [idx[pos:pos + max_events] for pos in range(0, len(idx), max_events)]
    seeds = [(split.event_records(g)[0], split.events(g)['direct']) for g in groups]

    def parquet_loader():
        # groups of max_events events with budgets wide enough to take them all: the same events and work
        for g, (fit, direct) in zip(groups, seeds):
            ids = split.event_id[g]
            e = {**parquet_events(raw, meta, ids), 'direct': direct}
            row = np.searchsorted(meta['event_id'], ids)
            labels = {'azimuth': meta['azimuth'][row], 'zenith': meta['zenith'][row], **{k: fit[k] for k in prepare.SEED_FIELDS}}
            batch = prepare.pack_events(e, labels, g, split.geometry, max(max_pulses, len(e['time'])),
                                        max(max_doms, len(e['dom_offsets'])), max_events, max_pulses_per_dom)
            tensors = {k: torch.from_numpy(v) for k, v in batch.items() if isinstance(v, np.ndarray)}
        return len(groups)

    # best of 3 each: the parquet loader's first pass also paid its first use of pyarrow's filtered reads (0.43 s of
    # 1.27 s in a fresh process, ~7% after the prepare row)
    t_packed, _ = timed(packed_loader, repeat=3)
    t_parquet, _ = timed(parquet_loader, repeat=3)
    return {'events': len(idx), 'packed_events_per_s': len(idx) / t_packed, 'parquet_events_per_s': len(idx) / t_parquet}


# -----------------------------------------------------------------------------
# peak memory

_libc = None


def _proc_status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


def peak_memory(fn):
    """Runs fn once; returns (peak bytes the call allocated above its starting point, fn's result).
    CUDA: torch.cuda.max_memory_allocated. CPU: growth of the peak resident set (VmHWM, reset through
    /proc/self/clear_refs) over the resident set before the call, freed memory first handed back to the
    system (gc, malloc_trim) so that the call cannot hide in pages the process already holds."""
    global _libc
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, result
    gc.collect()
    try:
        _libc = _libc or ctypes.CDLL('libc.so.6')
        _libc.malloc_trim(0)
    except OSError:
        pass
    if not os.path.exists('/proc/self/clear_refs'):
        return float('nan'), fn()
    base = _proc_status('VmRSS:')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # resets VmHWM to the current resident set (Linux >= 4.0)
    result = fn()
    return _proc_status('VmHWM:') - base, result


def measured(fn, repeat):
    """(best seconds of `repeat` calls, peak bytes of the last call, its result). The clock runs around fn alone, not
    around peak_memory's preparation (its gc.collect alone takes ~0.17 s once torch and the models are loaded)."""
    best = float('inf')
    for _ in range(repeat):
        peak, (t, result) = peak_memory(lambda: timed(fn))
        best = min(best, t)
    return best, peak, result


# -----------------------------------------------------------------------------
# the models of the step, scaling and inference rows

def model_args(settings, model_class=None):
    """The arguments of model_class among settings (a config's, or bench's own over config/toy_cpu.py's): all that
    it takes, so that one a fork adds to IceModel and sets in its config shapes the timed model too, where a list
    written out here left it at its default. Not attn: the device decides the layout (IceModel.path)."""
    params = inspect.signature(model_class or M.IceModel).parameters
    return {k: settings[k] for k in params if k in settings and k != 'attn'}


def new_model():
    return M.IceModel(**model_args({**_toy, **globals()})).to(device)


class PaddedT1(M.IceModel):
    """IceModel whose T1 pads every DOM to the longest DOM of the batch (one dense attention with a key mask) instead
    of attending each group of equal-length DOMs without padding."""

    def embed_doms(self, b, layout):
        D = b['dom_pos'].shape[0]
        real = b['t1_dom'] < D  # each DOM's pulses contiguous in both layouts; the flex one ends in padding (DOM D)
        dom, t1_x = b['t1_dom'][real], b['t1_x'][real]
        N = dom.shape[0]
        ar = torch.arange(N, device=dom.device)
        first = torch.ones(N, dtype=torch.bool, device=dom.device)
        first[1:] = dom[1:] != dom[:-1]
        within = ar - torch.cummax(torch.where(first, ar, 0), 0).values  # each pulse's place in its DOM
        n_dom, L = int(b['n_doms']), int(within.max()) + 1
        x = torch.zeros(n_dom, L, self.pulse_embed.out_features, device=dom.device)
        x = x.index_put((dom, within), self.pulse_embed(t1_x).float())
        valid = torch.zeros(n_dom, L, dtype=torch.bool, device=dom.device).index_put((dom, within), torch.ones_like(first))
        for blk in self.t1:
            x = FlatModel.block(blk, x, valid[:, None, None, :])
        x = (self.t1_ln(x) * valid[..., None]).sum(1) / b['dom_n_kept'][:n_dom, None].clamp(min=1)
        return torch.cat([x, x.new_zeros(D - n_dom, x.shape[1])])


def pulse_features(b):
    """IceModel's pulse features (model.pulse_features) plus the position of the pulse's DOM: (P, N_PULSE_FEATURES + 3)."""
    feats, _ = M.pulse_features(b)
    pdom = b['pulse_dom'].long()
    pos = torch.where(pdom[:, None] >= 0, b['dom_pos'].float()[pdom.clamp(min=0)], 0.0)
    return torch.cat([feats, pos / 500.0], dim=1)


class FlatModel(torch.nn.Module):
    """Transformer over all pulses of each event, events padded to the batch's longest (see the top of the file)."""

    def __init__(self, dim, layers, heads, mlp_ratio):
        super().__init__()
        self.embed = torch.nn.Linear(M.N_PULSE_FEATURES + 3, dim)  # pulse_features: IceModel's and the DOM position
        self.blocks = torch.nn.ModuleList([M.Block(dim, heads, mlp_ratio) for _ in range(layers)])
        self.ln = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, 3)

    @staticmethod
    def block(blk, x, mask):
        B, L, C = x.shape
        H = blk.n_head
        q, k, v = blk.qkv(blk.ln1(x)).view(B, L, 3, H, C // H).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + blk.proj(y.transpose(1, 2).reshape(B, L, C))
        return x + blk.fc_out(torch.nn.functional.gelu(blk.fc(blk.ln2(x))))

    def forward(self, b):
        n_p, n_ev, E = int(b['n_pulses']), int(b['n_events']), b['event_index'].shape[0]
        feats = pulse_features(b)[:n_p]  # the pulses of the batch's events fill the first n_p slots
        ev = b['dom_event'].long()[b['pulse_dom'][:n_p].long()]
        counts = torch.bincount(ev, minlength=n_ev)
        start = counts.cumsum(0) - counts
        L = int(counts.max())
        valid = torch.arange(L, device=ev.device)[None, :] < counts[:, None]
        x = torch.zeros(n_ev, L, self.embed.out_features, device=ev.device)
        x = x.index_put((ev, torch.arange(n_p, device=ev.device) - start[ev]), self.embed(feats).float())
        mask = None if bool(valid.all()) else valid[:, None, None, :]
        for blk in self.blocks:
            x = self.block(blk, x, mask)
        x = self.ln(x) * valid[..., None]
        pooled = x.sum(1) / counts[:, None]
        out = torch.zeros(E, 3, device=ev.device)
        return out.index_copy(0, torch.arange(n_ev, device=ev.device), self.head(pooled).float())


def autocast():
    on = device == 'cuda' and dtype != 'float32'
    return torch.autocast('cuda', dtype=getattr(torch, dtype), enabled=on)


def train_step(model, b):
    """Forward and backward of one micro-batch (gradients are freed again at the end). Nothing read back: like
    train.py's step it leaves the host free to queue the next one on a GPU (the timers wait for the device)."""
    with autocast():
        pred = model(b)
    loss = M.loss_fn(pred.float(), b['event_dir'], b['event_index'] >= 0)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.detach()


def pack_in_order(split, idx, budgets, max_batches=None, min_events=None):
    """The events idx packed in order into micro-batches at budgets (max_pulses, max_doms, max_events,
    max_pulses_per_dom), until max_batches of them, or until they hold min_events events, or idx runs out. Returns
    the micro-batches and how many events of idx they took (idx[:n])."""
    batches, n = [], 0
    while n < len(idx) and (max_batches is None or len(batches) < max_batches) and (min_events is None or n < min_events):
        batch, taken = prepare.pack_batch(split, idx[n:], *budgets)
        batches.append(batch)
        n += taken
    return batches, n


def step_batches_of(split):
    """The step, scaling and inference rows' micro-batches, drawn at random from the train split, and their events."""
    idx = np.random.default_rng(seed + 1).permutation(len(split))
    raw, n = pack_in_order(split, idx, (step_max_pulses, step_max_doms, step_max_events, step_max_pulses_per_dom),
                           max_batches=step_batches)
    return [M.model_inputs(r, 'flex' if device == 'cuda' else 'sdpa', device) for r in raw], idx[:n]


def step_flops(model, b):
    """FLOPs of one forward and backward, counted by torch's FlopCounterMode: the matmuls, and attention from the
    sizes of its SDPA calls (torch 2.13 has no formula for the CPU kernel; the sdpa layout has no padding, so this
    is the documents' own attention). Counted on the CPU, the same for every device."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
               aten._scaled_dot_product_flash_attention_for_cpu_backward:
                   lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v)}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        train_step(model, b)
    return counter.get_total_flops()


def matmul_rate(model, b):
    """FLOP/s of plain x @ w (bench's device and dtype) at the model's widths: every linear layer's forward shape
    (tokens, in, out) of each stream, and the two matmuls of its backward; the roofline the step is measured against."""
    dt = torch.bfloat16 if device == 'cuda' and dtype == 'bfloat16' else torch.float32
    shapes = []
    for n, dim in ((b['t1_src'].shape[0], model.args['t1_dim']), (b['t2_src'].shape[0], model.args['t2_dim'])):
        hidden = model.args['mlp_ratio'] * dim
        for k, m in ((dim, 3 * dim), (dim, dim), (dim, hidden), (hidden, dim)):
            shapes += [(n, k, m), (n, m, k), (k, n, m)]
    mats = [(torch.randn(n, k, device=device, dtype=dt), torch.randn(k, m, device=device, dtype=dt)) for n, k, m in shapes]

    def run():
        for x, w in mats:
            x @ w
    run()
    t, _ = timed(run, repeat=5)
    return sum(2 * n * k * m for n, k, m in shapes) / t


def loader_rate(split, budgets, transform):
    """Events/s of one BatchLoader (its background thread, as train.py runs it) packing and transforming batches."""
    loader = prepare.BatchLoader(split, *budgets, seed=seed, transform=transform)
    next(loader), next(loader)  # the thread's start and the first pages of the memory maps
    t = time.perf_counter()
    n = sum(next(loader)['n_events'] for _ in range(loader_batches))
    rate = n / (time.perf_counter() - t)
    loader.close()
    return rate


def git(*args):
    """git run in this repository's folder, its output captured (the comparison's older commit)."""
    import subprocess
    return subprocess.run(['git', *args], capture_output=True, text=True, cwd=_HERE)


def source_at(commit, path):
    """The text of a file of this repository at commit (`git show`)."""
    shown = git('show', f'{commit}:{path}')
    shown.check_returncode()
    return shown.stdout


def check_compare_commit(commit):
    """compare_commit named in one line at the start when git cannot give its model.py and sample.py (a typo, a
    shallow clone, a download without git's history), or its model.py has neither batch builder bench drives:
    otherwise a traceback after the other rows' minutes."""
    problem = f"bench: error: compare_commit={commit!r}"
    try:
        found = git('cat-file', '-e', f'{commit}^{{commit}}')
    except FileNotFoundError:
        raise SystemExit(f"{problem}: the comparison reads that commit through git, which is not installed here") from None
    if found.returncode:
        raise SystemExit(f"{problem}: not a commit of this repository's history ({found.stderr.strip()}); a shallow "
                         f"clone lacks older ones: git fetch --unshallow")
    for path in ('model.py', 'sample.py'):
        if git('cat-file', '-e', f'{commit}:{path}').returncode:
            raise SystemExit(f"{problem}: its tree has no {path}")
    if not re.search(r'^def (model_inputs|batch_to_tensors)\(', source_at(commit, 'model.py'), re.M):
        raise SystemExit(f"{problem}: its model.py builds no batches as bench drives them (model_inputs, or "
                         f"batch_to_tensors before it)")


def inference_budget(sample_source):
    """The factor on training's budgets at which a version of sample.py runs the model (its INFER_BUDGET; 1 in those
    from before it, which packed as training did)."""
    found = re.search(r'^INFER_BUDGET = (\d+)', sample_source, re.M)
    return int(found.group(1)) if found else 1


def old_model_module(commit):
    """model.py of an older commit, imported from `git show` (for the A B comparisons of the step and the forward)."""
    import importlib.util
    import tempfile
    src = source_at(commit, 'model.py')
    with tempfile.TemporaryDirectory() as folder:  # gone once imported: each run left one in /tmp
        path = os.path.join(folder, f'model_{commit}.py')
        with open(path, 'w') as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location(f'model_{commit}', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def old_inputs(old, old_model, raws):
    """An older commit's micro-batches from the present packer's, as that commit builds them: its own model_inputs (its
    stream layout; since 1c4d02a) or batch_to_tensors (before it, bfe73ee among them)."""
    if hasattr(old, 'model_inputs'):
        return [old.model_inputs(r, old_model.path(device), device) for r in raws]
    return [old.batch_to_tensors(r, device) for r in raws]


def forward_rate(model, batches, repeat=1):
    """Events/s of the model's forward alone, without gradients (best of repeat passes)."""
    def forward():
        with torch.inference_mode(), autocast():
            for b in batches:
                model(b)
    t, _ = timed(forward, repeat)
    return sum(int(b['n_events']) for b in batches) / t


def steps_per_s(model, batches):
    t, _ = timed(lambda: [train_step(model, b) for b in batches], repeat=1)
    return sum(int(b['n_events']) for b in batches) / t


def step_profile(model, batches, top=10):
    """Where the step's time goes: one pass over the batches under torch.profiler. Returns the pass's wall time, the
    busy time (on CUDA the kernels' time on the GPU; on the CPU the ops' own time) and the top ops by it. On CUDA a
    busy share well below 1 means the GPU waits for the host (kernel launches, the loader), which CUDA graphs
    (train.py's compile_mode='reduce-overhead') or larger micro-batches address; near 1, the kernels themselves. The
    profiler adds its own cost to each op on the host, so the share is a lower bound (the rates are timed without it)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    cuda = device == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        wall, _ = timed(lambda: [train_step(model, b) for b in batches])
    # the kernels (CUDA) or the CPU ops, each counted once by its own time, as torch's table totals them
    ops = [e for e in prof.key_averages() if not e.is_user_annotation
           and (e.device_type == DeviceType.CUDA if cuda else e.self_cpu_time_total > 0)]
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    busy = sum(own(e) for e in ops) / 1e6
    if not busy:  # on CUDA without CUPTI the profiler sees no kernels: a 0% busy GPU would read as a finding
        raise RuntimeError(f"the profiler recorded no {'GPU kernels' if cuda else 'CPU ops'}")
    ops.sort(key=own, reverse=True)
    return {'wall_s': wall, 'busy_s': busy, 'busy_share': busy / wall, 'what': 'GPU kernels' if cuda else 'CPU ops',
            'top': [{'name': e.key, 'calls': e.count, 'share': own(e) / 1e6 / busy} for e in ops[:top]]}


def bench_efficiency(name, split):
    """One config's step as a share of the machine's matmul rate, and its loader's events/s beside it. Each figure is
    printed as it is measured, the step's events/s first and the FLOP count after the rates: a run stopped by its time
    limit (tests/gpu_check.sh's bench stage, after the compile) still leaves in its log what it had."""
    cfg = train_config(name)
    divisor = cpu_budget_divisor if device == 'cpu' and cfg.get('device', 'cuda') != 'cpu' else 1
    budgets = (cfg['max_pulses'] // divisor, cfg['max_doms'] // divisor, max(cfg['max_events'] // divisor, 1),
               cfg['max_pulses_per_dom'])
    args = model_args(cfg)
    torch.manual_seed(seed)
    model = M.IceModel(**args)
    counted = copy.deepcopy(model)  # FLOPs are counted on the CPU (step_flops), whatever the device
    idx = np.random.default_rng(seed + 3).permutation(len(split))
    raw, _ = pack_in_order(split, idx, budgets, max_batches=step_batches)
    path = model.path(device)
    batches = [M.model_inputs(r, path, device) for r in raw]  # as train.py runs it: the features in the forward
    network = [M.model_inputs(r, path, device, with_features=True) for r in raw]  # the features already done
    model.to(device)
    timed_model = torch.compile(model) if compile else model

    def say(what):
        print(f"bench: efficiency {name}: {what}", flush=True)
    warmup_s, _ = timed(lambda: [train_step(timed_model, b) for b in batches[:2]])  # (and the compile)
    say(f"budgets {'/'.join(map(str, budgets))}, {sum(int(r['n_events']) for r in raw):,} events in {len(raw)} "
        f"micro-batches; the first two {warmup_s:.1f} s" + (" (the compile)" if compile else ""))
    rate = max(steps_per_s(timed_model, batches) for _ in range(step_repeat))
    say(f"step {rate:,.0f} events/s")
    roof = matmul_rate(model, batches[0])
    say(f"matmul at the model's widths {roof / 1e9:,.1f} GFLOP/s")
    # the loader at the config's full budgets, as train.py runs it on that config's device
    full = (cfg['max_pulses'], cfg['max_doms'], cfg['max_events'], cfg['max_pulses_per_dom'])
    path_full = model.path(cfg.get('device', 'cuda'))  # the layout train.py builds on that config's device
    loader = loader_rate(split, full, functools.partial(M.model_inputs, path=path_full))
    say(f"loader {loader:,.0f} events/s per rank, {loader / rate:.1f}x the step")
    # counted on every batch that is timed: FLOP/event varies from batch to batch (toy_cpu's first two came to 61M, all
    # eight to 50M)
    flops = sum(step_flops(counted, M.model_inputs(r, 'sdpa')) for r in raw) / sum(int(r['n_events']) for r in raw)
    say(f"{flops / 1e6:,.0f} MFLOP/event, {flops * rate / 1e9:,.1f} GFLOP/s, {flops * rate / roof:.0%} of the matmul rate")
    train_step(timed_model, network[0])  # warm-up (a graph of its own when compiled)
    network_rate = max(steps_per_s(timed_model, network) for _ in range(step_repeat))
    say(f"the network alone (the features done ahead) {network_rate:,.0f} events/s")
    out = {'budgets': list(budgets), 'budget_divisor': divisor, 'params': model.num_params(), 'flops_per_event': flops,
           'events_per_s': rate, 'warmup_s': warmup_s, 'network_events_per_s': network_rate, 'flops_per_s': flops * rate,
           'matmul_flops_per_s': roof, 'share_of_matmul': flops * rate / roof, 'loader_budgets': list(full),
           'loader_path': path_full, 'loader_events_per_s': loader}
    if profile:  # last, once every figure above is in: a profiler that fails (no CUPTI on a GPU node) is named, not fatal
        try:
            out['profile'] = step_profile(timed_model, batches)
        except RuntimeError as e:
            out['profile'] = {'error': f"{type(e).__name__}: {e}"}
    if compare_commit:
        old = old_model_module(compare_commit)
        torch.manual_seed(seed)
        old_model = old.IceModel(**model_args(args, old.IceModel)).to(device)  # the arguments it has
        old_batches = old_inputs(old, old_model, raw)
        train_step(old_model, old_batches[0])
        ab = {'old': [], 'new': [], 'new_network': []}
        for _ in range(max(step_repeat, 3)):  # A B A B: the machine's speed drifts between passes
            ab['old'].append(steps_per_s(old_model, old_batches))
            ab['new'].append(steps_per_s(timed_model, batches))
            ab['new_network'].append(steps_per_s(timed_model, network))
        # the median of each pass's ratio: on a noisy machine the ratio of each side's best pass strays further (the
        # same code against itself came out 1.075x that way, 1.015x this way; notes, section 10)
        old_rate = np.array(ab['old'])
        out['compare'] = {'commit': compare_commit, **{k: max(v) for k, v in ab.items()}, 'passes': len(old_rate),
                          'step_ratio': float(np.median(np.array(ab['new']) / old_rate)),
                          'network_ratio': float(np.median(np.array(ab['new_network']) / old_rate))}
        say(f"{out['compare']['step_ratio']:.2f}x {compare_commit}'s step, median of {len(old_rate)} A B passes")
        # sample.py's model: the forward alone (no gradients) on the same events, each commit's at the budgets its
        # sample.py packs (bfe73ee's training's, the present INFER_BUDGET times them), uncompiled as sample.py runs
        with open(os.path.join(_HERE, 'sample.py')) as f:
            factors = {'new': inference_budget(f.read()), 'old': inference_budget(source_at(compare_commit, 'sample.py'))}
        scaled = {side: [b * f for b in budgets[:3]] + [budgets[3]] for side, f in factors.items()}
        # whole micro-batches up to compare_events events, which the old side packs too
        new_raw, n_inference = pack_in_order(split, idx, scaled['new'], min_events=max(compare_events // divisor, 1))
        old_raw, _ = pack_in_order(split, idx[:n_inference], scaled['old'])
        packed = {'new': [M.model_inputs(r, path, device) for r in new_raw],
                  'old': old_inputs(old, old_model, old_raw)}
        rates = {'new': [], 'old': []}
        forward_rate(model, packed['new'][:1])  # warm-up
        forward_rate(old_model, packed['old'][:1])
        for _ in range(max(step_repeat, 3)):
            for side, m in (('old', old_model), ('new', model)):
                rates[side].append(forward_rate(m, packed[side]))
        out['compare'].update(
            inference_events=n_inference, inference_budget_factors=[factors['old'], factors['new']],
            inference_old_events_per_s=max(rates['old']), inference_events_per_s=max(rates['new']),
            inference_ratio=float(np.median(np.array(rates['new']) / np.array(rates['old']))))
        say(f"sample.py's model {out['compare']['inference_ratio']:.2f}x {compare_commit}'s on the same {n_inference:,} "
            f"events, each at its sample.py's budgets ({factors['new']}x and {factors['old']}x training's), median of "
            f"{len(rates['old'])} A B passes")
    return out


def bench_step(batches):
    torch.manual_seed(seed)
    hier = new_model()
    padded = PaddedT1(**hier.args).to(device)
    padded.load_state_dict(hier.state_dict())
    flat = FlatModel(t2_dim, t1_layers + t2_layers, t2_heads, mlp_ratio).to(device)
    with torch.no_grad():
        diff = float((hier(batches[0]) - padded(batches[0])).abs().max())
    models = {'hier': torch.compile(hier) if compile else hier, 'flat': flat, 'padded_t1': padded}
    if compile:
        for b in batches:
            train_step(models['hier'], b)  # compile before the clock starts
    n_events = sum(int(b['n_events']) for b in batches)
    out = {'batches': len(batches), 'events': n_events, 'pulses': sum(int(b['n_pulses']) for b in batches),
           'longest_event': max(int(b['event_n_pulses'].max()) for b in batches),
           'budgets': [step_max_pulses, step_max_doms, step_max_events, step_max_pulses_per_dom],
           'params': {k: sum(p.numel() for p in m.parameters()) for k, m in (('hier', hier), ('flat', flat))},
           'padded_t1_max_abs_diff': diff}
    for name, m in models.items():
        train_step(m, batches[0])  # warm-up
        t_sum, peaks = 0.0, []
        for b in batches:
            t, p, _ = measured(lambda: train_step(m, b), step_repeat)
            t_sum, peaks = t_sum + t, peaks + [p]
        # np.max keeps peak_memory's NaN where no /proc measures it (max(0, nan) was 0 MB)
        out[name] = {'s': t_sum, 'events_per_s': n_events / t_sum, 'peak_mb': float(np.max(peaks)) / 2**20}
    return out, hier


def scaling_event(n, rng, geometry):
    """One synthetic event of n pulses: n_doms ~ 5.85 n^0.513 DOMs (through real data's 49 DOMs at 63 pulses and
    2,256 at 110,000), every DOM one pulse plus a heavy-tailed (Pareto, alpha 2) share of the rest. As split.events(),
    but for the direct flags (the caller's prepare.linefit_seeds)."""
    n_doms = int(min(n, len(geometry), round(5.85 * n ** 0.513)))
    w = rng.pareto(2.0, n_doms) + 1e-3  # Lomax(2): a 100,000-pulse event has DOMs of a few thousand pulses
    sizes = 1 + rng.multinomial(n - n_doms, w / w.sum())
    sensors = np.sort(rng.choice(len(geometry), n_doms, replace=False))
    dom = np.repeat(np.arange(n_doms), sizes)
    time = 10000 + rng.integers(0, 20000, n)
    order = np.lexsort((time, dom))
    return {'sensor_id': sensors[dom].astype(np.int16), 'time': time[order].astype(np.int64),
            'charge': (np.round(rng.exponential(1.0, n) / 0.025 + 1) * 0.025).astype(np.float32),
            'auxiliary': rng.random(n) < 0.28, 'pulse_offsets': np.array([0, n]),
            'dom_offsets': np.r_[0, np.cumsum(sizes)], 'event_dom_offsets': np.array([0, n_doms])}, sizes


def bench_scaling(hier, geometry):
    torch.manual_seed(seed)
    flat = FlatModel(t2_dim, t1_layers + t2_layers, t2_heads, mlp_ratio).to(device)
    rng = np.random.default_rng(seed + 2)
    rows, flat_done = [], []  # (pulses, seconds, peak bytes) of the flat sizes that ran
    for n in sorted({int(s) for s in str(scaling_sizes).split(',') if s.strip()}):  # the estimates read the largest last
        e, sizes = scaling_event(n, rng, geometry)
        columns, e['direct'] = prepare.linefit_seeds(e, geometry)  # prepare.py's work, stored with an event
        labels = {'azimuth': [1.0], 'zenith': [1.0], 'fit_azimuth': [1.0], 'fit_zenith': [1.0], 'fit_rlogl': [1.0], **columns}
        batch = prepare.pack_events(e, labels, np.array([0]), geometry, n, len(sizes), 1,
                                    int(sizes.max()))
        b = M.model_inputs(batch, hier.path(device), device, with_features=False)  # features inside the step, as the flat model's
        row = {'n_pulses': n, 'n_doms': len(sizes), 'max_dom_pulses': int(sizes.max()),
               'kept_pulses': int(b['n_pulses'])}
        for name, m in (('hier', hier), ('flat', flat)):
            if name == 'flat' and flat_done:
                # time ~ n^2 from the largest size that ran, memory ~ n: attention's share of the time grows with n,
                # so an exponent fitted to smaller sizes runs low (1,000 -> 10,000 pulses gave 1.3, 10,000 -> 100,000
                # then took 2.0: a 118 s estimate ran for 393 s); n^2 bounds it from above
                n0, t0, p0 = flat_done[-1]
                k = 2.0
                est_s = t0 * (n / n0) ** k
                est_gb = p0 * (n / n0) / 2**30
                if est_s > flat_max_s or est_gb > flat_max_gb:
                    why = f"time ~{est_s:,.0f} s > {flat_max_s:g}" if est_s > flat_max_s else f"memory ~{est_gb:.1f} GB > {flat_max_gb:g}"
                    score_gb = t2_heads * n * n * 4 / 2**30
                    row[name] = {'skipped': f"estimated {why} (from {n0:,} pulses: time ~ n^{k:.2f}, memory ~ n); "
                                            f"materialised attention scores would take {score_gb:,.1f} GB per layer",
                                 'estimated_s': est_s, 'estimated_gb': est_gb, 'time_exponent': k,
                                 'score_matrix_gb': score_gb}
                    continue
            t1, p, _ = measured(lambda: train_step(m, b), 1)  # first call: warm-up and a time estimate
            t, p2, _ = measured(lambda: train_step(m, b), 3 if t1 < 1 else 1)
            row[name] = {'s': t, 'peak_mb': max(p, p2) / 2**20}
            if name == 'flat':
                flat_done.append((n, t, max(p, p2)))
        rows.append(row)
    return rows


def bench_inference(split, batches, idx, hier):
    hier.eval()
    n_events = sum(int(b['n_events']) for b in batches)
    forward_rate(hier, batches)  # warm-up
    model_rate = forward_rate(hier, batches, repeat=3)
    hier.train()
    e = split.events(idx)
    geometry = split.geometry
    t_lf, _ = timed(lambda: classical.linefit(geometry[e['sensor_id']], e['time'], e['pulse_offsets']), repeat=3)
    out = {'events': n_events, 'model_events_per_s': model_rate, 'linefit_events_per_s': len(idx) / t_lf}
    small = idx[:likelihood_events]
    es = split.events(small)
    for method in ('linefit_improved', 'mpe'):
        if not hasattr(classical, 'reconstruct') or method not in getattr(classical, 'METHODS', ()):
            out[method] = {'skipped': 'not in classical.py'}
            continue
        # warm-up on two events: linefit_improved's first call on the 64 took 14 ms, the next ones 4 ms (the scaling
        # row's LineFits had warmed it, a run without that row not)
        classical.reconstruct(method, split.events(small[:2]), geometry)
        t, _ = timed(lambda: classical.reconstruct(method, es, geometry), repeat=1)
        out[method] = {'events': len(small), 'events_per_s': len(small) / t}
    return out


def ratio_at(scaling, n_want):
    """(size, flat time / hier time, flat memory / hier memory) at n_want pulses, or at the largest size that
    both models ran when n_want is not among them (tiny test runs)."""
    both = [r for r in scaling if 's' in r['flat']]
    pick = [r for r in both if r['n_pulses'] == n_want] or both[-1:]
    if not pick:
        return None, float('nan'), float('nan')
    r = pick[0]
    return r['n_pulses'], r['flat']['s'] / r['hier']['s'], r['flat']['peak_mb'] / max(r['hier']['peak_mb'], 1e-9)


def main():
    from configurator import check_device, check_ranges, configure
    config = configure(globals())
    check_ranges('bench', globals(), at_least=dict(
        events_per_batch=1, read_events=1, max_pulses=1, max_doms=1, max_events=1, max_pulses_per_dom=1, threads=0,
        t1_dim=1, t1_layers=0, t1_heads=1, t2_dim=1, t2_layers=1, t2_heads=1, mlp_ratio=1, step_batches=1,
        step_max_pulses=1, step_max_doms=1, step_max_events=1, step_max_pulses_per_dom=1, step_repeat=1,
        flat_max_s=0.0, flat_max_gb=0.0, likelihood_events=1, cpu_budget_divisor=1, loader_batches=1),
        choices=dict(dtype=('float32', 'bfloat16')),
        more=[f"scaling_sizes={scaling_sizes!r} (pulse counts, comma-separated, each at least 1)"]
        if not all(x.strip().isdigit() and int(x) >= 1 for x in scaling_sizes.split(',') if x.strip()) else [])
    check_device('bench', device)
    torch.manual_seed(seed)
    # every side of every row gets the same threads: torch's and pyarrow's alike (one thread each by default),
    # so a ratio compares the code, not how many cores each library grabs
    torch.set_num_threads(threads or os.cpu_count())
    pa.set_cpu_count(threads or os.cpu_count())
    # model._flex_compiled keeps its shapes static (one graph per budget, as training wants), but here every scaling
    # size and every efficiency config is a new shape: past dynamo's default of 8 recompiles it would fall back to
    # uncompiled flex_attention, which materialises the scores (100,000^2 per head at the largest size)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    t_start = time.time()
    todo = set(rows.split(','))
    unknown = todo - {'prepare', 'reading', 'step', 'scaling', 'inference', 'efficiency'}
    if unknown or todo & {'scaling', 'inference'} and 'step' not in todo:
        raise SystemExit(f"bench: error: rows={rows!r}: the rows are prepare, reading, step, scaling, inference and "
                         f"efficiency" + (f", not {', '.join(sorted(unknown))}" if unknown else "; scaling and inference need step"))
    if compare_commit and 'efficiency' not in todo:
        raise SystemExit(f"bench: error: compare_commit={compare_commit!r} compares in the efficiency row, which "
                         f"rows={rows!r} leaves out")
    if compare_commit and compile:  # the older commit's step runs eager, and its ratio would mean compiled vs eager
        raise SystemExit(f"bench: error: compare_commit={compare_commit!r} times that commit's step eager: with "
                         f"compile=True its ratio would compare a compiled step with an eager one; run it with compile=False")
    if compare_commit:
        check_compare_commit(compare_commit)
    try:  # named now in one line: out was a traceback after all the rows' minutes, work_dir one at once
        os.makedirs(work_dir, exist_ok=True)
        open(out + '.tmp', 'w').close()
        os.remove(out + '.tmp')
    except OSError as e:
        raise SystemExit(f"bench: error: {e.filename}: cannot write it ({e.strerror}); give a work_dir and an out "
                         f"you can write") from None
    raw, packed = make_data()
    split = prepare.open_split(f"{packed}/train")  # the reading, step and efficiency rows' events
    results = {'config': config, 'machine': {'device': device, 'cpus': os.cpu_count(), 'threads': torch.get_num_threads(),
                                             'torch': torch.__version__,
                                             'memory': 'torch.cuda.max_memory_allocated' if device == 'cuda' else
                                             'peak resident set growth (VmHWM after clear_refs)'}}
    r, q, table = results, {}, []
    if 'prepare' in todo:
        p = r['prepare'] = bench_prepare(raw)
        q['prepare_over_pyarrow_read'] = p['prepare_s'] / p['pyarrow_read_s']
        q['packing_over_pyarrow_read'] = p['packing_s'] / p['pyarrow_read_s']
        table.append(('prepare', f"{p['prepare_pulses_per_s'] / 1e6:.2f}M pulses/s ({p['packing_pulses_per_s'] / 1e6:.2f}M the packing alone)",
                      f"pyarrow read {p['pyarrow_read_pulses_per_s'] / 1e6:.1f}M pulses/s",
                      f"{q['packing_over_pyarrow_read']:.2f}x the read time for the packing (goal <= 5), "
                      f"{q['prepare_over_pyarrow_read']:.1f}x with the LineFits"))
    if 'reading' in todo:
        rd = r['reading'] = bench_reading(raw, split)
        q['reading_vs_parquet'] = rd['packed_events_per_s'] / rd['parquet_events_per_s']
        table.append(('reading', f"{rd['packed_events_per_s']:,.0f} events/s", f"parquet loader {rd['parquet_events_per_s']:,.0f} events/s",
                      f"{q['reading_vs_parquet']:.1f}x faster (goal >= 20)"))
    if 'step' in todo:  # (scaling and inference need it)
        batches, idx = step_batches_of(split)
        st, hier = bench_step(batches)
        r['step'] = st
        q.update(step_vs_flat_realistic=st['hier']['events_per_s'] / st['flat']['events_per_s'],
                 step_vs_padded_t1_realistic=st['hier']['events_per_s'] / st['padded_t1']['events_per_s'],
                 step_memory_flat_over_hier_realistic=st['flat']['peak_mb'] / max(st['hier']['peak_mb'], 1e-9),
                 step_memory_padded_t1_over_hier_realistic=st['padded_t1']['peak_mb'] / max(st['hier']['peak_mb'], 1e-9))
        table += [('step', f"{st['hier']['events_per_s']:,.0f} events/s, {st['hier']['peak_mb']:,.0f} MB",
                   f"flat {st['flat']['events_per_s']:,.1f} events/s, {st['flat']['peak_mb']:,.0f} MB",
                   f"{q['step_vs_flat_realistic']:.1f}x faster (goal >= 1), {q['step_memory_flat_over_hier_realistic']:.1f}x less memory"),
                  ('', '', f"padded T1 {st['padded_t1']['events_per_s']:,.0f} events/s, {st['padded_t1']['peak_mb']:,.0f} MB",
                   f"{q['step_vs_padded_t1_realistic']:.1f}x faster, {q['step_memory_padded_t1_over_hier_realistic']:.1f}x less memory")]
    if 'scaling' in todo:
        sc = r['scaling'] = bench_scaling(hier, split.geometry)
        n10k, t10k, m10k = ratio_at(sc, 10000)
        hm = [(x['n_pulses'], x['hier']['peak_mb']) for x in sc if x['hier']['peak_mb'] > 0]
        # d log(memory) / d log(pulses) of the hierarchical step between the two largest sizes (1 = linear)
        q.update(step_vs_flat_10k=t10k, step_vs_flat_10k_pulses=n10k,  # 10,000 unless the scaling sizes leave it out
                 memory_flat_over_hier_10k=m10k,
                 hier_memory_exponent=(math.log(hm[-1][1] / hm[-2][1]) / math.log(hm[-1][0] / hm[-2][0])
                                       if len(hm) >= 2 else float('nan')))
        for x in sc:
            h, f = x['hier'], x['flat']
            label = f"{x['n_pulses']:,} pulses / {x['n_doms']:,} DOMs"
            if 's' in f:
                table.append(('scaling', f"{h['s'] * 1e3:,.0f} ms, {h['peak_mb']:,.0f} MB  {label}", f"flat {f['s'] * 1e3:,.0f} ms, {f['peak_mb']:,.0f} MB",
                              f"{f['s'] / h['s']:.1f}x faster" + (" (goal >= 10)" if x['n_pulses'] == 10000 else "")))
            else:
                table.append(('scaling', f"{h['s'] * 1e3:,.0f} ms, {h['peak_mb']:,.0f} MB  {label}", "flat skipped", f['skipped']))
    if 'inference' in todo:
        inf = r['inference'] = bench_inference(split, batches, idx, hier)
        q['inference_vs_linefit'] = inf['model_events_per_s'] / inf['linefit_events_per_s']
        lik = ', '.join(f"{m} {inf[m]['events_per_s']:,.0f}" for m in ('linefit_improved', 'mpe') if 'events_per_s' in inf[m])
        table.append(('inference', f"{inf['model_events_per_s']:,.0f} events/s",
                      f"LineFit {inf['linefit_events_per_s']:,.0f} events/s" + (f"; {lik}" if lik else ""),
                      f"{q['inference_vs_linefit']:.3f}x LineFit's rate"))
    if 'efficiency' in todo:
        r['efficiency'] = {name: bench_efficiency(name, split) for name in efficiency_configs.split(',') if name}
    results['ratios'] = q
    for name, e in results.get('efficiency', {}).items():
        cmp = e.get('compare')
        table.append(('efficiency', f"{name}: {e['events_per_s']:,.0f} events/s, {e['flops_per_event'] / 1e6:,.0f} MFLOP/event, "
                      f"{e['flops_per_s'] / 1e9:,.1f} GFLOP/s", f"matmul at its widths {e['matmul_flops_per_s'] / 1e9:,.1f} GFLOP/s",
                      f"{e['share_of_matmul']:.0%} of it; budgets {'/'.join(map(str, e['budgets']))}"
                      + (f"; {cmp['step_ratio']:.2f}x {cmp['commit']}'s step ({cmp['network_ratio']:.2f}x with the features done ahead), "
                         f"sample.py's model {cmp['inference_ratio']:.2f}x its" if cmp else '')))
        table.append(('', '', f"loader {e['loader_events_per_s']:,.0f} events/s per rank",
                      f"{e['loader_events_per_s'] / e['events_per_s']:.1f}x the step" + (
                          '' if e['budget_divisor'] == 1 else " at the reduced budget (the step on a GPU is the one that counts)")
                      + f"; budgets {'/'.join(map(str, e['loader_budgets']))}, {e['loader_path']} layout"))
    w1, w2 = max(len(x[1]) for x in table) + 2, max(len(x[2]) for x in table) + 2
    print(f"\n{'row':<10} {'iceaggr':<{w1}} {'naive alternative':<{w2}} ratio")
    for row in table:
        print(f"{row[0]:<10} {row[1]:<{w1}} {row[2]:<{w2}} {row[3]}")
    if 'scaling' in todo:
        print(f"hierarchical step memory ~ pulses^{q['hier_memory_exponent']:.2f} between the two largest scaling sizes; ", end='')
    print(f"memory: {results['machine']['memory']}; device {device}, {torch.get_num_threads()} threads")
    for name, e in results.get('efficiency', {}).items():
        p = e.get('profile', {})
        if 'error' in p:
            print(f"\n{name}'s step could not be profiled: {p['error']}")
        elif p:
            print(f"\n{name}'s step profiled, one pass of {step_batches} micro-batches: {p['wall_s'] * 1e3:,.0f} ms, of it "
                  f"{p['busy_share']:.0%} in {p['what']}; their largest shares:")
            for op in p['top']:
                print(f"  {op['share']:6.1%} {op['calls']:7,} calls  {op['name'][:100]}")
    try:
        with open(out + '.tmp', 'w') as f:  # renamed into place: a full disk leaves the previous out whole
            json.dump(results, f, indent=1)
        os.replace(out + '.tmp', out)
    except OSError as e:
        if os.path.exists(out + '.tmp'):
            os.remove(out + '.tmp')
        raise SystemExit(f"bench: error: {out}: cannot write it ({e.strerror}); free some space and re-run") from None
    print(f"\nbench: wrote {out} in {time.time() - t_start:.0f}s")

if __name__ == '__main__':
    signal.signal(signal.SIGTERM, simulate.stop)  # Ctrl-C too: one line, its simulation's and prepare's workers ended
    signal.signal(signal.SIGINT, simulate.stop)
    try:
        main()
    except simulate.Stopped as e:
        print(f"bench: stopped by {signal.Signals(e.code - 128).name}; {out} not written", file=sys.stderr)
        raise
