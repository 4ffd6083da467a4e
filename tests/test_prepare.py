"""prepare.py: every pulse round-trips, resume after interruption, the reader and batcher, and bad input."""

import errno
import glob
import json
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import classical
import prepare
from conftest import with_linefits
from prepare import PrepareError, open_split, pack_batch, BatchLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_raw(path, n_train=3, n_test=1, events=40, seed=0, truth=True):
    """A small random data set in the Kaggle layout, independent of simulate.py, with awkward cases:
    pulses out of (sensor, time) order, ties, big DOMs, a time span over 65,535 ns."""
    rng = np.random.default_rng(seed)
    os.makedirs(f"{path}/train")
    os.makedirs(f"{path}/test")
    n_sensors = 5160
    geo = np.c_[np.arange(n_sensors), rng.normal(0, 300, (n_sensors, 3)).round(2)]
    with open(f"{path}/sensor_geometry.csv", 'w') as f:
        f.write("sensor_id,x,y,z\n" + "\n".join(f"{int(r[0])},{r[1]},{r[2]},{r[3]}" for r in geo) + "\n")
    next_id = 100
    for part, n_batches, first_batch in [('train', n_train, 1), ('test', n_test, n_train + 1)]:
        metas, truths = [], []
        for b in range(first_batch, first_batch + n_batches):
            counts = rng.integers(1, 60, events)
            counts[0] = 400  # one DOM-heavy event
            ids = next_id + np.cumsum(rng.integers(1, 5, events))
            next_id = int(ids[-1]) + 1
            rows = counts.sum()
            event = np.repeat(ids, counts)
            sensor = rng.integers(0, n_sensors, rows).astype(np.int16)
            sensor[:300] = rng.integers(0, 3, 300)  # many pulses on a few DOMs
            t = rng.integers(5000, 20000, rows)
            t[5] = 90000  # span over 65,535 ns
            t[7] = t[8]  # a tie
            charge = (np.round(rng.exponential(1.5, rows) / 0.025) * 0.025).astype(np.float16).astype(np.float64)
            aux = rng.random(rows) < 0.3
            pq.write_table(pa.table({'event_id': event, 'sensor_id': sensor, 'time': t, 'charge': charge, 'auxiliary': aux}),
                           f"{path}/{part}/batch_{b}.parquet")
            last = np.cumsum(counts) - 1
            meta = {'batch_id': np.full(events, b), 'event_id': ids, 'first_pulse_index': last - counts + 1, 'last_pulse_index': last}
            if part == 'train':
                meta['azimuth'] = rng.uniform(0, 2 * np.pi, events)
                meta['zenith'] = np.arccos(rng.uniform(-1, 1, events))
            metas.append(pa.table(meta))
            truths.append(pa.table({'event_id': ids, 'batch_id': np.full(events, b), 'energy': rng.uniform(100, 1e6, events),
                                    'kind': rng.choice(['track', 'cascade'], events), 'vertex_x': rng.normal(0, 1, events),
                                    'vertex_y': rng.normal(0, 1, events), 'vertex_z': rng.normal(0, 1, events)}))
        pq.write_table(pa.concat_tables(metas), f"{path}/{part}_meta.parquet")
        if truth:
            pq.write_table(pa.concat_tables(truths), f"{path}/{part}_truth.parquet")


def read_raw_events(path, part, batches):
    """All pulses of the raw files, keyed by event id, each sorted by (sensor, time, charge, aux)."""
    out = {}
    for b in batches:
        t = pq.read_table(f"{path}/{part}/batch_{b}.parquet")
        cols = {c: t[c].to_numpy() for c in t.column_names}
        for i in np.unique(cols['event_id']):
            m = cols['event_id'] == i
            rec = np.rec.fromarrays([cols['sensor_id'][m], cols['time'][m], cols['charge'][m], cols['auxiliary'][m]])
            out[int(i)] = np.sort(rec, order=['f0', 'f1', 'f2', 'f3'])
    return out


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp('prep')
    make_raw(f"{root}/raw")
    prepare.run(f"{root}/raw", f"{root}/out", val_batches=1, num_proc=2, log=lambda *a: None)
    return root


def test_the_suite_hides_the_gpus_from_itself():
    # on a machine with GPUs a backward starts autograd's threads for them, after which no forked worker can run the
    # quick fit's backward: every prepare.run of the suite would fail there (conftest.py)
    if os.environ.get('ICEAGGR_CUDA_TESTS') == '1':
        pytest.skip('ICEAGGR_CUDA_TESTS=1 asks for the GPUs (the CUDA tests)')
    import torch
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '' and not torch.cuda.is_available()


def test_quick_fit_runs_in_workers_forked_after_a_compile_and_a_backward(tmp_path):
    # what test_bench leaves behind, a torch.compile and then a backward, must not stop prepare's forked workers from
    # running the quick fit's backward: on PyPI's torch it did unless conftest.py's first backward came before
    import torch
    x = torch.ones(3, requires_grad=True)
    torch.compile(lambda t: t * 2, backend='eager')(x).sum().backward()
    make_raw(f"{tmp_path}/raw", n_train=2, n_test=1, events=10)
    prepare.run(f"{tmp_path}/raw", f"{tmp_path}/out", val_batches=1, num_proc=1, log=lambda *a: None, fit_steps=5)
    assert np.isfinite(open_split(f"{tmp_path}/out/train")._column('fit_rlogl')).all()


def test_every_pulse_round_trips(prepared):
    raw = read_raw_events(f"{prepared}/raw", 'train', [1, 2, 3])
    raw.update(read_raw_events(f"{prepared}/raw", 'test', [4]))
    meta = pq.read_table(f"{prepared}/raw/train_meta.parquet").to_pydict()
    label = {e: (a, z) for e, a, z in zip(meta['event_id'], meta['azimuth'], meta['zenith'])}
    seen = set()
    for split, n in [('train', 80), ('val', 40), ('test', 40)]:
        s = open_split(f"{prepared}/out/{split}")
        assert len(s) == n
        for i in range(len(s)):
            e = s.event(i)
            eid = int(s.event_id[i])
            seen.add(eid)
            order = np.lexsort((e['time'], e['sensor_id']))
            assert (order == np.arange(len(order))).all(), "pulses must be in (sensor, time) order"
            assert e['sensor_id'].dtype == np.int16 and e['time'].dtype == np.int64 and e['auxiliary'].dtype == bool
            got = np.sort(np.rec.fromarrays([e['sensor_id'], e['time'], e['charge'].astype(np.float64), e['auxiliary']]),
                          order=['f0', 'f1', 'f2', 'f3'])
            want = raw[eid]
            assert len(got) == len(want)
            for f in ['f0', 'f1', 'f3']:
                assert (got[f] == want[f]).all()
            np.testing.assert_allclose(got['f2'], want['f2'], rtol=1e-3)  # float16 rounding
            if split == 'test':
                assert np.isnan(s.azimuth[i]) and np.isnan(s.zenith[i])
            else:
                assert (s.azimuth[i], s.zenith[i]) == label[eid]
    assert seen == set(raw), "every event appears in exactly one split"


def test_each_event_carries_its_quick_fit(prepared, tmp_path):
    # the model's second seed: classical.time_fit of the event, stored by prepare and carried into every batch
    s = open_split(f"{prepared}/out/val")
    # not a simulate.py set: prepare fitted it in homogeneous ice
    direction, rlogl = classical.time_fit(s.events(np.arange(len(s))), s.geometry, ice='bulk')
    stored = prepare.angles_to_dir(s._column('fit_azimuth'), s._column('fit_zenith'))
    assert classical.angular_error(stored, direction).max() < 1e-4
    np.testing.assert_allclose(s._column('fit_rlogl'), rlogl, rtol=1e-4, atol=1e-4)
    batch, n = prepare.pack_batch(s, np.arange(len(s)), 4096, 2048, 64, 32)
    np.testing.assert_allclose(batch['event_fit_dir'][:n], stored[:n], atol=1e-6)
    # fit_steps=0 (a faster prepare of a large set) stores the improved LineFit; a change of fit_steps rebuilds
    shutil.copytree(f"{prepared}/out", tmp_path / 'out')
    logs = []
    prepare.run(f"{prepared}/raw", str(tmp_path / 'out'), val_batches=1, num_proc=1, log=logs.append, fit_steps=0)
    assert s.manifest['made_by']['fit'] == {'steps': 80, 'ice': 'bulk'}  # not a simulate.py set: real data's ice
    assert sum("its quick fit was made with {'steps': 80, 'ice': 'bulk'}, this run asks for {'steps': 0, 'ice': None}: "
               "rebuilding it" in line for line in logs) == 4
    s = open_split(str(tmp_path / 'out' / 'val'))
    ilf = np.stack([s._column(f'ilf_{c}') for c in 'xyz'], 1)  # the model's first seed, made just before
    stored = prepare.angles_to_dir(s._column('fit_azimuth'), s._column('fit_zenith'))
    assert classical.angular_error(stored, ilf).max() < 1e-4 and (s._column('fit_rlogl') == classical.TIME_FIT_FAILED).all()
    assert classical.angular_error(ilf, classical.reconstruct('linefit_improved', s.events(np.arange(len(s))), s.geometry)).mean() < 0.05
    assert '--fit_steps=0' in prepare.mend_command(s.path, s.manifest)


def test_each_event_carries_the_linefits_the_model_computed(prepared):
    """The model's LineFit seeds, stored by prepare (float64, over all of an event's pulses), equal what the model
    computed on a batch before (float32, its packed pulses; none cut here), and the improved fit's direct pulses
    are flagged: the features of a batch are the same function as when the step computed them."""
    s = open_split(f"{prepared}/out/train")
    batch, n = prepare.pack_batch(s, np.arange(len(s)), 16384, 8192, 128, 4096)
    assert n == len(s) == 80 and batch['n_pulses'] == s.events(np.arange(n))['time'].size
    n_p = batch['n_pulses']
    model_made = with_linefits(batch)  # the model's function on the batch's own pulses, in float32
    np.testing.assert_allclose(batch['event_lf_v'][:n], model_made['event_lf_v'][:n], atol=1e-5)
    np.testing.assert_allclose(batch['event_ilf_dir'][:n], model_made['event_ilf_dir'][:n], atol=1e-4)  # zero where a fit has no velocity
    assert (batch['pulse_direct'][:n_p] == model_made['pulse_direct'][:n_p]).mean() > 0.999  # a float32 lateness can sit at the cut
    assert 0.3 < batch['pulse_direct'][:n_p].mean() < 0.95 and (batch['pulse_direct'][n_p:] == 0).all()
    assert (s.events(np.arange(n))['direct'] == batch['pulse_direct'][:n_p].astype(bool)).all()  # the reader's flags


def test_val_is_whole_held_out_batch_files(prepared):
    man = {s: json.load(open(f"{prepared}/out/{s}/manifest.json")) for s in ['train', 'val', 'test']}
    assert man['train']['shards'] == ['batch_1', 'batch_2'] and man['val']['shards'] == ['batch_3']
    assert man['test']['shards'] == ['batch_4'] and not man['test']['has_labels']
    assert man['train']['n_pulses'] == sum(len(np.load(f"{prepared}/out/train/{b}/pulses.npy", mmap_mode='r')) for b in ['batch_1', 'batch_2'])
    assert np.load(f"{prepared}/out/train/batch_1/pulses.npy", mmap_mode='r').dtype.itemsize <= 8


def test_events_offsets_and_truth(prepared):
    s = open_split(f"{prepared}/out/train")
    idx = np.array([45, 5, 0, 79, 5, 40])  # both shards, interleaved: read one gather per shard, then put in order
    e = s.events(idx)
    records = s.event_records(idx)[0]
    for j, i in enumerate(idx):
        one = s.event(i)
        assert records[j].tobytes() == s.event_records([i])[0].tobytes()
        a, b = e['pulse_offsets'][j], e['pulse_offsets'][j + 1]
        assert (e['sensor_id'][a:b] == one['sensor_id']).all() and (e['time'][a:b] == one['time']).all()
        d0, d1 = e['event_dom_offsets'][j], e['event_dom_offsets'][j + 1]
        starts = e['dom_offsets'][d0:d1 + 1]
        assert starts[0] == a and starts[-1] == b
        # each DOM is one sensor, and neighbouring DOMs differ in sensor
        dom_sensor = e['sensor_id'][starts[:-1]]
        assert (np.diff(dom_sensor) > 0).all()
        for k in range(d1 - d0):
            assert (e['sensor_id'][starts[k]:starts[k + 1]] == dom_sensor[k]).all()
    assert set(s.truth) == {'energy', 'kind', 'vertex_x', 'vertex_y', 'vertex_z'}
    assert set(np.unique(s.truth['kind'])) <= {0, 1}


def test_pack_batch_budgets_and_truncation(prepared):
    s = open_split(f"{prepared}/out/train")
    P, D, E, M = 60, 200, 8, 4
    b, n = pack_batch(s, np.arange(len(s)), P, D, E, M)
    assert b['pulse_time'].shape == (P,) and b['dom_pos'].shape == (D, 3) and b['event_dir'].shape == (E, 3)
    assert n == 1 and b['n_events'] == 1, "event 0 is over budget even after the per-DOM cap: alone and truncated"
    assert b['n_pulses'] == P and b['n_doms'] <= D
    assert (b['pulse_rank'][:P] < M).all()
    assert (b['pulse_dom'][P:] == -1).all() and (np.diff(b['pulse_dom'][:P]) >= 0).all()
    # the per-DOM cap keeps the earliest M pulses of each DOM; then non-auxiliary pulses go first
    e = s.event(0)
    dom_start = np.r_[0, np.flatnonzero(np.diff(e['sensor_id'])) + 1]
    rank = np.arange(len(e['time'])) - dom_start[np.cumsum(np.isin(np.arange(len(e['time'])), dom_start)) - 1]
    n_clean = int((~e['auxiliary'] & (rank < M)).sum())
    assert b['pulse_aux'][:P].sum() == max(0, P - n_clean)
    assert b['event_n_pulses'][0] == len(e['time']) and (b['event_dir'][1:] == 0).all()
    b, n = pack_batch(s, np.arange(len(s)), 1000, 5, E, 1000)
    assert n == 1 and b['n_doms'] == 5, "the DOM budget truncates too"
    # a batch of small events: budgets respected, fields consistent with the reader
    b, n = pack_batch(s, np.arange(1, len(s)), 2000, 2000, 16, 1000)
    assert 1 <= n <= 16 and b['n_events'] == n
    ev = s.events(np.arange(1, 1 + n))
    assert b['n_pulses'] == ev['pulse_offsets'][-1] and b['n_doms'] == ev['event_dom_offsets'][-1]
    assert (b['dom_sensor'][:b['n_doms']] == ev['sensor_id'][ev['dom_offsets'][:-1]]).all()
    np.testing.assert_allclose(b['dom_pos'][:b['n_doms']], s.geometry[b['dom_sensor'][:b['n_doms']]])
    first = np.minimum.reduceat(ev['time'], ev['pulse_offsets'][:-1])
    np.testing.assert_array_equal(b['pulse_time'][:b['n_pulses']], ev['time'] - np.repeat(first, np.diff(ev['pulse_offsets'])))
    assert (b['dom_n_pulses'][:b['n_doms']] == np.diff(ev['dom_offsets'])).all()
    np.testing.assert_allclose(np.linalg.norm(b['event_dir'][:n], axis=1), 1, atol=1e-6)
    # the simulation's truth, for the model's track and energy heads; NaN in the empty slots (and on real data)
    truth = {k: v[1:1 + n] for k, v in s.truth.items()}
    np.testing.assert_array_equal(b['event_track'][:n], truth['kind'] == 0)
    np.testing.assert_allclose(b['event_log_energy'][:n], np.log10(truth['energy']), rtol=1e-6)
    assert np.isnan(b['event_track'][n:]).all() and np.isnan(b['event_log_energy'][n:]).all()



def test_per_dom_cap_keeps_exactly_the_earliest_pulses(prepared):
    """Within the budgets, max_pulses_per_dom keeps each DOM's first M pulses in time: not M + 1, not the last M
    (both passed the checks of a batch that its budget truncates first), and every pulse of a DOM with fewer."""
    s = open_split(f"{prepared}/out/train")
    for M in (1, 2, 3):
        b, n = pack_batch(s, np.arange(len(s)), 100000, 100000, 16, M)  # event 0 has DOMs of many pulses
        ev = s.events(np.arange(n))
        size = np.diff(ev['dom_offsets'])
        assert (size > M).any(), "the test needs DOMs over the cap"
        kept = np.bincount(b['pulse_dom'][:b['n_pulses']], minlength=b['n_doms'])
        np.testing.assert_array_equal(kept, np.minimum(size, M))
        np.testing.assert_array_equal(b['dom_n_pulses'][:b['n_doms']], size)  # a DOM feature: its pulses before the cap
        first = np.minimum.reduceat(ev['time'], ev['pulse_offsets'][:-1])
        want = np.concatenate([ev['time'][o:o + k] for o, k in zip(ev['dom_offsets'][:-1], kept)])
        pulse_event = b['dom_event'][b['pulse_dom'][:b['n_pulses']]]
        np.testing.assert_array_equal(b['pulse_time'][:b['n_pulses']], want - first[pulse_event])



def test_dom_budget_keeps_the_doms_hit_first(prepared):
    """An event over the DOM budget keeps the DOMs of its first pulses in (non-auxiliary first, then time) order,
    not any max_doms of them."""
    s = open_split(f"{prepared}/out/train")
    b, n = pack_batch(s, np.arange(len(s)), 1000, 5, 8, 1000)
    assert n == 1 and b['n_doms'] == 5
    e = s.event(0)
    dom = np.cumsum(np.r_[True, np.diff(e['sensor_id']) != 0]) - 1  # pulses in (sensor, time) order
    by_pulse = dom[np.lexsort((e['time'], e['auxiliary']))]
    first = by_pulse[np.sort(np.unique(by_pulse, return_index=True)[1])[:5]]
    dom_sensor = e['sensor_id'][np.r_[0, np.flatnonzero(np.diff(e['sensor_id'])) + 1]]
    np.testing.assert_array_equal(b['dom_sensor'][:5], np.sort(dom_sensor[first]))


def test_an_event_over_the_budget_keeps_exactly_its_earliest_pulses(prepared):
    """Which pulses an event over a budget keeps, pulse by pulse: of each DOM's earliest M, the first P in the order
    (non-auxiliary first, then earliest), then of those the pulses of the first D DOMs in that order. A model is
    trained on one order: each DOM's first hit first instead cost a model trained on this one 0.18 rad on the toy's
    truncated val events (notes, section 25), and the checks of the counts alone passed it."""
    s = open_split(f"{prepared}/out/train")
    e = s.event(0)
    dom = np.cumsum(np.r_[True, np.diff(e['sensor_id']) != 0]) - 1
    for P, D, M in ((60, 1000, 1000), (110, 1000, 3), (150, 40, 1000), (len(e['time']) - 1, 1000, 1000)):
        b, n = pack_batch(s, np.arange(len(s)), P, D, 8, M)
        assert n == 1
        in_dom, key = {}, []
        for i in range(len(e['time'])):  # the rule, one pulse at a time
            in_dom[dom[i]] = in_dom.get(dom[i], -1) + 1
            if in_dom[dom[i]] < M:
                key.append((bool(e['auxiliary'][i]), e['time'][i], i))
        taken = [k[-1] for k in sorted(key)][:P]
        doms = set(list(dict.fromkeys(dom[i] for i in taken))[:D])
        want = np.sort([i for i in taken if dom[i] in doms])
        n_p = b['n_pulses']
        assert n_p == len(want)
        np.testing.assert_array_equal(b['dom_sensor'][b['pulse_dom'][:n_p]], e['sensor_id'][want])
        np.testing.assert_array_equal(b['pulse_time'][:n_p], e['time'][want] - e['time'][want].min())
        np.testing.assert_array_equal(b['pulse_aux'][:n_p], e['auxiliary'][want])


def test_a_truncated_event_keeps_each_pulse_with_its_own_values():
    """An event over a budget (pack_events, as pack_batch packs it): each kept pulse brings its own charge, auxiliary
    flag and direct flag, its time counts from the first pulse the batch kept, its rank from the first kept pulse of
    its DOM, and the event's pulse and DOM counts are those before the cut (as dom_n_pulses is the DOM's). Every
    other packing test keeps the event's first pulse and its DOMs' first pulses, where the source's first n_p values,
    the time from the event's first raw pulse, the raw rank or the count of kept DOMs passed."""
    # (sensor, time, auxiliary) in (sensor, time) order; a distinct charge and a direct flag per pulse
    pulses = [(3, 100, 1), (3, 200, 0), (3, 300, 0), (3, 400, 0), (7, 50, 1), (7, 500, 0), (9, 600, 0), (9, 700, 0),
              (9, 800, 1), (12, 900, 1)]
    sensor, time, aux = (np.array(c) for c in zip(*pulses))
    dom_offsets = np.r_[0, np.flatnonzero(np.diff(sensor)) + 1, len(sensor)]
    e = {'sensor_id': sensor.astype(np.int16), 'time': time.astype(np.int64), 'auxiliary': aux.astype(bool),
         'charge': np.arange(1, 11, dtype=np.float32) * 0.25, 'direct': np.arange(10) % 3 == 0,
         'pulse_offsets': np.array([0, 10]), 'event_dom_offsets': np.array([0, 4]), 'dom_offsets': dom_offsets}
    ev = {name: np.array([0.5]) for name in ('azimuth', 'zenith', 'fit_azimuth', 'fit_zenith', 'fit_rlogl', 'lf_vx',
                                              'lf_vy', 'lf_vz', 'ilf_x', 'ilf_y', 'ilf_z')}
    geometry = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    # a cap of 3 per DOM, then 5 pulses: the non-auxiliary ones of the first 3 in each DOM, earliest first
    b = prepare.pack_events(e, ev, np.array([0]), geometry, max_pulses=5, max_doms=8, max_events=2, max_pulses_per_dom=3)
    want = np.array([1, 2, 5, 6, 7])  # the 50 ns (auxiliary) pulse and sensor 12's are cut
    assert b['n_pulses'] == 5 and b['n_doms'] == 3
    np.testing.assert_array_equal(b['dom_sensor'][b['pulse_dom'][:5]], sensor[want])
    np.testing.assert_array_equal(b['pulse_time'][:5], time[want] - 200)
    np.testing.assert_array_equal(b['pulse_charge'][:5], e['charge'][want])
    np.testing.assert_array_equal(b['pulse_aux'][:5], aux[want])
    np.testing.assert_array_equal(b['pulse_direct'][:5], e['direct'][want])
    np.testing.assert_array_equal(b['pulse_rank'][:5], [0, 1, 0, 0, 1])
    np.testing.assert_array_equal(b['dom_n_pulses'][:3], [4, 2, 3])
    assert (b['event_n_pulses'][0], b['event_n_doms'][0]) == (10, 4)


def test_a_batch_takes_every_event_that_fits(prepared):
    """plan_batch takes events while their pulses after the per-DOM cap, their DOMs and their count fit the budgets:
    with a budget exactly filled by the first k events it takes k, one pulse or DOM short k - 1. Counting pulses
    before the cap, or a budget reached as if exceeded, still gives batches within budget, only fewer events each
    (event 0 has DOMs of hundreds of pulses), which no other test noticed."""
    s = open_split(f"{prepared}/out/train")
    idx, cap = np.arange(len(s)), 4
    ev = s.events(idx[:12])
    capped = np.minimum(np.diff(ev['dom_offsets']), cap)
    for k in (1, 5, 12):
        pulses, doms = int(capped[:ev['event_dom_offsets'][k]].sum()), int(ev['event_dom_offsets'][k])
        assert pulses < ev['pulse_offsets'][k], "the case needs DOMs over the cap"
        assert pack_batch(s, idx, pulses, doms, k, cap)[1] == k
        assert pack_batch(s, idx, pulses, doms, 64, cap)[1] == k
        if k > 1:
            assert pack_batch(s, idx, pulses - 1, doms, 64, cap)[1] == k - 1
            assert pack_batch(s, idx, pulses, doms - 1, 64, cap)[1] == k - 1


def test_loader_covers_split_once_and_ranks_differ(prepared):
    s = open_split(f"{prepared}/out/train")
    seen = []
    for rank in range(2):
        loader = BatchLoader(s, 3000, 3000, 16, 64, shuffle=False, rank=rank, world_size=2, epochs=1)
        seen += [b['event_index'][:b['n_events']] for b in loader]
    seen = np.concatenate(seen)
    assert sorted(seen) == list(range(len(s)))
    draws = []
    for rank in range(2):
        loader = BatchLoader(s, 3000, 3000, 16, 64, shuffle=True, seed=1, rank=rank, world_size=2)
        draws.append(next(loader)['event_index'])
        loader.close()
    assert not set(draws[0][draws[0] >= 0]) & set(draws[1][draws[1] >= 0])



def test_shuffled_epochs_cover_the_split_once_in_a_new_order(prepared):
    """shuffle=True: in each epoch the ranks together draw every event once, and each epoch draws them in another
    order (the same permutation every epoch would show the model the same batches again and again)."""
    s = open_split(f"{prepared}/out/train")
    orders = {}
    for rank in range(2):
        loader = BatchLoader(s, 3000, 3000, 16, 64, shuffle=True, seed=5, rank=rank, world_size=2, epochs=2)
        for b in loader:
            orders.setdefault(b['epoch'], []).extend(b['event_index'][:b['n_events']])
    assert sorted(orders) == [0, 1]
    for epoch in orders:
        assert sorted(orders[epoch]) == list(range(len(s))), epoch
    assert orders[0] != orders[1]

def test_interrupted_prepare_resumes_to_identical_result(tmp_path, prepared):
    ref = f"{prepared}/out"
    shutil.copytree(f"{prepared}/raw", tmp_path / 'raw')
    out = tmp_path / 'out'
    prepare.run(str(tmp_path / 'raw'), str(out), val_batches=1, num_proc=1, log=lambda *a: None)
    # interrupt: a half-written temp shard, a missing shard and a missing manifest
    shutil.rmtree(out / 'train' / 'batch_2')
    os.makedirs(out / 'train' / '.tmp-batch_2-999')
    open(out / 'train' / '.tmp-batch_2-999' / 'pulses.npy', 'wb').write(b'partial')
    os.remove(out / 'train' / 'manifest.json')
    with pytest.raises(FileNotFoundError, match='manifest'):
        open_split(str(out / 'train'))
    logs = []
    prepare.run(str(tmp_path / 'raw'), str(out), val_batches=1, num_proc=1, log=logs.append)
    assert any('already complete' in line for line in logs)
    assert not os.path.exists(out / 'train' / '.tmp-batch_2-999')
    for split in ['train', 'val', 'test']:
        for b in json.load(open(f"{ref}/{split}/manifest.json"))['shards']:
            for f in ['pulses.npy', 'doms.npy', 'events.npy']:
                assert open(f"{ref}/{split}/{b}/{f}", 'rb').read() == open(out / split / b / f, 'rb').read()


def test_interrupted_process_leaves_no_complete_looking_shard(tmp_path):
    make_raw(tmp_path / 'raw', n_train=4, events=300)
    code = ("import prepare, os, signal\n"
            "orig = prepare.write_shard\n"
            "def w(task):\n"
            "    r = orig(task)\n"
            "    os.killpg(0, signal.SIGKILL)\n"  # kill the whole run right after its first shard
            "    return r\n"
            "prepare.write_shard = w\n"
            f"prepare.run({str(tmp_path / 'raw')!r}, {str(tmp_path / 'out')!r}, num_proc=1)\n")
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, timeout=120, start_new_session=True)
    assert r.returncode == -9
    assert not os.path.exists(tmp_path / 'out' / 'train' / 'manifest.json')
    for d in os.listdir(tmp_path / 'out' / 'train'):
        if d.startswith('batch_'):
            assert os.path.exists(tmp_path / 'out' / 'train' / d / 'shard.json')
    r = subprocess.run([sys.executable, 'prepare.py', f"--raw_dir={tmp_path / 'raw'}", f"--out_dir={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(open_split(str(tmp_path / 'out' / 'train'))) == 3 * 300


def _children(pid):
    """The live processes whose parent is pid, from /proc (this kernel has no /proc/<pid>/task/*/children)."""
    found = []
    for stat in glob.glob('/proc/[0-9]*/stat'):
        try:
            fields = open(stat).read().rsplit(')', 1)[1].split()  # after the command, which may hold spaces
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid and fields[0] != 'Z':
            found.append(int(stat.split('/')[2]))
    return found


def _alive(pid):
    try:
        return open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
@pytest.mark.parametrize('script, sig', [('prepare', signal.SIGTERM), ('prepare', signal.SIGINT), ('simulate', signal.SIGTERM),
                                         ('simulate', signal.SIGINT), ('prepare simulating', signal.SIGINT)])
def test_a_signal_ends_the_workers_too(tmp_path, script, sig):
    # a scheduler's SIGTERM reaches the main process only; its workers must not run on, orphaned, after it. A
    # terminal's Ctrl-C (SIGINT) reaches the whole process group: one line, no traceback from any process, and the
    # batch files already queued for the workers not made first. Shards of 5,000 events take the workers seconds each,
    # so the signal comes before any split is complete. 'prepare simulating': the quick start's prepare.py, in a folder
    # without data/kaggle, stopped while it simulates the default set
    out = tmp_path / 'out'
    cwd = ROOT
    if script == 'prepare':
        make_raw(tmp_path / 'raw', n_train=4, events=5000)
        args = [f"--raw_dir={tmp_path / 'raw'}", f"--out_dir={out}", '--num_proc=2']
    elif script == 'simulate':
        args = [f"--out_dir={out}", '--n_train_batches=3', '--n_test_batches=1', '--events_per_batch=20000', '--num_proc=2']
    else:
        cwd, args = tmp_path, [f"--sim_dir={out}", f"--out_dir={tmp_path / 'packed'}", '--num_proc=2']
    with open(tmp_path / 'stderr', 'w') as err:  # a file, not a pipe: workers that outlive the script would hold a pipe open
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script.split()[0]}.py")] + args, cwd=cwd,
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 120
        while len(workers) < 2 and p.poll() is None and time.time() < deadline:
            workers = _children(p.pid)
            time.sleep(0.05)
        assert len(workers) == 2, f"no workers seen: {p.poll()}"
        time.sleep(0.5)  # the workers past their start
        if sig == signal.SIGTERM:
            p.send_signal(sig)
        else:
            os.killpg(p.pid, sig)
        p.wait(timeout=120)
        err = (tmp_path / 'stderr').read_text()
        assert p.returncode == 128 + sig, err
        assert f'stopped by {sig.name}' in err and 'Traceback' not in err and len(err.splitlines()) == 1, err
        deadline = time.time() + 60
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), f"workers outlived {script}.py"
        if script == 'prepare':
            assert not glob.glob(f"{out}/*/manifest.json"), "a split looks complete"
            assert not glob.glob(f"{out}/*/.tmp-*") and not glob.glob(f"{out}/*/*.tmp*")
        else:
            assert json.load(open(out / 'simulation.json'))['complete'] is False
            # stopped within the first two batch files: the two queued behind them were not made first
            assert len(glob.glob(f"{out}/*/batch_*.parquet")) <= 2, os.listdir(out / 'train')
    finally:  # never leave a process behind, whatever failed
        for pid in [p.pid] + workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        p.wait()


def test_settings_out_of_range_are_refused_before_any_work(clean_raw, tmp_path):
    cmd = [sys.executable, 'prepare.py', f'--raw_dir={clean_raw}', f"--out_dir={tmp_path / 'out'}",
           '--num_proc=0', '--val_batches=0', '--train_batches=-1', '--fit_steps=-5']
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    for setting in ('num_proc=0 (at least 1)', 'val_batches=0 (at least 1)', 'train_batches=-1 (at least 0)',
                    'fit_steps=-5 (at least 0)'):
        assert setting in r.stderr
    # run() itself, as bench.py and the tests call it
    for setting, value in (('num_proc', 0), ('val_batches', 0), ('train_batches', -1), ('fit_steps', -5)):
        with pytest.raises(PrepareError, match=rf"^{setting}={value} is out of range \(at least"):
            prepare.run(clean_raw, str(tmp_path / 'out'), **{'num_proc': 1, setting: value}, log=lambda *a: None)
    assert not os.path.exists(tmp_path / 'out')


def test_a_missing_split_says_why(tmp_path, prepared, monkeypatch):
    # a mistyped split name: the prepared ones are listed
    with pytest.raises(FileNotFoundError, match=rf"^no split 'tset' in {prepared}/out: it has train, val, test$"):
        open_split(f"{prepared}/out/tset")
    # data_dir at the raw input: prepare's output is named, as a re-run of prepare would not mend it
    for path in (f"{prepared}/raw/train", f"{prepared}/raw"):
        with pytest.raises(FileNotFoundError, match=rf"^{prepared}/raw is raw Kaggle-layout input \(sensor_geometry\.csv, "
                                                    rf"test_meta\.parquet, train_meta\.parquet\), not prepare\.py's output; "
                                                    rf".*by default {prepared}/raw_packed"):
            open_split(path)
    # an unfinished split, or nothing prepared at all: prepare did not finish
    os.makedirs(tmp_path / 'out' / 'train')
    shutil.copytree(f"{prepared}/out/val", tmp_path / 'out' / 'val')
    unfinished = "manifest.json: no manifest, so the split is missing or prepare did not finish"
    with pytest.raises(FileNotFoundError, match=f"out/train/{unfinished}"):
        open_split(str(tmp_path / 'out' / 'train'))
    with pytest.raises(FileNotFoundError, match=f"none/test/{unfinished}"):
        open_split(str(tmp_path / 'none' / 'test'))
    # a relative data_dir names the folder it is relative to: the default data/sim_packed from another folder
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"^data/sim_packed/train/manifest.json: no manifest \(a path relative "
                                                rf"to the folder this runs in, {tmp_path}\), so the split is missing"):
        open_split('data/sim_packed/train')


# -- bad input, or a file that cannot be read: each gets a message naming the file, the event and the problem,
# exit status 1 ----------------------------------------------------------------------------------------------

def _corrupt_batch(raw, fn, part='train', b=1):
    path = f"{raw}/{part}/batch_{b}.parquet"
    t = pq.read_table(path)
    pq.write_table(fn(t), path)


def _set(t, name, values):
    values = values if isinstance(values, pa.Array) else pa.array(values)  # pyarrow 10's pa.array refuses an Array
    return t.set_column(t.column_names.index(name), name, values)


def _without(name):
    return lambda t: t.select([c for c in t.column_names if c != name])  # pyarrow 10 has no drop_columns


def _corrupt_meta(raw, fn, part='train'):
    path = f"{raw}/{part}_meta.parquet"
    pq.write_table(fn(pq.read_table(path)), path)


def _corrupt_truth(raw, fn, part='train'):
    path = f"{raw}/{part}_truth.parquet"
    pq.write_table(fn(pq.read_table(path)), path)


def _bad_value(column, row, value, dtype=None):
    def fn(t):
        v = t[column].to_numpy().copy() if dtype is None else t[column].to_numpy().astype(dtype)
        v[row] = value
        return _set(t, column, v)
    return fn


def _truncate(path, keep=0.5):
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:int(len(data) * keep)])


def _scribble(path, at=100, n=500):
    # garbage over the first data pages, size unchanged: the footer still opens, the pages do not
    data = bytearray(open(path, 'rb').read())
    data[at:at + n] = bytes(n)
    open(path, 'wb').write(bytes(data))


BAD_INPUTS = {
    'missing batch file': (lambda raw: os.remove(f"{raw}/train/batch_2.parquet"), r"batch_2\.parquet: missing file"),
    'missing geometry': (lambda raw: os.remove(f"{raw}/sensor_geometry.csv"), r"sensor_geometry\.csv: missing file"),
    'missing column': (lambda raw: _corrupt_batch(raw, _without('charge')), r"batch_1\.parquet: missing column 'charge'"),
    'missing meta column': (lambda raw: _corrupt_meta(raw, _without('zenith')), r"train_meta\.parquet: missing column 'zenith'"),
    'wrong dtype': (lambda raw: _corrupt_batch(raw, lambda t: _set(t, 'time', t['time'].to_numpy().astype(np.float64))),
                    r"batch_1\.parquet: column 'time' has type double, expected integer"),
    'nan charge': (lambda raw: _corrupt_batch(raw, _bad_value('charge', 450, np.nan)), r"batch_1\.parquet: event_id \d+ \(row 450\): non-finite charge"),
    'inf charge': (lambda raw: _corrupt_batch(raw, _bad_value('charge', 3, np.inf)), r"event_id \d+ \(row 3\): non-finite charge inf"),
    'huge charge': (lambda raw: _corrupt_batch(raw, _bad_value('charge', 3, 1e6)), r"charge 1000000\.0 outside .* float16 cannot hold"),
    'unknown sensor': (lambda raw: _corrupt_batch(raw, _bad_value('sensor_id', 10, 6000)), r"event_id \d+ \(row 10\): sensor_id 6000 is not in sensor_geometry"),
    'time span': (lambda raw: _corrupt_batch(raw, _bad_value('time', 10, 2**40)), r"event_id \d+ \(row 10\): time span \d+ ns exceeds"),
    'nan zenith': (lambda raw: _corrupt_meta(raw, _bad_value('zenith', 2, np.nan)), r"batch_1\.parquet: event_id \d+ has zenith nan"),
    'meta ranges': (lambda raw: _corrupt_meta(raw, lambda t: _set(t, 'last_pulse_index', t['last_pulse_index'].to_numpy() + (np.arange(len(t)) == 3))),
                    r"batch_1\.parquet: meta pulse ranges do not match the batch file \(\d+ rows\) at event_id \d+"),
    'empty event': (lambda raw: _corrupt_meta(raw, _bad_value('last_pulse_index', 3, 0)), r"batch_1\.parquet: event_id \d+ has no pulses"),
    'meta too short': (lambda raw: _corrupt_meta(raw, lambda t: t.slice(1)), r"batch_1\.parquet: meta pulse ranges do not match"),
    'duplicate event id': (lambda raw: _dup_event(raw), r"batch_1\.parquet: duplicate event_id \d+ in the meta"),
    'duplicate across files': (lambda raw: _dup_across(raw), r"duplicate event_id \d+ in .*batch_1\.parquet and .*batch_2\.parquet"),
    # batch 1's (train) and batch 3's (val) last events share an id above all others: their id ranges overlap, batch
    # 2's between them in id order overlaps both, and train and val are separate splits of one meta file
    'duplicate across splits': (lambda raw: _dup_across(raw, (1, 3), 10**6), r"duplicate event_id 1000000 in .*batch_1\.parquet and .*batch_3\.parquet"),
    'meta misses an event': (lambda raw: _corrupt_meta(raw, lambda t: t.filter(pa.array(np.arange(len(t)) != 19))),
                             r"batch_1\.parquet: meta pulse ranges do not match the batch file \(\d+ rows\) at row \d+: the file has event_id \d+, the meta \(none, it ends\)"),
    'empty batch_id': (lambda raw: _corrupt_meta(raw, lambda t: _set(t, 'batch_id', pa.array([None] + t['batch_id'].to_pylist()[1:], pa.int64()))),
                       r"train_meta\.parquet: empty batch_id in 1 rows"),
    # the simulation's truth: an unknown kind, an energy the energy head would learn log10(1e-3 GeV) of
    'truth kind unknown': (lambda raw: _corrupt_truth(raw, _bad_value('kind', 7, 'muon', object)),
                           r"train_truth\.parquet: event_id \d+ has kind 'muon', expected one of \['track', 'cascade'\]"),
    'truth energy 0': (lambda raw: _corrupt_truth(raw, _bad_value('energy', 7, 0.0)),
                       r"train_truth\.parquet: event_id \d+ has energy 0\.0 GeV, not above 0 \(null or NaN where it is unknown\)"),
    'empty sensor_id': (lambda raw: open(f"{raw}/sensor_geometry.csv", 'a').write(",1.5,1.5,2.5\n"), r"sensor_geometry\.csv: empty sensor_id on line 5162"),
    'not kaggle': (lambda raw: os.remove(f"{raw}/train_meta.parquet"), r"train_meta\.parquet: missing file"),
    # unreadable files (batch files are read in a worker process, the rest in the main one)
    'truncated batch file': (lambda raw: _truncate(f"{raw}/train/batch_2.parquet"), r"batch_2\.parquet: cannot read it \(Parquet magic bytes"),
    'empty batch file': (lambda raw: _truncate(f"{raw}/train/batch_1.parquet", 0), r"batch_1\.parquet: cannot read it \(Parquet file size is 0"),
    'scribbled batch file': (lambda raw: _scribble(f"{raw}/train/batch_1.parquet"), r"batch_1\.parquet: cannot read it \("),
    'test batch file': (lambda raw: _truncate(f"{raw}/test/batch_4.parquet", 0.9), r"test/batch_4\.parquet: cannot read it"),
    'truncated meta': (lambda raw: _truncate(f"{raw}/train_meta.parquet"), r"train_meta\.parquet: cannot read it"),
    'truncated test meta': (lambda raw: _truncate(f"{raw}/test_meta.parquet"), r"test_meta\.parquet: cannot read it"),
    'truncated truth': (lambda raw: _truncate(f"{raw}/train_truth.parquet"), r"train_truth\.parquet: cannot read it"),
    'empty geometry': (lambda raw: _truncate(f"{raw}/sensor_geometry.csv", 0), r"sensor_geometry\.csv: cannot read it \(Empty CSV"),
    'truncated geometry': (lambda raw: _truncate(f"{raw}/sensor_geometry.csv", 0.5), r"sensor_geometry\.csv: cannot read it \(.*columns"),
    'a folder for a file': (lambda raw: (os.remove(f"{raw}/train/batch_1.parquet"), os.makedirs(f"{raw}/train/batch_1.parquet")),
                            r"batch_1\.parquet: cannot read it"),
}


def _dup_event(raw):
    # event 2 takes event 1's id, in the meta and in the batch file alike
    meta = pq.read_table(f"{raw}/train_meta.parquet")
    ids = meta['event_id'].to_numpy().copy()
    old, ids[2] = ids[2], ids[1]
    pq.write_table(_set(meta, 'event_id', ids), f"{raw}/train_meta.parquet")
    _corrupt_batch(raw, lambda t: _set(t, 'event_id', np.where(t['event_id'].to_numpy() == old, ids[1], t['event_id'].to_numpy())))


def _dup_across(raw, batches=(1, 2), target=None):
    # the last event of batches[1] takes the id of batches[0]'s last event (or both take target), in the meta, the
    # batch files and the truth alike
    meta = pq.read_table(f"{raw}/train_meta.parquet")
    ids, bid = meta['event_id'].to_numpy().copy(), meta['batch_id'].to_numpy()
    truth = pq.read_table(f"{raw}/train_truth.parquet")
    tid = truth['event_id'].to_numpy().copy()
    for b in batches if target is not None else batches[1:]:
        new = target if target is not None else ids[bid == batches[0]][-1]
        j = np.flatnonzero(bid == b)[-1]
        old, ids[j] = ids[j], new
        _corrupt_batch(raw, lambda t: _set(t, 'event_id', np.where(t['event_id'].to_numpy() == old, new, t['event_id'].to_numpy())), b=b)
        tid[tid == old] = new
    pq.write_table(_set(meta, 'event_id', ids), f"{raw}/train_meta.parquet")
    pq.write_table(_set(truth, 'event_id', tid), f"{raw}/train_truth.parquet")


@pytest.fixture(scope='module')
def clean_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp('clean')
    make_raw(f"{root}/raw", n_train=3, n_test=1, events=20)
    return f"{root}/raw"


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(case, clean_raw, tmp_path):
    raw = str(tmp_path / 'raw')
    shutil.copytree(clean_raw, raw)
    corrupt, pattern = BAD_INPUTS[case]
    corrupt(raw)
    with pytest.raises(PrepareError, match=pattern):
        prepare.run(raw, str(tmp_path / 'out'), num_proc=1, log=lambda *a: None)
    split = 'test' if case.startswith('test') else 'train'  # the splits are packed in order: train, val, test
    assert not os.path.exists(tmp_path / 'out' / split / 'manifest.json')
    assert not os.path.exists(tmp_path / 'out' / 'val' / 'manifest.json') or case.startswith('test')
    assert not glob.glob(str(tmp_path / 'out' / '*' / '.tmp-*'))


def test_a_second_prepare_on_one_out_dir_stops_at_once(clean_raw, tmp_path):
    """prepare into an out_dir another prepare is writing (a job resubmitted beside the first) stops before writing
    anything, naming the holder: two at once rebuilt each other's shards, and with other settings left a split of
    both runs' shards under one manifest. The lock ends with the run, so the next run in this process goes on."""
    from configurator import lock_folder
    out = str(tmp_path / 'out')
    os.makedirs(out)
    fd = lock_folder('prepare', out)  # this process stands for the other prepare
    try:
        with pytest.raises(SystemExit, match=f"^prepare: error: {out} is in use by prepare.py, pid {os.getpid()} on "):
            prepare.run(clean_raw, out, num_proc=1, log=lambda *a: None)
        assert os.listdir(out) == ['lock']
    finally:
        os.close(fd)
    for _ in range(2):
        prepare.run(clean_raw, out, num_proc=1, log=lambda *a: None)
    assert len(open_split(f"{out}/train")) == 2 * 20


def test_bad_input_exit_status_and_message_on_the_command_line(clean_raw, tmp_path):
    raw = str(tmp_path / 'raw')
    shutil.copytree(clean_raw, raw)
    _corrupt_batch(raw, _bad_value('sensor_id', 10, 6000))
    r = subprocess.run([sys.executable, 'prepare.py', f'--raw_dir={raw}', f"--out_dir={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert 'batch_1.parquet' in r.stderr and 'sensor_id 6000' in r.stderr and 'event_id' in r.stderr


def test_unreadable_file_on_the_command_line_and_no_permission(clean_raw, tmp_path, monkeypatch):
    raw = str(tmp_path / 'raw')
    shutil.copytree(clean_raw, raw)
    _truncate(f"{raw}/train/batch_3.parquet")
    r = subprocess.run([sys.executable, 'prepare.py', f'--raw_dir={raw}', f"--out_dir={tmp_path / 'out'}", '--num_proc=2'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"prepare: error: {raw}/train/batch_3.parquet: cannot read it (Parquet magic "
                                             f"bytes not found in footer. Either the file is corrupted or this is not a parquet "
                                             f"file.); if it is damaged, cut short or empty, download or copy it again"]
    # no permission (simulated: the tests may run as root, who reads anything)
    shutil.copy(f"{clean_raw}/train/batch_3.parquet", f"{raw}/train/batch_3.parquet")
    real = pq.ParquetFile

    def guarded(path, *a, **k):
        if str(path).endswith('batch_2.parquet'):
            raise PermissionError(errno.EACCES, f"Failed to open local file '{path}'")
        return real(path, *a, **k)
    monkeypatch.setattr(pq, 'ParquetFile', guarded)
    with pytest.raises(PrepareError, match=r"batch_2\.parquet: cannot read it: Permission denied$"):
        prepare.run(raw, str(tmp_path / 'out2'), num_proc=1, log=lambda *a: None)


def test_a_dead_worker_is_named(clean_raw, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, 'pack_file', lambda *a: os._exit(9))  # in the worker, as the out-of-memory killer would
    with pytest.raises(PrepareError, match=r"batch_\d\.parquet: the worker process packing it died"):
        prepare.run(clean_raw, str(tmp_path / 'out'), num_proc=1, log=lambda *a: None)


# -- damaged output: shards know their sizes and checksums ---------------------------------------------

def test_shard_json_records_sizes_and_checksums(prepared):
    d = f"{prepared}/out/train/batch_1"
    info = json.load(open(f"{d}/shard.json"))
    assert info['format_version'] == prepare.FORMAT_VERSION == 4
    assert set(info['files']) == {'pulses.npy', 'doms.npy', 'events.npy'}
    for name, rec in info['files'].items():
        data = open(f"{d}/{name}", 'rb').read()
        assert rec == {'bytes': len(data), 'crc32': zlib.crc32(data)}
    assert (np.load(f"{d}/pulses.npy") == open_split(f"{prepared}/out/train").shards[0]['pulses']).all()



def test_checksum_of_a_file_larger_than_one_read(tmp_path):
    """--verify reads a file 16 MiB at a time: a real shard's pulses.npy (23 MB for 2.9M pulses) checks out across
    its reads, as one of the test's small shards does in one."""
    path = str(tmp_path / 'pulses.npy')
    record = prepare._save(path, np.random.default_rng(0).integers(0, 256, (1 << 24) + 1000, dtype=np.uint8))
    assert prepare._file_crc32(path) == record['crc32'] == zlib.crc32(open(path, 'rb').read())

def test_cut_short_shard_is_named_and_rebuilt(tmp_path, prepared):
    shutil.copytree(f"{prepared}/out", tmp_path / 'out')
    out = tmp_path / 'out'
    _truncate(out / 'val' / 'batch_3' / 'pulses.npy', 0.7)  # a copy stopped by a full disk
    with pytest.raises(prepare.SplitError) as e:
        open_split(str(out / 'val'))
    msg = str(e.value)
    assert f"{out}/val/batch_3/pulses.npy: " in msg and "bytes, but shard.json records" in msg
    assert f"python prepare.py --raw_dir={prepared}/raw --out_dir={out} --val_batches=1 --train_batches=0" in msg
    logs = []
    prepare.run(f"{prepared}/raw", str(out), val_batches=1, num_proc=1, log=logs.append)
    assert any(re.search(r"val/batch_3: pulses\.npy: \d+ bytes, but shard.json records \d+ .*: rebuilding it", line) for line in logs), logs
    assert sum('rebuilding' in line for line in logs) == 1
    for f in ['pulses.npy', 'doms.npy', 'events.npy']:
        assert open(out / 'val' / 'batch_3' / f, 'rb').read() == open(f"{prepared}/out/val/batch_3/{f}", 'rb').read()
    assert len(open_split(str(out / 'val'))) == 40


def test_verify_finds_a_flipped_byte_and_rebuilds_it(tmp_path, prepared):
    shutil.copytree(f"{prepared}/out", tmp_path / 'out')
    out = tmp_path / 'out'
    path = out / 'train' / 'batch_2' / 'doms.npy'
    data = bytearray(open(path, 'rb').read())
    data[-3] ^= 0x10  # bit rot: same size, so only the checksum sees it
    open(path, 'wb').write(bytes(data))
    assert len(open_split(str(out / 'train'))) == 80  # the cheap check on opening passes
    logs = []
    bad = prepare.verify_output(str(out), log=logs.append)
    assert list(bad) == [f"{out}/train/batch_2"] and 'doms.npy: its bytes differ' in bad[f"{out}/train/batch_2"]
    # a plain re-run checks sizes only and keeps it; --verify=True rebuilds it
    prepare.run(f"{prepared}/raw", str(out), val_batches=1, num_proc=1, log=lambda *a: None)
    assert open(path, 'rb').read() == bytes(data)
    logs = []
    prepare.run(f"{prepared}/raw", str(out), val_batches=1, num_proc=1, log=logs.append, verify=True)
    assert any('train/batch_2: doms.npy: its bytes differ' in line and 'rebuilding' in line for line in logs)
    assert any('sizes and checksums checked' in line for line in logs)
    assert open(path, 'rb').read() == open(f"{prepared}/out/train/batch_2/doms.npy", 'rb').read()
    assert prepare.verify_output(str(out), log=lambda *a: None) == {}


def test_verify_on_the_command_line_without_the_raw_files(tmp_path, prepared):
    shutil.copytree(f"{prepared}/out", tmp_path / 'copy')  # packed data copied elsewhere, the raw files not
    out = tmp_path / 'copy'
    cmd = [sys.executable, 'prepare.py', f"--raw_dir={tmp_path / 'nothing'}", f"--out_dir={out}", '--verify=True']
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and '4 shards' in r.stdout and '0 damaged' in r.stdout, r.stdout + r.stderr
    _scribble(out / 'test' / 'batch_4' / 'events.npy', at=200, n=8)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr
    assert f"{out}/test/batch_4/events.npy: its bytes differ" in r.stdout
    assert f"--raw_dir={prepared}/raw --out_dir={out} --verify=True" in r.stderr
    assert not os.path.exists(tmp_path / 'nothing')


# -- damaged contents, sizes right: each shard's records once, and each batch's DOM offsets and pulses --------

def _damaged_val(prepared, tmp_path, damage):
    """A copy of the prepared val split (one shard of 40 events) whose arrays damage(pulses, doms, events) changes in
    place, returning the row of the event the error names: the sizes stay as recorded, so opening it passes."""
    shutil.copytree(f"{prepared}/out/val", tmp_path / 'val')
    arrays = [np.load(tmp_path / 'val' / 'batch_3' / f"{k}.npy", mmap_mode='r+') for k in ('pulses', 'doms', 'events')]
    row = damage(*arrays)
    for a in arrays:
        a.flush()
    return open_split(str(tmp_path / 'val')), int(arrays[2]['event_id'][row])


def _record(field, value, row=5, named=0):
    """A damage: events.npy's field of event `row` set to value(its value); the error names event row + named.
    Event 5 has 33 DOMs of a pulse each, event 0 400 pulses in 103 DOMs."""
    def damage(pulses, doms, events):
        events[field][row] = value(events[field][row])
        return row + named
    return damage


def _pulse(field, value, row=5, at=3):
    """A damage: pulses.npy's field of pulse `at` of event `row` set to value(its value)."""
    def damage(pulses, doms, events):
        pulses[field][events['pulse_start'][row] + at] = value(pulses[field][events['pulse_start'][row] + at])
        return row
    return damage


def _dom(at, value):
    """A damage: doms.npy's offset at(events) set to value(its value); the error names the event at(events) starts."""
    def damage(pulses, doms, events):
        where = at(events)
        doms[where] = value(doms[where])
        return int(np.searchsorted(events['dom_start'], where, side='right') - 1)
    return damage


ENDS = r"its (pulses|DOMs) end at \d+ \((pulse|dom)_start \+ n_(pulses|doms)\), where the next event's \(event_id \d+\) start at -?\d+"
DAMAGE = {  # what was a numpy error from deep in the batching (IndexError, 'repeats may not contain negative
    # values', shapes that do not broadcast; with n_doms's high bit, after gigabytes), or packed another event's
    # pulses without a word (pulse_start off by one or negative, dom_start off by one)
    'n_doms + 1': (_record('n_doms', lambda v: v + 1, row=0), 'events.npy', ENDS),
    'n_doms - 1': (_record('n_doms', lambda v: v - 1), 'events.npy', ENDS),
    'n_doms negative': (_record('n_doms', lambda v: -3), 'events.npy', r"n_doms -3, not from 1 to the 5160 sensors"),
    'n_doms high bit': (_record('n_doms', lambda v: v | 1 << 28), 'events.npy', r"n_doms 268435489, not from 1 to the 5160 sensors"),
    'dom_start + 1': (_record('dom_start', lambda v: v + 1, named=-1), 'events.npy', ENDS),
    'pulse_start negative': (_record('pulse_start', lambda v: -5, named=-1), 'events.npy', ENDS),
    'the first pulse_start': (_record('pulse_start', lambda v: 1, row=0), 'events.npy', r"the first event's pulse_start is 1, not 0"),
    'n_pulses + 1': (_record('n_pulses', lambda v: v + 1), 'events.npy', ENDS),
    'n_pulses 0': (_record('n_pulses', lambda v: 0), 'events.npy', r"n_pulses 0, below its n_doms"),
    'the last event past the end': (_record('n_pulses', lambda v: v + 1, row=39), 'events.npy',
                                    r"the last event's pulses end at \d+ \(pulse_start \+ n_pulses\), pulses\.npy at \d+"),
    'DOM offsets not increasing': (_dom(lambda e: e['dom_start'][5] + 1, lambda v: v + 2), 'doms.npy',
                                   r"its DOM offsets do not increase: its DOM 1 starts at pulse \d+, DOM 2 \(of 33; 33 is the end\) at \d+"),
    "an event's first DOM offset": (_dom(lambda e: 0, lambda v: v + 1), 'doms.npy',
                                    r"its 103 DOMs hold pulses \[1, 400\), its record in events\.npy \[0, 400\) \(pulse_start, n_pulses\)"),
    'the last DOM offset high bit': (_dom(lambda e: -1, lambda v: v | 1 << 30), 'doms.npy', r"its 29 DOMs hold pulses \[\d+, 10737\d+\), its record in events\.npy \[\d+, \d+\) \(pulse_start, n_pulses\)"),
    # an IndexError in the batching or in the classical fits (a DOM's later pulse: event 0's DOM 0 has many), or NaN
    # in the model's features, which train.py took for a NaN loss; a time far off went in as it was
    'sensor_id bit 13': (_pulse('sensor_aux', lambda v: v ^ 1 << 13), 'pulses.npy',
                         r"its pulse 3: sensor_id \d+, past the geometry's 5160 sensors"),
    "a DOM's later pulse's sensor_id": (_pulse('sensor_aux', lambda v: v ^ 1 << 13, row=0, at=1), 'pulses.npy',
                                        r"its pulse 1: sensor_id \d+, past the geometry's 5160 sensors"),
    'charge NaN': (_pulse('charge', lambda v: np.nan), 'pulses.npy', r"its pulse 3: charge nan, not from 0 to 65504"),
    'charge infinite': (_pulse('charge', lambda v: np.inf), 'pulses.npy', r"its pulse 3: charge inf, not from 0 to 65504"),
    'charge negative': (_pulse('charge', lambda v: -1), 'pulses.npy', r"its pulse 3: charge -1\.0, not from 0 to 65504"),
    'time high bit': (_pulse('dt', lambda v: v | 1 << 31), 'pulses.npy',
                      r"its pulse 3: time \d+ ns after the event's t0, past the split's longest event \(\d+ ns\)"),
    # NaN in the model's features or its loss: train.py stopped on a NaN loss or val error, blaming the learning rate
    # or the weights, and sample.py took a val split with a NaN azimuth for one without labels; a finite label out of
    # range trained as a direction
    'fit_azimuth NaN': (_record('fit_azimuth', lambda v: np.nan), 'events.npy', r"fit_azimuth nan, a seed that is not finite"),
    'ilf_z infinite': (_record('ilf_z', lambda v: np.inf), 'events.npy', r"ilf_z inf, a seed that is not finite"),
    'azimuth NaN': (_record('azimuth', lambda v: np.nan), 'events.npy', r"azimuth nan, a label not from 0 to 6\.283185"),
    'zenith past pi': (_record('zenith', lambda v: v + 4), 'events.npy', r"zenith [\d.]+, a label not from 0 to 3\.141593"),
    # the truth of a simulated set: a kind code past the names trained the track head on a cascade and counted the
    # event among sample.py's cascades; an energy of 0 or below trained the energy head toward log10(1e-3 GeV)
    'kind 7': (_record('kind', lambda v: 7), 'events.npy', r"kind 7, not a kind code \(0 to 1\)"),
    'energy negative': (_record('energy', lambda v: -v), 'events.npy', r"energy -[\d.e+]+, not above 0 GeV"),
    'energy infinite': (_record('energy', lambda v: np.inf), 'events.npy', r"energy inf, not above 0 GeV"),
}


@pytest.mark.parametrize('case', list(DAMAGE))
def test_damaged_contents_are_named_not_packed(case, prepared, tmp_path):
    damage, files, why = DAMAGE[case]
    s, event_id = _damaged_val(prepared, tmp_path, damage)
    message = (re.escape(f"{tmp_path}/val/batch_3/{files}: event_id {event_id}: ") + why + re.escape(
               f"; the shard is damaged: rebuild it with: python prepare.py --raw_dir={prepared}/raw --out_dir={tmp_path} ")
               + r".*--verify=True$")
    with pytest.raises(prepare.SplitError, match=message):
        pack_batch(s, np.arange(40), 3000, 3000, 64, 64)  # the whole shard in one batch
    with pytest.raises(prepare.SplitError, match=message):
        s.events(np.arange(40))  # as the classical fits read them


def test_an_unknown_energy_is_no_damage(prepared, tmp_path):
    """A NaN energy in the truth is an unknown one (a user's own simulation may lack some): packed as NaN, which
    the energy head's loss leaves out, not named as damage."""
    s, event_id = _damaged_val(prepared, tmp_path, _record('energy', lambda v: np.nan))
    b, n = pack_batch(s, np.arange(40), 3000, 3000, 64, 64)
    assert n == 40 and np.isnan(b['event_log_energy'][5]) and np.isfinite(np.delete(b['event_log_energy'][:n], 5)).all()


def test_damage_met_in_a_loader_worker_comes_out_of_next(prepared, tmp_path):
    """BatchLoader's worker processes pack the pulses (its thread plans from the records): a damaged charge met there
    is the same SplitError out of next(), not a hang."""
    s, event_id = _damaged_val(prepared, tmp_path, _pulse('charge', lambda v: np.nan))
    loader = BatchLoader(s, 3000, 3000, 64, 64, shuffle=False, epochs=1, workers=2)
    with pytest.raises(prepare.SplitError, match=f"val/batch_3/pulses.npy: event_id {event_id}: its pulse 3: charge nan"):
        next(loader)
    loader.close()


def test_changed_meta_truth_or_geometry_rebuilds_the_shards_made_of_them(tmp_path, clean_raw):
    """A re-run keeps a shard only while its batch file, its meta and truth rows and the geometry are what made it:
    new labels are read, and an edit that breaks the meta is met as on a first run, not kept from before."""
    shutil.copytree(clean_raw, tmp_path / 'raw')
    raw, out = str(tmp_path / 'raw'), str(tmp_path / 'out')
    run = lambda log: prepare.run(raw, out, num_proc=1, log=log, fit_steps=0)
    run(lambda *a: None)
    _corrupt_meta(raw, _bad_value('azimuth', 25, 1.25))  # batch 2's 6th event: a corrected label
    logs = []
    run(logs.append)
    assert [line for line in logs if 'rebuilding' in line] == \
        [f"prepare: {out}/train/batch_2: its meta rows, truth rows or the geometry changed since it was made: rebuilding it"]
    assert open_split(f"{out}/train").azimuth[25] == np.float32(1.25)
    truth = pq.read_table(f"{raw}/train_truth.parquet")
    pq.write_table(_set(truth, 'energy', truth['energy'].to_numpy() * 2), f"{raw}/train_truth.parquet")
    logs = []
    run(logs.append)
    assert sum('truth rows or the geometry changed' in line for line in logs) == 3  # train's and val's; test's truth is its own
    geo = open(f"{raw}/sensor_geometry.csv").read().splitlines()
    sensor, x, yz = geo[-1].split(',', 2)
    open(f"{raw}/sensor_geometry.csv", 'w').write("\n".join(geo[:-1] + [f"{sensor},{float(x) + 1},{yz}"]) + "\n")
    logs = []
    run(logs.append)
    assert sum('truth rows or the geometry changed' in line for line in logs) == 4
    _corrupt_batch(raw, lambda t: _set(t, 'time', t['time'].to_numpy() + 7), b=2)  # the batch file itself, made anew
    logs = []
    run(logs.append)
    assert [line for line in logs if 'rebuilding' in line] == \
        [f"prepare: {out}/train/batch_2: its source {raw}/train/batch_2.parquet changed since it was made: rebuilding it"]
    _corrupt_meta(raw, lambda t: _set(t, 'last_pulse_index', t['last_pulse_index'].to_numpy() + (np.arange(len(t)) == 3)))
    with pytest.raises(PrepareError, match=r"batch_1\.parquet: meta pulse ranges do not match the batch file"):
        run(lambda *a: None)
    assert not os.path.exists(f"{out}/train/manifest.json")


def test_a_moved_raw_folder_keeps_its_shards(tmp_path, clean_raw):
    """A raw folder moved (mv keeps the files' times) or reached by another path keeps its shards, which then name
    their batch files where they are now: the source path was part of a shard's record, and such a re-run rebuilt
    the whole Kaggle set (about 3 hours). A batch file whose time changed is still rebuilt."""
    shutil.copytree(clean_raw, tmp_path / 'raw')
    raw, moved, out = str(tmp_path / 'raw'), str(tmp_path / 'moved'), str(tmp_path / 'out')
    prepare.run(raw, out, num_proc=1, log=lambda *a: None, fit_steps=0)
    before = {f: open(f, 'rb').read() for f in glob.glob(f"{out}/*/batch_*/*.npy")}
    os.rename(raw, moved)
    logs = []
    prepare.run(moved, out, num_proc=1, log=logs.append, fit_steps=0)
    assert not any('rebuilding' in line for line in logs), logs
    assert {f: open(f, 'rb').read() for f in glob.glob(f"{out}/*/batch_*/*.npy")} == before
    with open(f"{out}/train/batch_1/shard.json") as f:
        assert json.load(f)['source'] == f"{moved}/train/batch_1.parquet"
    assert len(prepare.open_split(f"{out}/train")) > 0
    os.utime(f"{moved}/train/batch_1.parquet", ns=(1, 1))
    prepare.run(moved, out, num_proc=1, log=logs.append, fit_steps=0)
    assert [line for line in logs if 'rebuilding' in line] == \
        [f"prepare: {out}/train/batch_1: its source {moved}/train/batch_1.parquet changed since it was made: rebuilding it"]


def test_an_out_dir_named_like_a_pattern_leaves_other_folders_alone(tmp_path, clean_raw):
    """out_dir=packed[1] was read as a glob pattern: the stale-shard sweep of a fresh split layout matched packed1,
    another prepared folder, and deleted its shards."""
    other, odd = str(tmp_path / 'packed1'), str(tmp_path / 'packed[1]')
    prepare.run(clean_raw, other, val_batches=1, num_proc=1, log=lambda *a: None, fit_steps=0)  # train 1, 2; val 3
    before = sorted(glob.glob(f"{other}/*/batch_*/*"))
    prepare.run(clean_raw, odd, val_batches=2, num_proc=1, log=lambda *a: None, fit_steps=0)  # train 1; val 2, 3
    assert sorted(glob.glob(f"{other}/*/batch_*/*")) == before and len(before) == 4 * 4
    assert len(open_split(f"{other}/train")) == 2 * 20 and len(open_split(f"{odd}/train")) == 20
    assert prepare.verify_output(odd, log=lambda *a: None) == {}


def test_an_out_dir_that_links_to_raw_dir_is_refused(tmp_path, clean_raw):
    """The same folder by another spelling: a link (or ..) passed the abspath comparison, and the output was written
    among the raw files."""
    raw = str(tmp_path / 'raw')
    shutil.copytree(clean_raw, raw)
    os.symlink(raw, tmp_path / 'link')
    for out in (str(tmp_path / 'link'), f"{raw}/../raw/"):
        with pytest.raises(PrepareError, match=r"^out_dir .* is raw_dir .* \(the same folder\): give another out_dir$"):
            prepare.run(raw, out, num_proc=1, log=lambda *a: None, fit_steps=0)
    assert sorted(os.listdir(raw)) == sorted(os.listdir(clean_raw))


def test_an_ice_table_by_another_spelling_keeps_the_shards(tmp_path, clean_raw, monkeypatch):
    """fit_ice=ice.txt was recorded as typed: the same table given by its full path (or from another folder) rebuilt
    every shard (hours on the Kaggle set), and the manifest named a file only the folder prepare ran in could find.
    A shard an older prepare.py recorded relative is kept from the folder it was made in."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'ice.txt').write_text("-1000 30 100\n1000 30 100\n")
    out, logs = str(tmp_path / 'out'), []
    prepare.run(clean_raw, out, num_proc=1, log=logs.append, fit_steps=1, fit_ice='ice.txt')
    with open(f"{out}/train/manifest.json") as f:
        assert json.load(f)['made_by']['fit'] == {'steps': 1, 'ice': f"{tmp_path}/ice.txt"}
    with open(f"{out}/train/batch_1/shard.json") as f:
        info = json.load(f)
    with open(f"{out}/train/batch_1/shard.json", 'w') as f:
        json.dump({**info, 'fit': {'steps': 1, 'ice': 'ice.txt'}}, f)  # as an older prepare.py recorded it
    prepare.run(clean_raw, out, num_proc=1, log=logs.append, fit_steps=1, fit_ice=f"{tmp_path}/ice.txt")
    assert not [line for line in logs if 'rebuilding' in line]


def test_the_default_out_dir_sits_beside_the_raw_folder(tmp_path, monkeypatch):
    # raw_dir=. from inside the download packed into ._packed, a hidden folder among the raw files
    os.makedirs(tmp_path / 'kaggle' / 'train')
    monkeypatch.chdir(tmp_path / 'kaggle' / 'train')
    assert prepare.default_out('..') == prepare.default_out(f"{tmp_path}/kaggle/") == f"{tmp_path}/kaggle_packed"
    monkeypatch.chdir(tmp_path / 'kaggle')
    assert prepare.default_out('.') == prepare.default_out('./') == f"{tmp_path}/kaggle_packed"
    assert prepare.default_out('data/sim/') == prepare.default_out('data/sim') == 'data/sim_packed'


def test_the_command_that_mends_a_split_pastes_as_one_word_a_path(tmp_path):
    # the command a damaged split's message gives, pasted into a shell: /data/my set was two words
    made_by = {'raw_dir': '/data/my set', 'val_batches': 1, 'train_batches': 0, 'fit': {'steps': 80, 'ice': 'ice table.txt'}}
    cmd = prepare.mend_command(f"{tmp_path}/out é/train", {'made_by': made_by})
    assert shlex.split(cmd) == ['python', 'prepare.py', '--raw_dir=/data/my set', f'--out_dir={tmp_path}/out é',
                                '--val_batches=1', '--train_batches=0', '--fit_steps=80', '--fit_ice=ice table.txt']


def test_old_format_output_is_refused_and_rebuilt(tmp_path, prepared):
    shutil.copytree(f"{prepared}/out", tmp_path / 'out')
    out = tmp_path / 'out'
    for p in glob.glob(f"{out}/*/manifest.json") + glob.glob(f"{out}/*/*/shard.json"):
        info = json.load(open(p))
        info['format_version'] = 1
        info.pop('files', None)
        info.pop('made_by', None)
        json.dump(info, open(p, 'w'))
    with pytest.raises(prepare.SplitError, match=r"format version 1, this reader reads 4; re-run prepare.py") as e:
        open_split(str(out / 'train'))
    assert f"python prepare.py --raw_dir={prepared}/raw --out_dir={out} (and the val_batches" in str(e.value)
    logs = []
    prepare.run(f"{prepared}/raw", str(out), val_batches=1, num_proc=1, log=logs.append)
    assert sum('made by an older prepare.py' in line and 'rebuilding' in line for line in logs) == 4
    assert len(open_split(str(out / 'train'))) == 80


# -- a full disk: refused before writing, or named and cleaned up mid-run ---------------------------------

def test_short_disk_is_refused_before_writing(clean_raw, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**12, 10**12 - 50_000, 50_000))
    with pytest.raises(PrepareError, match=r"out: not enough disk space: 4 shards to write need up to 0\.\d MB, the disk has 0\.1 MB free"):
        prepare.run(clean_raw, str(tmp_path / 'out'), num_proc=1, log=lambda *a: None)
    assert not glob.glob(str(tmp_path / 'out' / '*' / '*'))
    # the estimate is an upper bound of what is written, and not a loose one
    monkeypatch.undo()
    real, need = prepare.check_space, []
    monkeypatch.setattr(prepare, 'check_space', lambda *a: need.append(real(*a)))
    prepare.run(clean_raw, str(tmp_path / 'out'), num_proc=1, log=lambda *a: None)
    written = sum(os.path.getsize(p) for p in glob.glob(str(tmp_path / 'out' / '*' / 'batch_*' / '*')))
    assert written <= need[0] < 1.5 * written


def test_disk_full_mid_run_is_named_and_cleaned_up(clean_raw, tmp_path, monkeypatch):
    real, calls = prepare._save, []

    def save(path, a):
        calls.append(path)
        if len(calls) == 5:  # the second shard's doms.npy
            raise OSError(errno.ENOSPC, 'No space left on device')
        return real(path, a)
    monkeypatch.setattr(prepare, '_save', save)  # the worker is forked from here, so it saves through this too
    with pytest.raises(PrepareError, match=r"train/batch_2: no space left on the device while writing it; free some space and re-run"):
        prepare.run(clean_raw, str(tmp_path / 'out'), num_proc=1, log=lambda *a: None)
    assert sorted(os.listdir(tmp_path / 'out' / 'train')) == ['batch_1']  # the finished shard, no temp folder
    monkeypatch.undo()
    logs = []
    prepare.run(clean_raw, str(tmp_path / 'out'), num_proc=1, log=logs.append)
    assert any('1 shards were already complete' in line for line in logs)
    assert len(open_split(str(tmp_path / 'out' / 'train'))) == 40


def test_loader_resumes_at_a_position_with_the_same_batches(prepared):
    s = open_split(f"{prepared}/out/train")
    args = (3000, 3000, 16, 64)
    whole = BatchLoader(s, *args, seed=3)
    first = [next(whole) for _ in range(4)]
    position = whole.position
    rest = [next(whole) for _ in range(12)]  # across epoch boundaries (80 events, 16 a batch at most)
    whole.close()
    assert first[-1]['position'] == position and rest[-1]['epoch'] >= 2
    resumed = BatchLoader(s, *args, seed=3, start=position)
    again = [next(resumed) for _ in range(12)]
    resumed.close()
    for a, b in zip(rest, again):
        assert a['position'] == b['position'] and (a['event_index'] == b['event_index']).all()
        assert (a['pulse_time'] == b['pulse_time']).all()


def test_loader_workers_give_the_thread_batches(prepared):
    """Worker processes pack and transform the same batches, in the same order, as the background thread (with the
    model's stream layout and features as the transform, as train.py runs it)."""
    import functools
    import torch
    import model as M
    s = open_split(f"{prepared}/out/train")
    runs = []
    for workers in (0, 2):
        loader = BatchLoader(s, 3000, 3000, 16, 64, seed=5, workers=workers,
                             transform=functools.partial(M.model_inputs, path='sdpa'))
        runs.append([next(loader) for _ in range(7)])  # across an epoch boundary
        loader.close()
    for a, b in zip(*runs):
        assert a.keys() == b.keys()
        for k in a:
            same = torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
            assert same, k
    assert runs[0][-1]['epoch'] == 1


def test_loader_workers_close_under_a_signal_handler(prepared):
    """train.py handles SIGTERM (a flag, read between iterations) before it makes its loaders, whose workers are
    forked with that handler and ended by SIGTERM when a loader closes: a worker that kept the handler ignored it, and
    close() waited forever (each evaluation closes its loader). In a process of its own, so a hang cannot stop the
    suite."""
    code = (f"import signal, sys; sys.path.insert(0, {ROOT!r})\n"
            "from prepare import BatchLoader, open_split\n"
            "signal.signal(signal.SIGTERM, lambda signum, frame: print('handler ran', flush=True))\n"
            f"split = open_split({str(prepared) + '/out/train'!r})\n"
            "for _ in range(10):  # whether a worker is still there to get the SIGTERM is a race: the hang came 1 in 8\n"
            "    loader = BatchLoader(split, 3000, 3000, 16, 64, workers=4)\n"
            "    next(loader)\n"
            "    loader.close()\n"
            "print('closed', flush=True)\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == 'closed\n', (r.stdout, r.stderr[-2000:])


def test_loader_workers_outlive_a_sigterm_to_the_whole_job(prepared):
    """A scheduler's SIGTERM to every process of the job (SLURM's scancel, kill -TERM -<pgid>) reaches the loader's
    workers too, while train.py's handler lets the run go on to its stop (the iteration, the evaluation under way, under
    torchrun the log interval). The workers died of it, the batches they were packing never came, and the run waited
    for them forever, saving nothing (60 s per batch in flight in close()). They go on, and close() still ends them. In
    a process of its own (and its own process group), so a hang cannot stop the suite."""
    code = (f"import os, signal, sys, time; sys.path.insert(0, {ROOT!r})\n"
            "from prepare import BatchLoader, open_split\n"
            "signal.signal(signal.SIGTERM, lambda signum, frame: None)  # train.py's: a flag, read between iterations\n"
            f"split = open_split({str(prepared) + '/out/train'!r})\n"
            "def slow(b):  # a worker is still packing a batch when the signal comes\n"
            "    time.sleep(0.1)\n"
            "    return b\n"
            "args = (split, 3000, 3000, 4, 64)\n"
            "whole = [b['position'] for b in BatchLoader(*args, shuffle=False, epochs=1)]\n"
            "loader = BatchLoader(*args, shuffle=False, epochs=1, workers=2, transform=slow)\n"
            "got = [next(loader)['position']]\n"
            "os.killpg(0, signal.SIGTERM)\n"
            "got += [b['position'] for b in loader]\n"
            "loader.close()\n"
            "print(got == whole, len(got), flush=True)\n")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, start_new_session=True)
    assert r.returncode == 0 and r.stdout == 'True 20\n', (r.stdout, r.stderr[-2000:])


def test_loader_refuses_a_rank_without_events(prepared):
    s = open_split(f"{prepared}/out/val")  # 40 events
    for rank in (0, 50):  # rank 50's endless loader would wait forever; rank 0 refuses too, or it would wait for 50
        with pytest.raises(ValueError, match=r"val: 40 events for 64 ranks, so ranks 40\.\.63 get none; use fewer ranks"):
            BatchLoader(s, 3000, 3000, 16, 64, world_size=64, rank=rank)
    with pytest.raises(ValueError, match=r"rank 2 is not among the ranks 0\.\.1 of world_size 2"):
        BatchLoader(s, 3000, 3000, 16, 64, world_size=2, rank=2)
    loader = BatchLoader(s, 3000, 3000, 16, 64, world_size=64, rank=50, epochs=1)  # an evaluation's: nothing to do
    with pytest.raises(StopIteration):
        next(loader)
    loader.close()


def test_records_that_prepare_did_not_write_are_named(tmp_path, prepared):
    shutil.copytree(f"{prepared}/out/val", tmp_path / 'val')
    manifest = (tmp_path / 'val' / 'manifest.json').read_text()
    for bad in ('{}', '[]'):
        (tmp_path / 'val' / 'manifest.json').write_text(bad)
        with pytest.raises(prepare.SplitError, match=r"val/manifest\.json: not a manifest that prepare\.py wrote"):
            open_split(str(tmp_path / 'val'))
    (tmp_path / 'val' / 'manifest.json').write_text(manifest)
    shard = tmp_path / 'val' / 'batch_3' / 'shard.json'
    info = json.loads(shard.read_text())
    for bad, why in (({**info, 'format_version': 5}, "format version 5, made by a newer prepare.py"),
                     ({k: v for k, v in info.items() if k != 'files'}, "no record of its array files"), ([], "not a record")):
        shard.write_text(json.dumps(bad))
        with pytest.raises(prepare.SplitError, match=f"batch_3/shard.json: {why}"):
            open_split(str(tmp_path / 'val'))


def test_geometry_in_whole_metres_is_read(tmp_path, clean_raw):
    shutil.copytree(clean_raw, tmp_path / 'raw')
    path = tmp_path / 'raw' / 'sensor_geometry.csv'
    rows = [line.split(',') for line in path.read_text().splitlines()[1:]]
    path.write_text("sensor_id,x,y,z\n" + "".join(f"{r[0]},{round(float(r[1]))},{round(float(r[2]))},{round(float(r[3]))}\n" for r in rows))
    prepare.run(str(tmp_path / 'raw'), str(tmp_path / 'out'), num_proc=1, log=lambda *a: None, fit_steps=0)
    geometry = open_split(str(tmp_path / 'out' / 'val')).geometry
    assert geometry[7].tolist() == [round(float(c)) for c in rows[7][1:]]


def test_tables_read_as_pyarrow_10_to_12_give_them(clean_raw, tmp_path, monkeypatch):
    """requirements.txt allows pyarrow 10, whose table columns' to_numpy() takes no keyword (zero_copy_only came in
    13): prepare.py passed one for the auxiliary column and stopped on every batch file with a TypeError. Here every
    table prepare.py reads has columns that refuse keywords, as those versions' do."""
    class Column:
        def __init__(self, column):
            self.column = column

        def to_numpy(self):
            return self.column.to_numpy()

        def __getattr__(self, name):
            return getattr(self.column, name)

    class Table(Column):
        def __getitem__(self, name):
            return Column(self.column[name])

    read, read_table, read_csv = pq.ParquetFile.read, pq.read_table, pa.csv.read_csv
    monkeypatch.setattr(pq.ParquetFile, 'read', lambda self, *a, **k: Table(read(self, *a, **k)))
    monkeypatch.setattr(pq, 'read_table', lambda *a, **k: Table(read_table(*a, **k)))
    monkeypatch.setattr(pa.csv, 'read_csv', lambda *a, **k: Table(read_csv(*a, **k)))
    prepare.run(clean_raw, str(tmp_path / 'out'), num_proc=1, log=lambda *a: None, fit_steps=0)
    val = open_split(str(tmp_path / 'out' / 'val'))
    assert len(val) == 20 and not np.isnan(val.truth['energy']).all()  # the pulses, and the truth read by read_table


def test_constants_and_imported_names_are_not_settings(tmp_path):
    """prepare.py's settings are the lower-case globals of its settings block: --FORMAT_VERSION=9 (data the reader then
    refuses), --AUX_BIT=... (a corrupted pulse layout) or the imported FIRST_COMPLETED are unknown settings."""
    for arg in ('--FORMAT_VERSION=9', '--AUX_BIT=1', '--FIRST_COMPLETED=x'):
        r = subprocess.run([sys.executable, 'prepare.py', f"--raw_dir={tmp_path / 'nothing'}", arg], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and f"unknown setting '{arg[2:].split('=')[0]}'" in r.stderr, r.stderr[-2000:]
        assert 'FORMAT_VERSION' not in r.stderr.split('settings are:')[1] and 'fit_steps' in r.stderr


def test_linefit_seeds_memory_stays_per_chunk(prepared):
    """prepare.linefit_seeds holds its float64 inputs one chunk at a time: made for the whole batch file at once they
    took 56 bytes a pulse (1.9 GB of a real 33M-pulse file, per worker), on top of what pack_file holds."""
    import tracemalloc
    s = open_split(f"{prepared}/out/train")
    ev = s.events(np.tile(np.arange(len(s)), 60))
    n_pulses = len(ev['time'])
    expected = prepare.linefit_seeds(ev, s.geometry, chunk_doms=256)
    tracemalloc.start()
    try:
        columns, direct = prepare.linefit_seeds(ev, s.geometry, chunk_doms=256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * n_pulses, f"{peak / n_pulses:.1f} bytes a pulse"
    assert (direct == expected[1]).all() and all((columns[k] == expected[0][k]).all() for k in columns)
    whole = prepare.linefit_seeds(ev, s.geometry)  # one chunk: the same results
    assert (whole[1] == direct).all() and all(np.allclose(whole[0][k], columns[k], atol=1e-9) for k in columns)


def test_quick_fit_runs_per_chunk_of_events(prepared, monkeypatch, tmp_path):
    """pack_file fits chunks of whole events (FIT_CHUNK_PULSES), not the whole batch file at once (whose inputs took
    2.9 GB for a real 33M-pulse file, per worker), with the same result as one call on the whole file."""
    calls = []
    real_fit = classical.time_fit
    def counting(ev, *a, **k):
        calls.append((len(ev['pulse_offsets']) - 1, len(ev['time'])))
        return real_fit(ev, *a, **k)
    monkeypatch.setattr(classical, 'time_fit', counting)
    monkeypatch.setattr(prepare, 'FIT_CHUNK_PULSES', 500)
    raw = f"{prepared}/raw"
    geometry = prepare.read_geometry(raw)
    meta = next(m for b, m in prepare.iter_meta(f"{raw}/train_meta.parquet", prepare.META_COLUMNS) if b == 1)
    fit = {'steps': 20, 'ice': 'bulk'}
    pulses, doms, events, stats = prepare.pack_file(f"{raw}/train/batch_1.parquet", meta, None, geometry, True, fit)
    assert len(calls) > 2 and sum(c[0] for c in calls) == len(events) and sum(c[1] for c in calls) == len(pulses)
    assert all(p <= 500 or e == 1 for e, p in calls)  # a chunk is whole events of at most 500 pulses, or one larger event
    calls.clear()
    monkeypatch.setattr(prepare, 'FIT_CHUNK_PULSES', 1 << 30)
    _, _, whole, _ = prepare.pack_file(f"{raw}/train/batch_1.parquet", meta, None, geometry, True, fit)
    assert len(calls) == 1
    for name in ('fit_azimuth', 'fit_zenith', 'fit_rlogl'):
        np.testing.assert_allclose(events[name], whole[name], atol=1e-4)


def test_a_read_only_out_dir_is_named_in_one_line(clean_raw, tmp_path, monkeypatch):
    """prepare re-run on a prepared folder the user may only read (a group's shared copy, a read-only mount) stops in
    one line naming the folder, and writes nothing: it died in a traceback from the lock file's os.open. Emulated:
    the tests run as root, whom permissions do not stop, so the lock file's open fails as on a read-only mount."""
    import errno
    out = str(tmp_path / 'out')
    prepare.run(clean_raw, out, num_proc=1, log=lambda *a: None)
    before = sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs)
    real_open = os.open

    def read_only(path, *a, **k):
        if str(path).endswith('/lock'):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, 'open', read_only)
    with pytest.raises(SystemExit, match=f"^prepare: error: {out}/lock: cannot write into {out} \\(Read-only file "
                                         f"system\\); prepare.py writes there: give an out_dir you can write$"):
        prepare.run(clean_raw, out, num_proc=1, log=lambda *a: None)
    assert sorted(os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs) == before


def test_a_changed_fit_ice_rebuilds_the_shards(tmp_path, clean_raw):
    """A re-run with the same fit_steps in another ice (fit_ice='toy' after 'bulk', or another table file) refits every
    shard: the quick fit, the model's second seed, depends on the ice, and a shard kept from before would hold the old
    ice's fits under a manifest that records the new one."""
    out = str(tmp_path / 'out')
    prepare.run(clean_raw, out, num_proc=1, log=lambda *a: None, fit_steps=1, fit_ice='bulk')
    bulk = open_split(f"{out}/val")._column('fit_rlogl')
    logs = []
    prepare.run(clean_raw, out, num_proc=1, log=logs.append, fit_steps=1, fit_ice='toy')
    assert sum("its quick fit was made with {'steps': 1, 'ice': 'bulk'}, this run asks for {'steps': 1, 'ice': 'toy'}: "
               "rebuilding it" in line for line in logs) == 4, logs
    for d in glob.glob(f"{out}/*/batch_*"):
        with open(f"{d}/shard.json") as f:
            assert json.load(f)['fit'] == {'steps': 1, 'ice': 'toy'}, d
    assert not np.array_equal(open_split(f"{out}/val")._column('fit_rlogl'), bulk)


def _raw_statistics(prepared):
    """The train split's statistics (batch files 1 and 2) computed from the raw pulses."""
    events = list(read_raw_events(f"{prepared}/raw", 'train', (1, 2)).values())  # (sensor, time, charge, aux) each
    dom_sizes = [np.unique(e['f0'], return_counts=True)[1] for e in events]
    dom_size, charge = np.concatenate(dom_sizes), np.concatenate([e['f2'] for e in events])
    log_q = np.log10(np.maximum(charge, float(np.float16(1e-3))))
    return {'n_pulses': len(charge), 'n_doms': len(dom_size), 'n_events': len(events)}, {
        'aux_fraction': np.concatenate([e['f3'] for e in events]).mean(), 'single_pulse_dom_fraction': (dom_size == 1).mean(),
        'mean_pulses_per_event': len(charge) / len(events), 'max_pulses_per_event': max(map(len, events)),
        'max_doms_per_event': max(map(len, dom_sizes)), 'max_pulses_per_dom': dom_size.max(),
        'max_time_span': max(np.ptp(e['f1']) for e in events), 'log10_charge_mean': log_q.mean(), 'log10_charge_std': log_q.std()}


def test_manifest_statistics_describe_the_split_s_pulses(prepared):
    """manifest.json's counts and stats are the split's own, summed over its shards from the raw pulses: the
    fractions over the right totals (auxiliary pulses over pulses, single-pulse DOMs over DOMs), the maxima over every
    shard (the reader's check of pulse times reads max_time_span)."""
    m = json.load(open(f"{prepared}/out/train/manifest.json"))
    counts, want = _raw_statistics(prepared)
    assert {k: m[k] for k in counts} == counts
    assert set(m['stats']) == set(want)
    for k, v in want.items():
        if not k.startswith('log10_charge'):  # test_manifest_log10_charge_statistics
            assert m['stats'][k] == pytest.approx(float(v), rel=1e-6), k


def test_manifest_log10_charge_statistics(prepared):
    """The log10 charge's mean and spread over the split's pulses (each pulse's charge at least 1e-3 pe), from the
    shards' float sums (write_manifest cut them to whole numbers until 2026-12-08: a mean of -0.070957 for -0.071021)."""
    m = json.load(open(f"{prepared}/out/train/manifest.json"))
    _, want = _raw_statistics(prepared)
    for k in ('log10_charge_mean', 'log10_charge_std'):
        assert m['stats'][k] == pytest.approx(float(want[k]), rel=1e-4), k


def test_loader_with_max_events_total_draws_only_the_first_events(prepared):
    """max_events_total=n (train.py's train_events and eval_events, sample.py's n): every epoch draws the split's first
    n events, each once across the ranks, shuffled or in order, and none past them."""
    s = open_split(f"{prepared}/out/train")
    for shuffle in (False, True):
        seen = []
        for rank in range(2):
            loader = BatchLoader(s, 3000, 3000, 16, 64, shuffle=shuffle, seed=2, rank=rank, world_size=2, epochs=1,
                                 max_events_total=30)
            seen += [i for b in loader for i in b['event_index'][:b['n_events']]]
        assert sorted(seen) == list(range(30)), shuffle


def test_fit_steps_0_takes_the_plain_linefit_where_the_improved_one_has_no_velocity(tmp_path):
    """With fit_steps=0 the stored quick fit is the improved LineFit, or where it found no velocity (its kept pulses all
    at one time) the plain LineFit's direction: where the neutrino comes from, minus its velocity. Here the three
    non-auxiliary hits share a time and only the auxiliary pulses (weight 1e-3 in the plain fit) move along +x."""
    geometry = np.array([[0, 0, 0], [20, 0, 0], [0, 20, 0], [100, 0, 0], [200, 0, 0], [300, 0, 0]], np.float32)
    rows = [(0, 10000, False), (1, 10000, False), (2, 10000, False), (3, 10400, True), (4, 10800, True), (5, 11200, True)]
    sensor, t, aux = (np.array(c) for c in zip(*rows))
    src = str(tmp_path / 'batch_1.parquet')
    pq.write_table(pa.table({'event_id': np.full(6, 7), 'sensor_id': sensor.astype(np.int16), 'time': t,
                             'charge': np.ones(6), 'auxiliary': aux}), src)
    meta = {'event_id': np.array([7]), 'first_pulse_index': np.array([0]), 'last_pulse_index': np.array([5])}
    _, _, events, _ = prepare.pack_file(src, meta, None, geometry, False, {'steps': 0, 'ice': None})
    assert all(events[f'ilf_{c}'][0] == 0 for c in 'xyz')  # the case: no improved LineFit
    lf_v = np.array([[events[f'lf_v{c}'][0] for c in 'xyz']])
    assert lf_v[0, 0] > 0  # the plain fit's velocity along +x
    stored = prepare.angles_to_dir(events['fit_azimuth'], events['fit_zenith'])
    assert classical.angular_error(stored, -lf_v)[0] < 1e-4
    assert events['fit_rlogl'][0] == classical.TIME_FIT_FAILED


def test_each_event_carries_its_own_truth_whatever_the_truth_file_s_order(tmp_path, clean_raw):
    """events.npy's truth columns are each event's row of the truth file, matched by event_id (not by position: here
    its rows are shuffled), kind coded as KIND_NAMES lists it (0 track, 1 cascade): the kind and energy heads learn
    them, and sample.py's figures group by them."""
    shutil.copytree(clean_raw, tmp_path / 'raw')
    raw = str(tmp_path / 'raw')
    truth = pq.read_table(f"{raw}/train_truth.parquet")
    truth = truth.take(np.random.default_rng(0).permutation(len(truth)))
    pq.write_table(truth, f"{raw}/train_truth.parquet")
    prepare.run(raw, str(tmp_path / 'out'), num_proc=1, log=lambda *a: None, fit_steps=0)
    row = {e: i for i, e in enumerate(truth['event_id'].to_pylist())}
    for split in ('train', 'val'):
        s = open_split(str(tmp_path / 'out' / split))
        at = np.array([row[e] for e in s.event_id.tolist()])
        kind = np.array(truth['kind'].to_pylist())[at]
        assert set(kind) == set(prepare.KIND_NAMES)
        np.testing.assert_array_equal(s.truth['kind'], (kind == 'cascade').astype(np.uint8))
        for name in ('energy', 'vertex_x', 'vertex_y', 'vertex_z'):
            np.testing.assert_array_equal(s.truth[name], truth[name].to_numpy()[at].astype(np.float32), name)
