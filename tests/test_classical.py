"""classical.py: LineFit is exact on a noise-free line, the MPE likelihood fit finds noise-free many-hit tracks
to within a few degrees (in the toy's depth-dependent ice with MPE_ICE = 'toy', in homogeneous ice with 'bulk'),
the ice table reads a user's file, and every method returns finite, in-range angles for degenerate events."""

import math

import numpy as np
import pytest
import torch

import classical as C
from simulate import make_geometry, path_ice


def test_linefits_recover_a_straight_line_exactly():
    rng = np.random.default_rng(0)
    n_events, n_hits = 5, 40
    v = rng.normal(size=(n_events, 3))
    v *= (C.C_VACUUM / np.linalg.norm(v, axis=1))[:, None]
    r0 = rng.uniform(-300, 300, (n_events, 3))
    t = 10000 + np.sort(rng.uniform(0, 3000, (n_events, n_hits)), 1)
    pos = r0[:, None] + v[:, None] * t[..., None]  # hits at r = r0 + v t
    offsets = np.arange(n_events + 1) * n_hits
    truth = -v / np.linalg.norm(v, axis=1, keepdims=True)  # the neutrino comes from -v
    for fit in (C.linefit, C.linefit_improved):
        err = C.angular_error(fit(pos.reshape(-1, 3), t.ravel(), offsets), truth)
        assert err.max() < 1e-6, (fit.__name__, err)


def test_improved_linefit_drops_scattered_light():
    # a muon's direct hits on a line, and late pulses (light scattered for 600-1200 ns) on DOMs 40-100 m to one
    # side of it, near its first hits: they pull plain LineFit off; the delay cleaning drops them, as later than direct light
    # from a neighbour's first hit allows, so the improved LineFit keeps the line exactly
    rng = np.random.default_rng(4)
    n_events, n_hits, n_late = 6, 30, 10
    v = rng.normal(size=(n_events, 3))
    v *= (C.C_VACUUM / np.linalg.norm(v, axis=1))[:, None]
    t = 10000 + np.sort(rng.uniform(0, 2000, (n_events, n_hits)), 1)
    pos = v[:, None] * (t[..., None] - 11000)
    near = np.arange(n_late) % 5  # near the first 5 hit DOMs
    off = np.repeat(rng.normal(size=(n_events, 1, 3)), n_late, 1)  # one side per event
    off -= (off * v[:, None]).sum(-1, keepdims=True) * v[:, None] / C.C_VACUUM ** 2  # perpendicular to the track
    off *= rng.uniform(40, 100, (n_events, n_late, 1)) / np.linalg.norm(off, axis=-1, keepdims=True)
    pos = np.concatenate([pos, pos[:, near] + off], 1).reshape(-1, 3)
    time = np.concatenate([t, t[:, near] + rng.uniform(600, 1200, (n_events, n_late))], 1).ravel()
    offsets = np.arange(n_events + 1) * (n_hits + n_late)
    truth = -v / np.linalg.norm(v, axis=1, keepdims=True)
    plain = C.angular_error(C.linefit(pos, time, offsets), truth)
    improved = C.angular_error(C.linefit_improved(pos, time, offsets), truth)
    assert plain.min() > 0.005, plain
    assert improved.max() < 1e-6, improved


def simulated_tracks(n_events, rng, ice='toy'):
    """Noise-free through-going muons in the IceCube-like geometry, timed as the fit assumes: direct Cherenkov
    time plus the first of N Pandel delays plus 2.5 ns jitter, N ~ Poisson of a light yield falling with d.
    ice 'toy': the Pandel distance scaled by simulate.py's path-averaged scattering, as the simulation does;
    'bulk': one scattering length, PANDEL_LAMBDA. Also returns each hit's sensor_id."""
    geo = make_geometry()
    zenith, azimuth = np.arccos(rng.uniform(-1, 1, n_events)), rng.uniform(0, 2 * np.pi, n_events)
    truth = C.angles_to_vector(azimuth, zenith)
    pos, time, npe, sensor, offsets = [], [], [], [], [0]
    for u in -truth:  # a handful of test events: a loop is clearer here
        closest = rng.normal(size=3)
        closest = 150 * rng.random() * (closest - closest @ u * u) / np.linalg.norm(closest - closest @ u * u)
        rel = geo - closest
        along = rel @ u
        d = np.sqrt(np.maximum((rel * rel).sum(1) - along ** 2, 0.0))
        n = rng.poisson(30 * np.exp(-d / 40) / np.sqrt(np.maximum(d, 1)))
        hit = n > 0
        inv_scat = np.full(hit.sum(), 1 / C.PANDEL_LAMBDA)
        if ice == 'toy':  # average 1/l_scat from the emission point on the track to the DOM
            z_emit = closest[2] + (along[hit] - d[hit] / math.tan(math.radians(40.7))) * u[2]
            inv_scat = path_ice(z_emit, geo[hit, 2])[1]
        xi = np.maximum(d[hit], 1) / C.SIN_CHERENKOV * inv_scat
        delay = np.array([rng.gamma(x, 1 / C.PANDEL_RATE, k).min() for x, k in zip(xi, n[hit])])
        t = 9000 + (along[hit] + C.TRACK_DELAY_FACTOR * d[hit]) / C.C_VACUUM + delay + rng.normal(0, 2.5, hit.sum())
        pos.append(geo[hit]), time.append(t), npe.append(n[hit].astype(float)), sensor.append(np.nonzero(hit)[0])
        offsets.append(offsets[-1] + hit.sum())
    return np.concatenate(pos), np.concatenate(time), np.concatenate(npe), np.array(offsets), truth, np.concatenate(sensor)


@pytest.mark.parametrize('ice', ['toy', 'bulk'])
@pytest.mark.parametrize('charge', [False, True])
def test_mpe_fit_recovers_noise_free_tracks(ice, charge, monkeypatch):
    # times alone, and refined with the charge of every DOM near the track (as the detector is, unhit ones too)
    monkeypatch.setattr(C, 'MPE_ICE', ice)
    torch.manual_seed(0)
    pos, time, npe, offsets, truth, sensor = simulated_tracks(8, np.random.default_rng(1), ice)
    assert np.diff(offsets).min() >= 40  # many hits
    plain = C.linefit(pos, time, offsets)
    improved = C.linefit_improved(pos, time, offsets)
    seeds = np.stack([improved, plain, C._tilted(improved, 0.25, 0.0), C._tilted(improved, 0.25, math.pi)], 1)
    geo = make_geometry()
    near = (geo, np.ones(len(geo)), sensor, npe, offsets) if charge else None
    direction, ll = C.mpe_fit(pos, time, npe, offsets, seeds, near=near)
    err = C.angular_error(direction, truth)
    assert np.isfinite(ll).all()
    assert np.degrees(err).max() < 2.0, np.degrees(err)
    assert np.median(err) < np.median(C.angular_error(plain, truth))


def track_events(n_events, rng):
    """simulated_tracks as classical's events (one pulse per DOM, so each event's DOMs are its pulses) and the truth."""
    pos, time, npe, offsets, truth, sensor = simulated_tracks(n_events, rng)
    ev = {'sensor_id': sensor, 'time': time, 'charge': npe, 'auxiliary': np.zeros(len(time), bool),
          'pulse_offsets': offsets, 'event_dom_offsets': offsets, 'dom_offsets': np.arange(len(time) + 1)}
    return ev, truth


def test_time_fit_beats_its_seed_on_many_hit_tracks():
    # the quick fit prepare.py stores with every event (the model's second seed): from the LineFits to within a
    # few degrees, closer than the improved LineFit, with a small reduced log-likelihood
    torch.manual_seed(0)
    ev, truth = track_events(8, np.random.default_rng(2))
    direction, rlogl = C.time_fit(ev, make_geometry())
    err = C.angular_error(direction, truth)
    improved = C.angular_error(C.reconstruct('linefit_improved', ev, make_geometry()), truth)
    print(f"time_fit median {np.degrees(np.median(err)):.2f} deg, improved LineFit {np.degrees(np.median(improved)):.2f}")
    assert np.degrees(err).max() < 3.0, np.degrees(err)
    assert np.median(err) < 0.7 * np.median(improved)
    assert np.isfinite(rlogl).all() and (rlogl < 10).all(), rlogl
    # rlogl is small where the times fit a track: the same hits with their times shuffled among the DOMs fit worse
    shuffled = {**ev, 'time': np.concatenate([np.random.default_rng(3).permutation(ev['time'][a:b])
                                              for a, b in zip(ev['pulse_offsets'][:-1], ev['pulse_offsets'][1:])])}
    assert (C.time_fit(shuffled, make_geometry())[1] > rlogl + 1).all()


def test_quick_fit_never_asks_for_a_gpu(monkeypatch):
    # prepare's forked workers run the quick fit on the CPU; torch.optim's step() asked torch for the accelerator and
    # its stream, which in a worker of a parent that had touched CUDA failed (bench.py on a GPU: "CUDA error:
    # initialization error") and otherwise opened a CUDA context per worker
    def no_gpu(*args, **kwargs):
        raise AssertionError('the quick fit asked torch for an accelerator')
    monkeypatch.setattr(torch.accelerator, 'current_accelerator', no_gpu)
    monkeypatch.setattr(torch.cuda, 'is_available', no_gpu)
    ev, _ = track_events(2, np.random.default_rng(4))
    direction, rlogl = C.time_fit(ev, make_geometry(), steps=5)
    assert np.isfinite(direction).all() and np.isfinite(rlogl).all()


@pytest.mark.parametrize("starting_too", [False, True])
def test_time_likelihood_takes_the_survival_term_where_more_than_one_photon(starting_too):
    # log n + log f + (n - 1) log Q per DOM: computing Q only where n > 1 (hits['many']) must give the sum over every
    # DOM, for infinite tracks and for starting ones (their muon and cascade share each photon), at the fit's start
    # from the true directions of simulated tracks
    pos, time, npe, offsets, truth, _ = simulated_tracks(3, np.random.default_rng(4))
    fit_kw = dict(dtype=torch.float64, device='cpu')
    path_mean = C._ice_path_mean(fit_kw, 'toy')
    hits, centre, t_ref = C._time_rows(pos, time, npe, offsets, 1, fit_kw)
    assert 0 < len(hits['many']) < len(time) and (hits['n'][hits['many']] > 1).all()
    centre_g = torch.as_tensor(centre, **fit_kw)
    params = C._seed_tracks(truth[:, None], None, hits, centre_g, t_ref, 1, path_mean, fit_kw)
    params['s_vertex'], params['log_ratio'] = C._starting_vertex(params, torch.ones(3, dtype=torch.bool), hits, centre_g,
                                                                 starting_too, fit_kw)
    unit, ref = C._track(params['u'], params['shift'], centre_g)

    def log_likelihood(h):
        return C._time_log_likelihood(h, unit, ref, params, path_mean, starting_too, 3)
    ll = log_likelihood(hits)
    assert ((ll - log_likelihood({**hits, 'n': torch.ones_like(hits['n'])})).abs() > 0.1).all()  # the terms count
    torch.testing.assert_close(ll, log_likelihood({**hits, 'many': torch.arange(len(time))}), rtol=1e-12, atol=1e-9)


def test_charge_likelihood_takes_every_dom_near_the_track_hit_or_not():
    # DOMs on the x axis at 0, 50, 100, 119 and 200 m; tracks along z through the origin; radius 120 m
    geometry = np.array([[0.0, 0, 0], [50, 0, 0], [100, 0, 0], [119, 0, 0], [200, 0, 0]])
    efficiency = np.array([1.0, 1.0, 1.35, 1.0, 1.0])
    # event 0 saw 2 pe on DOM 1 and 5 pe on DOM 4 (beyond the radius: left out), event 1 saw 1 pe on DOM 0
    near = (geometry, efficiency, np.array([1, 4, 0]), np.array([2.0, 5.0, 1.0]), np.array([0, 2, 3]))
    track = np.zeros((2, 3)), np.tile([0.0, 0.0, 1.0], (2, 1))
    pos, eff, charge, offsets = C._near_doms(near, 0, 2, *track)
    assert offsets.tolist() == [0, 4, 8]
    assert np.allclose(pos[:, 0], [0, 50, 100, 119] * 2) and np.allclose(eff, [1, 1, 1.35, 1] * 2)
    assert charge.tolist() == [0, 2, 0, 0, 1, 0, 0, 0]
    pos, eff, charge, offsets = C._near_doms(near, 1, 2, *(a[:1] for a in track))  # a chunk: event 1 alone
    assert offsets.tolist() == [0, 4] and charge.tolist() == [1, 0, 0, 0]


def test_ice_table_settings(tmp_path):
    from simulate import absorption_length, scattering_length
    assert C.ice_table('bulk') is None
    z, inv, inv_att = C.ice_table('toy')
    assert np.all(np.diff(z) > 0) and np.allclose(inv, 1 / scattering_length(z))
    assert np.allclose(inv_att, 1 / np.sqrt(absorption_length(z) * scattering_length(z) / 3))
    path = tmp_path / 'ice.csv'  # a user's table, unsorted: z (m), effective scattering length (m)
    path.write_text('# z, l_scat\n0, 20\n-500, 40\n500, 30\n')
    z, inv, inv_att = C.ice_table(str(path))
    assert np.allclose(1 / inv[[np.argmin(abs(z + 500)), np.argmin(abs(z + 250)), np.argmin(abs(z - 500))]], [40, 30, 30])
    assert np.allclose(1 / inv[0], 40) and np.allclose(1 / inv[-1], 30)  # held constant beyond the table
    assert np.allclose(inv_att, 1 / np.sqrt(C.PANDEL_LAMBDA_A * (1 / inv) / 3))  # no absorption column: Pandel's
    path.write_text('# z, l_scat, l_abs\n-500, 40, 120\n500, 30, 300\n')  # with absorption lengths
    z, inv, inv_att = C.ice_table(str(path))
    assert np.allclose(1 / inv_att[[0, -1]], np.sqrt([120 * 40 / 3, 300 * 30 / 3]))


def events(pulses):
    """An ev dict as prepare's Split.events returns it, from per-event lists of (sensor, time, charge, aux)."""
    sensor, time, charge, aux, pulse_offsets, event_dom_offsets, dom_starts = [], [], [], [], [0], [0], []
    for pulse_list in pulses:
        pulse_list = sorted(pulse_list, key=lambda p: (p[0], p[1]))
        for k, p in enumerate(pulse_list):
            if k == 0 or p[0] != pulse_list[k - 1][0]:
                dom_starts.append(len(sensor))
            sensor.append(p[0]), time.append(p[1]), charge.append(p[2]), aux.append(p[3])
        pulse_offsets.append(len(sensor))
        event_dom_offsets.append(len(dom_starts))
    return {'sensor_id': np.array(sensor, np.int16), 'time': np.array(time, np.int64),
            'charge': np.array(charge, np.float32), 'auxiliary': np.array(aux, bool),
            'pulse_offsets': np.array(pulse_offsets), 'event_dom_offsets': np.array(event_dom_offsets),
            'dom_offsets': np.array(dom_starts + [len(sensor)])}


def test_linefits_of_an_event_with_one_clean_pulse_use_all_its_pulses():
    """reconstruct's LineFits read the non-auxiliary pulses, or every pulse of an event with fewer than two: one clean
    pulse alone has no velocity, and the direction would be the fallback (0, 0, 1)."""
    geo = make_geometry()
    hits = [(s, 10000 + 50 * k, 1.0, k != 3) for k, s in enumerate(range(1000, 2200, 61))]  # across strings and depths
    one_clean, all_clean = events([hits]), events([[(s, t, q, False) for s, t, q, _ in hits]])
    for method in ('linefit', 'linefit_improved'):
        want = C.reconstruct(method, all_clean, geo)
        assert abs(want[0, 2]) < 0.99 and C.angular_error(C.reconstruct(method, one_clean, geo), want).max() < 1e-9, method


def test_improved_linefit_without_a_velocity_takes_the_plain_one():
    """Where the delay cleaning leaves only simultaneous hits (no velocity), the improved LineFit's direction is the
    plain LineFit's, not the (0, 0, 1) of an event without any: here the DOMs above, hit 1-1.5 us late, are dropped."""
    geo = make_geometry()
    sensor, time = np.array([1003, 1004, 1005, 1000, 1001, 1002]), np.array([1e4, 1e4, 1e4, 1.1e4, 1.12e4, 1.15e4])
    plain = C.linefit(geo[sensor], time, np.array([0, 6]))
    assert plain[0, 2] < -0.99  # the late hits above: a muon going up
    assert C.angular_error(C.linefit_improved(geo[sensor], time, np.array([0, 6])), plain).max() < 1e-9


def test_the_likelihood_fits_take_an_events_brightest_doms(monkeypatch):
    """Above MPE_MAX_DOMS hit DOMs an event's likelihood fits use its brightest DOMs, whose first times are the
    sharpest."""
    monkeypatch.setattr(C, 'MPE_MAX_DOMS', 3)
    ev = events([[(s, 10000 + 50 * k, q, False) for k, (s, q) in enumerate(zip((100, 200, 300, 400, 500), (1.0, 5.0, 2.0, 4.0, 3.0)))]])
    assert sorted(C._fit_inputs(ev, make_geometry())['doms'][2]) == [3.0, 4.0, 5.0]


def test_delay_cleaning_of_an_event_with_more_doms_than_references(monkeypatch):
    """An event with more hit DOMs than DELAY_MAX_REFS (most real ones; 2 here, so that six DOMs make one): a pulse
    goes as scattered light when it comes DELAY_NS after direct light from the first hit of one of the event's
    least-late DOMs could, wherever along the track it lies, or after its own DOM's first hit, no reference."""
    monkeypatch.setattr(C, 'DELAY_MAX_REFS', 2)
    x = np.array([-400.0, -300, 300, 400, 500])  # a muon along +x: the neutrino comes from -x
    pos, time = np.stack([x, 0 * x, 0 * x], 1), 10000 + x / C.C_VACUUM
    # light scattered to a DOM 60 m off the track's late end, 300 ns after the muon passed
    late = (np.r_[pos, [[450.0, 60, 0]]], np.r_[time, 10000 + 450 / C.C_VACUUM + 300], np.array([0, 6]))
    assert C.angular_error(C.linefit(*late), [[-1.0, 0, 0]]) > 0.01  # the case that matters
    assert C.angular_error(C.linefit_improved(*late), [[-1.0, 0, 0]]) < 1e-9
    # a DOM 100 m off the track, 300 m from any other, hit again 250 ns after its first pulse: the fit is the one
    # without that pulse
    alone = (np.r_[pos, [[0.0, 100, 0]]], np.r_[time, 10100], np.array([0, 6]))
    again = (np.r_[alone[0], [[0.0, 100, 0]]], np.r_[alone[1], 10350], np.array([0, 7]))
    assert C.angular_error(C.linefit(*again), C.linefit(*alone)) > 1e-3
    assert C.angular_error(C.linefit_improved(*again), C.linefit_improved(*alone)) < 1e-9


def test_degenerate_events_give_finite_angles():
    geo = make_geometry()
    ev = events([
        [(100, 10000, 1.0, False)],                                          # one pulse
        [(100, 10000, 1.0, False), (100, 10050, 2.0, False), (100, 10400, 1.0, True)],  # one DOM
        [(s, 12000, 1.0, False) for s in (100, 101, 102, 160, 161, 700)],   # all pulses at one time
        [(s, 10000 + 37 * s, 1.0, True) for s in (5, 900, 1800, 2700)],      # only auxiliary pulses
        [(s, 10000 + 50 * k, 1.0, False) for k, s in enumerate(range(1000, 1030))],  # a normal-ish event
        [(s, 10000 + 50 * k, 0.0, False) for k, s in enumerate(range(1000, 1030))],  # no charge (prepare takes 0)
    ])
    for method in C.METHODS:
        d = C.reconstruct(method, ev, geo)
        assert d.shape == (6, 3) and d.dtype == np.float64 and np.isfinite(d).all(), method
        assert np.allclose(np.linalg.norm(d, axis=1), 1.0), method
        az, zen = C.vector_to_angles(d)
        assert np.isfinite(az).all() and np.isfinite(zen).all()
        assert ((az >= 0) & (az < 2 * np.pi) & (zen >= 0) & (zen <= np.pi)).all(), method


def test_mpe_fit_with_light_emitted_beyond_the_ice_table():
    # a DOM 3 km from a vertical track: its photon left the track ~3.5 km above the detector, past the ends of
    # the ice table, where float32 once rounded the clamped table position up to an index beyond the last row
    assert C.MPE_DTYPE == 'float32' and C.MPE_ICE == 'toy'
    z = np.linspace(-400, 400, 40)
    pos = np.concatenate([np.stack([np.zeros(40), np.full(40, 20.0), z], 1), [[3000.0, 0.0, 0.0]]])
    time = np.r_[10000 + (400 - z) / C.C_VACUUM, 30000.0]
    seeds = np.tile([[[0.0, 0.0, 1.0]]], (1, 2, 1))  # the muon goes straight down
    near = (pos, np.ones(41), np.arange(41), np.full(41, 3.0), np.array([0, 41]))
    for refine in (None, near):  # the time fit, then with the charge refinement too
        direction, ll = C.mpe_fit(pos, time, np.full(41, 3.0), np.array([0, 41]), seeds, steps=5, near=refine)
        assert np.isfinite(direction).all() and np.isfinite(ll).all()


def test_the_likelihood_fits_time_each_dom_by_its_first_pulse():
    """The quick fit is a first-photon likelihood: each DOM's time is its first pulse's. Later pulses on the DOMs
    (auxiliary here, so that the LineFit seeds are the same, and with the DOM's total charge unchanged) change
    nothing; a fit timed by a DOM's last pulse would move."""
    torch.manual_seed(0)
    ev, _ = track_events(3, np.random.default_rng(5))
    n = len(ev['time'])
    dom = np.repeat(np.arange(n), 2)  # each DOM: its pulse, then one 50-1000 ns later with half a pe of its charge
    late = np.tile([0, 1], n).astype(bool)
    charge = np.where(late, 0.5, ev['charge'][dom] - 0.5)
    delay = np.random.default_rng(7).integers(50, 1000, 2 * n) * late
    ev2 = {'sensor_id': ev['sensor_id'][dom], 'time': ev['time'][dom] + delay, 'charge': charge, 'auxiliary': late,
           'pulse_offsets': 2 * ev['pulse_offsets'], 'event_dom_offsets': ev['event_dom_offsets'],
           'dom_offsets': 2 * ev['dom_offsets']}
    one, two = C.time_fit(ev, make_geometry(), steps=10), C.time_fit(ev2, make_geometry(), steps=10)
    assert C.angular_error(one[0], two[0]).max() < 1e-6
    np.testing.assert_allclose(one[1], two[1], rtol=1e-5)


def test_the_fits_over_chunks_of_events_are_those_of_one_call(monkeypatch):
    """The quick fit runs its LineFit seeds over chunks of CHUNK_PULSES pulses and the likelihood over chunks of
    MPE_CHUNK_DOMS DOMs (a prepare.py call holds up to a million pulses): each event's fit is the same whichever chunk
    it falls in, none dropped or read with another chunk's offsets."""
    torch.manual_seed(0)
    ev, _ = track_events(5, np.random.default_rng(6))
    whole = C.time_fit(ev, make_geometry(), steps=10)
    monkeypatch.setattr(C, 'CHUNK_PULSES', 250)  # one pulse per DOM here
    monkeypatch.setattr(C, 'MPE_CHUNK_DOMS', 250)
    doms = np.diff(ev['event_dom_offsets'])
    assert doms.max() > 250 and doms.min() < 125, doms  # an event over a chunk alone, and chunks of several
    chunked = C.time_fit(ev, make_geometry(), steps=10)
    assert C.angular_error(whole[0], chunked[0]).max() < 1e-5
    np.testing.assert_allclose(whole[1], chunked[1], rtol=1e-4)
