"""
Evaluate a trained model on held-out events, beside plain and improved LineFit and the quick fit on the same
events (the `baselines` setting: classical.py's methods), and give each event an error circle it can trust.

    python sample.py                                  # out/best.pt on the val split of its data
    python sample.py --split=test                     # predictions + Kaggle submission.csv
    python sample.py --out_dir=out-baseline-1m --max_events=100000 --ckpt=ckpt.pt

Prints the competition metric (mean angular error) in rad and degrees with its standard error over the events, the
median and percentiles, and breakdowns by pulse count, DOM count, zenith, predicted kappa, and energy and kind where
the data has a truth file (the synthetic set does).

Error circles: the model's 3-vector is a von Mises-Fisher distribution whose norm kappa is its
concentration; the circle that holds probability p of it has a closed-form radius. On the val split
sample.py measures how often the true direction falls inside each event's 50%, 68% and 90% circles, fits
monotone maps from the predicted kappa to calibrated circles (one per level, since the errors have heavier
tails than a vMF, and one set per group of events: by the model's predicted kind and energy where its heads
learned them, else by hit-DOM count), checks them honestly (fit on the
even-indexed events, measured on the odd-indexed ones), then fits the stored maps on all of val and writes
them to out_dir/calibration.json; on any other split it applies the stored maps. Writes to out_dir, all at the end
and together (a run stopped before or while it writes leaves the files of the run before as they were):
    eval_<split>.json          the same figures (n_events, mean_angular_error and its standard error _se,
                               median_angular_error, ..., linefit, linefit_improved, time_fit: {the same, and
                               model_ratio: the model's mean error over theirs, with model_ratio_se},
                               breakdowns, resolution, coverage, training)
    predictions_<split>.csv    event_id, azimuth, zenith, kappa, hit_doms, track_probability and log10_energy
                               (the model's heads, where its training data had a truth file), kappa_calibrated
                               (its vMF's 50% circles hold 50%), radius50_deg, radius90_deg (the calibrated
                               circles; from kappa without a map)
                               (+ true angles and errors where known)
    submission.csv             for the test split: event_id, azimuth, zenith (the Kaggle format), when every
                               test event was predicted
    calibration.json           for the val split: the calibration maps (applied on other splits, to the weights
                               they were fit for), from calibration_min_events val events up; a run on fewer val
                               events than the stored maps of the same weights keeps them
    resolution_<split>.png     median angular error against true energy, per kind, model and classical fits
    resolution_doms_<split>.png  the same against the number of hit DOMs
    coverage_<split>.png       observed against nominal coverage of the error circles, before and after calibration
    training.png               train loss and val error against iteration (from out_dir/log.jsonl, by train.py)
"""

import errno
import functools
import glob
import hashlib
import json
import math
import os
import signal
import sys
import textwrap
import time

import matplotlib
matplotlib.use('Agg')  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import model as M  # noqa: E402
import classical  # noqa: E402
import prepare  # noqa: E402
from prepare import KIND_NAMES, BatchLoader, SplitError, open_split  # noqa: E402

# -----------------------------------------------------------------------------
# settings
out_dir = 'out'
ckpt = 'best.pt'          # file in out_dir
data_dir = ''             # '' = the data_dir the model was trained on
split = 'val'
max_events = 0            # the first max_events events of the split (0 = all)
max_pulses = 0            # micro-batch budgets; 0 = INFER_BUDGET times those of training
max_doms = 0
max_events_per_batch = 0
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = 'float32'         # autocast dtype on CUDA: none by default, since bf16 turned a bright track's direction by up to
                          # 0.7 deg (p99; notes, section 17), more than real ones are resolved; 'bfloat16' is faster
compile = False
attn = 'auto'             # 'auto' (FlexAttention on CUDA, grouped SDPA elsewhere), 'flex' or 'sdpa': the same function of
                          # the same weights, whatever the checkpoint was trained with
baselines = 'linefit,linefit_improved,time_fit'  # classical methods on the same events, from classical.METHODS ('mpe' too:
                                                 # slow; '' = none); time_fit is read as prepare.py stored it, the model's second seed
plots = True              # write the PNG figures
plot_min_events = 20      # the resolution figures leave out bins with fewer events
calibration_min_events = 1000  # the fewest val events calibration.json is fit on (its maps bin kappa by 300 at least)
# -----------------------------------------------------------------------------

LEVELS = (0.5, 0.68, 0.9)              # the error circles reported: IceCube's 50% and 90%, and 1 sigma
CURVE_LEVELS = np.round(np.arange(0.05, 0.96, 0.05), 2)  # the coverage plot's nominal levels
CAL_LEVELS = np.union1d(CURVE_LEVELS, LEVELS)            # the levels the calibration maps are fit at
INFER_BUDGET = 4  # without gradients a micro-batch keeps no activations: 4x training's budgets ran the toy model at
                  # 1.2-1.3x the events/s of 1x on the CPU (fewer, larger ops; 8x and 16x less again; notes, section 10)
ENERGY_EDGES = [-np.inf, 2.5, 3, 3.5, 4, 5, 6, np.inf]  # log10(E / GeV), for the tables
DOM_EDGES = [0, 10, 20, 40, 80, 160, 320, np.inf]
GROUP_TITLES = {'by_kind': 'by kind', 'by_energy': 'by energy (log10 GeV)', 'by_doms': 'by hit DOMs'}
METHOD_LABELS = {'model': 'iceaggr', 'linefit': 'LineFit', 'linefit_improved': 'improved LineFit', 'time_fit': 'quick likelihood fit',
                 'mpe': 'MPE likelihood fit'}


# -----------------------------------------------------------------------------
# error circles: containment radius, coverage, calibration

def containment_radius(kappa, p):
    """Angle (rad) around the predicted direction holding probability p of a von Mises-Fisher distribution on the
    sphere: P(angle <= r) = (1 - exp(-kappa (1 - cos r))) / (1 - exp(-2 kappa)), inverted in a form exact both for
    kappa -> 0 (uniform on the sphere, 1 - cos r = 2 p) and for kappa in the thousands (no 1 - exp cancellation)."""
    kappa = np.maximum(np.asarray(kappa, np.float64), 1e-12)
    one_minus_cos = -np.log1p(p * np.expm1(-2 * kappa)) / kappa
    return np.arccos(1 - np.clip(one_minus_cos, 0, 2))


def vmf_radii(kappa, levels=LEVELS):
    """(len(levels), n) containment radii (rad) of each event's own von Mises-Fisher distribution."""
    return np.stack([containment_radius(kappa, p) for p in levels])


def coverage(err, radii):
    """Observed fraction of events whose true direction lies inside their circle, per row of radii; NaN (null in
    the json) for an empty bin, made here because numpy's mean of no events also warns on stderr."""
    if err.shape[-1] == 0:
        return np.full(radii.shape[:-1], np.nan)
    return (err <= radii).mean(-1)


def fit_kappa_map(kappa, err, levels, n_bins=12, min_events=300):
    """For each level p, a monotone map of the predicted kappa to the kappa whose p-circles hold p of the true
    directions: in n_bins quantile bins of log kappa the scale of kappa that does so, placed at the bin's median
    log kappa, interpolated between, made non-decreasing so that a surer prediction never gets a wider circle.
    One map per level, because the errors have heavier tails than a vMF: a sure vMF's 90% circle is 1.8 times its
    50% one, the toy model's tracks' errors have a 90% quantile 5 times their median, so the one scale whose 50%
    circles hold 50% leaves the 90% circles too small."""
    log_k = np.log(np.maximum(kappa, 1e-12))
    n_bins = max(1, min(n_bins, len(kappa) // min_events))
    # equal-count bins by rank, events of one kappa in one bin (the first's), empty bins dropped: quantile edges left
    # bins empty where many events share one kappa (a model that predicts one kappa for all), and an empty bin has
    # no median and no quantile (an IndexError)
    order = np.argsort(log_k, kind='stable')
    by_rank = (np.arange(len(kappa)) * n_bins // max(len(kappa), 1))[np.searchsorted(log_k[order], log_k[order])]
    idx = np.empty(len(kappa), np.int64)
    idx[order] = np.unique(by_rank, return_inverse=True)[1].ravel()
    n_bins = int(idx.max(initial=0)) + 1
    knots = np.array([np.median(log_k[idx == b]) for b in range(n_bins)])
    log_scale = np.zeros((len(levels), n_bins))
    for j, p in enumerate(levels):
        # per event, the largest log scale of kappa at which its p-circle still holds the true direction (bisection:
        # the circle shrinks as kappa grows); p of a bin's events stay inside up to the (1 - p) quantile of these
        lo, hi = np.full(len(kappa), -20.0), np.full(len(kappa), 20.0)
        for _ in range(40):
            mid = (lo + hi) / 2
            inside = err <= containment_radius(kappa * np.exp(mid), p)
            lo, hi = np.where(inside, mid, lo), np.where(inside, hi, mid)
        log_scale[j] = [np.quantile(lo[idx == b], 1 - p) for b in range(n_bins)]
    log_scale = np.maximum.accumulate(knots + log_scale, axis=1) - knots
    return {'log_kappa_knots': knots.tolist(), 'log_scale': log_scale.tolist()}


def merged_edges(values, edges, min_events):
    """The report's bin edges (DOM_EDGES, ENERGY_EDGES) for the calibration's groups: a bin with fewer than
    min_events of values merged into its smaller neighbour, until none is."""
    edges = list(edges)
    while edges:
        counts = np.bincount(np.digitize(values, edges), minlength=len(edges) + 1)
        g = int(np.argmin(counts))
        if counts[g] >= min(min_events, len(values)):
            break
        # drop the edge between group g and its smaller neighbour
        edges.pop(0 if g == 0 else g - 1 if g == len(edges) or counts[g - 1] <= counts[g + 1] else g)
    return [-np.inf] + [float(e) for e in edges] + [np.inf]


def finite_or_none(x):
    return float(x) if np.isfinite(x) else None  # JSON has no infinity: an open end of a group's box is null


def in_box(box, events):
    """Which events lie in box ({column: [lo, hi)}, None an open end), events a dict of per-event columns."""
    m = np.ones(len(events['hit_doms']), bool)
    for column, (lo, hi) in box.items():
        m &= (events[column] >= (-np.inf if lo is None else lo)) & (events[column] < (np.inf if hi is None else hi))
    return m


def fit_calibration(kappa, err, events, levels=CAL_LEVELS, min_events=1000):
    """The calibration: a kappa map per level (fit_kappa_map) for each group of events, the groups boxes in columns
    of events that every event has, labelled or not (an analysis can select on them, where it cannot on the true
    kind or energy). events: dict of per-event columns, 'hit_doms' and, where the model's heads learned them (a
    simulated training set), 'track_probability' and 'log10_energy'.
    - With the heads: the events the model calls tracks (p >= 0.5) and cascades, each per bin of the report's
      ENERGY_EDGES in predicted energy (merged to min_events). The model's kappa means another thing for each kind
      and energy: after a toy main job, held out, the worst kind was 3.0 points off nominal and the worst energy bin
      3.2 (per hit-DOM group 4.4 and 4.6; notes, section 9).
    - Without: per bin of hit-DOM count (the report's DOM_EDGES bins, merged to min_events): after the toy main job
      one map for all left the 80-160 DOM events' 50% circles holding 61%, per group 49.5%."""
    if 'track_probability' in events:
        boxes = []
        p, log_e = events['track_probability'], events['log10_energy']
        parts = [[-np.inf, 0.5], [0.5, np.inf]] if min(((p < 0.5).sum(), (p >= 0.5).sum())) >= min_events else [[-np.inf, np.inf]]
        for part in parts:
            e = merged_edges(log_e[(p >= part[0]) & (p < part[1])], ENERGY_EDGES[1:-1], min_events)
            boxes += [{'track_probability': part, 'log10_energy': [lo, hi]} for lo, hi in zip(e, e[1:])]
        method = 'per predicted kind and bin of predicted energy'
    else:
        e = merged_edges(events['hit_doms'], DOM_EDGES[1:-1], min_events)
        boxes, method = [{'hit_doms': [lo, hi]} for lo, hi in zip(e, e[1:])], 'per group of hit-DOM count'
    boxes = [{c: [finite_or_none(lo), finite_or_none(hi)] for c, (lo, hi) in box.items()} for box in boxes]
    groups = [{'box': box, **fit_kappa_map(kappa[m], err[m], levels)} for box in boxes for m in [in_box(box, events)]]
    return {'method': method + ', per level, a scale of kappa per quantile bin of log kappa, interpolated, monotone',
            'levels': [float(p) for p in levels], 'columns': sorted({c for b in boxes for c in b}), 'groups': groups}


def subset(events, idx):
    return {k: v[idx] for k, v in events.items()}


def level_index(cal, p):
    """The row of the calibration's maps fit at the level nearest p."""
    return int(np.argmin(np.abs(np.array(cal['levels']) - p)))


def calibrated_kappa(cal, kappa, events, p=0.5):
    """The kappa of the level-p map of each event's group: for p = 0.5 the vMF whose 50% circles hold 50% of the true
    directions (the median-matched width, as IceCube's pull correction does)."""
    j, log_k = level_index(cal, p), np.log(np.maximum(kappa, 1e-12))
    log_scale = np.zeros(len(kappa))
    for g in cal['groups']:
        m = in_box(g['box'], events)
        log_scale[m] = np.interp(log_k[m], g['log_kappa_knots'], g['log_scale'][j])
    return kappa * np.exp(log_scale)


def calibrated_radii(cal, kappa, events, levels=LEVELS):
    """(len(levels), n) calibrated containment radii (rad), each level from its own map (levels the map was fit
    at), widened where needed so that a higher level never has a smaller circle."""
    radii = np.maximum.accumulate(np.stack([containment_radius(calibrated_kappa(cal, kappa, events, p), p)
                                            for p in cal['levels']]), 0)
    return radii[[level_index(cal, p) for p in levels]]


def circles(kappa, events, cal, levels=LEVELS):
    """The error circles compared, as radii (len(levels), n): each event's own vMF ('predicted'), and where there is
    a map, the calibrated circles and those of the one vMF of the calibrated kappa (whose 90% circles the tails
    outgrow)."""
    out = {'predicted': vmf_radii(kappa, levels)}
    if cal:
        out.update(calibrated=calibrated_radii(cal, kappa, events, levels),
                   calibrated_vmf=vmf_radii(calibrated_kappa(cal, kappa, events), levels))
    return out


def coverage_report(err, radii_by_name, groups):
    """Coverage at LEVELS of each set of circles in radii_by_name ({'predicted': (3, n) radii, ...}), over all events
    and per bin of each grouping in groups ({'by_kind': (bin index per event, bin labels), ...})."""
    def row(m, label):
        return {'bin': label, 'n': int(m.sum()), **{k: coverage(err[m], r[:, m]).tolist() for k, r in radii_by_name.items()}}
    report = {'all': row(np.ones(len(err), bool), 'all')}
    for name, (idx, labels) in groups.items():
        report[name] = [row(idx == i, lab) for i, lab in enumerate(labels) if (idx == i).any()]
    return report


def print_coverage(title, report):
    names = [k for k in report['all'] if k not in ('bin', 'n')]
    print(f"  {title}")
    print(f"    {'':>18} {'events':>8}" + "".join(f"   {k:>17}" for k in names))
    for group, rows in [('', [report['all']])] + [(k, v) for k, v in report.items() if k != 'all']:
        if group:
            print(f"    {GROUP_TITLES.get(group, group)}:")
        for r in rows:
            print(f"    {r['bin']:>18} {r['n']:8d}" + "".join("   " + " ".join(f"{100 * c:5.1f}" for c in r[k]) for k in names))


def check_coverage(split, err, kappa, events, cal, groups, kind):
    """Do the true directions fall inside the error circles as often as they claim? On val the honest check is a
    map fit on the even-indexed events, measured on the odd-indexed ones (cal, the stored map, is fit on all of
    them); on other splits cal was fit on val, so every event is held out. Prints the tables, returns the json's
    'coverage': the held-out report, the curves of the coverage figure, and on val the stored map in sample."""
    n = len(kappa)
    print(f"coverage: % of true directions inside the error circle at {' / '.join(f'{100 * p:.0f}' for p in LEVELS)}%"
          f" (predicted: each event's vMF; calibrated: the circles of radius50_deg, radius90_deg; calibrated_vmf: the vMF"
          f" of kappa_calibrated)")
    if split == 'val':
        even, check = np.arange(0, n, 2), np.arange(1, n, 2)
        check_cal = fit_calibration(kappa[even], err[even], subset(events, even))
        about = f"held out: a map fit on the {len(even)} even-indexed events of {split}, checked on the {len(check)} odd-indexed ones"
    else:
        check, check_cal = np.arange(n), cal
        about = f"all {n} events of {split}" + (", held out: the map was fit on val" if cal else ", no calibration map")
    cov = {'levels': list(LEVELS), 'about': about, 'held_out': coverage_report(
        err[check], circles(kappa[check], subset(events, check), check_cal), {k: (idx[check], labels) for k, (idx, labels) in groups.items()})}
    print_coverage(about, cov['held_out'])
    curve_groups = {'all': np.ones(n, bool), **({k: kind == i for i, k in enumerate(KIND_NAMES)} if kind is not None else {})}
    curve_radii = circles(kappa[check], subset(events, check), check_cal, CURVE_LEVELS)
    cov['curves'] = {'title': about, 'nominal': CURVE_LEVELS.tolist(),
                     'groups': {g: {k: coverage(err[check][m[check]], r[:, m[check]]).tolist()
                                    for k, r in curve_radii.items() if k != 'calibrated_vmf'}
                                for g, m in curve_groups.items() if m[check].any()}}
    if split == 'val' and cal is not None:
        cov['stored_map_in_sample'] = coverage_report(err, circles(kappa, events, cal), {})['all']
        fit_n = cal.get('n_events', n)  # more than n where a run on part of val kept the maps fit on more of it
        print(f"  the stored map, fit on {'all ' if fit_n == n else ''}{fit_n} events, on "
              f"{'those same events' if fit_n == n else f'the first {n} of them'} (in sample, not a check): "
              + " ".join(f"{100 * c:5.1f}" for c in cov['stored_map_in_sample']['calibrated']))
    return cov


# -----------------------------------------------------------------------------
# tables and figures

def standard_error(err):
    """The standard error of err's mean (rad): how far the mean of another draw of as many events would stray. It
    measures the evaluation's noise only; two trainings of one config differ by more (README, the main job's row)."""
    return float(err.std(ddof=1) / math.sqrt(len(err))) if len(err) > 1 else None


def mean_ratio(err, base_err):
    """mean(err) / mean(base_err) over the same events, and its standard error: paired, so the events both methods
    find hard cancel (the delta method: the spread of err - ratio * base_err, over mean(base_err))."""
    ratio = err.mean() / base_err.mean()
    se = standard_error(err - ratio * base_err)
    return float(ratio), None if se is None else se / float(base_err.mean())


def summary(err):
    return {'mean_angular_error': float(err.mean()), 'mean_angular_error_se': standard_error(err),
            'median_angular_error': float(np.median(err)),
            'mean_angular_error_deg': math.degrees(err.mean()), 'median_angular_error_deg': math.degrees(np.median(err)),
            'percentiles_deg': {str(p): math.degrees(np.percentile(err, p)) for p in (10, 25, 75, 90)}}


def track_auc(p_track, is_track):
    """The chance a track scores above a cascade, a tie counted half: the Mann-Whitney statistic of the ranks, tied
    scores taking their mean rank. Ranks from a sort's order of ties made the figure hang on the numpy version (its
    default sort orders ties differently in 1.24, 1.26 and 2.4) and, with tied float32 scores, on the event order."""
    _, inverse, counts = np.unique(p_track, return_inverse=True, return_counts=True)
    rank = (np.cumsum(counts) - (counts - 1) / 2)[inverse.ravel()]  # a run of c ties at ranks k-c+1..k: mean k-(c-1)/2
    n_tracks = int(is_track.sum())
    return float((rank[is_track].sum() - n_tracks * (n_tracks + 1) / 2) / max(n_tracks * int((~is_track).sum()), 1))


def bin_index(values, edges):
    """Each value's bin of edges (the first and last take the values below and above), -1 for NaN: an event whose
    truth is unknown (a simulation's missing energy) is in no bin, where np.digitize put it in the last."""
    return np.where(np.isnan(values), -1, np.digitize(values, edges[1:-1]))


def breakdown(name, values, edges, fmt, errs):
    """Mean error of each method in errs ({'model': ..., 'linefit': ...}) per bin of values; prints a table,
    returns a list of rows."""
    rows = []
    print(f"  by {name}:")
    idx = bin_index(values, edges)
    for i in range(len(edges) - 1):
        m = idx == i
        if not m.any():
            continue
        row = {'bin': fmt(edges[i], edges[i + 1]), 'n': int(m.sum()), 'mean_angular_error': float(errs['model'][m].mean())}
        row.update({f'{k}_mean_angular_error': float(e[m].mean()) for k, e in errs.items() if k != 'model'})
        rows.append(row)
        txt = "".join(f"   {k} {math.degrees(row[f'{k}_mean_angular_error']):6.2f}" for k in errs if k != 'model')
        print(f"    {row['bin']:>18} {row['n']:8d} events   model {math.degrees(row['mean_angular_error']):6.2f} deg{txt}")
    return rows


def resolution_table(values, edges, errs, kind=None, min_events=20):
    """Median angular error (deg) of each method per bin of values (the first and last bins take the values below
    and above the edges), per kind where known (else 'all'); None in bins with fewer than min_events events. The
    figures of resolution_<split>.png, kept in the json."""
    kinds = {'all': np.ones(len(values), bool)} if kind is None else {n: kind == i for i, n in enumerate(KIND_NAMES)}
    idx = bin_index(values, edges)
    table = {'edges': [float(e) for e in edges], 'kinds': {}}
    for kname, km in kinds.items():
        ms = [km & (idx == i) for i in range(len(edges) - 1)]
        table['kinds'][kname] = {'n': [int(m.sum()) for m in ms],
                                 **{k: [math.degrees(np.median(e[m])) if m.sum() >= min_events else None for m in ms]
                                    for k, e in errs.items()}}
    return table


def plain_log_ticks(axis):
    # 2, 3, 5, 10, 20, ... as plain numbers: the defaults write 2x10^1 on every minor tick
    axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 3, 5)))
    axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
    axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def plot_resolution(table, xlabel, path, logx=False):
    """One panel per kind: median angular error against the binned quantity (at each bin's centre), a line per
    method. Returns the arrays drawn, {(kind, method): (x, y)}."""
    kinds = table['kinds']
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    lo, hi = np.array(table['edges'][:-1]), np.array(table['edges'][1:])
    x = np.sqrt(lo * hi) if logx else (lo + hi) / 2
    drawn = {}
    for ax, (kname, t) in zip(axes[0], kinds.items()):
        for method, y in t.items():
            if method != 'n':
                y = np.array([np.nan if v is None else v for v in y])
                drawn[(kname, method)] = (x[np.isfinite(y)], y[np.isfinite(y)])
                ax.plot(*drawn[(kname, method)], 'o-' if method == 'model' else 's--', label=METHOD_LABELS.get(method, method))
        ax.set_title(f"{kname}s" if kname != 'all' else 'all events')
        ax.set_xlabel(xlabel)
        ys = np.concatenate([drawn[(kname, m)][1] for m in t if m != 'n'])
        if len(ys) and ys.max() > 3 * ys.min():
            ax.set_yscale('log')  # a track's error falls from tens of degrees to one over the energies
            plain_log_ticks(ax.yaxis)
        if len(ys):
            ax.legend()
        if logx:
            ax.set_xscale('log')
            plain_log_ticks(ax.xaxis)
        ax.grid(True, which='both', alpha=0.3)
    axes[0][0].set_ylabel('median angular error [deg]')
    save_png(fig, path)
    return drawn


def plot_coverage(curves, path):
    """Observed against nominal coverage of the error circles, per kind, before (dashed) and after (solid)
    calibration; the diagonal is perfect calibration. Returns the arrays drawn, {(group, kappa name): (x, y)}."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color='grey', lw=0.8)
    drawn = {}
    x = np.array(curves['nominal'])
    for i, (group, c) in enumerate(curves['groups'].items()):
        for name, style in (('predicted', '--'), ('calibrated', '-')):
            if name in c:
                y = np.array(c[name])
                drawn[(group, name)] = (x, y)
                ax.plot(100 * x, 100 * y, style, color=f'C{i}', label=f"{group}, " + ("predicted kappa" if name == "predicted" else "calibrated"))
    ax.set_xlabel('nominal coverage [%]')
    ax.set_ylabel('observed coverage [%]')
    ax.set_title(textwrap.fill(curves['title'], 60), fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)
    return drawn


def read_history(path):
    """train.py's out_dir/log.jsonl as curves: train loss at each log point, val error (deg) and loss at each
    evaluation; None when the run wrote no log (older runs)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.endswith('\n')]  # not a line cut short by a killed run
    # the last line of each iteration: a resumed run that has nothing left to do evaluates its last iteration again
    train = list({r['iter']: r for r in rows if 'train_loss' in r}.values())
    val = list({r['iter']: r for r in rows if 'val_error' in r}.values())
    return {'iter': [r['iter'] for r in train], 'train_loss': [r['train_loss'] for r in train],
            'val_iter': [r['iter'] for r in val], 'val_loss': [r['val_loss'] for r in val],
            'val_error_deg': [math.degrees(r['val_error']) for r in val]}


def plot_training(history, path, ckpt_iter=None):
    """Training curves: loss (train, and val of the averaged weights) and val mean angular error against
    iteration; a dotted line at the evaluated checkpoint. Returns the arrays drawn, {name: (x, y)}."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    drawn = {'train_loss': (np.array(history['iter']), np.array(history['train_loss'])),
             'val_loss': (np.array(history['val_iter']), np.array(history['val_loss'])),
             'val_error_deg': (np.array(history['val_iter']), np.array(history['val_error_deg']))}
    a1.plot(*drawn['train_loss'], lw=0.8, label='train')
    a1.plot(*drawn['val_loss'], 'o-', label='val')
    a1.set_ylabel("loss per event (train.py's)")  # its event_losses: the kind and energy heads' terms too, where trained
    a1.legend()
    a2.plot(*drawn['val_error_deg'], 'o-')
    a2.set_ylabel('val mean angular error [deg]')
    for ax in (a1, a2):
        ax.set_xlabel('iteration')
        ax.grid(True, alpha=0.3)
        if ckpt_iter is not None:
            ax.axvline(ckpt_iter, color='grey', ls=':')
    save_png(fig, path)
    return drawn


def plot_writers(result, split, ckpt_iter):
    """The figures of what result holds (resolution, coverage, training curves): [(file name, write(path))]."""
    writers = []
    if 'resolution' in result:
        writers.append((f'resolution_{split}.png', lambda path: plot_resolution(
            result['resolution']['energy'], 'true neutrino energy log10(E / GeV)', path)))
    if 'resolution_doms' in result:
        writers.append((f'resolution_doms_{split}.png', lambda path: plot_resolution(
            result['resolution_doms'], 'number of hit DOMs', path, logx=True)))
    if 'coverage' in result:
        writers.append((f'coverage_{split}.png', lambda path: plot_coverage(result['coverage']['curves'], path)))
    if result['training']:
        writers.append(('training.png', lambda path: plot_training(result['training'], path, ckpt_iter)))
    return writers


def tmp_path(path):
    """Where a result is written before it replaces path in one rename: a file cut short by a kill is never left
    looking complete, and two sample.py on one out_dir (one by hand beside a scheduled one) each write their own
    (with one shared name their writes mixed, or one's rename took the other's file away: a traceback)."""
    return f"{path}.{os.getpid()}.tmp"


def write_error(path, e):
    """The one line for a result that cannot be written: a full disk, or an out_dir the user may only read (a
    colleague's run, a read-only mount), where sample.py died in a traceback after the whole evaluation."""
    todo = ("free some space and re-run" if e.errno == errno.ENOSPC else
            "give an out_dir you can write, and the checkpoint by its full path (--ckpt=/path/to/best.pt)")
    return SystemExit(f"sample: error: {path}: cannot write it ({e.strerror or e}); {todo}")


def replace_all(writes):
    """writes [(path, write)]: each write(tmp) puts a result into its temporary file, then all are renamed into place
    together, so that out_dir holds one run's set: a kill or a full disk while writing (the CSV of a million events
    takes seconds) left this run's eval json beside the last run's predictions, each file whole and the set mixed.
    On an error, Ctrl-C or SIGTERM no temporary file is left (a cut one kept the space it had taken) and the files
    already there stay as they were."""
    started = []
    try:
        for path, write in writes:
            started.append(path)
            write(tmp_path(path))
    except BaseException as e:
        for path in started:
            if os.path.exists(tmp_path(path)):
                os.remove(tmp_path(path))
        if isinstance(e, OSError):
            raise write_error(started[-1], e) from None
        raise
    caught = []  # a signal now waits for the last rename (a mask would not do: torch's threads take signals too)
    held = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for path, _ in writes:
            os.replace(tmp_path(path), path)
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        for signum in caught[:1]:
            signal.raise_signal(signum)


def save_png(fig, path):
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=80, format='png')
    finally:
        plt.close(fig)


def csv_writer(columns):
    names = list(columns)
    fmts = ['%d' if np.issubdtype(np.asarray(columns[c]).dtype, np.integer) else '%.6f' for c in names]
    table = np.column_stack([np.asarray(columns[c], np.float64) if f != '%d' else columns[c] for c, f in zip(names, fmts)])
    return lambda path: np.savetxt(path, table, fmt=fmts, delimiter=',', header=','.join(names), comments='')


def finite(obj):
    """obj with every non-finite float as None: JSON has no NaN (a figure of an empty bin, a percentile of one event);
    numpy's scalars and arrays as Python's numbers and lists: a metric added to the report as (err < x).sum() (an
    int64), a float32 or an array stopped json.dump in a TypeError after the whole evaluation, nothing written."""
    if isinstance(obj, (np.generic, np.ndarray)):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_writer(obj):
    def write(path):
        with open(path, 'w') as f:
            json.dump(finite(obj), f, indent=1, allow_nan=False)
    return write


def weights_digest(state):
    """SHA-1 of a checkpoint's weights: what calibration.json was fit for (a name and an iteration are not enough:
    a new run into the same out_dir writes best.pt at the same iterations)."""
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -----------------------------------------------------------------------------

def stored_calibration(path, weights, n):
    """The maps in path if they were fit for these weights on more than n val events, else None."""
    try:
        with open(path) as f:
            cal = json.load(f)
        return cal if cal.get('weights_sha1') == weights and cal.get('n_events', 0) > n else None
    except (OSError, ValueError, AttributeError):
        return None


def stored_fit(s):
    """How prepare.py made split s's quick fit ({'steps', 'ice'}; {} for data from before it recorded them)."""
    return (s.manifest.get('made_by') or {}).get('fit') or {}


def fit_ice(s):
    """The ice of the likelihood baselines on split s: the one prepare.py fit its events' quick fit in (its fit_ice,
    'auto': the toy's ice for a simulated set, homogeneous ice for real data), else by the same rule."""
    return stored_fit(s).get('ice') or ('toy' if s.truth is not None else 'bulk')


def classical_baselines(s, n, methods, device):
    """The classical reconstructions (classical.py) of split s's first n events, timed like the model: {method: (n, 3)
    directions}, {method: events/s}. The likelihood fits run in the ice of the data (fit_ice)."""
    base_dirs, speed, ice = {}, {}, fit_ice(s)
    if 'mpe' in methods:  # a table file read now, in one line: an older prepare.py recorded it relative to its folder,
        try:              # and from another folder np.loadtxt's FileNotFoundError came out of the fit as a traceback
            classical.ice_table(ice)
        except (OSError, ValueError) as e:
            raise SystemExit(f"sample: error: the mpe baseline fits in the ice {s.path} was prepared in, fit_ice={ice!r}: "
                             f"{str(e).rstrip('.')}; run sample.py from the folder prepare.py ran in, or leave mpe out of --baselines") from None
    for name in methods:
        if name == 'time_fit':  # prepare.py fitted every event with it: read, as the model does (its rate is prepare's)
            if stored_fit(s).get('steps') == 0:
                print("sample: time_fit: this data was prepared with fit_steps=0, which stores the improved LineFit in "
                      "the quick fit's place: its row is that LineFit (as the model's second seed is)")
            rec = s.event_records(np.arange(n))[0]
            base_dirs[name], speed[name] = prepare.angles_to_dir(rec['fit_azimuth'], rec['fit_zenith']).astype(np.float64), s.fit_events_per_s
            continue
        t0 = time.time()
        dirs = np.zeros((n, 3))
        chunk = 2000 if name == 'mpe' else 20000
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            dirs[lo:hi] = classical.reconstruct(name, s.events(np.arange(lo, hi)), s.geometry, device=device, ice=ice)
            if hi < n and time.time() - t0 > 30:  # the MPE fit runs at a few events/s on real events: say where it is
                print(f"sample: {name}: {hi} of {n} events in {time.time() - t0:.0f}s")
        base_dirs[name], speed[name] = dirs, n / (time.time() - t0)
        print(f"sample: {name} on {n} events in {time.time() - t0:.1f}s ({speed[name]:.0f} events/s)")
    return base_dirs, speed


def load_checkpoint(path):
    """train.py's checkpoint, or one line naming the file and what to do when it is missing or damaged."""
    if not os.path.exists(path):
        raise SystemExit(f"sample: error: {path}: no checkpoint there; train.py writes best.pt and ckpt.pt into "
                         f"its out_dir: choose them with --out_dir and --ckpt{checkpoints_near(path)}")
    try:
        ck = M.read_checkpoint(path, ('config', 'model', 'model_args', 'iter_num', 'max_pulses_per_dom', 'data_dir'))
    except ValueError as e:  # truncated zip, garbage, no permission, not a train.py checkpoint, foreign objects
        raise SystemExit(f"sample: error: {path}: unreadable checkpoint ({e}); "
                         f"try --ckpt=ckpt.pt or --ckpt=ckpt.prev.pt (train.py keeps the one before ckpt.pt)") from None
    return ck


def checkpoints_near(path, most=4):
    """' (found: ...)': the checkpoints in path's folder and, of path's name, in the folders beside it. A plain
    `python sample.py` after the quick start looks in out/, where the run wrote out-toy-cpu/."""
    folder = os.path.normpath(os.path.dirname(path) or '.')
    found = sorted(map(os.path.normpath, glob.glob(os.path.join(glob.escape(folder), '*.pt'))))
    beside = os.path.join(glob.escape(os.path.dirname(folder)), '*', glob.escape(os.path.basename(path)))
    found += sorted(set(map(os.path.normpath, glob.glob(beside))) - set(found))
    if not found:
        return ''
    more = f" and {len(found) - most} more" if len(found) > most else ''
    return f" (found: {', '.join(found[:most])}{more})"


def batches(loader):
    """The loader's batches; damaged data met in one (prepare.Split names the file, the event and the command that
    rebuilds it) in one line, not a traceback from the loader's thread."""
    try:
        yield from loader
    except SplitError as e:
        raise SystemExit(f"sample: error: {e}") from None


def calibration_maps(cal_path, s, n, ck, kappa, err, events, has_labels):
    """The maps that calibrate this run's error circles (None: each event's own vMF), and whether they are new, for
    main to write to cal_path with the other results: on val fit on its events, unless the maps there were fit for
    these weights on more val events (kept) or there are fewer than calibration_min_events; on other splits read from
    cal_path, where they were fit for these weights."""
    cal, fitted = None, False
    weights = weights_digest(ck['model'])
    if split == 'val' and has_labels and (kept := stored_calibration(cal_path, weights, n)):
        cal = kept  # a run on part of val (a slow baseline's --max_events) keeps the maps fit on more of it
        print(f"sample: {cal_path} kept: fit on {cal['n_events']} val events for these weights, more than this run's {n}")
    elif split == 'val' and has_labels and n < calibration_min_events:
        print(f"sample: {n} val events are too few to fit the error circles' maps (calibration_min_events="
              f"{calibration_min_events}): {cal_path} is not written, the circles use the predicted kappa")
    elif split == 'val' and has_labels:
        cal = {'checkpoint': ckpt, 'iter': int(ck['iter_num']), 'weights_sha1': weights, 'n_events': int(n),
               'fit_on': f"{s.path}, {n} events", **fit_calibration(kappa, err, events)}
        fitted = True
    elif os.path.exists(cal_path):
        try:
            with open(cal_path) as f:
                cal = json.load(f)
            fit_on, stale = cal['fit_on'], cal.get('weights_sha1') != weights
            if not stale:  # a map of another checkpoint may group by outputs this one lacks
                calibrated_radii(cal, kappa[:1], subset(events, slice(0, 1)))
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise SystemExit(f"sample: error: {cal_path}: not a calibration map ({type(e).__name__}: {e}); "
                             f"run sample.py --split=val to write it again")
        if stale:
            # a map older than weights_sha1 may be of these very weights (same checkpoint, same iteration): unknowable
            why = ("was written by an older sample.py, which did not record the weights it was fit for" if 'weights_sha1' not in cal
                   else f"was fit for other weights ({cal['checkpoint']} at iter {cal['iter']}), not this checkpoint's")
            print(f"sample: {cal_path} {why}: not applied; run sample.py --split=val to refit it")
            cal = None
        else:
            print(f"sample: error circles calibrated by {cal_path}, fit on {fit_on}")
    else:
        print(f"sample: no {cal_path} (sample.py --split=val writes it): the error circles use the predicted kappa")
    return cal, fitted


def main():
    from configurator import check_device, check_ranges, configure
    configure(globals())
    check_ranges('sample', globals(), at_least=dict(max_events=0, max_pulses=0, max_doms=0, max_events_per_batch=0,
                                                    plot_min_events=1, calibration_min_events=1), choices=dict(dtype=('float32', 'bfloat16', 'float16'), attn=('auto', 'flex', 'sdpa')))
    check_device('sample', device)
    methods = [m for m in baselines.split(',') if m]
    if set(methods) - set(classical.METHODS):
        raise SystemExit(f"sample: unknown baseline {sorted(set(methods) - set(classical.METHODS))}; choose from {classical.METHODS}")
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    ck = load_checkpoint(os.path.join(out_dir, ckpt))
    first_result = os.path.join(out_dir, f'eval_{split}.json')
    try:  # out_dir takes the results: one the user may only read is named now, not after the whole evaluation
        os.makedirs(out_dir, exist_ok=True)  # a new one beside a checkpoint given by its full path (--ckpt)
        open(tmp_path(first_result), 'w').close()
        os.remove(tmp_path(first_result))
    except OSError as e:
        raise write_error(first_result, e) from None
    cfg = ck['config']
    raw_model = M.IceModel(**{**ck['model_args'], 'attn': attn})
    if M.load_weights(raw_model, ck['model'], os.path.join(out_dir, ckpt), 'sample', ck.get('model_sha1')):
        print(f"sample: warning: {os.path.join(out_dir, ckpt)} was trained with another model.py (edited since, or "
              f"another commit): its weights fit this one's shapes, but an input or step changed in place feeds them "
              f"other numbers; its own results need the model.py that trained it")
    raw_model.to(device).eval()
    model = torch.compile(raw_model) if compile else raw_model
    autocast = torch.autocast(device_type, dtype=getattr(torch, dtype), enabled=device_type == 'cuda' and dtype != 'float32')

    try:
        s = open_split(os.path.join(data_dir or ck['data_dir'], split))
    except (FileNotFoundError, SplitError) as e:
        # the checkpoint's data_dir: an older train.py recorded it as given, relative to the folder it ran in, and
        # from another folder 'run prepare.py' alone sent the user to remake data that was there all along
        where = ("" if data_dir else f" (data_dir {ck['data_dir']!r} is the one the checkpoint records"
                 + ("" if os.path.isabs(ck['data_dir']) else ", relative to the folder train.py ran in")
                 + "; give --data_dir=<prepare.py's output> if the data is elsewhere)")
        raise SystemExit(f"sample: error: {e}{where}")
    n = min(max_events, len(s)) if max_events else len(s)
    print(f"sample: {os.path.join(out_dir, ckpt)} (iter {ck['iter_num']}, {raw_model.num_params() / 1e6:.3f}M parameters) "
          f"on {n} of {len(s)} events of {s.path}, device {device}, attention {raw_model.path(device)}")

    # model predictions, in split order
    t0 = time.time()
    pred = np.zeros((n, 3), np.float64)
    network = np.zeros((n, 3), np.float64)  # the network's own vMF, before the seeds join it
    truth_out = np.zeros((n, 2), np.float64)  # the track logit and log10 energy of the heads (model.truth_loss)
    seen = np.zeros(n, bool)
    # the loader builds each batch's stream layout ahead of the model (model.model_inputs); the features run in the forward
    to_model = functools.partial(M.model_inputs, path=raw_model.path(device), with_features=False)
    loader = BatchLoader(s, max_pulses or INFER_BUDGET * cfg['max_pulses'], max_doms or INFER_BUDGET * cfg['max_doms'],
                         max_events_per_batch or INFER_BUDGET * cfg['max_events'], ck['max_pulses_per_dom'], shuffle=False,
                         epochs=1, max_events_total=n, transform=to_model, pin_memory=device_type == 'cuda')
    with torch.no_grad():
        for batch in batches(loader):
            with autocast:
                out = model(M.to_device(batch, device))
            k = batch['n_events']
            idx = batch['event_index'][:k].numpy()
            out = out[:k].float().cpu().numpy()
            pred[idx], network[idx], truth_out[idx] = out[:, :3], out[:, 3:6], out[:, 6:8]
            seen[idx] = True
    loader.close()
    assert seen.all(), "some events were not evaluated"
    bad = ~np.isfinite(pred).all(1)
    if bad.any():  # weights gone bad (a run that diverged): no file of made-up directions
        raise SystemExit(f"sample: error: {os.path.join(out_dir, ckpt)} predicts non-finite directions for {bad.sum()} of {n} "
                         f"events (the first event_id {s.event_id[np.flatnonzero(bad)[0]]}): its weights are broken; "
                         f"evaluate another checkpoint (--ckpt=ckpt.prev.pt, or an earlier run's)")
    t_model = time.time() - t0
    kappa = np.linalg.norm(pred, axis=1)
    az, zen = M.vector_to_angles(pred)
    print(f"sample: model on {n} events in {t_model:.1f}s ({n / t_model:.0f} events/s)")

    base_dirs, speed = classical_baselines(s, n, methods, device)
    speed = {'model': n / t_model, **speed}

    result = {'split': split, 'n_events': int(n), 'checkpoint': os.path.join(out_dir, ckpt), 'iter': int(ck['iter_num']),
              'budgets': {'max_pulses': loader.args[0], 'max_doms': loader.args[1], 'max_events': loader.args[2],
                          'max_pulses_per_dom': loader.args[3]}}
    has_labels = bool(np.isfinite(s.azimuth[:n]).all())
    ev_pulses, ev_doms = s.n_pulses[:n], s.n_doms[:n]
    cols = {'event_id': s.event_id[:n], 'azimuth': az, 'zenith': zen, 'kappa': kappa, 'hit_doms': ev_doms}
    # what the calibration may group events by: the hit DOMs, and the heads' kind and energy where they learned them
    events = {'hit_doms': ev_doms}
    if ck.get('truth_heads'):
        events.update(track_probability=1 / (1 + np.exp(-truth_out[:, 0])), log10_energy=truth_out[:, 1])
        cols.update(events)

    # the kappa map: fit here on val, read from out_dir/calibration.json elsewhere
    cal_path = os.path.join(out_dir, 'calibration.json')
    err = M.angular_errors(s.azimuth[:n], s.zenith[:n], az, zen) if has_labels else None
    cal, cal_fitted = calibration_maps(cal_path, s, n, ck, kappa, err, events, has_labels)
    radii = circles(kappa, events, cal, (0.5, 0.9))
    if cal:
        cols['kappa_calibrated'] = calibrated_kappa(cal, kappa, events)
    cols.update({'radius50_deg': np.degrees(radii['calibrated' if cal else 'predicted'][0]),
                 'radius90_deg': np.degrees(radii['calibrated' if cal else 'predicted'][1])})
    result['calibration'] = None if cal is None else {'path': cal_path, 'fit_on': cal['fit_on']}

    if has_labels:
        errs = {'model': err, **{k: M.angular_errors(s.azimuth[:n], s.zenith[:n], *M.vector_to_angles(d)) for k, d in base_dirs.items()}}
        result.update(summary(err))
        result['events_per_s'] = speed['model']
        for k, e in errs.items():
            if k != 'model':
                ratio, ratio_se = mean_ratio(err, e)
                result[k] = {**summary(e), 'events_per_s': speed[k], 'model_ratio': ratio, 'model_ratio_se': ratio_se}
        # one table: a row per method, on the same events (s.e.: the standard error of the mean, in rad)
        print(f"{'method':<18} {'mean (rad)':>10} {'s.e.':>7} {'mean (deg)':>10} {'median (deg)':>12} {'events/s':>10}")
        for k, e in errs.items():
            se = standard_error(e)
            print(f"{k:<18} {e.mean():10.4f} {'' if se is None else f'{se:7.4f}':>7} {math.degrees(e.mean()):10.2f} "
                  f"{math.degrees(np.median(e)):12.2f} {speed[k]:10.0f}")
        for k, name in [('linefit', 'LineFit'), ('linefit_improved', 'improved LineFit')]:
            if k in errs:
                ratio, ratio_se = result[k]['model_ratio'], result[k]['model_ratio_se']
                print(f"model / {name} mean angular error: {ratio:.3f}"
                      + ('' if ratio_se is None else f" (standard error {ratio_se:.3f}, paired over these events)"))
        # what the seeds' weights (model.IceModel.with_seed) add to the network's own direction
        err_network = M.angular_errors(s.azimuth[:n], s.zenith[:n], *M.vector_to_angles(network))
        result['network_alone'] = summary(err_network)
        print(f"the network alone, before the seeds join: mean {err_network.mean():.4f} rad, "
              f"{err_network.mean() / err.mean():.3f} of the model's")
        print("model percentiles (deg): " + ", ".join(f"p{p} {v:.1f}" for p, v in result['percentiles_deg'].items()))
        intfmt = lambda a, b: f"{a:.0f}-{b:.0f}" if np.isfinite(b) else f">= {a:.0f}"
        logfmt = lambda a, b: f"{a}-{b}" if np.isfinite(a) and np.isfinite(b) else (f"< {b}" if np.isfinite(b) else f">= {a}")
        result['by_pulses'] = breakdown('pulse count', ev_pulses, [0, 30, 60, 100, 200, 500, 1000, 10000, np.inf], intfmt, errs)
        result['by_doms'] = breakdown('DOM count', ev_doms, DOM_EDGES, intfmt, errs)
        result['by_zenith'] = breakdown('true zenith (deg)', np.degrees(s.zenith[:n]), np.arange(0, 181, 30.0), intfmt, errs)
        q = np.quantile(kappa, [0, 0.2, 0.4, 0.6, 0.8, 1.0])
        q[-1] = np.inf
        result['by_kappa'] = breakdown('predicted kappa (quintiles)', kappa, q, lambda a, b: f"{a:.1f}-{b:.1f}", errs)
        groups = {'by_doms': (bin_index(ev_doms, DOM_EDGES), [intfmt(a, b) for a, b in zip(DOM_EDGES, DOM_EDGES[1:])])}
        kind = None
        if s.truth is not None:
            log_e = np.log10(np.maximum(s.truth['energy'][:n].astype(np.float64), 1e-3))  # NaN: unknown
            known_e = np.isfinite(log_e)
            result['by_energy'] = breakdown('energy (log10 GeV)', log_e, ENERGY_EDGES, logfmt, errs)
            kind = s.truth['kind'][:n]
            result['by_kind'] = breakdown('kind (0 track, 1 cascade)', kind, [-0.5, 0.5, 1.5], lambda a, b: KIND_NAMES[int(a + 0.5)], errs)
            # the classical fits' home ground: well-lit tracks, where likelihood fits are judged by their median
            bright = (kind == 0) & (ev_doms >= 50)
            if bright.any():
                result['tracks_50_doms'] = {'n': int(bright.sum()), 'median_angular_error': float(np.median(err[bright])),
                                            'network_alone_median_angular_error': float(np.median(err_network[bright])),
                                            **{f'{k}_median_angular_error': float(np.median(e[bright])) for k, e in errs.items() if k != 'model'}}
                print(f"  tracks with >= 50 hit DOMs ({bright.sum()} events), median: model {np.median(err[bright]):.4f} rad"
                      f"   network alone {np.median(err_network[bright]):.4f}"
                      + "".join(f"   {k} {np.median(e[bright]):.4f}" for k, e in errs.items() if k != 'model'))
            if 'track_probability' in events:  # how well the heads tell the kind and the energy
                p_track, is_track = events['track_probability'], kind == KIND_NAMES.index('track')
                result['truth_heads'] = {'track_auc': track_auc(p_track, is_track), 'kind_accuracy': float(((p_track >= 0.5) == is_track).mean()),
                                         **{f'log10_energy_rms_{k}s': float(np.sqrt(np.mean((events['log10_energy'] - log_e)[(kind == i) & known_e] ** 2)))
                                            for i, k in enumerate(KIND_NAMES) if ((kind == i) & known_e).any()}}
                print("  the heads: " + ", ".join(f"{k} {v:.3f}" for k, v in result['truth_heads'].items()))
            groups = {'by_kind': (kind, KIND_NAMES),
                      'by_energy': (bin_index(log_e, ENERGY_EDGES), [logfmt(a, b) for a, b in zip(ENERGY_EDGES, ENERGY_EDGES[1:])]),
                      **groups}
            result['resolution'] = {'energy': resolution_table(log_e, np.arange(2.0, 8.01, 0.5), errs, kind, plot_min_events)}
        result['resolution_doms'] = resolution_table(ev_doms, 2.0 ** np.arange(3, 13), errs, kind, plot_min_events)

        result['coverage'] = check_coverage(split, err, kappa, events, cal, groups, kind)
        cols.update({'true_azimuth': s.azimuth[:n], 'true_zenith': s.zenith[:n], 'angular_error': err})
        cols.update({f'{k}_angular_error': e for k, e in errs.items() if k != 'model'})
    else:
        print(f"sample: {split} has no labels; writing predictions only")
        result['mean_angular_error'] = result['median_angular_error'] = None

    result['training'] = read_history(os.path.join(out_dir, 'log.jsonl'))
    results = [(f'eval_{split}.json', json_writer(result)), (f'predictions_{split}.csv', csv_writer(cols))]
    if cal_fitted:
        results.append(('calibration.json', json_writer(cal)))
    if split == 'test' and n < len(s):  # a submission needs every test event: a partial one would look complete
        print(f"sample: submission.csv is not written: {n} of the {len(s)} test events were predicted (max_events)")
    elif split == 'test':
        results.append(('submission.csv', csv_writer({'event_id': s.event_id[:n], 'azimuth': az, 'zenith': zen})))
    if plots:
        results += plot_writers(result, split, int(ck['iter_num']))
    replace_all([(os.path.join(out_dir, name), write) for name, write in results])
    print(f"sample: wrote {', '.join(name for name, _ in results)} in {out_dir}")

def stop(signum, frame):
    """A scheduler's SIGTERM or Ctrl-C as an exception, so that replace_all's clean-up runs; one line and the exit
    status of the signal (143, 130) where SIGTERM left .tmp files and Ctrl-C printed a traceback."""
    print(f"sample: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    sys.exit(128 + signum)


if __name__ == '__main__':
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    main()
