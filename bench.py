"""
Measured throughput and scaling, each row beside its naive alternative, in one run on the same inputs
(so the ratios hold on a noisy machine). Prints one table and writes bench.json.

    python bench.py                      # CPU, the sizes in the settings below
    python bench.py --device=cuda        # FlexAttention, bf16 (and compile=True for torch.compile)

Rows:
  prepare    pulses/s of prepare.py packing one synthetic batch file, beside pyarrow's bare read of it
  reading    events/s from the packed shards to a ready micro-batch of model tensors, beside a
             straightforward parquet loader (read the batch file, group rows by event, same tensors)
  step       events/s and peak memory of forward + backward: hierarchical model, a flat transformer of the
             same width and depth over all pulses of each event, and T1 with every DOM padded
  scaling    single events of 100 .. 100,000 pulses, hierarchical against flat
  inference  events/s of the model beside LineFit (and the likelihood fit where classical.py has one)
"""

import json
import os
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import torch

import prepare
import simulate

# -----------------------------------------------------------------------------
device = 'cpu'
compile = False
work_dir = 'data/bench'        # scratch: the synthetic files the rows read
out = 'bench.json'
events_per_batch = 20000       # the synthetic batch file of the prepare and reading rows
read_events = 4096             # random events read per reading measurement
max_pulses = 16384             # micro-batch budgets (as in config/toy_cpu.py)
max_doms = 8192
max_events = 256
max_pulses_per_dom = 64
seed = 1337
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
    """Two synthetic train batch files (val needs one), packed once; reused across runs of the bench."""
    raw, packed = f"{work_dir}/raw_{events_per_batch}", f"{work_dir}/packed_{events_per_batch}"
    simulate.simulate(out_dir=raw, n_train_batches=2, n_test_batches=0, events_per_batch=events_per_batch, seed=seed)
    if not os.path.exists(f"{packed}/train/manifest.json"):
        prepare.run(raw, packed, val_batches=1, num_proc=1, log=lambda *a: None)
    return raw, packed


def bench_prepare(raw):
    src = f"{raw}/train/batch_1.parquet"
    geometry = prepare.read_geometry(raw)
    meta = next(prepare.iter_meta(f"{raw}/train_meta.parquet", prepare.META_COLUMNS))[1]
    truth = prepare.read_truth(f"{raw}/train_truth.parquet", 1, meta['event_id'])
    shard = f"{work_dir}/prepare_row/batch_1"
    os.makedirs(os.path.dirname(shard), exist_ok=True)
    t_read, table = timed(lambda: pq.read_table(src), repeat=5)
    t_pack, _ = timed(lambda: prepare.write_shard((src, shard, meta, truth, geometry, True)), repeat=5)
    shutil.rmtree(os.path.dirname(shard))
    n = table.num_rows
    return {'pulses': n, 'pyarrow_read_s': t_read, 'prepare_s': t_pack,
            'prepare_pulses_per_s': n / t_pack, 'pyarrow_read_pulses_per_s': n / t_read}


def parquet_events(raw, meta_by_event, event_ids):
    """The straightforward loader: read each batch file the events live in (filtered to those events),
    group the rows by event and sort them, giving the same dict as Split.events()."""
    batch_of = meta_by_event['batch_id'][np.searchsorted(meta_by_event['event_id'], event_ids)]
    parts = []
    for b in np.unique(batch_of):
        ids = event_ids[batch_of == b]
        t = pq.read_table(f"{raw}/train/batch_{b}.parquet", filters=[('event_id', 'in', ids.tolist())])
        parts.append({c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names})
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


def bench_reading(raw, packed):
    split = prepare.open_split(f"{packed}/train")
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

    def parquet_loader():
        # groups of max_events events with budgets wide enough to take them all: the same events and work
        pos, n_batches = 0, 0
        while pos < len(idx):
            ids = split.event_id[idx[pos:pos + max_events]]
            e = parquet_events(raw, meta, ids)
            row = np.searchsorted(meta['event_id'], ids)
            batch = prepare.pack_events(e, meta['azimuth'][row], meta['zenith'][row], idx[pos:pos + max_events],
                                        split.geometry, max(max_pulses, len(e['time'])), max(max_doms, len(e['dom_offsets'])),
                                        max_events, max_pulses_per_dom)
            tensors = {k: torch.from_numpy(v) for k, v in batch.items() if isinstance(v, np.ndarray)}
            pos, n_batches = pos + max_events, n_batches + 1
        return n_batches

    t_packed, _ = timed(packed_loader, repeat=3)
    t_parquet, _ = timed(parquet_loader, repeat=1)
    return {'events': len(idx), 'packed_events_per_s': len(idx) / t_packed, 'parquet_events_per_s': len(idx) / t_parquet}


def main():
    from configurator import configure
    config = configure(globals())
    torch.manual_seed(seed)
    t_start = time.time()
    raw, packed = make_data()
    results = {'config': config, 'machine': {'device': device, 'cpus': os.cpu_count(), 'torch': torch.__version__}}
    results['prepare'] = bench_prepare(raw)
    results['reading'] = bench_reading(raw, packed)
    r = results
    results['ratios'] = {
        'prepare_over_pyarrow_read': r['prepare']['prepare_s'] / r['prepare']['pyarrow_read_s'],
        'reading_vs_parquet': r['reading']['packed_events_per_s'] / r['reading']['parquet_events_per_s'],
    }
    rows = [
        ('prepare', f"{r['prepare']['prepare_pulses_per_s'] / 1e6:.2f}M pulses/s", f"pyarrow read {r['prepare']['pyarrow_read_pulses_per_s'] / 1e6:.1f}M pulses/s",
         f"{results['ratios']['prepare_over_pyarrow_read']:.2f}x the read time (goal <= 5)"),
        ('reading', f"{r['reading']['packed_events_per_s']:,.0f} events/s", f"parquet loader {r['reading']['parquet_events_per_s']:,.0f} events/s",
         f"{results['ratios']['reading_vs_parquet']:.1f}x faster (goal >= 20)"),
    ]
    print(f"\n{'row':<10} {'iceaggr':<26} {'naive alternative':<34} ratio")
    for row in rows:
        print(f"{row[0]:<10} {row[1]:<26} {row[2]:<34} {row[3]}")
    with open(out, 'w') as f:
        json.dump(results, f, indent=1)
    print(f"\nbench: wrote {out} in {time.time() - t_start:.0f}s")


if __name__ == '__main__':
    main()
