"""
Classical direction reconstruction: the baselines a learned model has to beat.

All functions work on a whole batch of events at once (numpy or torch, vectorised; loops only over a fixed
number of iterations or chunks). Pulses of all events are concatenated; event j owns pulses
[event_offsets[j], event_offsets[j+1]). Directions are unit vectors of where the neutrino COMES FROM (the
Kaggle convention): x = cos(az) sin(zen), y = sin(az) sin(zen), z = cos(zen); the particle travels along minus
that vector.

    linefit           plain LineFit: least-squares line r(t) = r0 + v t through the pulses, closed form.
                      Fast, but every scattered (late) photon pulls the line, so it is biased on tracks and
                      near random on cascades.
    linefit_improved  the robust LineFit of IceCube (Aartsen et al., NIM A 736 (2014) 143): (1) delay cleaning
                      drops a pulse that comes more than DELAY_NS after what light from a neighbouring DOM
                      (within DELAY_RADIUS) could explain, the signature of a photon delayed by scattering;
                      (2) a Huber-weighted fit (iteratively reweighted least squares: pulses further than
                      HUBER_M from the line count linearly, not quadratically); (3) a last plain fit without
                      the pulses still further than OUTLIER_M from the line. linefit_improved_packed is the same
                      over pulses packed from many events (torch), which prepare.py runs on every shard
                      (linefit_seeds) and stores with each event as the model's first seed.
    mpe_fit           maximum-likelihood fit of a muon track to the hit DOMs, in two stages.
                      (1) Times: an infinite track (vertex, time, direction) fitted to the first pulse time of
                      each hit DOM. Cherenkov light from the track reaches a DOM at perpendicular distance d
                      directly at t_geo = t0 + (d_along + 0.9173 d) / c; scattering only delays it, by t_res >= 0
                      distributed as the Pandel function, a Gamma distribution with shape xi = r / PANDEL_LAMBDA
                      (r = d / sin theta_c, the photon path) and rate b = 1/tau + c_ice/lambda_a. A DOM that saw N
                      photoelectrons records the FIRST of N photons: the "MPE" density N p1(t) (1 - P1(t))^(N-1),
                      far sharper than one photon's p1 when N is large. The Pandel shape uses the effective distance
                      d_eff = r * 33.3 m / l_scat, l_scat the effective scattering length averaged along the
                      photon's path from its emission point on the track to the DOM (MPE_ICE, ice_table). Times
                      within the PMT jitter of t_geo (and earlier, which Pandel forbids) are patched by a Gaussian of
                      width MPE_JITTER_NS, and a noise floor keeps a stray noise hit from vetoing the true track.
                      Seeded from both LineFits plus tilted copies, optimised with Adam for all events and seeds at
                      once in torch.
                      (2) Charge (MPE_AMPLITUDE): each seed's fit is refined with, added to the times, the Poisson
                      likelihood of the charge of every DOM within MPE_AMP_RADIUS of the track, hit or not: the
                      expected photoelectrons fall as exp(-r / l_att) / sqrt(r) (l_att the diffuse attenuation
                      length along the path) times the PMT's acceptance for the light's direction, the event's
                      brightness profiled out. DOMs that see nothing near the track say where it is not. With
                      MPE_STARTING each fit is also refined as a starting track: no muon light before a vertex, and
                      a cascade there whose light (point-like, peaked on the Cherenkov cone) mixes with the muon's
                      at each DOM in the ratio of their expected charges. The best fit per event by likelihood wins.
    time_fit          the MPE fit's first stage alone, quick (TIME_FIT_STEPS, from the two LineFits): what prepare.py
                      stores with every event as the model's second seed.
    reconstruct       one entry point: reconstruct(method, ev, geometry) for ev = split.events(idx); METHODS.
    angles_to_vector, vector_to_angles   model.py's, imported here for convenience
    angular_error     angle between two sets of directions, radians (the Kaggle metric per event)

Ice (MPE_ICE). Like IceCube's own fits, the likelihood fit takes a depth table of the ice: the Pandel distance of
each DOM is scaled by the effective scattering length averaged over depth along the photon path (exactly the
convention of simulate.py, whose d_eff = r * 33.3 m * <1/l_scat>; the Pandel time scale stays the bulk one).
  'toy'   simulate.py's own scattering_length(z): the table the synthetic data were made with (the default).
  'bulk'  one homogeneous ice, l_scat = PANDEL_LAMBDA = 33.3 m everywhere (the classic Pandel fit).
  a path  for real data: a text/CSV file of rows 'z, l_scat' (z in m in the detector's coordinates, as
          sensor_geometry; l_scat the effective scattering length in m), e.g. derived from IceCube's SPICE tables
          (b_e(400) per depth layer: l_scat = 1 / b_e; convert depth below surface to z with z = 1948.07 m - depth).
          Until such a table is plugged in, use 'bulk' on real data: the toy table is not real ice.
The charge likelihood also needs the attenuation of diffuse light, sqrt(l_abs l_scat / 3): 'toy' takes simulate.py's
absorption_length(z); a table file may give l_abs as a third column (else PANDEL_LAMBDA_A); 'bulk' uses
BULK_ATTENUATION. Its expected charges follow simulate.py's light model (its docstring's Physics), which is IceCube's
in shape only: on real data the charge likelihood is as approximate as the ice table behind it.
Real ice is more complex still (tilted layers, anisotropy, hole ice), so even a tabulated fit stays approximate,
as IceCube's Pandel-based fits are; they remain the standard first likelihood reconstruction all the same.
"""

import math

import numpy as np
import torch

from model import angles_to_vector, vector_to_angles  # noqa: F401  (one copy of the angle convention)
from model import C_VACUUM, TRACK_DELAY_FACTOR  # the model's features use them too
from model import sum_by, take  # take: x[index] by index_select, it and its backward several times faster on the CPU

# -----------------------------------------------------------------------------
# settings
# ice and Cherenkov light (the numbers simulate.py uses; its docstring's Physics)
# (C_VACUUM, the muon's speed in m/ns, and TRACK_DELAY_FACTOR, Cherenkov light's extra path, are model.py's)
N_GROUP = 1.356
C_ICE = C_VACUUM / N_GROUP  # 0.2210 m/ns, photons in ice
SIN_CHERENKOV = math.sin(math.radians(40.7))
COS_CHERENKOV = math.cos(math.radians(40.7))
PANDEL_TAU, PANDEL_LAMBDA, PANDEL_LAMBDA_A = 556.7, 33.3, 98.0  # ns, m (scattering), m (absorption)
PANDEL_RATE = 1.0 / PANDEL_TAU + C_ICE / PANDEL_LAMBDA_A  # 1/ns, the Gamma rate b
BULK_ATTENUATION = math.sqrt(PANDEL_LAMBDA_A * PANDEL_LAMBDA / 3.0)  # m, diffuse light in 'bulk' ice
# the improved LineFit (linefit_improved; prepare.py stores it with every event, the model's first seed)
DELAY_RADIUS = 156.0  # m: neighbours considered by the delay cleaning
DELAY_NS = 150.0      # ns of lateness beyond direct light from a neighbour that marks a scattered photon
DELAY_MAX_REFS = 32   # neighbours per event to compare with: its least-late DOMs (bounds the pair count)
HUBER_M = 153.0       # m: residual beyond which a pulse's pull grows linearly
HUBER_ITERS = 2       # 1, 3 and 5 gave the same directions on toy val events
OUTLIER_M = 150.0     # m: pulses still further from the Huber line are left out of the final fit
# MPE likelihood fit
MPE_JITTER_NS = 10.0  # patch width: PMT jitter plus the slack of a simple ice model
MPE_NOISE_DENSITY = 1e-6  # per ns: floor of a DOM's likelihood (a noise hit, or light the model cannot explain)
MPE_MAX_NPE = 64  # cap on N: charge is not exact, and a saturated DOM's charge says little
MPE_AUX_DOMS = False  # also fit DOMs with only auxiliary pulses (isolated hits: far light, or noise)
MPE_MAX_DOMS = 300  # brightest DOMs per event used (bounds the cost of the biggest events)
MPE_SEED_TILT = 0.25  # rad: extra seeds tilt the improved LineFit direction by this much
MPE_EXTRA_SEEDS = 2  # tilted seeds (besides plain and improved LineFit)
MPE_STEPS = 250
MPE_LR_DIR, MPE_LR_POS, MPE_LR_TIME = 0.03, 5.0, 15.0  # Adam steps: rad, m, ns
MPE_CHUNK_DOMS = 60000  # DOMs per optimisation chunk (memory bound)
MPE_DTYPE = 'float32'  # float32 is about twice as fast as float64 and as accurate here
MPE_SHAPE_GRAD = False  # also differentiate log Q in the Pandel shape (a second gamma function call per step; no gain)
MPE_AMPLITUDE = True  # refine the fits with the charge of every DOM near the track, hit or not (Poisson)
MPE_AMP_RADIUS = 150.0  # m: DOMs within this distance of the track enter the charge likelihood
MPE_AMP_NOISE = 0.01  # pe a DOM sees from noise in an event, whatever the track
MPE_DEEPCORE_EFF = 1.35  # relative efficiency of the DeepCore DOMs (strings 79-86: sensor_id >= 4680)
MPE_STARTING = True  # the refinement also fits a starting track: a cascade at a vertex, the muon from there on
MPE_CASCADE_TURN = 1.2  # extra Pandel distance (scattering lengths) of cascade light turned 90 deg off its cone
MPE_CASCADE_SHIFT = 0.37  # scattering lengths ahead of the vertex from which a cascade's scattered light spreads
MPE_EDGE_M = 10.0  # m over which the muon's light switches on at the vertex (smooth, for the gradient)
MPE_REFINE_STEPS = 150
MPE_LR_VERTEX, MPE_LR_RATIO = 20.0, 0.1  # Adam steps: starting-track vertex along the track (m), log light ratio
MPE_ICE = 'toy'  # 'toy': simulate.py's depth-dependent ice; 'bulk': one Pandel scale; or a table file (see ice_table)
METHODS = ['linefit', 'linefit_improved', 'time_fit', 'mpe']
# the quick fit (time_fit) that prepare.py stores with every event, the model's second seed
TIME_FIT_STEPS = 80  # 40: 0.046 rad on bright tracks at 1.7x the speed; 250 (and tilted seeds): 0.031 at a sixth
TIME_FIT_FAILED = 99.0  # the rlogl stored where the fit failed (and its direction is the improved LineFit's)
# -----------------------------------------------------------------------------


def _event_mean(values, event_offsets):
    # mean over each event's pulses; values (P,) or (P, k). reduceat needs non-empty events, checked by the caller
    sums = np.add.reduceat(values, event_offsets[:-1], axis=0)
    counts = np.diff(event_offsets).astype(np.float64)
    return sums / (counts[:, None] if sums.ndim == 2 else counts)


def _check(pos, time, event_offsets, name):
    pos = np.asarray(pos, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    event_offsets = np.asarray(event_offsets, dtype=np.int64)
    if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) != len(time):
        raise ValueError(f"{name}: pos must be (P, 3) and time (P,), got {pos.shape} and {time.shape}")
    if event_offsets[0] != 0 or event_offsets[-1] != len(time) or np.any(np.diff(event_offsets) <= 0):
        raise ValueError(f"{name}: event_offsets must start at 0, end at the pulse count and give every event a pulse")
    return pos, time, event_offsets


def linefit(pos, time, event_offsets):
    """Plain LineFit. pos (P, 3) metres, time (P,) ns, event_offsets (n_events + 1,) int64.
    Returns (n_events, 3) float64 unit vectors of the direction the neutrino comes from.
    The fitted velocity is v = (<r t> - <r><t>) / (<t^2> - <t>^2); the particle moves along v, so the
    neutrino comes from -v. Events whose pulses all share one time, or whose fit velocity is zero,
    get the finite fallback (0, 0, 1)."""
    pos, time, event_offsets = _check(pos, time, event_offsets, 'linefit')
    n_pulses = np.diff(event_offsets)
    # centre times per event first: t is ~1e4 ns, so <t^2> - <t>^2 straight from raw times loses precision
    t = time - np.repeat(_event_mean(time, event_offsets), n_pulses)
    # with <t> = 0 the <r><t> term vanishes: v = <r t> / <t^2>
    mean_rt = _event_mean(pos * t[:, None], event_offsets)
    var_t = _event_mean(t * t, event_offsets)
    v = mean_rt / np.where(var_t > 0, var_t, 1.0)[:, None]
    v[var_t <= 0] = 0.0
    return _direction_from_velocity(v)


def _direction_from_velocity(v, fallback=None):
    speed = np.linalg.norm(v, axis=1)
    direction = np.tile(np.array([0.0, 0.0, 1.0]), (len(v), 1)) if fallback is None else fallback.copy()
    ok = speed > 0
    direction[ok] = -v[ok] / speed[ok, None]
    return direction


# -----------------------------------------------------------------------------
# the improved LineFit over pulses packed from many events (torch): linefit_improved runs it on a batch of events,
# prepare.py (linefit_seeds) on every shard, whose stored fits the model reads as its seed

def weighted_line(pos, t, w, event, n_events):
    """Weighted least-squares line r = r_mean + v (t - t_mean) per event, in torch over concatenated points
    (pos (P, 3), t (P,), weights w (P,), event (P,) in 0..n_events-1). Returns the velocity v (n_events, 3),
    v = <(r - <r>)(t - <t>)> / <(t - <t>)^2> (zero for an event whose weighted times all agree), and each point's
    distance from its event's line, its lateness against it (time minus the time the line passes closest) too."""
    def per_event(x):
        return sum_by(event, x, n_events)

    ws = per_event(w).clamp(min=1e-12)
    tc = t - take(per_event(w * t) / ws, event)
    rc = pos - take(per_event(w[:, None] * pos) / ws[:, None], event)
    var_t = per_event(w * tc * tc)
    v = torch.where(var_t[:, None] > 0, per_event((w * tc)[:, None] * rc) / var_t.clamp(min=1e-12)[:, None], 0.0)
    v_p = take(v, event)
    residual = torch.linalg.vector_norm(rc - v_p * tc[:, None], dim=1)
    lateness = tc - (rc * v_p).sum(1) / take((v * v).sum(1).clamp(min=1e-12), event)
    return v, residual, lateness


def linefit_improved_packed(pos, t, w, event, dom, dom_pos, n_events, n_doms):
    """The improved LineFit in torch, over pulses concatenated from many events (as prepare.py has them per shard):
    pulse positions pos (P, 3), times t (P,), weights w (P,) (those above 0.5 count as hits; the cleaning keeps hits
    only, so the rest weigh in, with w, in the plain LineFit alone and in an event left with fewer than 3 pulses),
    event (P,) and DOM slot dom (P,) indices, DOM positions dom_pos (n_doms, 3). Delay cleaning
    compares each DOM with its event's DELAY_MAX_REFS least-late DOMs against the plain LineFit (the least delayed
    hits, spread along the track; this bounds the pairs to n_doms x DELAY_MAX_REFS) and with itself: a pulse goes
    when it comes more than DELAY_NS after direct light from one of their first hits could. An event left with
    fewer than 3 pulses keeps them all. DOM slots without pulses count as the last event's (a micro-batch's padding
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
    j = take(refs, dom_event)
    dist = torch.linalg.vector_norm(dom_pos[:, None, :] - take(dom_pos, j.clamp(min=0)), dim=2)
    arrival = torch.where((j >= 0) & (dist < DELAY_RADIUS), take(first_t, j.clamp(min=0)) + dist / C_VACUUM, math.inf).amin(1)
    delayed = t > take(torch.minimum(arrival, first_t) + DELAY_NS, dom)

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


def linefit_seeds(pos, t, aux, event, dom, dom_pos, n_events):
    """The two LineFits the model leans on, over the pulses of many events (torch, any float dtype; prepare.py runs
    this in float64 over each shard and stores the results with every event and pulse, so a batch costs none of it):
    the plain LineFit over the non-auxiliary pulses (the auxiliary ones weigh 1e-3), as a classical reconstruction
    would seed a likelihood fit, and the improved LineFit (linefit_improved_packed; on toy val events 4-5 deg closer
    than the plain one). Pulse positions pos (P, 3), times t (P,), aux (P,) 1.0 for auxiliary pulses, event (P,) and
    DOM dom (P,) indices, DOM positions dom_pos (n_doms, 3). Returns the plain fit's velocity (n_events, 3) in m/ns,
    the improved fit's direction the neutrino comes from (n_events, 3; zero where the fit has no velocity), and each
    pulse's direct flag (P,): 1.0 for those of the improved fit's final fit (its delay cleaning drops scattered
    light, its outlier cut far pulses)."""
    w = 1.0 - aux + 1e-3
    v_i, direct, v = linefit_improved_packed(pos, t, w, event, dom, dom_pos, n_events, len(dom_pos))
    return v, -v_i / torch.linalg.vector_norm(v_i, dim=1).clamp(min=1e-6)[:, None], direct


# pulses per chunk of linefit_improved: its delay cleaning's (DOMs, DELAY_MAX_REFS) arrays then stay in the CPU's
# cache (chunks of 2,000 toy events, ~300,000 pulses, ran at about a third of the speed; prepare.linefit_seeds)
CHUNK_PULSES = 16384


def chunk_bounds(offsets, size):
    """Chunks of whole events of about size items (pulses or DOMs), from the events' offsets into them: the last
    event boundary at or before each multiple of size, then the end (an event larger than a chunk is one alone)."""
    return np.unique(np.r_[np.searchsorted(offsets, np.arange(0, offsets[-1], size), 'right') - 1, len(offsets) - 1])


def linefit_improved(pos, time, event_offsets, dom=None):
    """Improved LineFit (delay cleaning, Huber-weighted fit, refit without outliers), same arguments and output as
    linefit. dom (P,) identifies the DOM of each pulse (sensor_id); by default pulses at one position share a DOM.
    Runs linefit_improved_packed in float64 over chunks of whole events of about CHUNK_PULSES pulses."""
    pos, time, event_offsets = _check(pos, time, event_offsets, 'linefit_improved')
    n_events = len(event_offsets) - 1
    event = np.repeat(np.arange(n_events), np.diff(event_offsets))
    if dom is None:
        dom = np.unique(pos, axis=0, return_inverse=True)[1].ravel()
    t = time - np.repeat(_event_mean(time, event_offsets), np.diff(event_offsets))  # small numbers, for precision
    v = np.zeros((n_events, 3))
    bounds = chunk_bounds(event_offsets, CHUNK_PULSES)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        p = slice(event_offsets[lo], event_offsets[hi])
        # one DOM slot per (event, DOM)
        key = (event[p] - lo) * (int(np.max(dom[p], initial=0)) + 1) + np.asarray(dom[p], np.int64)
        _, slot = np.unique(key, return_inverse=True)
        dom_pos = np.zeros((slot.max(initial=-1) + 1, 3))
        dom_pos[slot] = pos[p]
        v[lo:hi] = linefit_improved_packed(*map(torch.from_numpy, (pos[p], t[p], np.ones(len(slot)), event[p] - lo,
                                                                    slot.ravel(), dom_pos)), hi - lo, len(dom_pos))[0].numpy()
    return _direction_from_velocity(v, fallback=linefit(pos, time, event_offsets))


# -----------------------------------------------------------------------------
# the MPE likelihood fit
# mpe_fit runs _mpe_chunk on chunks of events; its pieces, each checkable against the physics on its own:
#   _time_rows, _charge_rows      the data: each DOM once per group (event x hypothesis x seed)
#   _seed_tracks                  where each infinite track starts (seed direction, charge centre, early t0)
#   _starting_vertex              where a starting track's vertex and its cascade's brightness start
#   _muon_light, _log_light       the muon's direct light (delay, Pandel shape) and how much of it a DOM sees
#   _vertex_cascade_light         the starting track's cascade at its vertex
#   _time_log_likelihood          first-photon Pandel likelihood of each hit DOM's first pulse time
#   _charge_log_likelihood        Poisson likelihood of the charge of every DOM near the track, hit or not
#   _fit_loop, _best_fit          Adam on all groups at once; the most likely fit per event

class _LogQ(torch.autograd.Function):
    """log Q(a, x), Q the regularised upper incomplete gamma function: the chance that a photon's Pandel delay
    exceeds x / b. torch differentiates gammaincc in x only; the a-derivative here is a forward difference."""

    @staticmethod
    def forward(ctx, a, x):
        q = torch.special.gammaincc(a, x)
        log_pdf = (a - 1) * torch.log(x) - x - torch.lgamma(a)
        # deep in the tail Q underflows; its leading asymptotic term x^(a-1) e^-x / Gamma(a) takes over
        tiny = torch.finfo(q.dtype).tiny
        log_q = torch.where(q > 1e6 * tiny, torch.log(q.clamp_min(tiny)), log_pdf)
        ctx.save_for_backward(a, x, log_q, log_pdf)
        return log_q

    @staticmethod
    def backward(ctx, grad):
        a, x, log_q, log_pdf = ctx.saved_tensors
        d_x = -torch.exp(log_pdf - log_q)  # dQ/dx = -x^(a-1) e^-x / Gamma(a)
        if not MPE_SHAPE_GRAD:
            return None, grad * d_x
        tiny = torch.finfo(a.dtype).tiny
        h = (1e-5 if a.dtype == torch.float64 else 3e-3) * (1.0 + a)
        q_h = torch.special.gammaincc(a + h, x)
        d_a = torch.where(q_h > 1e6 * tiny, (torch.log(q_h.clamp_min(tiny)) - log_q) / h, torch.log(x) - torch.digamma(a))
        return grad * d_a, grad * d_x


def ice_table(ice=None):
    """The ice for the fit: (z (K,) m on a uniform grid, ascending; 1 / l_scat (K,) 1/m; 1 / l_att (K,) 1/m), with
    l_scat the effective scattering length and l_att the attenuation length of diffuse light,
    sqrt(l_abs l_scat / 3); or None for 'bulk' (PANDEL_LAMBDA and BULK_ATTENUATION everywhere). ice: MPE_ICE."""
    ice = MPE_ICE if ice is None else ice
    if ice == 'bulk':
        return None
    z = np.arange(-1500.0, 1500.0 + 0.5, 1.0)
    if ice == 'toy':
        from simulate import absorption_length, scattering_length  # the toy ice the synthetic data were made with
        l_scat, l_abs = scattering_length(z), absorption_length(z)
    else:
        table = np.loadtxt(ice, delimiter=',' if str(ice).endswith('.csv') else None, comments='#', ndmin=2)
        table = table[np.argsort(table[:, 0])]  # rows: z (m, detector coordinates), l_scat (m)[, l_abs (m)]
        l_scat = np.interp(z, table[:, 0], table[:, 1])
        l_abs = np.interp(z, table[:, 0], table[:, 2]) if table.shape[1] > 2 else np.full_like(z, PANDEL_LAMBDA_A)
    return z, 1.0 / l_scat, 1.0 / np.sqrt(l_abs * l_scat / 3.0)


def log_photon(t_res, xi, rows=None):
    """One photon's log-density and log-survival under the Pandel delay distribution of shape xi (the photon path in
    scattering lengths), at residual t_res (ns) after direct light, patched below ~MPE_JITTER_NS: softplus maps t_res
    to a positive time that equals t_res well above the jitter and shrinks to ~0 below it, and a Gaussian term
    penalises light earlier than direct light, as the jitter convolution would. A DOM that saw n photons records the
    first: log n + log density + (n - 1) log survival. rows: the entries whose survival is wanted (the rest have n = 1),
    the survival then of those alone: its incomplete gamma function was a quarter of the time fit's time."""
    sigma = MPE_JITTER_NS
    t = (sigma * torch.nn.functional.softplus(t_res / sigma)).clamp_min(1e-6)
    x = PANDEL_RATE * t
    log_p1 = xi * math.log(PANDEL_RATE) + (xi - 1) * torch.log(t) - x - torch.lgamma(xi)
    if rows is not None:
        xi, x = take(xi, rows), take(x, rows)
    return log_p1 - 0.5 * (t_res.clamp_max(0) / sigma) ** 2, _LogQ.apply(xi, x)


def _tilted(direction, angle, phase):
    # rotate unit vectors by `angle` towards a perpendicular picked by `phase`
    helper = np.where(np.abs(direction[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = np.cross(direction, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(direction, e1)
    return math.cos(angle) * direction + math.sin(angle) * (math.cos(phase) * e1 + math.sin(phase) * e2)


def mpe_fit(dom_pos, dom_time, dom_npe, event_dom_offsets, seeds, device='cpu', steps=None, near=None, ice=None):
    """Fit a muon track to the first pulse time of each hit DOM, for many events at once.
    dom_pos (D, 3) m, dom_time (D,) ns (first pulse), dom_npe (D,) charge in pe, event_dom_offsets (n_events + 1,),
    seeds (n_events, S, 3) neutrino directions to start from. First every seed is fitted as an infinite track to the
    times alone. With near = (geometry (n_sensors, 3), efficiency (n_sensors,), hit_sensor (H,), hit_charge (H,),
    event_hit_offsets (n_events + 1,)): every DOM of the detector and the charge each event's DOMs saw (all pulses),
    each of these fits is then refined, adding the charge likelihood of the DOMs within MPE_AMP_RADIUS of the best
    one, hit or not, as an infinite and (MPE_STARTING) as a starting track. ice: ice_table's (None = MPE_ICE).
    Returns (n_events, 3) float64 unit vectors (where the neutrino comes from) and the best log-likelihood per
    event (of the last stage)."""
    steps = MPE_STEPS if steps is None else steps
    dom_pos, dom_time = np.asarray(dom_pos, np.float64), np.asarray(dom_time, np.float64)
    event_dom_offsets, seeds = np.asarray(event_dom_offsets, np.int64), np.asarray(seeds, np.float64)
    n_events = len(seeds)
    out, best_ll = seeds[:, 0].copy(), np.full(n_events, -np.inf)
    ends = event_dom_offsets[1:]
    cuts = np.unique(np.r_[0, np.searchsorted(ends, np.arange(MPE_CHUNK_DOMS, ends[-1], MPE_CHUNK_DOMS), 'right'), n_events])
    # the likelihood's far tails (noise floor, underflowing Gamma tails) fill the tensors with subnormal numbers,
    # which make CPU arithmetic ~50x slower: flush them to zero during the fit (torch's global switch, reset after).
    # The switch holds for the calling thread only, so the fit runs on that one thread (torch's intra-op threads
    # would compute with subnormals: a 2-thread fit was far slower than this 1-thread one)
    flush = str(device).startswith('cpu')
    if flush:
        n_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
    try:
        for lo, hi in zip(cuts[:-1], cuts[1:]):  # chunks of events, to bound memory
            a, b = event_dom_offsets[lo], event_dom_offsets[hi]
            doms = (dom_pos[a:b], dom_time[a:b], np.asarray(dom_npe[a:b], np.float64), event_dom_offsets[lo:hi + 1] - a)
            direction, ll, track, fits = _mpe_chunk(*doms, seeds[lo:hi], device, steps, ice)
            if near is not None:
                amp = _near_doms(near, lo, hi, *track[:2])
                direction, ll, _, _ = _mpe_chunk(*doms, fits[1], device, MPE_REFINE_STEPS, ice, amp, fits)
            out[lo:hi], best_ll[lo:hi] = direction, ll
    finally:
        if flush:
            torch.set_flush_denormal(False)
            torch.set_num_threads(n_threads)
    return out, best_ll


def _near_doms(near, lo, hi, point, direction):
    """The DOMs within MPE_AMP_RADIUS of each track (point, neutrino direction) of events lo..hi-1, hit or not:
    their positions, efficiencies, the charge each saw, and offsets per event."""
    geometry, efficiency, hit_sensor, hit_charge, hit_offsets = near
    n_sensors = len(geometry)
    rows = []
    for k in range(0, len(point), 256):  # (events, sensors) distances, 256 events at a time
        rel = geometry[None] - point[k:k + 256, None]
        along = (rel * direction[k:k + 256, None]).sum(2)
        e, s = np.nonzero((rel * rel).sum(2) - along * along < MPE_AMP_RADIUS ** 2)
        rows.append((e + k) * n_sensors + s)
    rows = np.concatenate(rows)  # sorted by event, then sensor
    hit_event = np.repeat(np.arange(hi - lo), np.diff(hit_offsets[lo:hi + 1]))
    hit_key = hit_event * n_sensors + hit_sensor[hit_offsets[lo]:hit_offsets[hi]]
    at = np.searchsorted(rows, hit_key).clip(0, max(len(rows) - 1, 0))
    inside = (rows[at] == hit_key) if len(rows) else np.zeros(len(hit_key), bool)
    charge = np.bincount(at[inside], hit_charge[hit_offsets[lo]:hit_offsets[hi]][inside], len(rows))
    sensor = rows % n_sensors
    return geometry[sensor], efficiency[sensor], charge, np.r_[0, np.cumsum(np.bincount(rows // n_sensors, minlength=hi - lo))]


def _mpe_chunk(pos, time, npe, offsets, seeds, device, steps, ice, amp=None, start=None):
    """Fit one chunk of events from seeds (n_events, S, 3); amp: the DOMs near the track (_near_doms) for the charge
    likelihood; start: (point (n_events, S, 3), direction, t0 (n_events, S)), the previous stage's fits of the
    seeds, to start from. Returns the best direction and log-likelihood per event, its track as (point, neutrino
    direction, t0), and every seed's fit as start takes it."""
    n_events, n_dirs = seeds.shape[:2]
    fit_kw = dict(dtype=getattr(torch, MPE_DTYPE), device=device)  # every tensor of the fit: MPE_DTYPE, on device
    # one group per (event, hypothesis, seed): with the charge likelihood and MPE_STARTING every seed is fitted as
    # an infinite and as a starting track; every DOM appears once per group
    starting_too = amp is not None and MPE_STARTING
    n_seeds = n_dirs * (2 if starting_too else 1)
    hits, centre, t_ref = _time_rows(pos, time, npe, offsets, n_seeds, fit_kw)
    centre_g = torch.as_tensor(np.repeat(centre, n_seeds, 0), **fit_kw)
    starting = torch.as_tensor(np.tile(np.arange(n_seeds) >= n_dirs, n_events), device=device)
    near = None if amp is None else _charge_rows(amp, n_seeds, fit_kw)
    path_mean = _ice_path_mean(fit_kw, ice)
    params = _seed_tracks(seeds, start, hits, centre_g, t_ref, n_seeds, path_mean, fit_kw)
    params['s_vertex'], params['log_ratio'] = _starting_vertex(params, starting, hits, centre_g, starting_too, fit_kw)

    def log_likelihood():
        unit, ref = _track(params['u'], params['shift'], centre_g)
        ll = _time_log_likelihood(hits, unit, ref, params, path_mean, starting_too, len(centre_g))
        if near is not None:
            ll = ll + _charge_log_likelihood(near, unit, ref, params, path_mean, starting_too, len(centre_g))
        return ll
    _fit_loop(params, starting, steps, log_likelihood)
    with torch.no_grad():
        ll = log_likelihood()
    return _best_fit(ll, params, centre_g, seeds, centre, t_ref, fit_kw)


def _group_rows(ev_of_row, n_seeds, device):
    # one entry per (row, seed) pair, sorted by group = event * n_seeds + seed: its group and the row it reads
    g = (ev_of_row[:, None] * n_seeds + np.arange(n_seeds)).ravel()
    r = np.repeat(np.arange(len(ev_of_row)), n_seeds)
    o = np.argsort(g, kind='stable')
    return torch.as_tensor(g[o], device=device), torch.as_tensor(r[o], device=device)


def _columns(v, rows):
    # vectors v (n, 3) -> those of rows as (3, len(rows)), a coordinate per contiguous row: the fit's dot products and
    # distances are then sums of three rows, where on (rows, 3) each sum over the last axis of 3 (forward and
    # backward) took ~3x as long, and the time fit 1.2x as long in all. index_select along the coordinates' axis,
    # as model.take along the first
    return v.t().contiguous().index_select(1, rows)


def _time_rows(pos, time, npe, offsets, n_seeds, fit_kw):
    """The time likelihood's data, each hit DOM once per group: position x (3, rows), first-pulse time t relative to
    its event's mean time t_ref, photon count n (charge rounded, 1..MPE_MAX_NPE) and the rows where it is over 1
    (many); and per event the charge centre and t_ref."""
    n_events = len(offsets) - 1
    n_doms = np.diff(offsets)
    event = np.repeat(np.arange(n_events), n_doms)
    # the track's reference point lives in the plane through the charge-weighted centre, perpendicular to the
    # track: the point along the track is degenerate with t0, so fixing it leaves a well-conditioned problem
    # an event without charge (prepare.py takes charge 0) weighs its DOMs alike: a NaN centre made NaN depths, which
    # the ice table's lookup turned into an index out of bounds
    wq = np.where((np.bincount(event, npe, n_events) > 0)[event], npe, 1.0)
    w = np.bincount(event, wq, n_events)
    centre = np.stack([np.bincount(event, wq * pos[:, k], n_events) for k in range(3)], 1) / w[:, None]
    t_ref = np.bincount(event, time, n_events) / n_doms  # times relative to the event mean, for precision
    group, dom = _group_rows(event, n_seeds, fit_kw['device'])
    n = torch.as_tensor(np.clip(np.round(npe), 1, MPE_MAX_NPE), **fit_kw)[dom]
    hits = dict(group=group, x=_columns(torch.as_tensor(pos, **fit_kw), dom), t=torch.as_tensor(time - t_ref[event], **fit_kw)[dom], n=n,
                many=torch.nonzero(n > 1)[:, 0])
    return hits, centre, t_ref


def _charge_rows(amp, n_seeds, fit_kw):
    """The charge likelihood's data, each DOM near the track (_near_doms) once per group: position x (3, rows),
    efficiency eff, charge; and the total charge per group."""
    amp_pos, amp_eff, amp_charge, amp_offsets = amp
    n_events = len(amp_offsets) - 1
    group, row = _group_rows(np.repeat(np.arange(n_events), np.diff(amp_offsets)), n_seeds, fit_kw['device'])
    charge = torch.as_tensor(amp_charge, **fit_kw)[row]
    return dict(group=group, x=_columns(torch.as_tensor(amp_pos, **fit_kw), row), eff=torch.as_tensor(amp_eff, **fit_kw)[row],
                charge=charge, q_total=torch.zeros(n_events * n_seeds, **fit_kw).index_add_(0, group, charge))


def _ice_path_mean(fit_kw, ice=None):
    """path_mean(which, z_from, z_to): the mean of 1 / l_scat (which 0) or of 1 / l_att (which 1) along the path
    from depth z_from to a DOM at depth z_to, in the ice ice_table(ice) (None: MPE_ICE)."""
    ice = ice_table(ice)
    if ice is None:
        return lambda which, z_from, z_to: 1.0 / (PANDEL_LAMBDA, BULK_ATTENUATION)[which]
    # path averages of 1/l_scat and 1/l_att from a point to a DOM: (G(z_dom) - G(z_from)) / (z_dom - z_from),
    # G the integral over depth, linear between grid points (so differentiable in z_from)
    z_grid, z0, dz = ice[0], float(ice[0][0]), float(ice[0][1] - ice[0][0])
    tables = [(torch.as_tensor(np.r_[0.0, np.cumsum(0.5 * (inv[1:] + inv[:-1]) * dz)], **fit_kw), torch.as_tensor(inv, **fit_kw))
              for inv in ice[1:]]

    def interp(table, z):
        s = ((z - z0) / dz).clamp(0, len(z_grid) - 1)
        k = s.detach().floor().long().clamp_max(len(z_grid) - 2)  # in float32, len - 1.000001 rounds up to len - 1
        f = s - k
        return take(table, k) * (1 - f) + take(table, k + 1) * f

    def path_mean(which, z_from, z_to):
        cum, inv = tables[which]
        span = z_to - z_from
        near = span.abs() < 1.0
        safe = torch.where(near, torch.ones_like(span), span)
        return torch.where(near, interp(inv, 0.5 * (z_to + z_from)), (interp(cum, z_to) - interp(cum, z_from)) / safe)
    return path_mean


def _track(u, shift, centre_g):
    # unit vectors along the muon, and each track's reference point: in the plane through the charge centre across it
    unit = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return unit, centre_g + shift - (shift * unit).sum(1, keepdim=True) * unit


def _muon_light(xr, ug, refg, path_mean):
    """The muon's direct Cherenkov light at DOMs xr, the track along ug through refg ((3, rows), a column each): the
    delay of direct light (ns after t0) and its Pandel shape xi (simulate.py's Physics); and for its amount
    rel = xr - refg, where the photon left the track (s_emit, m along it from refg), its path r, z_emit, and the mean
    1 / l_scat."""
    rel = xr - refg
    along = (rel * ug).sum(0)
    d_perp = torch.sqrt(((rel * rel).sum(0) - along ** 2).clamp_min(1e-6)) + 1.0  # metre softening: no 1/d at 0
    s_emit = along - d_perp * (COS_CHERENKOV / SIN_CHERENKOV)  # where the photon left the track
    r = d_perp / SIN_CHERENKOV
    z_emit = refg[2] + s_emit * ug[2]
    inv_scat = path_mean(0, z_emit, xr[2])
    return dict(delay=(along + TRACK_DELAY_FACTOR * d_perp) / C_VACUUM, xi=r * inv_scat), rel, s_emit, r, z_emit, inv_scat


def _log_light(xr, r, inv_scat, z_from, power, path_mean):
    # the toy's expected photoelectrons, up to a scale: exp(-r / l_att) / r^power times the PMT's acceptance
    # of light arriving from z_from (0 going down, 1 going up), washed out towards isotropy by scattering;
    # and the unscattered share of the light, exp(-r / l_scat)
    direct = torch.exp(-r * inv_scat)
    cos_up = ((xr[2] - z_from) / r).clamp(-1, 1)
    acceptance = direct * (0.26 + 0.5 * cos_up + 0.24 * cos_up ** 2) + (1 - direct) * (0.26 + 0.24 / 3)
    return -r * path_mean(1, z_from, xr[2]) - power * torch.log(r) + torch.log(acceptance), direct


def _vertex_cascade_light(xr, gr, rel, ug, refg, sv, log_ratio, path_mean):
    """The starting-track hypothesis's cascade at the vertex sv (m along the track from refg) at DOMs xr: a point
    source at n_g r / c after the interaction (the muon reaches the vertex at t0 + s_vertex / c), its light peaked on
    the Cherenkov cone around the track's direction and, off the cone, delayed by MPE_CASCADE_TURN scattering lengths
    times (1 - cos of the angle to the cone); exp(log_ratio) times as bright as the muon. Its delay_c, xi_c and the
    log of its light, log_cascade."""
    rel_c = rel - sv * ug
    r_c = torch.sqrt((rel_c * rel_c).sum(0) + 1.0)
    cos_eta = (rel_c * ug).sum(0) / r_c
    z_vertex = refg[2] + sv * ug[2]
    inv_scat_c = path_mean(0, z_vertex, xr[2])
    log_c, direct = _log_light(xr, r_c, inv_scat_c, z_vertex, 1.0, path_mean)
    profile = 0.35 + 1.6 * torch.exp(-0.5 * ((cos_eta - COS_CHERENKOV) / 0.22) ** 2)
    # its scattered light spreads as from MPE_CASCADE_SHIFT scattering lengths ahead (simulate.py's cascade_light)
    shift = MPE_CASCADE_SHIFT / inv_scat_c
    r_soft = torch.sqrt(r_c * r_c + shift * shift)
    r_ahead = torch.sqrt((r_c * r_c - 2 * shift * r_c * cos_eta + 2 * shift * shift).clamp_min(1e-6))
    diffuse = r_soft / r_ahead * torch.exp(-(r_ahead - r_soft) * path_mean(1, z_vertex, xr[2]))
    turn = 1 - cos_eta * COS_CHERENKOV - torch.sqrt((1 - cos_eta ** 2).clamp_min(0)) * SIN_CHERENKOV
    return dict(delay_c=(sv + N_GROUP * r_c) / C_VACUUM, xi_c=r_c * inv_scat_c + MPE_CASCADE_TURN * turn,
                log_cascade=take(log_ratio, gr) + log_c + torch.log(direct * profile + (1 - direct) * diffuse))


def _light(xr, gr, unit, ref, params, path_mean, with_amplitude, starting_too):
    """Per (row, group): the muon's direct-light delay (ns after t0) and Pandel shape; with_amplitude also the
    log of the light it brings (relative), and for starting tracks the same three for the vertex cascade."""
    ug, refg = _columns(unit, gr), _columns(ref, gr)
    out, rel, s_emit, r, z_emit, inv_scat = _muon_light(xr, ug, refg, path_mean)
    if not with_amplitude:
        return out
    sv = take(params['s_vertex'], gr)
    # no muon light from before the vertex (far upstream for an infinite track)
    out['log_track'] = (torch.nn.functional.logsigmoid((s_emit - sv) / MPE_EDGE_M)
                        + _log_light(xr, r, inv_scat, z_emit, 0.5, path_mean)[0])
    if starting_too:
        out.update(_vertex_cascade_light(xr, gr, rel, ug, refg, sv, params['log_ratio'], path_mean))
    return out


def _time_log_likelihood(hits, unit, ref, params, path_mean, starting_too, n_groups):
    """Per group: the log-likelihood of each hit DOM's first pulse time, the first of its n photons, each delayed
    after direct light by a Pandel-distributed scattering time (log_photon), above a noise floor."""
    x, group, t, n, many = hits['x'], hits['group'], hits['t'], hits['n'], hits['many']
    # amplitudes (starting tracks only) to share the photons out between the muon and the cascade
    hit = _light(x, group, unit, ref, params, path_mean, starting_too, starting_too)
    t0 = take(params['t0'], group)
    log_f, log_s = log_photon(t - t0 - hit['delay'], hit['xi'], many)  # the survival only where n > 1
    if starting_too:  # each photon comes from the muon or the cascade, in the ratio of their light at the DOM
        log_f_c, log_s_c = log_photon(t - t0 - hit['delay_c'], hit['xi_c'], many)
        log_mu = torch.logaddexp(hit['log_track'], hit['log_cascade'])
        p_track, p_cascade = hit['log_track'] - log_mu, hit['log_cascade'] - log_mu
        log_f = torch.logaddexp(p_track + log_f, p_cascade + log_f_c)
        log_s = torch.logaddexp(take(p_track, many) + log_s, take(p_cascade, many) + log_s_c)
    # the first of n photons: log n + log density, plus (n - 1) log survival where n > 1 (the same sum)
    ll = (torch.log(n) + log_f).index_add(0, many, (take(n, many) - 1) * log_s)
    ll = torch.logaddexp(ll, torch.full_like(ll, math.log(MPE_NOISE_DENSITY)))
    return ll.new_zeros(n_groups).index_add_(0, group, ll)


def _charge_log_likelihood(near, unit, ref, params, path_mean, starting_too, n_groups):
    """Per group: the Poisson log-likelihood of the charge of every DOM near the track, hit or not. The event's
    brightness is profiled out: with mu = A * light, the best A makes the expected total charge equal the observed one."""
    xa, agroup, qa = near['x'], near['group'], near['charge']
    light = _light(xa, agroup, unit, ref, params, path_mean, True, starting_too)
    log_mu = light['log_track'] if not starting_too else torch.logaddexp(light['log_track'], light['log_cascade'])
    mu = torch.exp(log_mu) * near['eff']
    scale = near['q_total'] / mu.new_zeros(n_groups).index_add_(0, agroup, mu).clamp_min(1e-30)
    mu = take(scale, agroup) * mu + MPE_AMP_NOISE
    return mu.new_zeros(n_groups).index_add_(0, agroup, qa * torch.log(mu) - mu)


def _order_within_groups(values, group, n_groups):
    # the rows sorted by group, by value within a group; each group's first place in that order and its row count
    by_value = torch.argsort(values)
    order = by_value[torch.argsort(group[by_value], stable=True)]
    counts = torch.bincount(group, minlength=n_groups)
    return order, torch.cumsum(counts, 0) - counts, counts


def _seed_tracks(seeds, start, hits, centre_g, t_ref, n_seeds, path_mean, fit_kw):
    """Every group's infinite track to start from: the muon along minus its seed; its reference point and t0 those of
    the previous stage's fit (start), or at the charge centre with t0 a low quantile of the direct-light offsets."""
    n_events, n_dirs = seeds.shape[:2]
    n_groups = n_events * n_seeds
    u = torch.as_tensor(-np.tile(seeds, (1, n_seeds // n_dirs, 1)).reshape(-1, 3), **fit_kw).clone()  # muon along -seed
    shift = torch.zeros(n_groups, 3, **fit_kw)
    with torch.no_grad():
        if start is not None:  # the previous stage's tracks: their points as the shift, their times
            point, _, t0 = (torch.as_tensor(np.tile(a, (1, n_seeds // n_dirs) + (1,) * (a.ndim - 2)).reshape((n_groups,) + a.shape[2:]), **fit_kw)
                            for a in start)
            shift = point - centre_g
            t0 = t0 - torch.as_tensor(np.repeat(t_ref, n_seeds), **fit_kw)
        else:
            # t0 starts at a low quantile of the direct-light offsets t - t_geo(t0 = 0): most first pulses come late
            unit, ref = _track(u, shift, centre_g)
            offset = hits['t'] - _light(hits['x'], hits['group'], unit, ref, None, path_mean, False, False)['delay']
            order, first, counts = _order_within_groups(offset, hits['group'], n_groups)
            t0 = offset[order][first + (0.2 * (counts - 1)).long()].clone()
    return dict(u=u, shift=shift, t0=t0)


def _starting_vertex(params, starting, hits, centre_g, starting_too, fit_kw):
    """The starting-track hypothesis's own parameters, per group: the vertex sits s_vertex metres along the track from
    the reference point, and its cascade shines exp(log_ratio) times as bright as the muon (light at 1 m). A starting
    track's vertex starts where its three earliest DOMs project onto the track (light leaves the vertex region first),
    its cascade e times as bright as the muon; an infinite track has its vertex far upstream and no cascade, and keeps
    these values."""
    s_vertex = torch.full((len(centre_g),), -1e5, **fit_kw)
    log_ratio = torch.full((len(centre_g),), -50.0, **fit_kw)
    if starting_too:
        with torch.no_grad():
            unit, ref = _track(params['u'], params['shift'], centre_g)
            x, group = hits['x'], hits['group']
            along = ((x - _columns(ref, group)) * _columns(unit, group)).sum(0)
            by_time, first, counts = _order_within_groups(hits['t'], group, len(centre_g))
            k = torch.minimum(first[:, None] + torch.arange(3, device=x.device), (first + counts - 1)[:, None])
            s_vertex = torch.where(starting, along[by_time][k].mean(1), s_vertex)
            log_ratio = torch.where(starting, torch.ones_like(log_ratio), log_ratio)
    return s_vertex, log_ratio


def _fit_loop(params, starting, steps, log_likelihood):
    """Adam on minus the summed log_likelihood() of all groups at once, a step size per parameter, with cosine decay;
    the starting-track parameters move for starting tracks only (infinite tracks stay infinite). Adam is written out
    (torch.optim.Adam's single-tensor step, op for op) because torch.optim's step() asks the GPU whether a CUDA graph
    is being captured: in prepare's forked workers that fails once the parent has touched CUDA (bench.py on a GPU),
    and otherwise it opens a CUDA context in every worker for a fit that runs on the CPU."""
    tensors = [params[k] for k in ('u', 'shift', 't0', 's_vertex', 'log_ratio')]
    rates = (MPE_LR_DIR, MPE_LR_POS, MPE_LR_TIME, MPE_LR_VERTEX, MPE_LR_RATIO)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for p in tensors:
        p.requires_grad_(True)
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in tensors]
    for step in range(steps):
        decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine decay: coarse moves first, then settle
        for p in tensors:
            p.grad = None
        (-log_likelihood().sum()).backward()
        for p in tensors:
            if p.grad is not None:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)  # a degenerate event must not poison the others
        for p in tensors[3:]:
            if p.grad is not None:
                p.grad *= starting  # infinite tracks stay infinite
        with torch.no_grad():
            for p, (m, v), lr in zip(tensors, moments, rates):
                if p.grad is None:
                    continue
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** (step + 1))).add_(eps)
                p.addcdiv_(m, denom, value=-lr * decay / (1 - beta1 ** (step + 1)))


def _best_fit(ll, params, centre_g, seeds, centre, t_ref, fit_kw):
    """Per event the most likely of its groups' fits (the first seed where none is finite): direction, log-likelihood,
    track (point, direction, t0); and every group's fit, (n_events, n_seeds, ...) arrays, as the next stage starts."""
    n_events = len(seeds)
    n_seeds = len(centre_g) // n_events
    with torch.no_grad():
        ll = ll.reshape(n_events, n_seeds).cpu().numpy()
        unit, ref = _track(params['u'], params['shift'], centre_g)
        direction = -unit.reshape(n_events, n_seeds, 3).cpu().numpy()
        ref = ref.reshape(n_events, n_seeds, 3).cpu().numpy()
        t0 = (params['t0'].reshape(n_events, n_seeds) + torch.as_tensor(t_ref[:, None], **fit_kw)).cpu().numpy()
    ll = np.where(np.isfinite(ll) & np.isfinite(direction).all(2), ll, -np.inf)
    best = np.argmax(ll, 1)
    pick = np.arange(n_events), best
    out = direction[pick]
    bad = ~np.isfinite(ll.max(1)) | ~np.isfinite(out).all(1) | (np.linalg.norm(out, axis=1) < 0.5)
    out[bad] = seeds[bad, 0]
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    point = np.where(bad[:, None], centre, ref[pick])
    return out, ll[pick], (point, out, np.where(bad, t_ref, t0[pick])), (ref, direction, t0)


# -----------------------------------------------------------------------------
# one entry point for sample.py

def reconstruct(method, ev, geometry, device='cpu', ice=None):
    """Directions of the events in ev = split.events(idx) by method 'linefit', 'linefit_improved', 'time_fit' or 'mpe'.
    geometry (n_sensors, 3) m. Returns (n_events, 3) float64 unit vectors, finite for every event.
    The LineFits use the non-auxiliary (locally coincident) pulses, or all pulses of an event with fewer than two;
    the MPE fit's times come from the DOMs with a non-auxiliary pulse (all hit DOMs where there are fewer than
    three): the time of each one's first pulse and its total charge; its charge likelihood takes the total charge
    of every hit DOM (MPE_DEEPCORE_EFF for sensor_id >= 4680, the DeepCore strings of IceCube's numbering).
    ice: the likelihood fits' ice (ice_table; None = MPE_ICE)."""
    if method not in METHODS:
        raise ValueError(f"reconstruct: method {method!r} is not one of {METHODS}")
    if method == 'time_fit':
        return time_fit(ev, geometry, ice=ice)[0]
    fit = _fit_inputs(ev, geometry, linefits_only=method != 'mpe')
    if method != 'mpe':
        return fit[method]
    seeds = [fit['linefit_improved'], fit['linefit']] + [_tilted(fit['linefit_improved'], MPE_SEED_TILT, 2 * math.pi * k / MPE_EXTRA_SEEDS)
                                                         for k in range(MPE_EXTRA_SEEDS)]
    direction, _ = mpe_fit(*fit['doms'], np.stack(seeds, 1), device=device, near=fit['near'] if MPE_AMPLITUDE else None, ice=ice)
    return direction


def time_fit(ev, geometry, steps=None, ice=None):
    """The quick likelihood fit that prepare.py stores with every event as the model's second seed: the MPE fit's
    first stage alone (an infinite track fitted to the hit DOMs' first-pulse times), from the two LineFits,
    TIME_FIT_STEPS steps (or steps), in ice (as mpe_fit), no charge likelihood, no tilted seeds. On the toy's
    tracks with 50+ hit DOMs its median error is 0.036-0.038 rad against the improved LineFit's 0.057 and the full
    fit's 0.025 (notes, section 11), at about 1,200 toy events/s on one core (notes, section 20). Returns
    (n_events, 3) float64 unit vectors and each event's reduced log-likelihood, minus the best log-likelihood per
    degree of freedom (used DOMs - 5; IceCube's rlogl: small where the times fit a track well; TIME_FIT_FAILED where
    the fit failed and the direction is the seed's)."""
    fit = _fit_inputs(ev, geometry)
    direction, ll = mpe_fit(*fit['doms'], np.stack([fit['linefit_improved'], fit['linefit']], 1),
                            steps=TIME_FIT_STEPS if steps is None else steps, ice=ice)
    dof = np.maximum(np.diff(fit['doms'][3]) - 5, 1)
    rlogl = np.where(np.isfinite(ll), -ll / dof, TIME_FIT_FAILED)
    return direction, np.clip(rlogl, -TIME_FIT_FAILED, TIME_FIT_FAILED)


def _fit_inputs(ev, geometry, linefits_only=False):
    """What the fits of reconstruct and time_fit read: both LineFits ('linefit', 'linefit_improved'), and unless
    linefits_only, the likelihood fit's DOMs ('doms': position, first-pulse time, charge, per-event offsets of the
    DOMs it uses) and every hit DOM's charge for its charge likelihood ('near')."""
    geometry = np.asarray(geometry, np.float64)
    sensor = ev['sensor_id'].astype(np.int64)
    time, clean = ev['time'].astype(np.float64), ~ev['auxiliary']
    offsets = ev['pulse_offsets']
    n_events = len(offsets) - 1
    event = np.repeat(np.arange(n_events), np.diff(offsets))
    use = clean | (np.bincount(event, clean, n_events) < 2)[event]
    use_offsets = np.r_[0, np.cumsum(np.bincount(event[use], minlength=n_events))]
    pos = geometry[sensor[use]]
    out = {'linefit': linefit(pos, time[use], use_offsets),
           'linefit_improved': linefit_improved(pos, time[use], use_offsets, dom=sensor[use])}
    if linefits_only:
        return out
    # per hit DOM (pulses are time-ordered within a DOM) its first time, total charge and position
    starts = ev['dom_offsets'][:-1]
    dom_event = np.repeat(np.arange(n_events), np.diff(ev['event_dom_offsets']))
    dom_clean = np.add.reduceat(clean.astype(np.int64), starts) > 0
    dom_npe = np.add.reduceat(ev['charge'].astype(np.float64), starts)
    dom_use = dom_clean | MPE_AUX_DOMS | (np.bincount(dom_event, dom_clean, n_events) < 3)[dom_event]
    # at most MPE_MAX_DOMS per event, the brightest: they carry the sharpest timing
    order = np.lexsort((-dom_npe, dom_event))
    rank = np.empty(len(order), np.int64)
    per_event = np.bincount(dom_event, minlength=n_events)
    rank[order] = np.arange(len(order)) - np.repeat(np.cumsum(per_event) - per_event, per_event)
    dom_use &= rank < MPE_MAX_DOMS
    sel = np.nonzero(dom_use)[0]  # still grouped by event
    out['doms'] = (geometry[sensor[starts[sel]]], time[starts[sel]], dom_npe[sel],
                   np.r_[0, np.cumsum(np.bincount(dom_event[sel], minlength=n_events))])
    efficiency = np.where(np.arange(len(geometry)) >= 78 * 60, MPE_DEEPCORE_EFF, 1.0)
    out['near'] = (geometry, efficiency, sensor[starts], dom_npe, ev['event_dom_offsets'])
    return out


def angular_error(u, v):
    """Per-event angle in radians between directions u and v, (n, 3) each (normalised here)."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return np.arccos(np.clip(np.sum(u * v, axis=-1), -1.0, 1.0))
