"""
Kaggle-layout parquet -> packed, memory-mapped binaries, and the reader every later stage uses.

    python prepare.py                                   # embedded default: simulate data/sim, pack to data/sim_packed
    python prepare.py --raw_dir=/data/icecube --out_dir=data/kaggle_packed --num_proc=16
    python prepare.py --out_dir=data/kaggle_packed --verify=True  # re-read every shard against its checksums

Input: a folder in the Kaggle "IceCube - Neutrinos in Deep Ice" layout (real, or written by simulate.py).
Output: out_dir/train, out_dir/val (the last `val_batches` batch files of train, held out whole) and
out_dir/test, each a folder of shards, one per batch file, plus geometry.npy and manifest.json:

    out_dir/<split>/batch_<N>/pulses.npy   (n_pulses,) 8-byte records, sorted by (event, sensor, time):
                                             dt          uint32   time - t0 of the event (ns), exact
                                             sensor_aux  uint16   sensor_id | direct << 14 | auxiliary << 15, exact
                                                                  (direct: kept by the improved LineFit, below)
                                             charge      float16  photoelectrons (the data's own precision)
                           doms.npy     (n_doms + 1,) uint32: shard-local index of each DOM's first pulse;
                                        a DOM is one hit sensor in one event, its pulses contiguous
                           events.npy   (n_events,) records: event_id, t0 (first pulse time, ns),
                                        pulse_start (int64), n_pulses, n_doms, dom_start (int64),
                                        azimuth, zenith (NaN in test), fit_azimuth, fit_zenith, fit_rlogl
                                        (the quick likelihood fit, classical.time_fit: the model's second
                                        seed), lf_vx, lf_vy, lf_vz (the plain LineFit's velocity, m/ns),
                                        ilf_x, ilf_y, ilf_z (the improved LineFit's direction, the model's
                                        first seed; classical.linefit_seeds), and the truth columns where the raw
                                        folder has a truth file (simulate.py writes one)
                           shard.json   counts, summary statistics, the source file's stamp, a digest of its
                                        meta and truth rows and the geometry, and each array file's size and
                                        CRC-32; written last, inside the shard
    out_dir/<split>/geometry.npy         (n_sensors, 3) float32 x, y, z in metres, indexed by sensor_id
    out_dir/<split>/manifest.json        shards, counts, dtypes, statistics; written when the split is complete

Event i of a shard has pulses [pulse_start, pulse_start + n_pulses) and DOMs [dom_start, dom_start + n_doms);
DOM d has pulses [doms[d], doms[d+1]). Everything is found in O(1) from np.load(..., mmap_mode='r').
Offsets are int64 at event level; DOM offsets are uint32 because they are local to one shard (a batch
file holds tens of millions of pulses, never four billion; prepare checks it).

Each shard is built in a temporary folder and renamed when complete, so an interrupted prepare never
leaves a shard that looks complete, and a re-run skips the shards that are (and rebuilds one whose
source file (its name, size or time: not its folder, which may move), meta rows, truth rows or geometry changed, whose quick fit was made with other fit_steps or fit_ice,
or whose files differ in size from those shard.json records: a copy cut short).
A SIGTERM (a scheduler's stop, sent to the main process alone) ends the workers too, and prepare.py exits 143.
Workers process one batch file each, so memory is bounded by num_proc batch files (up to ~3.5 GB a worker at a real
one's size, 33M pulses). Bad input, an unreadable file, or a full disk stops the run with a message naming the file,
the event and the problem.

The reader:
    from prepare import open_split
    s = open_split('data/sim_packed/val')
    len(s), s.event_id, s.azimuth, s.zenith, s.truth, s.geometry
    s.event(i)          -> dict of numpy arrays sensor_id, time, charge, auxiliary in (sensor, time) order
    s.events(idx)       -> the same for many events, concatenated, with pulse/DOM offsets (vectorised)
and the batcher that turns events into the model's fixed-shape micro-batches:
    pack_batch(s, idx, max_pulses, max_doms, max_events, max_pulses_per_dom) -> (batch, n_taken)
    BatchLoader(s, ...)  iterates such batches, filled by a background thread (or `workers` processes)
"""

import collections
import errno
import glob
import hashlib
import io
import json
import os
import queue
import shlex
import shutil
import signal
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from functools import cached_property
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.context import ForkContext, ForkProcess

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import torch

import classical  # the quick likelihood fit stored with each event
import model as M  # the batch layout (_ranges) and the angle convention
import simulate  # the default synthetic set, when there is no Kaggle data
from configurator import lock_folder, setting_names

# -----------------------------------------------------------------------------
# settings (override with a config file or --key=value, see configurator.py)
raw_dir = 'data/kaggle'   # Kaggle-layout folder; if this default one holds no data, the toy set is simulated
sim_dir = 'data/sim'      # where the embedded default synthetic set is simulated (never the same as raw_dir)
out_dir = ''              # '' = <raw_dir>_packed (<sim_dir>_packed for the toy set), so real and synthetic outputs
                          # never share a folder
val_batches = 1           # the last val_batches train batch files become the val split
train_batches = 0         # use only the first N train batch files of the meta (0 = all); for partial downloads
num_proc = max(1, min(8, os.cpu_count() or 1))  # worker processes, one batch file each
fit_steps = 80            # steps of the quick likelihood fit stored with each event, the model's second seed
                          # (classical.time_fit, most of prepare's time); 0 stores the improved LineFit instead:
                          # a prepare of the whole Kaggle set many times faster, a model less precise on bright tracks
fit_ice = 'auto'          # the fit's ice (classical.ice_table): 'auto' = 'toy' for a simulate.py set (it has a
                          # simulation.json), 'bulk' for real data; or a depth table file (classical.ice_table)
verify = False            # also re-read every finished shard against its recorded checksums (reads the whole output)
                          # and rebuild the damaged ones; without the raw files, only report them
# the settings: the lower-case globals above (not the constants below, nor names imported, such as FIRST_COMPLETED)
SETTINGS = [k for k in setting_names(globals()) if k.islower()]
# -----------------------------------------------------------------------------
# the least value of each count setting, checked by the command line and by run(): 0 workers or 0 val batch files would
# end in a traceback after all the packing, and a negative train_batches would slice off the last batch files
LEAST = dict(val_batches=1, train_batches=0, num_proc=1, fit_steps=0)

FORMAT_VERSION = 4  # 2: shard.json records each array file's size and CRC-32; 3: each event's quick fit; 4: both
                    # LineFits per event and each pulse's direct flag (the model computed them in every batch)
PULSE_DTYPE = np.dtype([('dt', '<u4'), ('sensor_aux', '<u2'), ('charge', '<f2')])
EVENT_FIELDS = [('event_id', '<i8'), ('t0', '<i8'), ('pulse_start', '<i8'), ('n_pulses', '<i4'),
                ('n_doms', '<i4'), ('dom_start', '<i8'), ('azimuth', '<f8'), ('zenith', '<f8'),
                ('fit_azimuth', '<f4'), ('fit_zenith', '<f4'), ('fit_rlogl', '<f4'),
                ('lf_vx', '<f4'), ('lf_vy', '<f4'), ('lf_vz', '<f4'), ('ilf_x', '<f4'), ('ilf_y', '<f4'), ('ilf_z', '<f4')]
TRUTH_FIELDS = [('energy', '<f4'), ('kind', 'u1'), ('vertex_x', '<f4'), ('vertex_y', '<f4'), ('vertex_z', '<f4')]
SEED_FIELDS = [name for name, _ in EVENT_FIELDS[8:]]  # what prepare.py computes for the model: the seed fits
LABEL_MAX = {'azimuth': 2 * np.pi, 'zenith': np.pi}  # the labels run from 0 to these (to within 1e-9: float rounding)
KIND_NAMES = ['track', 'cascade']  # truth 'kind' codes
AUX_BIT = 1 << 15
DIRECT_BIT = 1 << 14  # sensor ids stay below it (IceCube has 5,160)
MAX_DT = np.iinfo(np.uint32).max
MAX_CHARGE = float(np.finfo(np.float16).max)
BATCH_COLUMNS = {'event_id': 'integer', 'sensor_id': 'integer', 'time': 'integer',
                 'charge': 'floating', 'auxiliary': 'boolean'}
META_COLUMNS = {'batch_id': 'integer', 'event_id': 'integer', 'first_pulse_index': 'integer',
                'last_pulse_index': 'integer', 'azimuth': 'floating', 'zenith': 'floating'}


class PrepareError(Exception):
    """Bad input: the message names the file, the event where relevant, and the problem."""


class SplitError(ValueError):
    """A prepared split that cannot be read as it is (damaged, or made by another format version): the message
    names the file and the command that mends it."""


# -----------------------------------------------------------------------------
# input checks and reading

@contextmanager
def _reading(path):
    """A file that cannot be read (damaged, cut short, empty, no permission) is a named error, not a traceback."""
    try:
        yield
    except (OSError, pa.ArrowException) as e:
        if isinstance(e, OSError) and e.errno:  # no permission, an I/O error
            raise PrepareError(f"{path}: cannot read it: {os.strerror(e.errno)}") from None
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise PrepareError(f"{path}: cannot read it ({why}); if it is damaged, cut short or empty, "
                           f"download or copy it again") from None


def _kind_ok(arrow_type, kind):
    return {'integer': pa.types.is_integer, 'floating': pa.types.is_floating, 'boolean': pa.types.is_boolean,
            'number': lambda t: pa.types.is_integer(t) or pa.types.is_floating(t)}[kind](arrow_type)


def check_schema(path, schema, wanted):
    for name, kind in wanted.items():
        if name not in schema.names:
            raise PrepareError(f"{path}: missing column '{name}' (has {', '.join(schema.names)})")
        t = schema.field(name).type
        if not _kind_ok(t, kind):
            raise PrepareError(f"{path}: column '{name}' has type {t}, expected {kind}")


def read_geometry(raw):
    path = os.path.join(raw, 'sensor_geometry.csv')
    if not os.path.exists(path):
        raise PrepareError(f"{path}: missing file (the Kaggle layout has sensor_geometry.csv)")
    with _reading(path):
        table = pyarrow.csv.read_csv(path)
    check_schema(path, table.schema, {'sensor_id': 'integer', 'x': 'number', 'y': 'number', 'z': 'number'})
    if table['sensor_id'].null_count:
        raise PrepareError(f"{path}: empty sensor_id on line {table['sensor_id'].to_pylist().index(None) + 2}")
    sensor = table['sensor_id'].to_numpy()
    xyz = np.stack([table[c].to_numpy() for c in 'xyz'], 1).astype(np.float64)
    if not np.isfinite(xyz).all():
        row = int(np.flatnonzero(~np.isfinite(xyz).all(1))[0])
        raise PrepareError(f"{path}: non-finite position for sensor_id {sensor[row]}")
    if sensor.min() < 0 or sensor.max() >= DIRECT_BIT:
        raise PrepareError(f"{path}: sensor_id must be in [0, {DIRECT_BIT}) for the packed format")
    if len(np.unique(sensor)) != len(sensor):
        raise PrepareError(f"{path}: duplicate sensor_id")
    geometry = np.full((int(sensor.max()) + 1, 3), np.nan, np.float32)
    geometry[sensor] = xyz
    return geometry


def iter_meta(path, wanted, rows_per_read=1 << 20):
    """Stream a meta parquet file and yield (batch_id, dict of column arrays) per batch, without ever
    holding the whole file (the real train_meta has 132M rows). Each batch's rows must be contiguous,
    as in Kaggle's file."""
    if not os.path.exists(path):
        raise PrepareError(f"{path}: missing file")
    with _reading(path):  # the consumer's own errors never enter a generator, so only reading errors land here
        pf = pq.ParquetFile(path)
        check_schema(path, pf.schema_arrow, wanted)
        seen, current, parts = set(), None, []
        joined = lambda: {k: np.concatenate([p[k] for p in parts]) for k in wanted}
        for rb in pf.iter_batches(batch_size=rows_per_read, columns=list(wanted)):
            cols = {k: rb.column(k).to_numpy(zero_copy_only=False) for k in wanted}
            bid = cols['batch_id']
            cuts = np.flatnonzero(np.diff(bid)) + 1
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(bid)]):
                b_id = int(bid[a])
                if b_id != current:
                    if current is not None:
                        yield current, joined()
                    if b_id in seen:
                        raise PrepareError(f"{path}: rows of batch_id {b_id} are not contiguous")
                    seen.add(b_id)
                    current, parts = b_id, []
                parts.append({k: v[a:b] for k, v in cols.items()})
        if current is not None:
            yield current, joined()


def meta_batches(path):
    """The batch ids of a meta file in file order, with each batch's event and pulse counts, streamed
    (the real train_meta has 132M rows)."""
    cols = ['batch_id', 'first_pulse_index', 'last_pulse_index']
    ids, n_events, n_pulses = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    with _reading(path):
        pf = pq.ParquetFile(path)
        check_schema(path, pf.schema_arrow, dict.fromkeys(cols, 'integer'))
        for rb in pf.iter_batches(batch_size=1 << 20, columns=cols):
            if rb.column('batch_id').null_count:
                raise PrepareError(f"{path}: empty batch_id in {rb.column('batch_id').null_count} rows")
            bid = rb.column('batch_id').to_numpy(zero_copy_only=False)
            rows = rb.column('last_pulse_index').to_numpy(zero_copy_only=False) - rb.column('first_pulse_index').to_numpy(zero_copy_only=False) + 1
            cuts = np.r_[0, np.flatnonzero(np.diff(bid)) + 1]
            ids.append(bid[cuts])
            n_events.append(np.diff(np.r_[cuts, len(bid)]))
            n_pulses.append(np.add.reduceat(np.maximum(rows, 0), cuts))
    ids, n_events, n_pulses = (np.concatenate(a).astype(np.int64) for a in (ids, n_events, n_pulses))
    cuts = np.r_[0, np.flatnonzero(np.diff(ids)) + 1] if len(ids) else np.zeros(0, np.int64)  # a batch across reads
    return ids[cuts], np.add.reduceat(n_events, cuts), np.add.reduceat(n_pulses, cuts)


def read_truth(path, batch_id, event_id):
    """The simulation's truth for one batch, aligned to the meta's events (synthetic data only)."""
    with _reading(path):
        pf = pq.ParquetFile(path)
        check_schema(path, pf.schema_arrow, {'batch_id': 'integer', 'event_id': 'integer', 'energy': 'floating',
                                             'vertex_x': 'floating', 'vertex_y': 'floating', 'vertex_z': 'floating'})
        if 'kind' not in pf.schema_arrow.names:
            raise PrepareError(f"{path}: missing column 'kind'")
        t = pq.read_table(path, filters=[('batch_id', '=', batch_id)])
    truth_id = t['event_id'].to_numpy()
    order = np.argsort(truth_id)
    pos = np.searchsorted(truth_id, event_id, sorter=order).clip(0, len(truth_id) - 1)
    pos = order[pos] if len(order) else pos
    if len(truth_id) == 0 or (truth_id[pos] != event_id).any():
        missing = event_id[truth_id[pos] != event_id][0] if len(truth_id) else event_id[0]
        raise PrepareError(f"{path}: no truth row for event_id {missing} of batch {batch_id}, which the meta lists")
    kinds = np.asarray(t['kind'].to_pylist(), dtype=object)[pos]
    bad = ~np.isin(kinds, KIND_NAMES)
    if bad.any():
        raise PrepareError(f"{path}: event_id {event_id[bad][0]} has kind {kinds[bad][0]!r}, expected one of {KIND_NAMES}")
    truth = {c: t[c].to_numpy()[pos] for c in ['energy', 'vertex_x', 'vertex_y', 'vertex_z']}
    bad = ~(np.isnan(truth['energy']) | (truth['energy'] > 0) & np.isfinite(truth['energy']))
    if bad.any():  # (the energy head learns log10 of it: 0 or below would train it toward a made-up -3)
        raise PrepareError(f"{path}: event_id {event_id[bad][0]} has energy {float(truth['energy'][bad][0])} GeV, not above 0 "
                           f"(null or NaN where it is unknown)")
    truth['kind'] = (kinds == 'cascade').astype(np.uint8)
    return truth


# -----------------------------------------------------------------------------
# packing one batch file into one shard

def _offsets(counts):
    """[0, cumsum(counts)]: where each run starts, and the end (np.r_ costs several times more per call)."""
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def linefit_seeds(ev, geometry, chunk_doms=8192):
    """Both LineFits of every event of a shard, as the model reads them (classical.linefit_seeds, float64), from ev as
    Split.events returns it: the plain fit's velocity (n, 3) in m/ns and the improved fit's direction (n, 3), as
    events.npy's columns ({lf_vx, ..., ilf_z}: (n,) each), and each pulse's direct flag (P,) bool. Runs over
    chunks of whole events of about chunk_doms DOMs: the delay cleaning's (DOMs, DELAY_MAX_REFS) arrays then stay
    in the CPU's cache (chunks of 2,000 toy events, ~140,000 DOMs, ran 3x slower)."""
    offsets, dom_offsets, event_doms = ev['pulse_offsets'], ev['dom_offsets'], ev['event_dom_offsets']
    n = len(offsets) - 1
    sensor = ev['sensor_id']
    lf_v, ilf_dir, direct = np.zeros((n, 3)), np.zeros((n, 3)), np.zeros(len(sensor), bool)
    bounds = classical.chunk_bounds(event_doms, chunk_doms)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        # the float64 inputs of one chunk at a time: made for the whole file at once they took 56 bytes a pulse,
        # 1.9 GB of a real 33M-pulse batch file, on top of everything else the worker holds (chunked, its peak fell 5.5 -> 3.6 GB)
        p, d = slice(offsets[lo], offsets[hi]), slice(event_doms[lo], event_doms[hi] + 1)
        pos = geometry[sensor[p]].astype(np.float64)
        t, aux = ev['time'][p].astype(np.float64), ev['auxiliary'][p].astype(np.float64)
        event = np.repeat(np.arange(hi - lo), np.diff(offsets[lo:hi + 1]))
        dom = np.repeat(np.arange(event_doms[hi] - event_doms[lo]), np.diff(dom_offsets[d]))
        dom_pos = geometry[sensor[dom_offsets[d][:-1]]].astype(np.float64)
        v, u, kept = classical.linefit_seeds(*map(torch.from_numpy, (pos, t, aux, event, dom, dom_pos)), hi - lo)
        lf_v[lo:hi], ilf_dir[lo:hi], direct[p] = v.numpy(), u.numpy(), kept.numpy() > 0.5
    columns = {f'lf_v{c}': lf_v[:, i] for i, c in enumerate('xyz')}
    return {**columns, **{f'ilf_{c}': ilf_dir[:, i] for i, c in enumerate('xyz')}}, direct


FIT_CHUNK_PULSES = 1 << 20  # pulses per call of the quick fit in pack_file, whole events (memory bound)


def _event_slice(ev, lo, hi):
    """Events lo..hi-1 of ev (as linefit_seeds reads it), their offsets rebased to the slice."""
    p0, p1 = ev['pulse_offsets'][lo], ev['pulse_offsets'][hi]
    d0, d1 = ev['event_dom_offsets'][lo], ev['event_dom_offsets'][hi]
    out = {k: ev[k][p0:p1] for k in ('sensor_id', 'time', 'charge', 'auxiliary')}
    out.update(pulse_offsets=ev['pulse_offsets'][lo:hi + 1] - p0, event_dom_offsets=ev['event_dom_offsets'][lo:hi + 1] - d0,
               dom_offsets=ev['dom_offsets'][d0:d1 + 1] - p0)
    return out


def pack_file(src, meta, truth, geometry, has_labels, fit):
    """Read one Kaggle batch file, check it against its meta rows, and return the shard's arrays (with each event's
    quick fit, fit = {'steps', 'ice'}: classical.time_fit in that ice, or with 0 steps the improved LineFit)."""
    with _reading(src):
        pf = pq.ParquetFile(src)
        check_schema(src, pf.schema_arrow, BATCH_COLUMNS)
        table = pf.read(columns=list(BATCH_COLUMNS))
    row_event = table['event_id'].to_numpy()
    sensor = table['sensor_id'].to_numpy()
    t = table['time'].to_numpy().astype(np.int64, copy=False)
    charge = table['charge'].to_numpy()
    aux = table['auxiliary'].to_numpy()  # copies as needed; no zero_copy_only=: pyarrow 10-12 refuse it on a table
    if table['auxiliary'].null_count or table['charge'].null_count or table['time'].null_count or table['sensor_id'].null_count:
        raise PrepareError(f"{src}: null values in the pulse columns")
    del table

    # meta rows must tile the file: event k is rows first[k]..last[k], in order, nothing left over
    event_id, first, last = meta['event_id'], meta['first_pulse_index'], meta['last_pulse_index']
    n_events, n_rows = len(event_id), len(row_event)
    counts = last - first + 1
    where = lambda mask: f"event_id {event_id[np.flatnonzero(mask)[0]]}"
    if (counts < 1).any():
        raise PrepareError(f"{src}: {where(counts < 1)} has no pulses (last_pulse_index < first_pulse_index in the meta)")
    expected_first = np.r_[0, np.cumsum(counts)[:-1]]
    if (first != expected_first).any() or counts.sum() != n_rows:
        bad = first != expected_first
        if bad.any():
            what = where(bad)
        else:  # the ranges tile but cover another row count: name the first row where file and meta part
            expect = np.repeat(event_id, counts)
            m = min(len(expect), n_rows)
            row = int(np.flatnonzero(np.r_[expect[:m] != row_event[:m], True])[0])
            what = (f"row {row}: the file has event_id {row_event[row] if row < n_rows else '(none, it ends)'}, "
                    f"the meta {expect[row] if row < len(expect) else '(none, it ends)'}")
        raise PrepareError(f"{src}: meta pulse ranges do not match the batch file ({n_rows} rows) at {what}")
    if (np.repeat(event_id, counts) != row_event).any():
        row = int(np.flatnonzero(np.repeat(event_id, counts) != row_event)[0])
        k = int(np.searchsorted(np.cumsum(counts), row, side='right'))
        raise PrepareError(f"{src}: row {row} has event_id {row_event[row]} but the meta puts event_id {event_id[k]} there")
    uniq, cnt = np.unique(event_id, return_counts=True)
    if (cnt > 1).any():
        raise PrepareError(f"{src}: duplicate event_id {uniq[cnt > 1][0]} in the meta")

    # values the format must hold exactly
    event_of_row = np.repeat(np.arange(n_events), counts)
    def at(mask, what):
        row = int(np.flatnonzero(mask)[0])
        return PrepareError(f"{src}: event_id {event_id[event_of_row[row]]} (row {row}): {what}")
    charge_ok = (charge >= 0) & (charge <= MAX_CHARGE)  # False for NaN and inf too
    if not charge_ok.all():
        if not np.isfinite(charge).all():
            raise at(~np.isfinite(charge), f"non-finite charge {charge[~np.isfinite(charge)][0]}")
        raise at(~charge_ok, f"charge {charge[~charge_ok][0]} outside [0, {MAX_CHARGE:g}], which float16 cannot hold")
    known = np.isfinite(geometry[:, 0])
    in_range = (sensor >= 0) & (sensor < len(geometry))
    in_geometry = in_range & known[np.where(in_range, sensor, 0)]
    if not in_geometry.all():
        raise at(~in_geometry, f"sensor_id {sensor[~in_geometry][0]} is not in sensor_geometry.csv")
    t0 = np.minimum.reduceat(t, expected_first)
    dt = t - np.repeat(t0, counts)
    if (dt > MAX_DT).any():
        raise at(dt > MAX_DT, f"time span {dt.max()} ns exceeds the format's uint32 limit")
    if has_labels:
        for name, hi in LABEL_MAX.items():
            v = meta[name]
            bad = ~np.isfinite(v) | (v < 0) | (v > hi + 1e-9)
            if bad.any():
                raise PrepareError(f"{src}: {where(bad)} has {name} {v[bad][0]} outside [0, {hi:.6f}] in the meta")
    if n_rows >= 2**32:
        raise PrepareError(f"{src}: {n_rows} pulses in one batch file exceed the shard format's uint32 DOM offsets")

    # sort each event's pulses by (sensor, time): one sort of a packed integer key when it fits in 64 bits. A stable
    # sort: the rows come grouped by event (and in the Kaggle files in time order within each), runs that numpy's
    # stable sort exploits (2.1x quicksort's speed on a 20,000-event synthetic file, numpy 2.4), and pulses equal in
    # (event, sensor, time) keep the file's order.
    dt = dt.astype(np.uint64)
    bits_t, bits_e = max(int(dt.max()).bit_length(), 1), max(n_events.bit_length(), 1)
    if bits_e + 15 + bits_t <= 64:
        key = (event_of_row.astype(np.uint64) << np.uint64(15 + bits_t)) | (sensor.astype(np.uint64) << np.uint64(bits_t)) | dt
        order = np.argsort(key, kind='stable')
        del key
    else:
        order = np.lexsort((dt, sensor, event_of_row))
    pulses = np.empty(n_rows, PULSE_DTYPE)
    # each column gathered into an array of its own, then stored: the fits below read these, not the records'
    # strided fields (converting those took 39 ms of a 2.9M-pulse shard's 220)
    dt_sorted, sensor_sorted, aux_sorted = dt[order], sensor[order].astype(np.uint16), aux[order]
    charge_sorted = charge[order].astype(np.float16)
    pulses['dt'], pulses['charge'] = dt_sorted, charge_sorted
    pulses['sensor_aux'] = sensor_sorted | (aux_sorted.astype(np.uint16) << 15)

    # a DOM starts where the sensor changes or a new event starts
    new_dom = np.ones(n_rows, bool)
    new_dom[1:] = sensor_sorted[1:] != sensor_sorted[:-1]
    new_dom[expected_first] = True
    dom_first = np.flatnonzero(new_dom)
    doms = np.empty(len(dom_first) + 1, np.uint32)
    doms[:-1], doms[-1] = dom_first, n_rows
    n_doms = np.diff(np.searchsorted(dom_first, np.r_[expected_first, n_rows]))  # DOM starts per event

    events = np.zeros(n_events, EVENT_FIELDS + (TRUTH_FIELDS if truth is not None else []))
    events['event_id'], events['t0'] = event_id, t0
    events['pulse_start'], events['n_pulses'] = expected_first, counts
    events['dom_start'], events['n_doms'] = np.cumsum(n_doms) - n_doms, n_doms
    events['azimuth'] = meta['azimuth'] if has_labels else np.nan
    events['zenith'] = meta['zenith'] if has_labels else np.nan
    if truth is not None:
        for name, _ in TRUTH_FIELDS:
            events[name] = truth[name]
    # the pulses in Split.events' layout, but each time from its event's t0 (dt): the fits below use only the
    # differences of times within an event
    ev = {'sensor_id': sensor_sorted, 'time': dt_sorted.view(np.int64), 'charge': charge_sorted.astype(np.float32),
          'auxiliary': aux_sorted, 'pulse_offsets': np.r_[expected_first, n_rows],
          'event_dom_offsets': np.r_[0, np.cumsum(n_doms)], 'dom_offsets': doms.astype(np.int64)}
    # what the stats need of the file's own arrays, then those arrays go: a worker would otherwise hold them (1.9 GB
    # of a real 33M-pulse batch file) through the fits below, which only read ev
    n_aux, max_time_span = int(aux.sum()), int(dt.max())
    del row_event, sensor, t, charge, aux, event_of_row, charge_ok, in_range, in_geometry, dt, order, new_dom
    t_fit = time.time()  # fit_seconds: both LineFits and the quick fit
    columns, direct = linefit_seeds(ev, geometry)
    for k, v in columns.items():
        events[k] = v
    pulses['sensor_aux'] |= np.where(direct, DIRECT_BIT, 0).astype(np.uint16)
    if fit['steps']:  # over chunks of whole events: its inputs for a whole real batch file took another 2.9 GB
        fit_dir, rlogl = np.zeros((n_events, 3)), np.zeros(n_events)
        bounds = classical.chunk_bounds(ev['pulse_offsets'], FIT_CHUNK_PULSES)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            fit_dir[lo:hi], rlogl[lo:hi] = classical.time_fit(_event_slice(ev, lo, hi), geometry, fit['steps'], ice=fit['ice'])
    else:  # the improved LineFit just made (the plain one's direction where it found no velocity)
        ilf, lf_v = (np.stack([columns[f'{name}{c}'] for c in 'xyz'], 1) for name in ('ilf_', 'lf_v'))
        fit_dir, rlogl = np.where((ilf != 0).any(1, keepdims=True), ilf, -lf_v), classical.TIME_FIT_FAILED
    events['fit_azimuth'], events['fit_zenith'] = classical.vector_to_angles(fit_dir)
    events['fit_rlogl'] = rlogl

    log_q = np.log10(np.maximum(pulses['charge'], np.float16(1e-3)), dtype=np.float32)
    dom_size = np.diff(doms)
    stats = {'n_events': n_events, 'n_pulses': n_rows, 'n_doms': int(len(dom_first)),
             'n_aux': n_aux, 'n_single_pulse_doms': int((dom_size == 1).sum()),
             'max_pulses_per_event': int(counts.max()), 'max_doms_per_event': int(n_doms.max()),
             'max_pulses_per_dom': int(dom_size.max()), 'max_time_span': max_time_span,
             'sum_log10_charge': float(log_q.sum(dtype=np.float64)), 'sum_log10_charge_sq': float(np.dot(log_q, log_q)),
             'event_id_min': int(event_id.min()), 'event_id_max': int(event_id.max()),
             'fit': fit, 'fit_seconds': time.time() - t_fit}
    return pulses, doms, events, stats


def _source_stamp(src):
    st = os.stat(src)
    return {'source': os.path.abspath(src), 'source_size': st.st_size, 'source_mtime_ns': st.st_mtime_ns}


def inputs_digest(meta, truth, geometry_digest):
    """What a shard is made of besides its batch file, as one SHA-1: its meta rows, its truth rows and the geometry
    (its own digest, geometry_digest), so that a re-run rebuilds a shard whose meta, truth or geometry changed, not
    only one whose batch file did (a few ms per batch file: hashing runs at about 1 GB/s)."""
    h = hashlib.sha1(geometry_digest.encode())
    for part in (meta, truth or {}):
        for k in sorted(part):
            h.update(k.encode())
            h.update(np.ascontiguousarray(part[k]).tobytes())
    return h.hexdigest()


def _save(path, a):
    """np.save of a 1-D array, returning what shard.json records of the file: its size and CRC-32, summed from the
    bytes as they are written (zlib's CRC-32, 1-2 GB/s: about 35 ms of the ~1 s a 2.9M-pulse shard takes; bench.py's
    prepare row measured 0.92x and 1.01x the pulses/s of np.save without it, within the machine's noise)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(a))
    head, body = head.getvalue(), np.ascontiguousarray(a).view(np.uint8)
    with open(path, 'wb') as f:
        f.write(head)
        f.write(body)
    return {'bytes': len(head) + body.nbytes, 'crc32': zlib.crc32(body, zlib.crc32(head))}


def _file_crc32(path):
    crc, buf = 0, bytearray(1 << 24)
    with open(path, 'rb') as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(memoryview(buf)[:n], crc)
    return crc


def shard_problem(shard_dir, checksums=False):
    """(shard.json's record, None) for a finished shard that checks out, else (record or None, what is wrong).
    Always checked: shard.json is there, of this format, and each array file has the size it records (one stat
    per file); checksums=True also re-reads every byte against the CRC-32 summed when it was written."""
    try:
        with open(os.path.join(shard_dir, 'shard.json')) as f:
            info = json.load(f)
    except FileNotFoundError:
        return None, "shard.json: missing"
    except (OSError, ValueError) as e:
        return None, f"shard.json: unreadable ({e})"
    if not isinstance(info, dict):
        return None, "shard.json: not a record that prepare.py wrote"
    version = info.get('format_version')
    if version != FORMAT_VERSION:
        who = 'a newer' if isinstance(version, int) and version > FORMAT_VERSION else 'an older'
        return info, f"shard.json: format version {version}, made by {who} prepare.py (this one writes {FORMAT_VERSION})"
    if not isinstance(info.get('files'), dict):
        return info, "shard.json: no record of its array files"
    for name, want in info['files'].items():
        path = os.path.join(shard_dir, name)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            return info, f"{name}: {e.strerror}"
        if size != want['bytes']:
            return info, f"{name}: {size} bytes, but shard.json records {want['bytes']} (cut short or overwritten)"
        try:
            if checksums and _file_crc32(path) != want['crc32']:
                return info, f"{name}: its bytes differ from those written (checksum mismatch: damaged on disk or in a copy)"
        except OSError as e:
            return info, f"{name}: unreadable: {e.strerror}"
    return info, None


def shard_status(shard_dir, src, fit, inputs=None, checksums=False):
    """(record, None) for a finished shard of the same source file, inputs (inputs_digest: meta and truth rows,
    geometry; None skips that check) and quick fit that checks out, to be kept, else (None, why it is rebuilt), the
    reason None where there is simply no shard yet."""
    if not os.path.isdir(shard_dir):
        return None, None
    info, problem = shard_problem(shard_dir, checksums)
    stamp = _source_stamp(src)
    # the batch file by its name, size and modification time (ns), not its path: a raw folder moved (mv and cp -p keep
    # the times) or reached by another path (a link, a relative raw_dir) rebuilt the whole Kaggle set, about 3 hours
    if problem is None and (os.path.basename(str(info.get('source'))) != os.path.basename(src)
                            or any(info.get(k) != stamp[k] for k in ('source_size', 'source_mtime_ns'))):
        problem = f"its source {src} changed since it was made"
    elif problem is None and inputs is not None and info.get('inputs') != inputs:
        problem = ("it was made by an earlier prepare.py, which did not record its meta, truth and geometry" if 'inputs' not in info
                   else "its meta rows, truth rows or the geometry changed since it was made")
    elif problem is None and _recorded_fit(info.get('fit')) != fit:
        problem = f"its quick fit was made with {info.get('fit')}, this run asks for {fit}"
    return (info, None) if problem is None else (None, problem)


def _recorded_fit(fit):
    """A shard's recorded fit as run() spells one: an older prepare.py recorded a table file as typed, relative to
    the folder it ran in (from there, the same file: kept, as it was)."""
    ice = fit.get('ice') if isinstance(fit, dict) else None
    if isinstance(ice, str) and ice not in ('toy', 'bulk'):
        return {**fit, 'ice': os.path.abspath(ice)}
    return fit


def _write_error(e, path):
    """An error while writing the output, named, with what to do on a full disk."""
    if e.errno == errno.ENOSPC:
        return PrepareError(f"{path}: no space left on the device while writing it; free some space and re-run: "
                            f"finished shards are kept, unfinished ones were removed")
    return PrepareError(f"{e.filename or path}: cannot write it: {e.strerror or e}")


def write_shard(task):
    """Worker: pack one batch file into out/<split>/batch_<N>, atomically (build in a temp folder, rename)."""
    src, shard_dir, meta, truth, geometry, has_labels, fit, inputs = task
    t_start = time.time()
    pulses, doms, events, stats = pack_file(src, meta, truth, geometry, has_labels, fit)
    tmp = f"{os.path.dirname(shard_dir)}/.tmp-{os.path.basename(shard_dir)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        files = {f"{k}.npy": _save(f"{tmp}/{k}.npy", a) for k, a in [('pulses', pulses), ('doms', doms), ('events', events)]}
        info = {**_source_stamp(src), 'inputs': inputs, 'format_version': FORMAT_VERSION, **stats, 'files': files}
        with open(f"{tmp}/shard.json", 'w') as f:
            json.dump(info, f, indent=1)
        shutil.rmtree(shard_dir, ignore_errors=True)  # a stale shard of a changed source file, or a damaged one
        os.rename(tmp, shard_dir)
    except OSError as e:  # a full disk mid-run: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(e, shard_dir) from None
    return shard_dir, info, time.time() - t_start


def _write_json_atomic(path, obj):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def check_duplicate_events(shards):
    """Each event id once across shards [(shard folder, shard.json record)] of one meta file (train and val share
    train_meta's): every pair of shards whose id ranges overlap is compared, not only neighbours in id order (Kaggle's
    batch files hold disjoint ranges, so there it compares none)."""
    ranges = sorted((info['event_id_min'], info['event_id_max'], d, info['source']) for d, info in shards)
    for i, (lo_b, _, b, src_b) in enumerate(ranges):
        for _, hi_a, a, src_a in ranges[:i]:
            if hi_a >= lo_b:
                dup = np.intersect1d(np.load(f"{a}/events.npy", mmap_mode='r')['event_id'],
                                     np.load(f"{b}/events.npy", mmap_mode='r')['event_id'])
                if len(dup):
                    raise PrepareError(f"duplicate event_id {dup[0]} in {src_a} and {src_b}")


def write_manifest(split_dir, split, shard_infos, geometry, has_labels, has_truth, made_by=None):
    """Written last: its presence is what makes a split readable."""
    names = [os.path.basename(d) for d, _ in shard_infos]
    infos = [info for _, info in shard_infos]
    tmp = f"{split_dir}/geometry.npy.tmp.npy"
    np.save(tmp, geometry)
    os.replace(tmp, f"{split_dir}/geometry.npy")
    total = lambda k: sum(info[k] for info in infos)
    count = lambda k: int(total(k))  # the counts; the log10 charge's sums are floats (an int() cut them short)
    n_pulses = count('n_pulses')
    mean_q = total('sum_log10_charge') / max(n_pulses, 1)
    manifest = {
        'format_version': FORMAT_VERSION, 'split': split, 'shards': names,
        'n_events': count('n_events'), 'n_pulses': n_pulses, 'n_doms': count('n_doms'),
        'has_labels': has_labels, 'has_truth': has_truth, 'kind_names': KIND_NAMES,
        'pulse_dtype': PULSE_DTYPE.descr, 'n_sensors': len(geometry),
        'made_by': made_by,  # the settings that made it: the reader's message names the command that remakes it
        'stats': {
            'aux_fraction': count('n_aux') / max(n_pulses, 1),
            'single_pulse_dom_fraction': count('n_single_pulse_doms') / max(count('n_doms'), 1),
            'mean_pulses_per_event': n_pulses / max(count('n_events'), 1),
            'max_pulses_per_event': max(i['max_pulses_per_event'] for i in infos),
            'max_doms_per_event': max(i['max_doms_per_event'] for i in infos),
            'max_pulses_per_dom': max(i['max_pulses_per_dom'] for i in infos),
            'max_time_span': max(i['max_time_span'] for i in infos),
            'log10_charge_mean': mean_q,
            'log10_charge_std': float(np.sqrt(max(total('sum_log10_charge_sq') / max(n_pulses, 1) - mean_q ** 2, 0))),
        },
    }
    _write_json_atomic(f"{split_dir}/manifest.json", manifest)
    return manifest


def default_out(raw):
    """out_dir's default, <raw_dir>_packed beside the raw folder. raw_dir=. (run from inside the download) gave
    ._packed and raw_dir=.. gave .._packed: hidden folders in the working directory, inside the raw data."""
    base = os.path.normpath(raw)
    if os.path.basename(base) in ('.', '..', ''):  # the folder's own name from its full path: /data/kaggle for '.'
        base = os.path.abspath(raw)
    return base + '_packed'


def glob_in(folder, pattern):
    """The paths that match pattern inside folder, the folder's own name taken as it is: out_dir=packed[1] read as a
    pattern matched packed1, and a clean-up here deleted the shards of that other folder."""
    return glob.glob(os.path.join(glob.escape(folder), pattern))


def _batch_file(raw, part, batch_id):
    return os.path.join(raw, part, f"batch_{batch_id}.parquet")


def _size(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def check_space(out, shards, has_truth):
    """Refuse before writing when the shards to write, [(n_events, n_pulses)], cannot fit on out's disk. The meta
    does not say how many DOMs there are: counting one per pulse errs on the safe side (the median real event has
    49 hit DOMs for 63 pulses)."""
    event_bytes = np.dtype(EVENT_FIELDS + (TRUTH_FIELDS if has_truth else [])).itemsize
    need = sum(PULSE_DTYPE.itemsize * p + 4 * (p + 1) + event_bytes * e + 3 * 128 + 4096 for e, p in shards)
    free = shutil.disk_usage(out).free
    if need > free:
        raise PrepareError(f"{out}: not enough disk space: {len(shards)} shards to write need up to {_size(need)}, "
                           f"the disk has {_size(free)} free; free some space or choose another --out_dir")
    return need


def run(raw, out, val_batches=1, train_batches=0, num_proc=1, log=print, verify=False, fit_steps=80, fit_ice='auto'):
    """Pack raw into out. Shards already complete are kept (their sizes are checked; verify=True also re-reads them
    against their checksums); damaged or stale ones are rebuilt, with a message."""
    t_start = time.time()
    given = dict(val_batches=val_batches, train_batches=train_batches, num_proc=num_proc, fit_steps=fit_steps)
    for name, least in LEAST.items():
        if given[name] < least:
            raise PrepareError(f"{name}={given[name]!r} is out of range (at least {least})")
    for name in ['sensor_geometry.csv', 'train_meta.parquet']:
        if not os.path.exists(os.path.join(raw, name)):
            raise PrepareError(f"{os.path.join(raw, name)}: missing file; {raw} is not a Kaggle-layout folder")
    # realpath: an out_dir that is a link to raw_dir (or raw_dir reached through one) passed an abspath comparison,
    # and the shards, manifests and lock file were written among the raw files
    if os.path.realpath(raw) == os.path.realpath(out):
        raise PrepareError(f"out_dir {out} is raw_dir {raw} (the same folder): give another out_dir")
    geometry = read_geometry(raw)
    if fit_ice == 'auto':  # the toy's own ice table is right for the toy only; real data gets the homogeneous one
        fit_ice = 'toy' if os.path.exists(os.path.join(raw, 'simulation.json')) else 'bulk'
    try:
        classical.ice_table(fit_ice)  # a table file that cannot be read fails here, before any work
    except (OSError, ValueError) as e:
        raise PrepareError(f"fit_ice={fit_ice}: {e}") from None
    if fit_ice not in ('toy', 'bulk'):  # a table file by its full path, as the shards and the manifest record it: the
        fit_ice = os.path.abspath(fit_ice)  # same table by another spelling rebuilt every shard, and sample.py run
        # from another folder could not find the relative path the manifest recorded (a traceback)
    fit = {'steps': fit_steps, 'ice': fit_ice if fit_steps else None}

    plans, sizes = [], {}  # (part, split, batch ids); (part, batch id) -> (n_events, n_pulses)
    for part in ['train', 'test']:
        meta_path = os.path.join(raw, f"{part}_meta.parquet")
        if part == 'test' and not os.path.exists(meta_path):
            log(f"prepare: no {meta_path}, so no test split")
            continue
        if not os.path.exists(meta_path):
            raise PrepareError(f"{meta_path}: missing file")
        ids, n_events, n_pulses = meta_batches(meta_path)  # batch ids in file order
        sizes.update(zip(((part, int(b)) for b in ids), zip(n_events.tolist(), n_pulses.tolist())))
        if part == 'test' and len(ids) == 0:
            log(f"prepare: {meta_path} lists no events, so no test split")
            continue
        if part == 'train':
            if train_batches:
                ids = ids[:train_batches]
            if val_batches >= len(ids):
                raise PrepareError(f"{meta_path}: {len(ids)} train batch files leave none for training with val_batches={val_batches}")
            plans.append((part, 'train', ids[:len(ids) - val_batches]))
            plans.append((part, 'val', ids[len(ids) - val_batches:]))
        else:
            plans.append((part, 'test', ids))
    for part, split, ids in plans:
        for b in ids:
            if not os.path.exists(_batch_file(raw, part, b)):
                hint = " (for a partial download, set --train_batches=N to use the first N batch files)" if part == 'train' else ""
                raise PrepareError(f"{_batch_file(raw, part, b)}: missing file, listed in {part}_meta.parquet{hint}")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise _write_error(e, out) from None
    # the shards to write as far as their batch files tell (the meta's and the geometry's digests come later, shard by shard)
    to_write = [sizes[part, int(b)] for part, split, ids in plans for b in ids
                if shard_status(f"{out}/{split}/batch_{b}", _batch_file(raw, part, b), fit)[0] is None]
    check_space(out, to_write, any(os.path.exists(os.path.join(raw, f"{part}_truth.parquet")) for part, _, _ in plans))
    made_by = {'raw_dir': os.path.abspath(raw), 'val_batches': val_batches, 'train_batches': train_batches, 'fit': fit}
    # one prepare per out_dir at a time: two (a job resubmitted while the first still runs) packed every shard twice,
    # deleted each other's manifests and temporary folders, and with other settings (fit_steps, val_batches) left a
    # split of both runs' shards under one run's manifest, each exiting 0
    lock = lock_folder('prepare', out)
    try:
        _run_pool(raw, out, plans, geometry, made_by, num_proc, log, verify)
    except BaseException as e:
        for part, split, ids in plans:  # the pool has shut down: no worker still writes into these
            for stale in glob_in(out, f"{split}/.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in glob_in(out, f"{split}/*.tmp*"):  # the manifest's and geometry's temporary files
                os.remove(stale)
        if isinstance(e, OSError):
            raise _write_error(e, out) from None
        raise
    finally:
        os.close(lock)  # the lock's end (a killed run's ends with its process)
    log(f"prepare: done in {time.time() - t_start:.1f}s -> {out}")


def _worker_start(parent):
    """Each worker process of prepare's pool and of BatchLoader's, first. It runs torch on one thread: a forked child
    entering the OpenMP team of a parent that had used one hangs, so it leaves OpenMP before its first torch op. Then
    simulate.worker_start: SIGTERM's default action back (a worker that kept the parent's handler outlived the
    SIGTERM of BatchLoader's close(), which then waited forever: an evaluation of config/baseline_1m.py hung in 5 runs
    of 7), Ctrl-C left to the parent, and on Linux death with the parent."""
    torch.set_num_threads(1)
    simulate.worker_start(parent)


def _run_pool(raw, out, plans, geometry, made_by, num_proc, log, verify):
    # One pool for all splits, each split's manifest written when its last shard is in: val's and test's shards
    # start while train's last ones still run (split by split, a one-shard split left the other cores idle).
    geometry_digest = hashlib.sha1(geometry.tobytes()).hexdigest()
    with simulate.worker_pool(num_proc, _worker_start) as pool:
        pending = {}  # future -> (its split's state, source file)
        states = []  # each split's state, in the order started
        for part, split, ids in plans:
            st = _start_split(raw, out, part, split, ids, verify)
            st['peers'] = states
            states.append(st)
            for b, meta in iter_meta(os.path.join(raw, f"{part}_meta.parquet"), st['wanted']):
                if b not in st['ids']:
                    continue
                src, shard_dir = _batch_file(raw, part, b), f"{st['dir']}/batch_{b}"
                truth = read_truth(st['truth_path'], b, meta['event_id']) if st['has_truth'] else None
                inputs = inputs_digest(meta, truth, geometry_digest)
                info, problem = shard_status(shard_dir, src, made_by['fit'], inputs, checksums=verify)
                if info is not None:
                    if info['source'] != os.path.abspath(src):  # the same file in a moved raw folder: kept, renamed
                        info = {**info, 'source': os.path.abspath(src)}
                        _write_json_atomic(f"{shard_dir}/shard.json", info)
                    st['done'][shard_dir], st['n_skipped'] = info, st['n_skipped'] + 1
                else:
                    if problem:
                        log(f"prepare: {shard_dir}: {problem}: rebuilding it")
                    task = (src, shard_dir, meta, truth, geometry, st['has_labels'], made_by['fit'], inputs)
                    pending[pool.submit(write_shard, task)] = (st, src)
                    st['pending'].add(shard_dir)
                while len(pending) >= 2 * num_proc:  # a bounded number of batch files in flight bounds memory
                    _collect(pending, made_by, geometry, log)
                if len(st['done']) + len(st['pending']) == len(st['ids']):
                    break
            missing = [b for b in ids if f"{st['dir']}/batch_{b}" not in st['done'].keys() | st['pending']]
            if missing:
                raise PrepareError(f"{os.path.join(raw, part + '_meta.parquet')}: no meta rows for batch_id {missing[0]}")
            st['listed'] = True
            _finish_split(st, made_by, geometry, log)
        while pending:
            _collect(pending, made_by, geometry, log)


def _start_split(raw, out, part, split, ids, verify):
    """Clear what an earlier run left in out/split (its manifest: the split is incomplete until rewritten; temporary
    folders; shards of another split layout) and return the split's state for _run_pool."""
    split_dir = os.path.join(out, split)
    os.makedirs(split_dir, exist_ok=True)
    if os.path.exists(f"{split_dir}/manifest.json"):
        os.remove(f"{split_dir}/manifest.json")
    for stale in glob_in(split_dir, '.tmp-*'):
        shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted run
    wanted_shards = {f"batch_{b}" for b in ids}
    for d in glob_in(split_dir, 'batch_*'):
        if os.path.basename(d) not in wanted_shards and os.path.exists(f"{d}/shard.json"):
            shutil.rmtree(d)  # a shard of another split layout (val_batches changed)
    has_labels = part == 'train'
    truth_path = os.path.join(raw, f"{part}_truth.parquet")
    return dict(split=split, part=part, dir=split_dir, ids=set(int(b) for b in ids), order=list(ids), has_labels=has_labels,
                wanted=META_COLUMNS if has_labels else {k: v for k, v in META_COLUMNS.items() if k not in ('azimuth', 'zenith')},
                truth_path=truth_path, has_truth=os.path.exists(truth_path), done={}, pending=set(), n_skipped=0,
                checked='sizes and checksums' if verify else 'sizes',
                n_events=0, t_start=time.time(), listed=False)


def _collect(pending, made_by, geometry, log):
    """Wait for one shard of pending to finish, log it, and write its split's manifest if it was the last."""
    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
    for f in finished:
        st, src = pending.pop(f)
        try:
            shard_dir, info, dt = f.result()  # re-raises a worker's PrepareError here
        except BrokenProcessPool:
            raise PrepareError(f"{src}: the worker process packing it died (out of memory? try a smaller --num_proc)") from None
        st['done'][shard_dir], st['n_events'] = info, st['n_events'] + info['n_events']
        st['pending'].discard(shard_dir)
        fit_rate = (f"the quick fit {info['n_events'] / info['fit_seconds']:.0f} events/s on its process"
                    if info['fit']['steps'] else "no quick fit")
        pack_rate = info['n_pulses'] / max(dt - info['fit_seconds'], 1e-9) / 1e6
        log(f"prepare: {st['split']} {len(st['done'])}/{len(st['ids'])} {os.path.basename(shard_dir)}: {info['n_events']} events, "
            f"{info['n_pulses']} pulses in {dt:.1f}s (packing {pack_rate:.1f}M pulses/s, {fit_rate}; "
            f"{st['n_events'] / (time.time() - st['t_start']):.0f} events/s for the split)")
        _finish_split(st, made_by, geometry, log)


def _finish_split(st, made_by, geometry, log):
    """Once a split's meta is read through and all its shards are in: its manifest, which makes it readable."""
    if not st['listed'] or st['pending']:  # each split reaches this state once: listed, then no shard left
        return
    if st['n_skipped']:
        log(f"prepare: {st['split']}: {st['n_skipped']} shards were already complete ({st['checked']} checked) and were kept")
    # against the shards of this split and those done of the others from the same meta file: the split that
    # finishes last sees them all, so an event in both train and val is found too, and neither stays readable
    peers = [peer for peer in st['peers'] if peer['part'] == st['part']]
    try:
        check_duplicate_events([shard for peer in peers for shard in peer['done'].items()])
    except PrepareError:
        for peer in peers:
            if os.path.exists(f"{peer['dir']}/manifest.json"):
                os.remove(f"{peer['dir']}/manifest.json")
        raise
    shard_infos = [(f"{st['dir']}/batch_{b}", st['done'][f"{st['dir']}/batch_{b}"]) for b in st['order']]
    m = write_manifest(st['dir'], st['split'], shard_infos, geometry, st['has_labels'], st['has_truth'], made_by)
    log(f"prepare: {st['split']}: {m['n_events']} events, {m['n_pulses']} pulses, {m['n_doms']} DOMs in {len(shard_infos)} shards -> {st['dir']}")


# -----------------------------------------------------------------------------
# the reader

def _shell(path):
    """A path as a shell word, for the commands the messages give: pasted, /data/my set was two words."""
    return shlex.quote(str(path))


def mend_command(split_dir, manifest):
    """The prepare.py command that remakes a split's damaged shards, from the settings its manifest records
    (an older manifest records none: its shards still name their source files)."""
    out, made_by = os.path.dirname(os.path.abspath(split_dir)), (manifest or {}).get('made_by')
    if not made_by:
        try:
            with open(os.path.join(split_dir, manifest['shards'][0], 'shard.json')) as f:
                raw = _shell(os.path.dirname(os.path.dirname(json.load(f)['source'])))
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            raw = '<the raw folder it was made from>'
        return f"python prepare.py --raw_dir={raw} --out_dir={_shell(out)} (and the val_batches, train_batches it was made with)"
    return (f"python prepare.py --raw_dir={_shell(made_by['raw_dir'])} --out_dir={_shell(out)} "
            f"--val_batches={made_by['val_batches']} --train_batches={made_by['train_batches']}" + _fit_args(made_by.get('fit')))


def _fit_args(fit):
    """The command-line settings of a recorded quick fit (none for a manifest older than it)."""
    if not fit:
        return ""
    return f" --fit_steps={fit['steps']}" + (f" --fit_ice={_shell(fit['ice'])}" if fit['steps'] else "")


def _no_manifest(path, mpath):
    """Why a split has no manifest, as far as its folder tells: a data_dir that is the raw input, or a split name that
    is not among the prepared ones, which a re-run of prepare.py would not mend; else an unfinished prepare."""
    folder = os.path.dirname(os.path.normpath(path)) or '.'
    for d in (folder, os.path.normpath(path)):  # data_dir=data/sim, or open_split('data/sim') itself
        raw = sorted(os.path.basename(f) for pattern in ('*_meta.parquet', 'sensor_geometry.csv')
                     for f in glob_in(d, pattern))
        if raw:
            return (f"{d} is raw Kaggle-layout input ({', '.join(raw)}), not prepare.py's output; point data_dir at the "
                    f"folder prepare.py packs it into (by default {default_out(d)}: python prepare.py --raw_dir={_shell(d)})")
    splits = sorted((os.path.basename(os.path.dirname(m)) for m in glob_in(folder, '*/manifest.json')),
                    key=lambda name: (['train', 'val', 'test', name].index(name), name))
    if splits and not os.path.isdir(path):  # a split folder without a manifest is an unfinished one: the message below
        return f"no split '{os.path.basename(os.path.normpath(path))}' in {folder}: it has {', '.join(splits)}"
    # a relative path is the working directory's: train.py run from another folder looked for data/sim_packed there
    here = "" if os.path.isabs(mpath) else f" (a path relative to the folder this runs in, {os.getcwd()})"
    return f"{mpath}: no manifest{here}, so the split is missing or prepare did not finish; run prepare.py"


class Split:
    """One prepared split (a folder with manifest.json): the events of all its shards, memory-mapped. Opening it
    checks each shard's file sizes against its shard.json (a stat per file), so a copy cut short is named here,
    not met as a numpy error later; `python prepare.py --verify=True` checks the bytes too. Bytes damaged with the
    sizes right are named (SplitError) where a batch reads them: a shard's records whole when one first reads from it
    (_check_records), and in each batch the DOM offsets and pulses it reads (dom_sizes, events)."""

    def __init__(self, path):
        self.path = path
        mpath = os.path.join(path, 'manifest.json')
        if not os.path.exists(mpath):
            raise FileNotFoundError(_no_manifest(path, mpath))
        try:
            with open(mpath) as f:
                self.manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise SplitError(f"{mpath}: unreadable ({e}); re-run prepare.py with the settings that made it") from None
        if not isinstance(self.manifest, dict) or 'format_version' not in self.manifest:
            raise SplitError(f"{mpath}: not a manifest that prepare.py wrote (no format_version); re-run prepare.py")
        if self.manifest['format_version'] != FORMAT_VERSION:
            raise SplitError(f"{mpath}: format version {self.manifest['format_version']}, this reader reads {FORMAT_VERSION}; "
                             f"re-run prepare.py to rebuild it: {mend_command(path, self.manifest)}")
        self.shards, fitted, fit_seconds = [], 0, 0.0
        for name in self.manifest['shards']:
            d = os.path.join(path, name)
            info, problem = shard_problem(d)
            if problem:
                raise SplitError(f"{d}/{problem}: the shard is damaged; rebuild it with: {mend_command(path, self.manifest)}")
            # plain ndarray views of the memory maps: same pages, without np.memmap's per-index overhead
            self.shards.append({k: np.asarray(np.load(f"{d}/{k}.npy", mmap_mode='r')) for k in ['pulses', 'doms', 'events']})
            fitted, fit_seconds = fitted + info['n_events'], fit_seconds + info['fit_seconds']
        # the quick fit's rate when prepare.py ran it, per process, its two LineFit seeds included (fit_seconds)
        self.fit_events_per_s = fitted / max(fit_seconds, 1e-9)
        # what rows() gathers from: the records as raw bytes, since numpy copies a structured dtype field by field (a
        # gather of events.npy records took 30x as long)
        self._raw = {k: [s[k].view((np.void, s[k].dtype.itemsize)) if s[k].dtype.names else s[k] for s in self.shards]
                     for k in ('pulses', 'doms', 'events')}
        sizes = [len(s['events']) for s in self.shards]
        self.shard_start = np.r_[0, np.cumsum(sizes)].astype(np.int64)
        self._unchecked = set(range(len(self.shards)))  # the shards whose records no batch has read yet (_check_records)
        try:
            self.geometry = np.load(os.path.join(path, 'geometry.npy'))
        except (OSError, ValueError) as e:
            raise SplitError(f"{path}/geometry.npy: unreadable ({e}); rebuild it with: {mend_command(path, self.manifest)}") from None

    def __len__(self):
        return int(self.shard_start[-1])

    def _column(self, name):
        return np.concatenate([np.asarray(s['events'][name]) for s in self.shards]) if self.shards else np.zeros(0)

    @cached_property
    def event_id(self):
        return self._column('event_id')

    @cached_property
    def azimuth(self):
        return self._column('azimuth')

    @cached_property
    def zenith(self):
        return self._column('zenith')

    @cached_property
    def n_pulses(self):
        return self._column('n_pulses')

    @cached_property
    def n_doms(self):
        return self._column('n_doms')

    @cached_property
    def truth(self):
        """dict of energy (GeV), kind (0 track, 1 cascade), vertex_x/y/z (m), or None for real data."""
        if not self.manifest['has_truth']:
            return None
        return {name: self._column(name) for name, _ in TRUTH_FIELDS}

    def event_records(self, idx):
        """The events.npy records of split-wide indices idx, in the order given, and each one's shard."""
        idx = np.asarray(idx, np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"event index out of range [0, {len(self)}) in {self.path}")
        shard = np.searchsorted(self.shard_start, idx, side='right') - 1
        if self._unchecked:  # a shard's records are checked whole when a batch first reads from it
            for s in self._unchecked.intersection(shard.tolist()):
                self._check_records(s)
                self._unchecked.discard(s)
        return self.rows('events', shard, idx - self.shard_start[shard]), shard

    def _damaged(self, ev, shard, k, files, what):
        """The error for the k-th of events ev (records as read, with their shards) in a shard whose sizes are right but
        whose contents are not (bits flipped on a disk or in a copy, or a writer of its own): the file, the event, the
        problem, and the command that rebuilds the shard (a plain re-run checks sizes only, and would keep it)."""
        where = f"{self.path}/{self.manifest['shards'][shard[k]]}/{files}: event_id {ev['event_id'][k]}"
        mend = f"{mend_command(self.path, self.manifest)} --verify=True"
        return SplitError(f"{where}: {what}; the shard is damaged: rebuild it with: {mend}")

    def _check_records(self, s):
        """Shard s's events.npy, whole, as prepare.py writes it: each event's pulses and DOMs start where those of the
        event before end, from the files' starts to their ends; an event has 1 to n_sensors DOMs (one per hit sensor),
        at least as many pulses, finite seeds and, in train and val, labels in range. Else a batch would read another
        event's pulses or DOMs, fail deep in numpy, or reach the model with NaN (met as a NaN loss); where the data
        has truth, a kind code and an energy (NaN: unknown) that the heads learn and sample.py's figures group by.
        Run once per shard and process, when a batch first reads from it (2 ms for 20,000 events): on each batch's
        records, the checks cost 2% of the batching's time."""
        ev, shard, n = self.shards[s]['events'], np.full(len(self.shards[s]['events']), s), len(self.geometry)
        limits = ([('n_doms', ev['n_doms'], 1, n, f"not from 1 to the {n} sensors"),
                   ('n_pulses', ev['n_pulses'] - ev['n_doms'], 0, np.inf, "below its n_doms")]
                  + [(name, ev[name], -np.inf, np.inf, "a seed that is not finite") for name in SEED_FIELDS]
                  + [(name, ev[name], 0, hi + 1e-9, f"a label not from 0 to {hi:.6f}") for name, hi in LABEL_MAX.items()
                     if self.manifest['has_labels']]
                  # the truth that the kind and energy heads learn (NaN energy: unknown)
                  + ([('kind', ev['kind'], 0, len(KIND_NAMES) - 1, f"not a kind code (0 to {len(KIND_NAMES) - 1})"),
                      ('energy', np.where(np.isnan(ev['energy']), 1, ev['energy']), np.finfo(np.float32).tiny, np.inf,
                       "not above 0 GeV")] if 'kind' in ev.dtype.names else []))
        for name, x, lo, hi, why in limits:
            bad = ~((x >= lo) & (x <= hi) & np.isfinite(x))
            if bad.any():
                k = np.flatnonzero(bad)[0]
                raise self._damaged(ev, shard, k, 'events.npy', f"{name} {ev[name][k]}, {why}")
        for name, what, file in [('pulse', 'pulses', 'pulses.npy'), ('dom', 'DOMs', 'doms.npy')]:
            start, end = ev[f'{name}_start'], ev[f'{name}_start'] + ev[f'n_{name}s']
            total = len(self.shards[s][f'{name}s']) - (name == 'dom')  # doms.npy ends with the end of the last DOM
            if start[0] != 0:
                raise self._damaged(ev, shard, 0, 'events.npy', f"the first event's {name}_start is {start[0]}, not 0")
            k = np.flatnonzero(np.r_[start[1:] != end[:-1], end[-1] != total])
            if len(k) and k[0] == len(ev) - 1:
                raise self._damaged(ev, shard, k[0], 'events.npy', f"the last event's {what} end at {end[-1]} "
                                    f"({name}_start + n_{name}s), {file} at {total}")
            if len(k):
                raise self._damaged(ev, shard, k[0], 'events.npy', f"its {what} end at {end[k[0]]} ({name}_start + "
                                    f"n_{name}s), where the next event's (event_id {ev['event_id'][k[0] + 1]}) start at "
                                    f"{start[k[0] + 1]}")

    def rows(self, name, shard, starts, lengths=None):
        """Rows of the shards' `name` array (events, doms or pulses): row starts[i] of shard[i], or with lengths the
        rows starts[i] .. starts[i] + lengths[i] - 1, concatenated in the order given. The events are sorted by shard
        once, so a batch costs one gather per shard it touches, whatever the number of events (a batch of the full
        Kaggle set draws its events from hundreds of shards)."""
        if not self.shards:
            return np.zeros(0)
        raw, dtype = self._raw[name], self.shards[0][name].dtype
        if len(shard) == 0 or shard.min() == shard.max():  # one shard: no sorting
            src = starts if lengths is None else M._ranges(starts, lengths)
            return raw[int(shard[0]) if len(shard) else 0][src].view(dtype)
        order = np.argsort(shard, kind='stable')
        runs = np.flatnonzero(np.diff(shard[order])) + 1  # where each shard's events start in that order
        starts = np.asarray(starts, np.int64)[order]
        if lengths is None:
            dst, src, cuts = order, starts, runs
        else:
            n = np.asarray(lengths, np.int64)
            dst = M._ranges((np.cumsum(n) - n)[order], n[order])  # each row's place in the output
            src, cuts = M._ranges(starts, n[order]), np.cumsum(n[order])[runs - 1]
        out = np.empty(len(dst), raw[0].dtype)
        for s, d, r in zip(shard[order[np.r_[0, runs]]].tolist(), np.split(dst, cuts), np.split(src, cuts)):
            out[d] = raw[s][r]
        return out.view(dtype)

    def dom_sizes(self, ev, shard):
        """The pulse count of every DOM of the events with records ev (event_records), concatenated: each event's
        n_doms + 1 DOM bounds read from doms.npy, without the differences across two events. Checked to increase
        (events() checks that the DOMs hold the events' pulses): else a batch would pack pulses in the wrong DOMs, or
        fail deep in numpy."""
        n_d = ev['n_doms'].astype(np.int64)
        sizes = np.diff(self.rows('doms', shard, ev['dom_start'], n_d + 1).astype(np.int64))
        sizes = np.delete(sizes, _offsets(n_d + 1)[1:-1] - 1)
        if sizes.min() < 1:
            raise self._doms_problem(ev, shard)
        return sizes

    def _doms_problem(self, ev, shard):
        """What dom_sizes or events() found wrong with the DOM offsets of events ev (their records checked), for the
        first event concerned."""
        ps, n_p, n_d = ev['pulse_start'].astype(np.int64), ev['n_pulses'].astype(np.int64), ev['n_doms'].astype(np.int64)
        first = _offsets(n_d + 1)  # where each event's bounds start among those read, and the end
        bounds = self.rows('doms', shard, ev['dom_start'], n_d + 1).astype(np.int64)
        start, end = bounds[first[:-1]], bounds[first[1:] - 1]
        falls = np.zeros(len(ev), bool)  # the events whose DOM offsets do not increase
        falls[np.repeat(np.arange(len(ev)), n_d)[np.delete(np.diff(bounds), first[1:-1] - 1) < 1]] = True
        k = np.flatnonzero(falls | (start != ps) | (end - start != n_p))[0]
        if falls[k]:
            b = bounds[first[k]:first[k + 1]]
            j = np.flatnonzero(np.diff(b) < 1)[0]
            return self._damaged(ev, shard, k, 'doms.npy', f"its DOM offsets do not increase: its DOM {j} starts at "
                                 f"pulse {b[j]}, DOM {j + 1} (of {n_d[k]}; {n_d[k]} is the end) at {b[j + 1]}")
        return self._damaged(ev, shard, k, 'doms.npy', f"its {n_d[k]} DOMs hold pulses [{start[k]}, {end[k]}), its record "
                             f"in events.npy [{ps[k]}, {ps[k] + n_p[k]}) (pulse_start, n_pulses)")

    def events(self, idx, read=None):
        """Pulses of many events, concatenated in the order of idx, as a dict of numpy arrays:
        sensor_id int16, time int64 (ns, as in the parquet), charge float32, auxiliary bool, direct bool (kept by
        the improved LineFit, as prepare.py stored it), and
        pulse_offsets (n+1), event_dom_offsets (n+1), dom_offsets (n_doms+1) int64 into those arrays.
        read: (records, shards, DOM sizes) of these events where the caller has read them (plan_batch)."""
        ev, shard, dom_sizes = read if read is not None else (*self.event_records(idx), None)
        n_p, n_d = ev['n_pulses'].astype(np.int64), ev['n_doms'].astype(np.int64)
        # each event's DOMs hold its pulses in order, and the events follow each other: the DOM offsets are the
        # running sum of the DOM sizes
        dom_offsets = _offsets(self.dom_sizes(ev, shard) if dom_sizes is None else dom_sizes)
        pulse_offsets = _offsets(n_p)
        # as many as the events' records: an event's first or last DOM offset damaged in doms.npy would move its DOMs
        # against its pulses (two events damaged so as to make up for each other would pass)
        if dom_offsets[-1] != pulse_offsets[-1]:
            raise self._doms_problem(ev, shard)
        pulses = self.rows('pulses', shard, ev['pulse_start'], n_p)
        sensor_aux = pulses['sensor_aux']
        sensor_id, charge = (sensor_aux & (DIRECT_BIT - 1)).astype(np.int16), pulses['charge'].astype(np.float32)
        # values that no shard holds: a sensor past the geometry (an IndexError in the batching), a charge that is NaN,
        # infinite or negative (NaN in the model's features, met as a NaN loss), a time past the split's longest event
        if len(charge) and (sensor_id.max() >= len(self.geometry) or not (charge.min() >= 0 and charge.max() <= MAX_CHARGE)
                            or pulses['dt'].max() > self.manifest['stats']['max_time_span']):
            raise self._pulses_problem(ev, shard, pulses, pulse_offsets)
        return {
            'sensor_id': sensor_id,
            'time': pulses['dt'].astype(np.int64) + np.repeat(ev['t0'], n_p),
            'charge': charge,
            'auxiliary': sensor_aux >= AUX_BIT,
            'direct': (sensor_aux & DIRECT_BIT) > 0,
            'pulse_offsets': pulse_offsets, 'event_dom_offsets': _offsets(n_d), 'dom_offsets': dom_offsets,
        }

    def _pulses_problem(self, ev, shard, pulses, offsets):
        """What events() found wrong, for the first pulse it concerns (offsets: each event's first among the pulses)."""
        sensor, charge, dt = pulses['sensor_aux'] & (DIRECT_BIT - 1), pulses['charge'].astype(np.float32), pulses['dt']
        n, span = len(self.geometry), self.manifest['stats']['max_time_span']
        checks = [(sensor >= n, sensor, f"sensor_id {{}}, past the geometry's {n} sensors"),
                  (~((charge >= 0) & (charge <= MAX_CHARGE)), charge, f"charge {{}}, not from 0 to {MAX_CHARGE:g}"),
                  (dt > span, dt, f"time {{}} ns after the event's t0, past the split's longest event ({span} ns)")]
        for bad, value, what in checks:
            if bad.any():
                j = np.flatnonzero(bad)[0]
                k = np.searchsorted(offsets, j, side='right') - 1
                return self._damaged(ev, shard, k, 'pulses.npy', f"its pulse {j - offsets[k]}: {what.format(value[j])}")

    def event(self, i):
        """One event's pulses in (sensor, time) order: sensor_id, time, charge, auxiliary."""
        e = self.events([i])
        return {k: e[k] for k in ['sensor_id', 'time', 'charge', 'auxiliary']}


def open_split(path):
    return Split(path)


def verify_output(out, log=print):
    """Re-read every shard under out (all splits) against the sizes and checksums of its shard.json, reading
    nothing else. Logs each damaged shard and returns {shard folder: problem}."""
    bad = {}
    splits = sorted(d for d in glob_in(out, '*') if os.path.isdir(d))
    for split_dir in splits:
        try:
            with open(f"{split_dir}/manifest.json") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            manifest = None
            if glob_in(split_dir, 'batch_*'):
                log(f"prepare: verify: {split_dir}: no readable manifest.json: the split is incomplete")
                bad[split_dir] = "no manifest"
        names = manifest['shards'] if manifest else [os.path.basename(d) for d in glob_in(split_dir, 'batch_*')]
        for name in sorted(names):
            _, problem = shard_problem(f"{split_dir}/{name}", checksums=True)
            if problem:
                bad[f"{split_dir}/{name}"] = problem
                log(f"prepare: verify: {split_dir}/{name}/{problem}")
    n = sum(len(glob_in(d, 'batch_*')) for d in splits)
    log(f"prepare: verify: {n} shards in {out}, {len(bad)} damaged or incomplete")
    return bad


# -----------------------------------------------------------------------------
# batching: events -> fixed-shape micro-batches of packed pulse and DOM streams for the model

def plan_batch(split, idx, max_pulses, max_doms, max_events, max_pulses_per_dom):
    """How many of the events idx (from the first) the next micro-batch takes: events in order while their pulses
    (after the per-DOM cap), DOMs and count fit the budgets, at least one. Reads only event records and DOM offsets.
    Returns the count and what it read of the events taken (their records, shards and DOM sizes), which packing
    them needs again (pack_taken's read)."""
    cand = np.asarray(idx[:max_events], np.int64)
    if len(cand) == 0:
        raise ValueError("pack_batch needs at least one event")
    ev, shard = split.event_records(cand)
    # exact pulse cost after the per-DOM cap, from the DOM offsets alone (no pulse is read for this)
    n_d = ev['n_doms'].astype(np.int64)
    sizes = split.dom_sizes(ev, shard)
    dom_end = np.cumsum(n_d)
    cost_p = np.add.reduceat(np.minimum(sizes, max_pulses_per_dom), dom_end - n_d)
    fits = (np.cumsum(cost_p) <= max_pulses) & (dom_end <= max_doms)
    n = max(int(np.argmin(fits)) if not fits.all() else len(cand), 1)
    return n, (ev[:n], shard[:n], sizes[:dom_end[n - 1]])


def pack_batch(split, idx, max_pulses, max_doms, max_events, max_pulses_per_dom):
    """Pack a prefix idx[:n_taken] of the given events into one micro-batch of fixed shapes
    (P = max_pulses pulse slots, D = max_doms DOM slots, E = max_events event slots).

    Truncation rules, applied in this order:
    - a DOM with more than max_pulses_per_dom pulses keeps its earliest max_pulses_per_dom;
    - events are taken in order while their pulses, DOMs and count fit the budgets (plan_batch);
    - the first event alone may exceed a budget (a 100,000-pulse event): it then keeps its pulses in the
      order non-auxiliary first, then earliest, up to max_pulses, and of those only the pulses of the
      first max_doms DOMs in that order.
    Returns (batch, n_taken) with batch a dict of numpy arrays (see the field list in the code)."""
    n_taken, read = plan_batch(split, idx, max_pulses, max_doms, max_events, max_pulses_per_dom)
    return pack_taken(split, idx[:n_taken], max_pulses, max_doms, max_events, max_pulses_per_dom, read), n_taken


def pack_taken(split, idx, max_pulses, max_doms, max_events, max_pulses_per_dom, read):
    """The micro-batch of exactly the events idx (as plan_batch took them; read: what it read of them)."""
    idx = np.asarray(idx, np.int64)
    return pack_events(split.events(idx, read), read[0], idx, split.geometry, max_pulses, max_doms, max_events,
                       max_pulses_per_dom)


def pack_events(e, ev, event_index, geometry, max_pulses, max_doms, max_events, max_pulses_per_dom):
    """The model's micro-batch from events as split.events() returns them (all of them are packed,
    truncated by the rules of pack_batch) and their records ev (events.npy's, or a dict of arrays with the same
    names: azimuth, zenith, the quick fit's and the LineFits' columns). Fixed shapes: P = max_pulses, D = max_doms,
    E = max_events."""
    n_taken = len(e['pulse_offsets']) - 1
    n_pulses_raw = e['pulse_offsets'][-1]
    dom_size = np.diff(e['dom_offsets'])
    dom_of_pulse = np.repeat(np.arange(len(dom_size)), dom_size)
    rank = np.arange(n_pulses_raw) - e['dom_offsets'][:-1][dom_of_pulse]
    keep = rank < max_pulses_per_dom
    if keep.sum() > max_pulses or len(dom_size) > max_doms:  # only a lone first event gets here
        order = np.lexsort((e['time'], e['auxiliary']))  # non-auxiliary first, then earliest
        order = order[keep[order]][:max_pulses]
        dom_rank = np.full(len(dom_size), np.iinfo(np.int64).max)
        np.minimum.at(dom_rank, dom_of_pulse[order], np.arange(len(order)))
        first_doms = np.argsort(dom_rank, kind='stable')[:max_doms]
        keep = np.zeros(n_pulses_raw, bool)
        keep[order] = True
        keep &= np.isin(dom_of_pulse, first_doms)

    # kept pulses stay in (event, sensor, time) order; DOMs with no kept pulse disappear
    kept = np.flatnonzero(keep)
    old_dom = dom_of_pulse[kept]
    dom_alive = np.zeros(len(dom_size), bool)
    dom_alive[old_dom] = True
    new_dom_index = np.cumsum(dom_alive) - 1
    pulse_dom = new_dom_index[old_dom]
    n_p, n_dm = len(kept), int(dom_alive.sum())
    event_of_dom = np.repeat(np.arange(n_taken), np.diff(e['event_dom_offsets']))
    dom_event = event_of_dom[dom_alive]
    dom_sensor = e['sensor_id'][e['dom_offsets'][:-1]][dom_alive].astype(np.int32)
    dom_first = np.flatnonzero(np.diff(pulse_dom, prepend=-1))
    pulse_rank = np.arange(n_p) - dom_first[pulse_dom]
    event_of_pulse = dom_event[pulse_dom]
    t = e['time'][kept]
    t_first = np.full(n_taken, np.iinfo(np.int64).max)
    np.minimum.at(t_first, event_of_pulse, t)

    P, D, E = max_pulses, max_doms, max_events
    b = {
        'pulse_time': np.zeros(P, np.float32), 'pulse_charge': np.zeros(P, np.float32),
        'pulse_aux': np.zeros(P, np.float32), 'pulse_rank': np.zeros(P, np.int32),
        'pulse_dom': np.full(P, -1, np.int32),
        'dom_pos': np.zeros((D, 3), np.float32), 'dom_sensor': np.full(D, -1, np.int32),
        'dom_event': np.full(D, -1, np.int32), 'dom_n_pulses': np.zeros(D, np.int32),
        'event_dir': np.zeros((E, 3), np.float32), 'event_index': np.full(E, -1, np.int64),
        'event_fit_dir': np.zeros((E, 3), np.float32), 'event_fit_rlogl': np.zeros(E, np.float32),
        'event_lf_v': np.zeros((E, 3), np.float32), 'event_ilf_dir': np.zeros((E, 3), np.float32),
        'pulse_direct': np.zeros(P, np.float32),
        'event_n_pulses': np.zeros(E, np.int32), 'event_n_doms': np.zeros(E, np.int32),
        'event_track': np.full(E, np.nan, np.float32), 'event_log_energy': np.full(E, np.nan, np.float32),
        'n_pulses': n_p, 'n_doms': n_dm, 'n_events': n_taken,
    }
    b['pulse_time'][:n_p] = t - t_first[event_of_pulse]
    b['pulse_charge'][:n_p] = e['charge'][kept]
    b['pulse_aux'][:n_p] = e['auxiliary'][kept]
    b['pulse_direct'][:n_p] = e['direct'][kept]
    b['pulse_rank'][:n_p] = pulse_rank
    b['pulse_dom'][:n_p] = pulse_dom
    np.take(geometry, dom_sensor, axis=0, out=b['dom_pos'][:n_dm])  # (3x faster than geometry[dom_sensor] here)
    b['dom_sensor'][:n_dm] = dom_sensor
    b['dom_event'][:n_dm] = dom_event
    b['dom_n_pulses'][:n_dm] = dom_size[dom_alive]
    b['event_dir'][:n_taken] = angles_to_dir(ev['azimuth'], ev['zenith'])
    b['event_fit_dir'][:n_taken] = angles_to_dir(ev['fit_azimuth'], ev['fit_zenith'])
    b['event_fit_rlogl'][:n_taken] = ev['fit_rlogl']
    b['event_lf_v'][:n_taken] = np.stack([ev['lf_vx'], ev['lf_vy'], ev['lf_vz']], -1)
    b['event_ilf_dir'][:n_taken] = np.stack([ev['ilf_x'], ev['ilf_y'], ev['ilf_z']], -1)
    b['event_index'][:n_taken] = event_index
    b['event_n_pulses'][:n_taken] = np.diff(e['pulse_offsets'])
    b['event_n_doms'][:n_taken] = np.diff(e['event_dom_offsets'])
    names = ev.dtype.names if hasattr(ev, 'dtype') else ev.keys()
    if 'kind' in names:  # a simulated set's truth: what the model's track and energy heads learn (NaN: unknown)
        b['event_track'][:n_taken] = ev['kind'] == KIND_NAMES.index('track')
        b['event_log_energy'][:n_taken] = np.log10(np.maximum(ev['energy'], 1e-3))
    return b


def angles_to_dir(azimuth, zenith):
    """Unit vector of the direction the neutrino comes from, float32 (NaN in, NaN out): model.angles_to_vector's."""
    return M.angles_to_vector(azimuth, zenith).astype(np.float32)


class BatchLoader:
    """Iterator of pack_batch micro-batches, prepared ahead of the consumer.

    shuffle=True: a new permutation per epoch (seeded by seed and epoch), each rank taking every world_size-th
    event of it, so ranks draw different events; epochs=None runs forever.
    shuffle=False: the split in order, rank r taking the r-th contiguous chunk, each event once per epoch.

    A background thread plans the batches (plan_batch: which events each takes, cheap) and packs them, or hands the
    packing to `workers` processes when one thread cannot keep up (a GPU step); the batches come out in the same
    order either way. transform(batch) runs where the packing runs (the model's stream layout and features: see
    model.model_inputs), and pin_memory pages the result's tensors in for asynchronous copies to a GPU.
    The batches are a function of (seed, epoch, position in the epoch's order): `position` is (epoch, events of
    it taken) after the last batch handed out, and a loader made with start=position goes on exactly from there."""

    def __init__(self, split, max_pulses, max_doms, max_events, max_pulses_per_dom,
                 shuffle=True, seed=0, rank=0, world_size=1, epochs=None, prefetch=4, max_events_total=0,
                 start=(0, 0), transform=None, workers=0, pin_memory=False):
        self.split, self.args = split, (max_pulses, max_doms, max_events, max_pulses_per_dom)
        self.position = tuple(start)
        self.shuffle, self.seed, self.rank, self.world_size, self.epochs = shuffle, seed, rank, world_size, epochs
        # the events each epoch draws from: the first max_events_total of the split (0 = all; an evaluation of part of it)
        self.n_events = min(len(split), max_events_total) if max_events_total else len(split)
        if not 0 <= rank < world_size:
            raise ValueError(f"BatchLoader: rank {rank} is not among the ranks 0..{world_size - 1} of world_size {world_size}")
        # without an end, a rank with no events would wait forever; every rank refuses, so that under torchrun all of
        # them stop with this line, where the others would fail later on a closed connection
        if epochs is None and world_size > self.n_events:
            idle = f"rank {self.n_events} gets" if world_size == self.n_events + 1 else f"ranks {self.n_events}..{world_size - 1} get"
            raise ValueError(f"{split.path}: {self.n_events} events for {world_size} ranks, so {idle} none; use fewer ranks "
                             f"or a larger split")
        self.transform, self.pin_memory, self.prefetch, self.workers = transform, pin_memory, prefetch, workers
        self.queue = queue.Queue(maxsize=prefetch)
        self.stop = threading.Event()
        # forked before the thread starts; the workers run torch on one thread each and never touch a GPU
        self.pool = _WorkerContext().Pool(workers, _worker_init, (split.path, self.args, transform, os.getpid())) if workers else None
        # this thread and its consumer share the interpreter lock, which a waiting thread gets only after the holder
        # has run for Python's switch interval: at its 5 ms the training step's threads, which retake the lock between
        # ops, stalled behind this thread's numpy; at 0.5 ms the toy's main job made 1.04-1.08x the events/s and
        # sample.py's model loop 1.02-1.08x (notes, section 10). A process-wide setting, made where the thread is.
        sys.setswitchinterval(0.0005)
        self.thread = threading.Thread(target=self._fill, daemon=True)
        self.thread.start()

    def _order(self, epoch):
        if self.shuffle:
            return np.random.default_rng([self.seed, epoch]).permutation(self.n_events)[self.rank::self.world_size]
        return np.array_split(np.arange(self.n_events), self.world_size)[self.rank]

    def _plans(self):
        """(epoch, event indices, position after it, what plan_batch read of them) of each batch in order, from self.position on."""
        epoch, pos = self.position
        while self.epochs is None or epoch < self.epochs:
            order = self._order(epoch)
            while pos < len(order):
                n, read = plan_batch(self.split, order[pos:], *self.args)
                yield epoch, order[pos:pos + n], (epoch, pos + n), read
                pos += n
            epoch, pos = epoch + 1, 0

    def _fill(self):
        try:
            in_flight = self.in_flight = collections.deque()  # the workers' batches, in order
            for plan in self._plans():
                if self.stop.is_set():
                    return
                if self.pool is None:
                    self._put(self._ready(_pack(self.split, self.args, self.transform, *plan)))
                    continue
                in_flight.append(self.pool.apply_async(_worker_pack, plan))
                if len(in_flight) >= self.prefetch + self.workers:
                    self._put(self._ready(_unpickled(in_flight.popleft().get())))
            while in_flight:
                self._put(self._ready(_unpickled(in_flight.popleft().get())))
            self._put(None)
        except BaseException as e:  # hand the error to the consumer rather than hang it
            self._put(e)

    def _ready(self, batch):
        if self.pin_memory:
            batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return batch

    def _put(self, item):
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def __iter__(self):
        return self

    def __next__(self):
        item = self.queue.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        self.position = item['position']
        return item

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)
        if self.pool is not None:
            # let the workers finish the batches in flight first: a worker killed while it writes a result leaves
            # half a message in the pipe, and Pool.terminate then waits forever on its result thread (seen in CI)
            for result in getattr(self, 'in_flight', ()):
                result.wait(timeout=60)
            self.pool.terminate()


def _pack(split, args, transform, epoch, idx, position, read):
    batch = pack_taken(split, idx, *args, read)
    batch['epoch'], batch['position'] = epoch, position
    return transform(batch) if transform is not None else batch


_worker = {}  # in each of BatchLoader's worker processes: its own open split, the budgets and transform (_worker_init)


class _WorkerProcess(ForkProcess):
    def terminate(self):  # Pool.terminate's (BatchLoader.close): SIGKILL, since these workers ignore SIGTERM (_worker_init)
        self.kill()


class _WorkerContext(ForkContext):
    Process = _WorkerProcess


def _worker_init(path, args, transform, parent):
    _worker_start(parent)
    # a SIGTERM to every process of the job (a scheduler's) reaches the workers too, while the parent's handler lets the
    # run go on to its stop (the iteration, the evaluation under way, under torchrun the log interval): a worker that
    # died of it never sent the batch it was packing, and the parent waited for it forever, saving nothing. Ignored, as
    # SIGINT is; the parent ends them (close(), or its death: _worker_start). Not a Python handler that exits once the
    # parent closes: one that came as the worker was about to block on the task queue's lock ran only after it, never
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _worker.update(split=open_split(path), args=args, transform=transform)


def _worker_pack(epoch, idx, position, read):
    batch = _pack(_worker['split'], _worker['args'], _worker['transform'], epoch, idx, position, read)
    tensors = [k for k, v in batch.items() if isinstance(v, torch.Tensor)]
    return {k: v.numpy() if k in tensors else v for k, v in batch.items()}, tensors  # pickled as plain arrays


def _unpickled(result):
    batch, tensors = result
    return {k: torch.from_numpy(v) if k in tensors else v for k, v in batch.items()}


# -----------------------------------------------------------------------------

if __name__ == '__main__':
    from configurator import check_ranges, configure
    configure(globals(), names=SETTINGS)
    check_ranges('prepare', globals(), at_least=LEAST)
    # SIGTERM (a scheduler's stop) reaches this process and not its workers, which would outlive it, and Ctrl-C
    # reaches both: simulate.stop unwinds, so that the pools kill their workers and run() removes its temporary files
    signal.signal(signal.SIGTERM, simulate.stop)
    signal.signal(signal.SIGINT, simulate.stop)
    raw, out, simulating = raw_dir, None, False
    try:
        if raw_dir == 'data/kaggle' and not os.path.exists(os.path.join(raw_dir, 'train_meta.parquet')):
            raw = sim_dir
            if not verify:
                print(f"prepare: no Kaggle data in {raw_dir}; using the synthetic set in {sim_dir}, simulated first if missing")
                simulating = True
                simulate.simulate(out_dir=sim_dir, num_proc=num_proc)  # also refuses a set made with other physics
                simulating = False
        out = out_dir or default_out(raw)
        made_from = set()  # the raw folders the output records it was made from
        for m in glob_in(out, '*/manifest.json'):
            try:
                with open(m) as f:
                    made_from.add(json.load(f)['made_by']['raw_dir'])
            except (OSError, ValueError, KeyError, TypeError):
                pass
        if verify and (not os.path.exists(os.path.join(raw, 'train_meta.parquet')) or made_from - {os.path.abspath(raw)}):
            # without the raw files it was made from, verify only reports
            if not os.path.isdir(out):
                raise PrepareError(f"{out}: no such folder to verify")
            bad = verify_output(out)
            if bad:
                src = ', '.join(map(_shell, sorted(made_from))) or 'the raw folder it was made from'
                raise PrepareError(f"{out}: {len(bad)} damaged or incomplete shards or splits (listed above); to rebuild them, "
                                   f"run prepare.py again with --raw_dir={src} --out_dir={_shell(out)} --verify=True")
        else:
            run(raw, out, val_batches=val_batches, train_batches=train_batches, num_proc=num_proc, verify=verify,
                fit_steps=fit_steps, fit_ice=fit_ice)
    except PrepareError as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        sys.exit(1)
    except simulate.Stopped as e:
        print(f"prepare: stopped by {signal.Signals(e.code - 128).name}; " + (
            f"{sim_dir} is not complete, and the same command simulates it anew" if simulating else
            f"the finished shards in {out} are kept, and the same command goes on from them"), file=sys.stderr)
        raise
