"""Tests for sample.py's error circles and figures: the von Mises-Fisher containment radius, the kappa
calibration (fit on part of the events, checked on the rest), and on a tiny trained run the files it writes,
the calibration stored on val and applied on test, and figures that draw the numbers of the json."""

import csv
import json
import math
import os
import signal

import numpy as np
import pytest
import torch

import model as M
import sample
from prepare import open_split, pack_batch
from test_train import TINY, data_dir, run  # noqa: F401 (data_dir is the tiny data set fixture)


@pytest.mark.parametrize('kappa', [1e-9, 0.3, 2.0, 30.0, 1e4])
def test_containment_radius_holds_its_probability(kappa):
    # the vMF density in the angle from the mean direction is proportional to exp(kappa cos a) sin a: integrate it
    a = np.linspace(0, math.pi, 2_000_001)
    cdf = np.cumsum(np.exp(kappa * (np.cos(a) - 1)) * np.sin(a))
    cdf /= cdf[-1]
    for p in (0.05, 0.5, 0.68, 0.9, 0.99):
        r = sample.containment_radius(np.array([kappa]), p)[0]
        assert np.interp(r, a, cdf) == pytest.approx(p, abs=2e-4), (kappa, p)
    # the limits: uniform on the sphere, and the 2-D Gaussian of width 1/sqrt(kappa)
    if kappa < 1e-6:
        assert sample.containment_radius(np.array([kappa]), 0.5)[0] == pytest.approx(math.pi / 2)
    if kappa > 1e3:
        assert sample.containment_radius(np.array([kappa]), 0.9)[0] == pytest.approx(math.sqrt(2 * math.log(10) / kappa), rel=1e-3)


def vmf_errors(rng, kappa):
    """Angles between a vMF(kappa) draw and its mean direction, by rejection from the uniform sphere's 1 - cos."""
    out = np.empty(len(kappa))
    todo = np.arange(len(kappa))
    while len(todo):
        x = rng.uniform(0, 2, len(todo))
        keep = rng.random(len(todo)) < np.exp(-kappa[todo] * x)
        out[todo[keep]] = np.arccos(1 - x[keep])
        todo = todo[~keep]
    return out


def test_calibration_fixes_miscalibrated_kappa_on_held_out_events():
    rng = np.random.default_rng(0)
    true_kappa = np.exp(rng.uniform(np.log(0.5), np.log(50), 40000))
    err = vmf_errors(rng, true_kappa)
    # a model too sure of its confident events and too unsure of the others: its circles are wrong at both ends
    predicted = 0.4 * true_kappa ** 1.6
    fit, check = slice(0, 20000), slice(20000, None)
    raw = sample.coverage(err[check], sample.vmf_radii(predicted[check]))
    assert np.abs(raw - sample.LEVELS).min() > 0.03, raw
    doms = rng.integers(20, 200, len(err))  # no bearing on the errors here
    cal = sample.fit_calibration(predicted[fit], err[fit], {'hit_doms': doms[fit]})
    c = sample.circles(predicted[check], {'hit_doms': doms[check]}, cal)
    for name in ('calibrated', 'calibrated_vmf'):  # here one vMF of the calibrated kappa fits at every level too
        radii = c[name]
        assert np.abs(sample.coverage(err[check], radii) - sample.LEVELS).max() < 0.02, name
    # monotone: a surer prediction never gets a wider circle, and a higher level never a smaller one
    grid = np.exp(np.linspace(-5, 10, 1000))
    for n_doms in (20, 199):
        events = {'hit_doms': np.full(len(grid), n_doms)}
        radii = sample.calibrated_radii(cal, grid, events, sample.CAL_LEVELS)
        assert (np.diff(radii, axis=1) <= 0).all() and (np.diff(radii, axis=0) >= 0).all()
        assert (np.diff(sample.calibrated_kappa(cal, grid, events)) >= 0).all()
    # well calibrated input stays so
    cal = sample.fit_calibration(true_kappa[fit], err[fit], {'hit_doms': doms[fit]})
    radii = sample.calibrated_radii(cal, true_kappa[check], {'hit_doms': doms[check]})
    assert np.abs(sample.coverage(err[check], radii) - sample.LEVELS).max() < 0.02


@pytest.mark.parametrize('tied', [1.0, 0.5])
def test_calibration_with_tied_kappa(tied):
    """A share of the events (all, half) with one kappa: the map is still fit, finite, and its circles cover."""
    rng = np.random.default_rng(3)
    n = 4000
    kappa = rng.lognormal(5, 1, n)
    kappa[:int(tied * n)] = 400.0
    err = rng.rayleigh(1 / np.sqrt(kappa))
    events = {'hit_doms': np.full(n, 30)}
    cal = sample.fit_calibration(kappa, err, events)
    radii = sample.calibrated_radii(cal, kappa, events)
    assert np.isfinite(radii).all() and np.isfinite(sample.calibrated_kappa(cal, kappa, events)).all()
    assert np.allclose(sample.coverage(err, radii), sample.LEVELS, atol=0.03)


def test_calibration_per_hit_dom_group():
    """Where the predicted kappa means another thing for well-lit events than for faint ones (the toy model's
    tracks, most of its many-DOM events), one map for all is wrong in both groups and per-group maps are right."""
    rng = np.random.default_rng(2)
    true_kappa = np.exp(rng.uniform(np.log(2), np.log(200), 40000))
    doms = np.where(rng.random(len(true_kappa)) < 0.3, rng.integers(80, 400, len(true_kappa)), rng.integers(10, 80, len(true_kappa)))
    err = vmf_errors(rng, true_kappa)
    predicted = np.where(doms >= 80, true_kappa / 4, true_kappa * 2)  # the bright too unsure, the faint too sure
    fit, check = slice(0, 20000), slice(20000, None)
    cal = sample.fit_calibration(predicted[fit], err[fit], {'hit_doms': doms[fit]})
    assert 80 in [g['box']['hit_doms'][0] for g in cal['groups']], cal['groups']
    # the groups part the events: one with 80 hit DOMs is in [80, ...) alone, not in the group below too
    assert (sum(sample.in_box(g['box'], {'hit_doms': doms}) for g in cal['groups']) == 1).all() and (doms == 80).any()
    one = sample.fit_calibration(predicted[fit], err[fit], {'hit_doms': doms[fit]}, min_events=len(doms))
    assert len(one['groups']) == 1
    for bright in (True, False):
        m = ((doms >= 80) == bright)[check]
        cov = lambda c: sample.coverage(err[check][m], sample.calibrated_radii(c, predicted[check][m], {'hit_doms': doms[check][m]}))
        assert np.abs(cov(cal) - sample.LEVELS).max() < 0.03, (bright, cov(cal))
        assert np.abs(cov(one) - sample.LEVELS).max() > 0.06, (bright, cov(one))


def test_calibration_per_predicted_kind_and_energy():
    """Where the model's heads learned the kind and energy (simulated training data), the groups are the predicted
    kind and energy: tracks and cascades of the same kappa and hit DOMs that miss differently get their own maps, so
    each true kind is calibrated although the prediction of its kind is sometimes wrong; without the heads (the
    hit-DOM groups) neither kind is."""
    rng = np.random.default_rng(4)
    n = 60000
    track = rng.random(n) < 0.3
    true_kappa = np.exp(rng.uniform(np.log(1), np.log(300), n))
    err = vmf_errors(rng, true_kappa)
    predicted = np.where(track, true_kappa / 3, true_kappa * 2)  # the tracks too unsure, the cascades too sure
    events = {'hit_doms': rng.integers(20, 200, n), 'log10_energy': rng.normal(3, 0.7, n),
              'track_probability': np.clip(np.where(track, 0.85, 0.1) + rng.normal(0, 0.08, n), 0, 1)}
    fit, check = np.arange(n // 2), np.arange(n // 2, n)
    cal = sample.fit_calibration(predicted[fit], err[fit], sample.subset(events, fit))
    assert cal['columns'] == ['log10_energy', 'track_probability'] and len(cal['groups']) >= 6
    sizes = [sample.in_box(g['box'], sample.subset(events, fit)).sum() for g in cal['groups']]
    assert sum(sizes) == len(fit) and min(sizes) >= 1000, sizes  # the groups part the events, none too small
    json.loads(json.dumps(cal, allow_nan=False))  # plain JSON: open ends are null, not Infinity
    doms_only = sample.fit_calibration(predicted[fit], err[fit], {'hit_doms': events['hit_doms'][fit]})
    for is_track in (True, False):
        m = check[track[check] == is_track]
        cov = lambda c: sample.coverage(err[m], sample.calibrated_radii(c, predicted[m], sample.subset(events, m)))
        assert np.abs(cov(cal) - sample.LEVELS).max() < 0.03, (is_track, cov(cal))
        assert np.abs(cov(doms_only) - sample.LEVELS).max() > 0.08, (is_track, cov(doms_only))


def test_calibration_covers_heavy_tails_level_by_level():
    # 15% of the events reconstructed anywhere on the sphere: heavier tails than any vMF has
    rng = np.random.default_rng(1)
    kappa = np.exp(rng.uniform(np.log(5), np.log(500), 40000))
    err = np.where(rng.random(len(kappa)) < 0.15, np.arccos(rng.uniform(-1, 1, len(kappa))), vmf_errors(rng, kappa))
    fit, check = slice(0, 20000), slice(20000, None)
    doms = rng.integers(20, 200, len(err))
    cal = sample.fit_calibration(kappa[fit], err[fit], {'hit_doms': doms[fit]})
    c = sample.circles(kappa[check], {'hit_doms': doms[check]}, cal)
    assert np.abs(sample.coverage(err[check], c['calibrated']) - sample.LEVELS).max() < 0.02
    # the one vMF matched at 50% leaves its 90% circles far too small: why each level has its own map
    vmf = sample.coverage(err[check], c['calibrated_vmf'])
    assert abs(vmf[0] - 0.5) < 0.02 and vmf[2] < 0.86, vmf


def test_a_higher_level_never_gets_a_smaller_circle():
    """Each level's map is fit on its own, and noise can cross them: where the 90% map would draw a circle smaller
    than the 50% one, the 90% circle is widened to it."""
    cal = {'levels': [0.5, 0.9], 'groups': [{'box': {'hit_doms': [None, None]}, 'log_kappa_knots': [0.0],
                                            'log_scale': [[0.0], [3.0]]}]}  # the 90% map 20x surer than the 50% one
    kappa, events = np.array([5.0, 50.0]), {'hit_doms': np.array([30, 30])}
    radii = sample.calibrated_radii(cal, kappa, events, (0.5, 0.9))
    assert (sample.containment_radius(20 * kappa, 0.9) < radii[0]).all()  # the case that matters
    np.testing.assert_array_equal(radii[1], radii[0])


def test_a_small_group_is_merged_into_its_smaller_neighbour():
    """The calibration's groups: a bin of too few events joins the smaller of its neighbours, so the groups stay as
    even as the bins allow (here 10-20's 100 events join 20-40's 500, not the 2,000 below 10)."""
    values = np.repeat([5, 15, 30, 50], [2000, 100, 500, 2000])
    assert sample.merged_edges(values, [10, 20, 40], 500) == [-np.inf, 10.0, 40.0, np.inf]

def test_breakdown_rows_hold_the_events_of_their_bins(capsys):
    """The report's tables: each event in the bin [lo, hi) its row names, with each method's mean error there."""
    values = np.array([0, 9, 10, 25, 400])
    errs = {'model': np.array([0.1, 0.2, 0.3, 0.4, 0.5]), 'linefit': np.array([1.0, 2.0, 3.0, 4.0, 5.0])}
    rows = sample.breakdown('DOM count', values, sample.DOM_EDGES, lambda a, b: f"{a}-{b}", errs)
    assert [(r['bin'], r['n']) for r in rows] == [('0-10', 2), ('10-20', 1), ('20-40', 1), ('320-inf', 1)]
    assert rows[0]['mean_angular_error'] == pytest.approx(0.15) and rows[0]['linefit_mean_angular_error'] == pytest.approx(1.5)


def test_an_unknown_energy_is_in_no_bin(capsys):
    """An event whose true energy is unknown (NaN in a simulation's truth) is left out of the energy tables and
    figures: np.digitize put it in the highest bin."""
    log_e = np.array([2.5, 7.5, np.nan, np.nan])
    errs = {'model': np.array([0.1, 0.2, 3.0, 3.0])}
    rows = sample.breakdown('energy', log_e, sample.ENERGY_EDGES, lambda a, b: f"{a}-{b}", errs)
    assert sum(r['n'] for r in rows) == 2 and rows[-1]['mean_angular_error'] == pytest.approx(0.2)
    table = sample.resolution_table(log_e, np.arange(2.0, 8.01, 0.5), errs, np.array([0, 1, 0, 1]), min_events=1)
    assert sum(table['kinds']['track']['n']) == 1 and sum(table['kinds']['cascade']['n']) == 1
    assert table['kinds']['cascade']['model'][-1] == pytest.approx(np.degrees(0.2))


def test_the_end_bins_take_the_values_beyond_the_edges(capsys):
    """The tables' and figures' first and last bins take the events below and above their edges, as resolution_table
    says: a 10^9 GeV event is in the highest energy bin of the figure, not left out of it, and so is a zenith of
    exactly 180 deg in the last row of the zenith table."""
    table = sample.resolution_table(np.array([1.0, 9.0]), np.arange(2.0, 8.01, 0.5), {'model': np.array([0.1, 0.2])},
                                    min_events=1)
    n = table['kinds']['all']['n']
    assert n[0] == 1 and n[-1] == 1 and sum(n) == 2
    rows = sample.breakdown('true zenith (deg)', np.array([0.0, 180.0]), np.arange(0, 181, 30.0), lambda a, b: f"{a}-{b}",
                            {'model': np.array([0.1, 0.2])})
    assert [(r['bin'], r['n']) for r in rows] == [('0.0-30.0', 1), ('150.0-180.0', 1)]


def test_standard_errors_match_the_spread_of_repeated_evaluations():
    """The mean's standard error and the paired ratio's are the spread that 2,000 evaluations on fresh events give:
    the ratio's pairing (a second method whose errors follow the first's) makes it far smaller than unpaired."""
    rng = np.random.default_rng(0)
    n, trials = 400, 2000
    hard = rng.gamma(2.0, 0.3, (trials, n))  # how hard each event is, shared by both methods
    model_err = hard * rng.uniform(0.6, 0.9, (trials, n))
    base_err = hard * rng.uniform(0.9, 1.3, (trials, n))
    means, ratios = model_err.mean(1), model_err.mean(1) / base_err.mean(1)
    se = np.array([sample.standard_error(e) for e in model_err])
    ratio_se = np.array([sample.mean_ratio(a, b)[1] for a, b in zip(model_err, base_err)])
    assert np.median(se) == pytest.approx(means.std(), rel=0.06)
    assert np.median(ratio_se) == pytest.approx(ratios.std(), rel=0.06)
    assert np.median(ratio_se) < 0.5 * np.median(se) / base_err.mean()  # unpaired it would be about as large
    assert sample.mean_ratio(2 * base_err[0], base_err[0]) == pytest.approx((2.0, 0.0), abs=1e-12)
    assert sample.standard_error(np.array([0.3])) is None  # one event: no spread to measure
    # the spread's unbiased estimate (n - 1 in the variance): of few events the n form's is too small, 0.35 here
    assert sample.standard_error(np.array([0.0, 1.0])) == pytest.approx(0.5)


def test_track_auc_counts_a_tie_half():
    """The heads' AUC counts a track and a cascade of the same score half, as the pairs say: it ranked ties in the
    order a sort left them, which numpy 1.24, 1.26 and 2.4 choose differently, and which here put the tracks first."""
    same = np.full(4, 0.5, np.float32)
    assert sample.track_auc(same, np.array([True, True, False, False])) == 0.5
    assert sample.track_auc(same, np.array([False, False, True, True])) == 0.5
    # pairs: 0.9 beats both cascades, the tracks' 0.5 ties one and beats the other: 3.5 of 4
    assert sample.track_auc(np.float32([0.9, 0.5, 0.5, 0.1]), np.array([True, True, False, False])) == 0.875


def read_csv(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def calibrated_kappa_as_in_the_csv(cal, rows):
    """Whether the csv's kappa_calibrated is the map's of its kappa, to the csv's 6 decimals: its own rounding and
    that of the kappa it came from, scaled by the map (rtol=1e-5 alone held by chance: with another model's weights,
    a pulse feature added, a kappa near 0.01 rounded 2.6e-5 of itself and the test failed)."""
    want = sample.calibrated_kappa(cal, rows['kappa'], rows)
    return np.all(np.abs(rows['kappa_calibrated'] - want) <= 1e-6 * (1 + want / np.maximum(rows['kappa'], 1e-6)) + 1e-5 * want)


def test_val_coverage_is_checked_on_events_the_map_was_not_fit_on():
    """On val the coverage report's check is held out: a map fit on the even-indexed events, measured on the
    odd-indexed ones; a map fit on the events it is checked on would report its own fit, not a check."""
    rng = np.random.default_rng(5)
    n = 4000
    kappa = np.exp(rng.uniform(np.log(2), np.log(200), n))
    err = vmf_errors(rng, kappa / 3)  # too sure by 3x: the map matters
    events = {'hit_doms': rng.integers(10, 200, n)}
    cal = sample.fit_calibration(kappa, err, events)
    cov = sample.check_coverage('val', err, kappa, events, cal, {}, None)
    even, odd = slice(0, None, 2), slice(1, None, 2)
    fit = sample.fit_calibration(kappa[even], err[even], sample.subset(events, even))
    assert cov['held_out']['all']['n'] == n // 2
    np.testing.assert_allclose(cov['held_out']['all']['calibrated'],
                               sample.coverage(err[odd], sample.calibrated_radii(fit, kappa[odd], sample.subset(events, odd))))
    np.testing.assert_allclose(cov['held_out']['all']['predicted'], sample.coverage(err[odd], sample.vmf_radii(kappa[odd])))


def test_in_sample_line_names_the_events_the_stored_map_was_fit_on(capsys):
    """The stored map's in-sample coverage line says how many val events the map was fit on: a run on part of val
    keeps maps fit on more of it (sample.py's stored_calibration), and the line said 'fit on all 2000 events' of a
    map fit on 20,000."""
    rng = np.random.default_rng(6)
    kappa = np.exp(rng.uniform(np.log(2), np.log(200), 2000))
    err = vmf_errors(rng, kappa / 3)
    events = {'hit_doms': rng.integers(10, 200, len(kappa))}
    cal = {**sample.fit_calibration(kappa, err, events), 'n_events': 2000}
    sample.check_coverage('val', err, kappa, events, cal, {}, None)
    assert 'the stored map, fit on all 2000 events, on those same events (in sample' in capsys.readouterr().out
    part = slice(0, 500)
    sample.check_coverage('val', err[part], kappa[part], sample.subset(events, part), cal, {}, None)
    assert 'the stored map, fit on 2000 events, on the first 500 of them (in sample' in capsys.readouterr().out


def test_a_map_from_before_the_weights_were_recorded_is_named_so(monkeypatch, tmp_path, capsys):
    """calibration.json written by a sample.py older than df1053e records no weights_sha1: it is not applied (no
    one can tell which weights it was fit for), and the line says why. It said 'fit for other weights (best.pt at
    iter 6), not this checkpoint's' of a map fit on that very best.pt (found with a checkpoint and map of acc1167)."""
    rng = np.random.default_rng(7)
    kappa = np.exp(rng.uniform(np.log(2), np.log(200), 200))
    events = {'hit_doms': rng.integers(10, 200, len(kappa))}
    old = {'checkpoint': 'best.pt', 'iter': 6, 'fit_on': 'data/sim_packed/val, 200 events',
           **sample.fit_calibration(kappa, vmf_errors(rng, kappa), events)}
    path = str(tmp_path / 'calibration.json')
    json.dump(old, open(path, 'w'))
    monkeypatch.setattr(sample, 'split', 'test')
    ck = {'model': {'w': torch.zeros(3)}, 'iter_num': 6}
    cal, written = sample.calibration_maps(path, None, len(kappa), ck, kappa, None, events, False)
    out = capsys.readouterr().out
    assert cal is None and not written
    assert (f"sample: {path} was written by an older sample.py, which did not record the weights it was fit for: "
            f"not applied; run sample.py --split=val to refit it") in out, out


def test_training_figure_names_the_loss_train_py_logs(monkeypatch, tmp_path):
    """The training figure's loss is train.py's per-event loss, which holds the kind and energy heads' terms where
    the data has a truth file (every toy run) beside the vMF NLLs and the angular term: its axis said 'vMF NLL +
    angular term' alone."""
    import matplotlib.axes
    labels = []
    monkeypatch.setattr(matplotlib.axes.Axes, 'set_ylabel', lambda self, label, *a, **k: labels.append(label))
    history = {'iter': [10, 20], 'train_loss': [3.0, 2.5], 'val_iter': [20], 'val_loss': [2.6], 'val_error_deg': [50.0]}
    sample.plot_training(history, str(tmp_path / 'training.png'))
    assert labels == ["loss per event (train.py's)", 'val mean angular error [deg]']


def test_sample_writes_error_circles_and_figures(data_dir, tmp_path):  # noqa: F811
    out = str(tmp_path / 'out')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=20', '--eval_interval=10'] + TINY
        + ['--log_interval=5'])
    # train.py's curves: a line per log point and eval point; a resumed run drops the lines past its checkpoint
    # and a last line cut short by a killed run
    history = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert [r['iter'] for r in history if 'train_loss' in r] == [5, 10, 15, 20]
    assert [r['iter'] for r in history if 'val_error' in r] == [10, 20]
    with open(os.path.join(out, 'log.jsonl'), 'a') as f:
        f.write(json.dumps({'iter': 25, 'train_loss': 9.0, 'lr': 0.0}) + '\n{"iter": 3')  # and a line cut short
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=20', '--init_from=resume'] + TINY)
    assert max(json.loads(line)['iter'] for line in open(os.path.join(out, 'log.jsonl'))) == 20

    p = run(['sample.py', f'--out_dir={out}', '--split=val', '--plot_min_events=2', '--calibration_min_events=20'])
    assert 'held out: a map fit on the ' in p.stdout and 'not a check' in p.stdout
    for f in ('eval_val.json', 'predictions_val.csv', 'calibration.json', 'resolution_val.png',
              'resolution_doms_val.png', 'coverage_val.png', 'training.png'):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert not any(f.endswith('.tmp') for f in os.listdir(out))
    ev = json.load(open(os.path.join(out, 'eval_val.json')))
    cal = json.load(open(os.path.join(out, 'calibration.json')))
    assert cal['iter'] == ev['iter'] and cal['checkpoint'] == 'best.pt'
    # the metric's standard errors, the mean's and the paired ratio's to each baseline, in the json and the table
    for k in ('linefit', 'linefit_improved', 'time_fit'):
        assert ev[k]['model_ratio'] == pytest.approx(ev['mean_angular_error'] / ev[k]['mean_angular_error'])
        assert 0 < ev[k]['model_ratio_se'] < 1 and 0 < ev[k]['mean_angular_error_se'] < 1
    assert 0 < ev['mean_angular_error_se'] < 0.5 * ev['mean_angular_error']
    assert f"{ev['mean_angular_error_se']:7.4f}" in p.stdout
    assert f"model / LineFit mean angular error: {ev['linefit']['model_ratio']:.3f} (standard error " in p.stdout
    # the tiny set is simulated: the heads learned the kind and energy, and the calibration groups by them
    assert cal['columns'] == ['log10_energy', 'track_probability'] and 0 <= ev['truth_heads']['track_auc'] <= 1

    # the csv's circles are those of the calibrated kappa, and the json's coverage is that of the csv's circles
    pr = read_csv(os.path.join(out, 'predictions_val.csv'))
    assert calibrated_kappa_as_in_the_csv(cal, pr)
    assert np.allclose([pr['radius50_deg'], pr['radius90_deg']],
                       np.degrees(sample.calibrated_radii(cal, pr['kappa'], pr, (0.5, 0.9))), atol=1e-5)
    cov = ev['coverage']
    assert cov['levels'] == [0.5, 0.68, 0.9]
    odd = slice(1, None, 2)
    assert np.allclose(cov['held_out']['all']['predicted'], sample.coverage(pr['angular_error'][odd], sample.vmf_radii(pr['kappa'][odd])))
    n_odd = ev['n_events'] // 2
    assert cov['held_out']['all']['n'] == n_odd and sum(r['n'] for r in cov['held_out']['by_kind']) == n_odd
    inside = pr['angular_error'] <= np.radians([pr['radius50_deg'], pr['radius90_deg']])
    assert np.allclose(np.array(cov['stored_map_in_sample']['calibrated'])[[0, 2]], inside.mean(1))

    # the resolution figure's numbers: medians of the csv's errors per kind and energy bin, as the json has them
    truth = open_split(os.path.join(data_dir, 'val')).truth
    table = ev['resolution']['energy']
    drawn = sample.plot_resolution(table, 'x', str(tmp_path / 'r.png'))
    edges = np.array(table['edges'])
    ebin = np.digitize(np.log10(truth['energy']), edges[1:-1])
    for k, kname in enumerate(['track', 'cascade']):
        for method, column in (('model', 'angular_error'), ('linefit', 'linefit_angular_error')):
            want = [math.degrees(np.median(pr[column][m])) if m.sum() >= 2 else None
                    for m in [(truth['kind'] == k) & (ebin == i) for i in range(len(edges) - 1)]]
            assert table['kinds'][kname][method] == pytest.approx(want, abs=1e-3)  # the csv keeps 6 decimals (rad)
            x, y = drawn[(kname, method)]
            assert len(y) >= 2 and list(y) == [v for v in table['kinds'][kname][method] if v is not None]
            assert list(x) == [(lo + hi) / 2 for lo, hi, v in zip(edges, edges[1:], want) if v is not None]
    # the json's figures are those of the csv's errors and heads, and the heads' columns are the model's own outputs
    # (its kind logit through the sigmoid, its log10 energy): a column swapped or a sign lost has no other witness
    assert ev['mean_angular_error'] == pytest.approx(pr['angular_error'].mean(), abs=1e-6)
    assert ev['median_angular_error'] == pytest.approx(np.median(pr['angular_error']), abs=1e-6)
    assert ev['truth_heads']['kind_accuracy'] == pytest.approx(((pr['track_probability'] >= 0.5) == (truth['kind'] == 0)).mean())
    ck = torch.load(os.path.join(out, 'best.pt'), weights_only=False)
    net = M.IceModel(**{**ck['model_args'], 'attn': 'sdpa'})
    net.load_state_dict(ck['model'])
    val = open_split(os.path.join(data_dir, 'val'))
    b = M.model_inputs(pack_batch(val, np.arange(len(val)), 4 * 8192, 4 * 4096, 4 * 64, 16)[0], path='sdpa')
    assert b['n_events'] == len(val) == len(pr['event_id'])
    with torch.no_grad():
        heads = net.eval()(b)[:len(val), 6:8].double().numpy()
    order = np.asarray(b['event_index'][:len(val)])
    assert np.allclose(pr['track_probability'][order], 1 / (1 + np.exp(-heads[:, 0])), atol=2e-6)
    assert np.allclose(pr['log10_energy'][order], heads[:, 1], atol=2e-6)
    drawn = sample.plot_coverage(cov['curves'], str(tmp_path / 'c.png'))
    assert np.allclose(drawn[('all', 'predicted')][1], sample.coverage(pr['angular_error'][odd], sample.vmf_radii(pr['kappa'][odd], sample.CURVE_LEVELS)))
    assert ('all', 'calibrated') in drawn
    drawn = sample.plot_training(ev['training'], str(tmp_path / 't.png'))
    # the resumed run's evaluation at iteration 20 replaces the first one's
    history = [json.loads(line) for line in open(os.path.join(out, 'log.jsonl'))]
    assert list(drawn['train_loss'][0]) == [5, 10, 15, 20] and list(drawn['val_error_deg'][0]) == [10, 20]
    assert np.allclose(drawn['val_error_deg'][1], [math.degrees(r['val_error']) for r in history if 'val_error' in r][-3::2])

    # other splits apply the map stored on val; where they have labels the output says that the coverage is that
    # of a map fit elsewhere
    p = run(['sample.py', f'--out_dir={out}', '--split=train', '--max_events=30', '--baselines=', '--plots=False'])
    assert f"fit on {cal['fit_on']}" in p.stdout and 'held out: the map was fit on val' in p.stdout
    et = json.load(open(os.path.join(out, 'eval_train.json')))
    ptr = read_csv(os.path.join(out, 'predictions_train.csv'))
    assert et['calibration']['fit_on'] == cal['fit_on']
    assert calibrated_kappa_as_in_the_csv(cal, ptr)
    inside = ptr['angular_error'] <= np.radians([ptr['radius50_deg'], ptr['radius90_deg']])
    assert np.allclose(np.array(et['coverage']['held_out']['all']['calibrated'])[[0, 2]], inside.mean(1))

    # a map fit for other weights is not applied (test: no labels, the Kaggle case; the circles are the predicted
    # kappa's): a new run into the same out_dir writes best.pt at the same iteration
    cal['weights_sha1'] = '0' * 40
    json.dump(cal, open(os.path.join(out, 'calibration.json'), 'w'))
    p = run(['sample.py', f'--out_dir={out}', '--split=test', '--plots=False'])
    assert 'not applied' in p.stdout
    pt = read_csv(os.path.join(out, 'predictions_test.csv'))
    assert 'kappa_calibrated' not in pt
    assert np.allclose(pt['radius90_deg'], np.degrees(sample.containment_radius(pt['kappa'], 0.9)), atol=1e-5)

    # sample.py packs 4x training's budgets per micro-batch (INFER_BUDGET); the predictions are those of training's
    run(['sample.py', f'--out_dir={out}', '--split=val', '--baselines=', '--plots=False', '--calibration_min_events=20', '--max_pulses=8192',
         '--max_doms=4096', '--max_events_per_batch=64'])
    again = read_csv(os.path.join(out, 'predictions_val.csv'))
    assert len(again['event_id']) == len(pr['event_id']) and (again['event_id'] == pr['event_id']).all()
    assert np.allclose(again['kappa'], pr['kappa'], rtol=1e-4)
    assert M.angular_errors(again['azimuth'], again['zenith'], pr['azimuth'], pr['zenith']).max() < 1e-4
    assert np.allclose(again['track_probability'], pr['track_probability'], atol=1e-5)
    # a run on part of val keeps the maps fit on all of it, for the same weights
    stored = open(os.path.join(out, 'calibration.json')).read()
    p = run(['sample.py', f'--out_dir={out}', '--split=val', '--max_events=30', '--baselines=', '--plots=False',
             '--calibration_min_events=20'])
    assert 'kept: fit on 40 val events for these weights, more than this run\'s 30' in p.stdout
    assert open(os.path.join(out, 'calibration.json')).read() == stored
    # also on fewer than calibration_min_events, too few to fit new maps: the stored ones still apply
    p = run(['sample.py', f'--out_dir={out}', '--split=val', '--max_events=10', '--baselines=', '--plots=False',
             '--calibration_min_events=20'])
    assert 'kept: fit on 40 val events for these weights, more than this run\'s 10' in p.stdout
    assert 'kappa_calibrated' in read_csv(os.path.join(out, 'predictions_val.csv'))
    assert open(os.path.join(out, 'calibration.json')).read() == stored
    # but not maps fit for other weights (a new run into the same out_dir): those are fit again on this run's events
    json.dump({**json.loads(stored), 'weights_sha1': '0' * 40}, open(os.path.join(out, 'calibration.json'), 'w'))
    p = run(['sample.py', f'--out_dir={out}', '--split=val', '--max_events=30', '--baselines=', '--plots=False',
             '--calibration_min_events=20'])
    refit = json.load(open(os.path.join(out, 'calibration.json')))
    assert 'kept' not in p.stdout and refit['n_events'] == 30 and refit['weights_sha1'] == json.loads(stored)['weights_sha1'] != '0' * 40

    # a model whose heads did not learn (truth_weight=0; the Kaggle data, which has no truth file, likewise): no
    # kind or energy in the csv, and the calibration groups by hit DOMs
    out0 = str(tmp_path / 'out0')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out0}', '--max_iters=4', '--eval_interval=4',
         '--truth_weight=0'] + TINY)
    run(['sample.py', f'--out_dir={out0}', '--split=val', '--baselines=', '--plots=False', '--calibration_min_events=20'])
    p0 = read_csv(os.path.join(out0, 'predictions_val.csv'))
    assert 'track_probability' not in p0 and 'log10_energy' not in p0
    assert json.load(open(os.path.join(out0, 'calibration.json')))['columns'] == ['hit_doms']
    assert 'truth_heads' not in json.load(open(os.path.join(out0, 'eval_val.json')))

    # train.py's val error at the checkpoint's iteration is the metric of the weights it saved, over all of val (its
    # eval_events hold all 40): sample.py's error on val with them, to float32 rounding
    logged = [r['val_error'] for r in history if 'val_error' in r and r['iter'] == ev['iter']][-1]
    assert ev['n_events'] == 40 and abs(ev['mean_angular_error'] - logged) < 2e-4, (ev['mean_angular_error'], logged)


def test_likelihood_baselines_fit_in_the_data_s_ice(monkeypatch, capsys):
    """sample.py's mpe baseline fits in the ice prepare.py chose for the data (the toy's for simulation, homogeneous
    ice for real data: its fit_ice='auto'), not classical.MPE_ICE's 'toy' for every data set."""
    import types

    import classical
    real = types.SimpleNamespace(manifest={'made_by': {'fit': {'steps': 80, 'ice': 'bulk'}}}, truth=None)
    old = types.SimpleNamespace(manifest={'made_by': {'fit': {'steps': 0, 'ice': None}}}, truth=None)
    toy = types.SimpleNamespace(manifest={'made_by': {'fit': {'steps': 80, 'ice': 'toy'}}}, truth={'kind': None})
    assert [sample.fit_ice(s) for s in (real, old, toy)] == ['bulk', 'bulk', 'toy']
    seen = []
    monkeypatch.setattr(classical, 'mpe_fit', lambda *a, ice=None, **k: seen.append(ice) or (np.zeros((1, 3)), None))
    monkeypatch.setattr(classical, '_fit_inputs', lambda ev, geometry, linefits_only: {
        'linefit': np.array([[0.0, 0.0, 1.0]]), 'linefit_improved': np.array([[0.0, 0.0, 1.0]]), 'doms': (), 'near': None})
    classical.reconstruct('mpe', None, None, ice='bulk')
    assert seen == ['bulk']
    # and sample.py hands the data's ice to the fits (a fake split of 2,500 real events: two chunks of the mpe fit)
    seen.clear()
    monkeypatch.setattr(classical, 'reconstruct', lambda name, ev, geometry, device, ice: seen.append((name, ice))
                        or np.tile([0.0, 0.0, 1.0], (len(ev), 1)))
    real.events, real.geometry = (lambda idx: idx), None
    dirs, speed = sample.classical_baselines(real, 2500, ['linefit', 'mpe'], 'cpu')
    assert seen == [('linefit', 'bulk'), ('mpe', 'bulk'), ('mpe', 'bulk')] and dirs['mpe'].shape == (2500, 3)
    assert list(speed) == ['linefit', 'mpe']
    # a table file that cannot be read from here (an older prepare.py recorded it relative to its folder): one line
    lost = types.SimpleNamespace(manifest={'made_by': {'fit': {'steps': 80, 'ice': 'ice.txt'}}}, truth=None, path='pk/val')
    with pytest.raises(SystemExit, match=r"^sample: error: the mpe baseline fits in the ice pk/val was prepared in, "
                                         r"fit_ice='ice.txt': ice.txt not found; run sample.py from the folder"):
        sample.classical_baselines(lost, 2, ['linefit', 'mpe'], 'cpu')
    # the quick fit's row of a set prepared with fit_steps=0 says that it is the improved LineFit
    rec = {'fit_azimuth': np.zeros(2, np.float32), 'fit_zenith': np.zeros(2, np.float32)}
    for s, said in ((old, True), (real, False)):
        s.event_records, s.fit_events_per_s = (lambda idx: (rec,)), 1.0
        dirs, _ = sample.classical_baselines(s, 2, ['time_fit'], 'cpu')
        assert np.allclose(dirs['time_fit'], [[0, 0, 1]] * 2)
        assert ('fit_steps=0' in capsys.readouterr().out) == said


def _write_many(path, seed, times):
    rng = np.random.default_rng(seed)
    for _ in range(times):
        sample.replace_all([(path, sample.csv_writer({'event_id': np.arange(100_000), 'azimuth': rng.random(100_000)}))])


def test_two_samples_on_one_out_dir_write_whole_files(tmp_path):
    """Two sample.py writing one file at once (one by hand beside a scheduled one) end with a whole file of one of
    them: with one shared temporary name their writes went into one file, or one's rename took the other's file
    away (a FileNotFoundError traceback)."""
    import multiprocessing
    path = str(tmp_path / 'predictions_val.csv')
    procs = [multiprocessing.get_context('fork').Process(target=_write_many, args=(path, seed, 15)) for seed in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = np.loadtxt(path, delimiter=',', skiprows=1)
    assert rows.shape == (100_000, 2) and (rows[:, 0] == np.arange(100_000)).all()
    assert sorted(os.listdir(tmp_path)) == ['predictions_val.csv']


@pytest.mark.parametrize('what', ['json', 'csv', 'figure'])
def test_a_full_disk_names_the_result_and_keeps_the_one_before(tmp_path, monkeypatch, what):
    """A disk that fills while sample.py writes a result stops it in one line naming the file and 'No space left on
    device', leaves no cut temporary file (it kept the space it took) and the previous result as it was: before,
    a traceback (seen on a 5 MB tmpfs: coverage_val.png) that left the .tmp file behind."""
    import errno
    import matplotlib.pyplot as plt
    path = str(tmp_path / f'result.{what}')
    open(path, 'w').write('the previous result\n')

    def half_then_full(target, *a, **k):
        open(target, 'w').write('half')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(SystemExit, match=f"^sample: error: {path}: cannot write it \\(No space left on device\\); "
                                         f"free some space and re-run$"):
        if what == 'json':
            monkeypatch.setattr(sample.json, 'dump', lambda obj, f, **k: (f.write('{"half'), half_then_full(f.name)))
            sample.replace_all([(path, sample.json_writer({'a': 1}))])
        elif what == 'csv':
            monkeypatch.setattr(np, 'savetxt', half_then_full)
            sample.replace_all([(path, sample.csv_writer({'event_id': np.arange(3)}))])
        else:
            fig = plt.figure()
            monkeypatch.setattr(fig, 'savefig', half_then_full)
            sample.replace_all([(path, lambda tmp: sample.save_png(fig, tmp))])
    assert os.listdir(tmp_path) == [f'result.{what}'] and open(path).read() == 'the previous result\n'


def test_a_metric_of_numpy_values_is_written_as_json_numbers(tmp_path):
    """A metric added to the report as numpy values (a count (err < x).sum(), a float32, a per-bin array) is written
    as JSON's numbers, NaN as null: json.dump stopped in a TypeError at the end, after the whole evaluation."""
    path = str(tmp_path / 'eval_val.json')
    err = np.radians([0.5, 2.0, 7.0])
    sample.replace_all([(path, sample.json_writer({'n_within_5_deg': (err < np.radians(5)).sum(), 'p50': np.float32(0.5),
                                                   'per_bin': np.array([1.5, np.nan]), 'all_within': np.all(err < 1)}))])
    assert json.load(open(path)) == {'n_within_5_deg': 2, 'p50': 0.5, 'per_bin': [1.5, None], 'all_within': True}


KILLED_IN_THE_CSV = (
    "import os, runpy, signal, sys, time\n"
    "import numpy as np\n"
    "savetxt, sig = np.savetxt, getattr(signal, sys.argv.pop(1))\n"
    "def cut(path, *a, **k):  # the predictions' CSV half written when the signal comes\n"
    "    savetxt(path, *a, **k)\n"
    "    if 'predictions_' in path:\n"
    "        os.kill(os.getpid(), sig); time.sleep(5)\n"
    "np.savetxt = cut\n"
    "runpy.run_path('sample.py', run_name='__main__')\n")


@pytest.mark.parametrize('sig', ['SIGTERM', 'SIGINT'])
def test_a_kill_while_the_results_are_written_leaves_the_last_set_whole(data_dir, tmp_path, sig):  # noqa: F811
    """sample.py stopped while it writes its results (a scheduler's SIGTERM, Ctrl-C; the CSV of a million events
    takes seconds) leaves out_dir's results those of the run before, every file, and no temporary file: it left this
    run's eval json beside the last run's predictions, each whole and the set mixed, and the cut CSV's .tmp file."""
    out = str(tmp_path / 'out')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'] + TINY)
    run(['sample.py', f'--out_dir={out}', '--baselines=', '--plots=False', '--calibration_min_events=20'])
    before = {f: open(os.path.join(out, f)).read() for f in ('eval_val.json', 'predictions_val.csv', 'calibration.json')}
    (tmp_path / 'killed.py').write_text(KILLED_IN_THE_CSV)
    p = run([str(tmp_path / 'killed.py'), sig, f'--out_dir={out}', '--baselines=', '--max_events=30',
             '--calibration_min_events=20'], check=False)
    assert p.returncode == 128 + getattr(signal, sig) and p.stderr == f"sample: stopped by {sig}\n", p.stderr[-2000:]
    assert {f: open(os.path.join(out, f)).read() for f in before} == before
    assert not [f for f in os.listdir(out) if f.endswith('.tmp') or f.endswith('.png')]


def test_a_signal_while_the_results_are_renamed_waits_for_the_last(tmp_path, monkeypatch):
    """A SIGTERM between two of the renames that put a run's results in place would leave a mixed set (the first
    file new, the second old): it waits for the last rename, then stops the run as before."""
    rename, renamed = os.replace, []

    def rename_then_signal(a, b):
        rename(a, b)
        renamed.append(b)
        if len(renamed) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(os, 'replace', rename_then_signal)
    paths = [str(tmp_path / 'eval_val.json'), str(tmp_path / 'predictions_val.csv')]
    before = signal.signal(signal.SIGTERM, sample.stop)
    try:
        with pytest.raises(SystemExit) as stop:
            sample.replace_all([(path, lambda tmp: open(tmp, 'w').write('new')) for path in paths])
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stop.value.code == 143 and renamed == paths and sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)


def test_an_out_dir_that_cannot_be_written_is_named_before_the_evaluation(data_dir, tmp_path):  # noqa: F811
    """sample.py on a run's folder the user may only read (a colleague's out_dir, a read-only mount) stops before it
    evaluates, in one line saying what to do: it died in a traceback writing eval_val.json after the whole evaluation
    (minutes on a real val split). Emulated (the tests run as root): every write into out_dir fails as on a read-only
    mount. The way out it names works: another out_dir (made if new) and the checkpoint by its full path."""
    out, mine = str(tmp_path / 'out'), str(tmp_path / 'mine')
    run(['train.py', f'--data_dir={data_dir}', f'--out_dir={out}', '--max_iters=2', '--eval_interval=2'] + TINY)
    read_only = (f"import builtins, errno, os, runpy, sys\nreal = builtins.open\n"
                 f"def ro(p, mode='r', *a, **k):\n"
                 f"    if str(p).startswith({out!r} + '/') and ('w' in mode or 'a' in mode):\n"
                 f"        raise OSError(errno.EROFS, os.strerror(errno.EROFS), p)\n"
                 f"    return real(p, mode, *a, **k)\n"
                 f"builtins.open = ro\nsys.argv = sys.argv[1:]\nrunpy.run_path('sample.py', run_name='__main__')\n")
    p = run(['-c', read_only, 'sample.py', f'--out_dir={out}', '--plots=False'], check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"sample: error: {out}/eval_val.json: cannot write it (Read-only file system); give an out_dir you can write, "
        f"and the checkpoint by its full path (--ckpt=/path/to/best.pt)"], p.stderr[-2000:]
    assert 'sample: model on' not in p.stdout
    run(['sample.py', f'--out_dir={mine}', f'--ckpt={out}/best.pt', '--plots=False'])  # a new folder, made
    assert {'eval_val.json', 'predictions_val.csv'} <= set(os.listdir(mine))
