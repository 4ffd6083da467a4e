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
                      the pulses still further than OUTLIER_M from the line.
    mpe_fit           maximum-likelihood fit of an infinite muon track (vertex, time, direction) to the first
                      pulse time of each hit DOM. Cherenkov light from the track reaches a DOM at perpendicular
                      distance d directly at t_geo = t0 + (d_along + 0.9173 d) / c; scattering only delays it,
                      by t_res >= 0 distributed as the Pandel function, a Gamma distribution with shape
                      xi = r / PANDEL_LAMBDA (r = d / sin theta_c, the photon path) and rate
                      b = 1/tau + c_ice/lambda_a. A DOM that saw N photoelectrons records the FIRST of N photons:
                      the "MPE" density N p1(t) (1 - P1(t))^(N-1), far sharper than one photon's p1 when N is
                      large. The Pandel shape uses the effective distance d_eff = r * 33.3 m / l_scat, l_scat the
                      effective scattering length averaged along the photon's path from its emission point on the
                      track to the DOM (MPE_ICE, ice_table). Times within the PMT jitter of t_geo (and earlier,
                      which Pandel forbids) are patched by a Gaussian of width MPE_JITTER_NS, and a noise floor
                      keeps a stray noise hit from vetoing the true track. Seeded from both LineFits plus tilted copies, optimised with
                      Adam for all events and seeds at once in torch; the best seed per event by likelihood wins.
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
Real ice is more complex still (tilted layers, anisotropy, hole ice), so even a tabulated fit stays approximate,
as IceCube's Pandel-based fits are; they remain the standard first likelihood reconstruction all the same.
Starting tracks (vertex cascade light, finite muon) are not modelled: the fit is worse on them than on
through-going muons.
"""

import math

import numpy as np
import torch

from model import angles_to_vector, vector_to_angles  # noqa: F401  (one copy of the angle convention)

# -----------------------------------------------------------------------------
# settings
# ice and Cherenkov light (DESIGN.md section 4; the numbers simulate.py uses)
C_VACUUM = 0.2998  # m/ns, the muon's speed
N_GROUP = 1.356
C_ICE = C_VACUUM / N_GROUP  # 0.2210 m/ns, photons in ice
SIN_CHERENKOV = math.sin(math.radians(40.7))
TRACK_DELAY_FACTOR = 0.9173  # (n_g - cos theta_c) / sin theta_c: extra light path per metre of perpendicular distance
PANDEL_TAU, PANDEL_LAMBDA, PANDEL_LAMBDA_A = 556.7, 33.3, 98.0  # ns, m (scattering), m (absorption)
PANDEL_RATE = 1.0 / PANDEL_TAU + C_ICE / PANDEL_LAMBDA_A  # 1/ns, the Gamma rate b
# improved LineFit
DELAY_RADIUS = 156.0  # m: neighbours considered by the delay cleaning
DELAY_NS = 150.0  # ns of lateness beyond direct light from a neighbour that marks a scattered photon
DELAY_MAX_REFS = 128  # neighbours per event to compare with: its earliest-hit DOMs (bounds the pair count)
HUBER_M = 153.0  # m: residual beyond which a pulse's pull grows linearly
HUBER_ITERS = 5
OUTLIER_M = 150.0  # m: pulses still further from the Huber line are left out of the final fit
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
MPE_ICE = 'toy'  # 'toy': simulate.py's depth-dependent ice; 'bulk': one Pandel scale; or a table file (see ice_table)
METHODS = ['linefit', 'linefit_improved', 'mpe']
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


def _weighted_line(pos, t, w, event, n_events):
    """Weighted least-squares line r = r_mean + v (t - t_mean) per event. Returns v, r_mean, t_mean."""
    sum_w = np.bincount(event, w, n_events)
    norm = np.where(sum_w > 0, sum_w, 1.0)
    t_mean = np.bincount(event, w * t, n_events) / norm
    r_mean = np.stack([np.bincount(event, w * pos[:, k], n_events) for k in range(3)], 1) / norm[:, None]
    dt, dr = t - t_mean[event], pos - r_mean[event]
    var_t = np.bincount(event, w * dt * dt, n_events)
    cov = np.stack([np.bincount(event, w * dt * dr[:, k], n_events) for k in range(3)], 1)
    v = cov / np.where(var_t > 0, var_t, 1.0)[:, None]
    v[var_t <= 0] = 0.0
    return v, r_mean, t_mean


def _line_residual(pos, t, event, fit):
    v, r_mean, t_mean = fit
    return np.linalg.norm(pos - r_mean[event] - v[event] * (t - t_mean[event])[:, None], axis=1)


def _delayed(pos, t, event, dom, n_events, plain):
    """Delay cleaning: True for a pulse later than direct light from a neighbouring DOM's first pulse allows,
    t_i - t_j > |r_i - r_j| / c + DELAY_NS with |r_i - r_j| < DELAY_RADIUS. The neighbours compared with are
    the DELAY_MAX_REFS DOMs per event that are earliest relative to the plain LineFit `plain` (v, r_mean, t_mean):
    the least delayed hits, spread along the whole track (this bounds the pair count of big events)."""
    order = np.lexsort((t, dom, event))
    first = np.ones(len(order), bool)
    first[1:] = (event[order][1:] != event[order][:-1]) | (dom[order][1:] != dom[order][:-1])
    ref = order[first]  # each DOM's first pulse (a pulse is its own DOM's reference: late pulses in a DOM go too)
    v, r_mean, t_mean = plain
    e = event[ref]
    speed2 = np.maximum((v * v).sum(1), 1e-12)[e]
    lateness = t[ref] - t_mean[e] - ((pos[ref] - r_mean[e]) * v[e]).sum(1) / speed2
    ref = ref[np.lexsort((lateness, e))]
    n_ref = np.bincount(event[ref], minlength=n_events)
    rank = np.arange(len(ref)) - np.repeat(np.cumsum(n_ref) - n_ref, n_ref)
    ref = ref[rank < DELAY_MAX_REFS]
    n_ref = np.minimum(n_ref, DELAY_MAX_REFS)
    ref_start = np.cumsum(n_ref) - n_ref
    m = n_ref[event]  # pairs per pulse
    out = np.zeros(len(t), bool)
    ends = np.cumsum(m)
    bounds = np.searchsorted(ends, np.arange(0, ends[-1], 4_000_000), 'right')  # chunks of ~4M pairs
    for lo, hi in zip(bounds, list(bounds[1:]) + [len(t)]):
        i = np.repeat(np.arange(lo, hi), m[lo:hi])
        k = np.arange(len(i)) - np.repeat(np.cumsum(m[lo:hi]) - m[lo:hi], m[lo:hi])
        j = ref[ref_start[event[i]] + k]
        dist = np.linalg.norm(pos[i] - pos[j], axis=1)
        late = (dist < DELAY_RADIUS) & (t[i] - t[j] > dist / C_VACUUM + DELAY_NS)
        out[lo:hi] = np.bincount(i - lo, late, hi - lo) > 0
    return out


def _keep_enough(keep, event, n_events, least=3):
    # an event left with fewer than `least` pulses keeps them all, so that every fit stays defined
    few = np.bincount(event, keep, n_events) < least
    return keep | few[event]


def linefit_improved(pos, time, event_offsets, dom=None):
    """Improved LineFit (delay cleaning, Huber-weighted fit, refit without outliers), same arguments and output as
    linefit. dom (P,) identifies the DOM of each pulse (sensor_id); by default pulses at one position share a DOM."""
    pos, time, event_offsets = _check(pos, time, event_offsets, 'linefit_improved')
    n_events = len(event_offsets) - 1
    event = np.repeat(np.arange(n_events), np.diff(event_offsets))
    if dom is None:
        dom = np.unique(pos, axis=0, return_inverse=True)[1].ravel()
    t = time - np.repeat(_event_mean(time, event_offsets), np.diff(event_offsets))  # small numbers, for precision
    plain = _weighted_line(pos, t, np.ones(len(t)), event, n_events)
    keep = _keep_enough(~_delayed(pos, t, event, np.asarray(dom, np.int64), n_events, plain), event, n_events)
    weight = keep.astype(np.float64)
    fit = _weighted_line(pos, t, weight, event, n_events)
    for _ in range(HUBER_ITERS):
        # Huber IRLS: weight 1 inside HUBER_M, HUBER_M / residual outside, so far pulses pull like |r|, not r^2
        res = _line_residual(pos, t, event, fit)
        weight = keep * np.where(res > HUBER_M, HUBER_M / np.maximum(res, 1e-9), 1.0)
        fit = _weighted_line(pos, t, weight, event, n_events)
    inlier = _keep_enough(keep & (_line_residual(pos, t, event, fit) < OUTLIER_M), event, n_events)
    fit = _weighted_line(pos, t, inlier.astype(np.float64), event, n_events)
    return _direction_from_velocity(fit[0], fallback=linefit(pos, time, event_offsets))


# -----------------------------------------------------------------------------
# the MPE likelihood fit

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
    """Effective scattering length vs depth for the fit: (z (K,) m on a uniform grid, ascending; 1 / l_scat (K,) 1/m),
    or None for 'bulk' (one Pandel scale, PANDEL_LAMBDA, everywhere). ice: MPE_ICE by default."""
    ice = MPE_ICE if ice is None else ice
    if ice == 'bulk':
        return None
    z = np.arange(-1500.0, 1500.0 + 0.5, 1.0)
    if ice == 'toy':
        from simulate import scattering_length  # the toy ice the synthetic data were made with
        return z, 1.0 / scattering_length(z)
    table = np.loadtxt(ice, delimiter=',' if str(ice).endswith('.csv') else None, comments='#', ndmin=2)
    table = table[np.argsort(table[:, 0])]  # rows: depth z (m, detector coordinates), effective scattering length (m)
    return z, 1.0 / np.interp(z, table[:, 0], table[:, 1])


def mpe_log_likelihood(t_res, d_perp, npe, inv_scat=1.0 / PANDEL_LAMBDA):
    """Log-likelihood of each DOM's first pulse at residual t_res (ns) from a track at perpendicular distance
    d_perp (m), given npe photoelectrons: the first of N Pandel photons, patched below ~MPE_JITTER_NS, floored.
    inv_scat: 1 / effective scattering length (1/m) along each photon's path (Pandel d_eff = r * 33.3 m / l_scat)."""
    sigma = MPE_JITTER_NS
    xi = d_perp / SIN_CHERENKOV * inv_scat  # Pandel shape: photon path in scattering lengths
    # softplus maps t_res to a positive time that equals t_res well above the jitter and shrinks to ~0 below
    # it; the Gaussian term penalises light earlier than direct light, as the jitter convolution would
    t = (sigma * torch.nn.functional.softplus(t_res / sigma)).clamp_min(1e-6)
    x = PANDEL_RATE * t
    log_p1 = xi * math.log(PANDEL_RATE) + (xi - 1) * torch.log(t) - x - torch.lgamma(xi)
    log_f = torch.log(npe) + log_p1 + (npe - 1) * _LogQ.apply(xi, x) - 0.5 * (t_res.clamp_max(0) / sigma) ** 2
    return torch.logaddexp(log_f, torch.full_like(log_f, math.log(MPE_NOISE_DENSITY)))


def _tilted(direction, angle, phase):
    # rotate unit vectors by `angle` towards a perpendicular picked by `phase`
    helper = np.where(np.abs(direction[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = np.cross(direction, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(direction, e1)
    return math.cos(angle) * direction + math.sin(angle) * (math.cos(phase) * e1 + math.sin(phase) * e2)


def mpe_fit(dom_pos, dom_time, dom_npe, event_dom_offsets, seeds, device='cpu', steps=None):
    """Fit an infinite track to the first pulse time of each hit DOM, for many events at once.
    dom_pos (D, 3) m, dom_time (D,) ns (first pulse), dom_npe (D,) charge in pe, event_dom_offsets (n_events + 1,),
    seeds (n_events, S, 3) neutrino directions to start from. Returns (n_events, 3) float64 unit vectors
    (where the neutrino comes from) and the best log-likelihood per event."""
    steps = MPE_STEPS if steps is None else steps
    dom_pos, dom_time = np.asarray(dom_pos, np.float64), np.asarray(dom_time, np.float64)
    event_dom_offsets, seeds = np.asarray(event_dom_offsets, np.int64), np.asarray(seeds, np.float64)
    n_events, n_seeds = seeds.shape[:2]
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
            out[lo:hi], best_ll[lo:hi] = _mpe_chunk(dom_pos[a:b], dom_time[a:b], np.asarray(dom_npe[a:b], np.float64),
                                                    event_dom_offsets[lo:hi + 1] - a, seeds[lo:hi], device, steps)
    finally:
        if flush:
            torch.set_flush_denormal(False)
            torch.set_num_threads(n_threads)
    return out, best_ll


def _mpe_chunk(pos, time, npe, offsets, seeds, device, steps):
    n_events, n_seeds = seeds.shape[:2]
    f64 = dict(dtype=getattr(torch, MPE_DTYPE), device=device)
    n_doms = np.diff(offsets)
    event = np.repeat(np.arange(n_events), n_doms)
    # the vertex lives in the plane through the charge-weighted centre, perpendicular to the track: the point
    # along the track is degenerate with t0, so fixing it leaves a well-conditioned 5-parameter problem
    w = np.bincount(event, npe, n_events)
    centre = np.stack([np.bincount(event, npe * pos[:, k], n_events) for k in range(3)], 1) / w[:, None]
    t_ref = np.bincount(event, time, n_events) / n_doms  # times relative to the event mean, for precision
    # one row per (event, seed) pair; every DOM appears once per seed
    group = (event[:, None] * n_seeds + np.arange(n_seeds)).ravel()
    dom = np.repeat(np.arange(len(event)), n_seeds)
    order = np.argsort(group, kind='stable')
    group, dom = torch.as_tensor(group[order], device=device), torch.as_tensor(dom[order], device=device)
    x = torch.as_tensor(pos, **f64)[dom]
    t = torch.as_tensor(time - t_ref[event], **f64)[dom]
    n = torch.as_tensor(np.clip(np.round(npe), 1, MPE_MAX_NPE), **f64)[dom]
    centre_g = torch.as_tensor(np.repeat(centre, n_seeds, 0), **f64)
    u = torch.as_tensor(-seeds.reshape(-1, 3), **f64).clone().requires_grad_(True)  # the muon moves along -seed
    shift = torch.zeros(n_events * n_seeds, 3, **f64, requires_grad=True)
    n_groups = n_events * n_seeds

    ice = ice_table()
    if ice is not None:
        # path average of 1/l_scat from the emission point to the DOM: (G(z_dom) - G(z_emit)) / (z_dom - z_emit),
        # G the integral of 1/l_scat over depth, linear between grid points (so differentiable in z_emit)
        z_grid, inv_grid = ice
        z0, dz = float(z_grid[0]), float(z_grid[1] - z_grid[0])
        cum = np.r_[0.0, np.cumsum(0.5 * (inv_grid[1:] + inv_grid[:-1]) * dz)]
        cum_t, inv_t = torch.as_tensor(cum, **f64), torch.as_tensor(inv_grid, **f64)

        def interp(table, z):
            s = ((z - z0) / dz).clamp(0, len(z_grid) - 1)
            k = s.detach().floor().long().clamp_max(len(z_grid) - 2)  # in float32, len - 1.000001 rounds up to len - 1
            f = s - k
            return table[k] * (1 - f) + table[k + 1] * f
        z_dom = x[:, 2]
        g_dom = interp(cum_t, z_dom)

    def geometry(u, shift):
        unit = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
        vertex = centre_g + shift - (shift * unit).sum(1, keepdim=True) * unit
        rel = x - vertex[group]
        along = (rel * unit[group]).sum(1)
        d_perp = torch.sqrt(((rel * rel).sum(1) - along ** 2).clamp_min(1e-6))
        if ice is None:
            inv_scat = 1.0 / PANDEL_LAMBDA
        else:
            z_emit = vertex[group, 2] + (along - d_perp / math.tan(math.radians(40.7))) * unit[group, 2]
            span = z_dom - z_emit
            near = span.abs() < 1.0
            safe = torch.where(near, torch.ones_like(span), span)
            inv_scat = torch.where(near, interp(inv_t, 0.5 * (z_dom + z_emit)), (g_dom - interp(cum_t, z_emit)) / safe)
        return along, d_perp + 1.0, inv_scat  # metre softening: no 1/d at d=0

    with torch.no_grad():
        # t0 starts at a low quantile of the direct-light offsets t - t_geo(t0 = 0): most first pulses come late
        along, d_perp, _ = geometry(u, shift)
        offset = t - (along + TRACK_DELAY_FACTOR * d_perp) / C_VACUUM
        by_value = torch.argsort(offset)
        by_group = by_value[torch.argsort(group[by_value], stable=True)]
        counts = torch.bincount(group, minlength=n_groups)
        first = torch.cumsum(counts, 0) - counts
        t0 = offset[by_group][first + (0.2 * (counts - 1)).long()].clone()
    t0.requires_grad_(True)
    opt = torch.optim.Adam([{'params': [u], 'lr': MPE_LR_DIR}, {'params': [shift], 'lr': MPE_LR_POS},
                            {'params': [t0], 'lr': MPE_LR_TIME}])
    base = [g['lr'] for g in opt.param_groups]

    def log_likelihood():
        along, d_perp, inv_scat = geometry(u, shift)
        t_res = t - t0[group] - (along + TRACK_DELAY_FACTOR * d_perp) / C_VACUUM
        ll = mpe_log_likelihood(t_res, d_perp, n, inv_scat)
        return torch.zeros(n_groups, **f64).index_add_(0, group, ll)

    for step in range(steps):
        for g, lr in zip(opt.param_groups, base):  # cosine decay: coarse moves first, then settle
            g['lr'] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        opt.zero_grad(set_to_none=True)
        (-log_likelihood().sum()).backward()
        for p in (u, shift, t0):
            p.grad.nan_to_num_(0.0, 0.0, 0.0)  # a degenerate event must not poison the others
        opt.step()
    with torch.no_grad():
        ll = log_likelihood().reshape(n_events, n_seeds).cpu().numpy()
        direction = -(u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)).reshape(n_events, n_seeds, 3).cpu().numpy()
    ll = np.where(np.isfinite(ll) & np.isfinite(direction).all(2), ll, -np.inf)
    best = np.argmax(ll, 1)
    out = direction[np.arange(n_events), best]
    bad = ~np.isfinite(ll.max(1)) | ~np.isfinite(out).all(1) | (np.linalg.norm(out, axis=1) < 0.5)
    out[bad] = seeds[bad, 0]
    return out / np.linalg.norm(out, axis=1, keepdims=True), ll.max(1)


# -----------------------------------------------------------------------------
# one entry point for sample.py

def reconstruct(method, ev, geometry, device='cpu'):
    """Directions of the events in ev = split.events(idx) by method 'linefit', 'linefit_improved' or 'mpe'.
    geometry (n_sensors, 3) m. Returns (n_events, 3) float64 unit vectors, finite for every event.
    The LineFits use the non-auxiliary (locally coincident) pulses, or all pulses of an event with fewer than two;
    the MPE fit uses the DOMs with a non-auxiliary pulse (all hit DOMs where there are fewer than three), the
    time of each one's first pulse and its total charge."""
    if method not in METHODS:
        raise ValueError(f"reconstruct: method {method!r} is not one of {METHODS}")
    geometry = np.asarray(geometry, np.float64)
    sensor = ev['sensor_id'].astype(np.int64)
    time, clean = ev['time'].astype(np.float64), ~ev['auxiliary']
    offsets = ev['pulse_offsets']
    n_events = len(offsets) - 1
    event = np.repeat(np.arange(n_events), np.diff(offsets))
    use = clean | (np.bincount(event, clean, n_events) < 2)[event]
    use_offsets = np.r_[0, np.cumsum(np.bincount(event[use], minlength=n_events))]
    pos = geometry[sensor[use]]
    plain = linefit(pos, time[use], use_offsets)
    if method == 'linefit':
        return plain
    improved = linefit_improved(pos, time[use], use_offsets, dom=sensor[use])
    if method == 'linefit_improved':
        return improved
    # MPE: per hit DOM (pulses are time-ordered within a DOM) its first time, total charge and position
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
    seeds = [improved, plain] + [_tilted(improved, MPE_SEED_TILT, 2 * math.pi * k / MPE_EXTRA_SEEDS)
                                 for k in range(MPE_EXTRA_SEEDS)]
    direction, _ = mpe_fit(geometry[sensor[starts[sel]]], time[starts[sel]], dom_npe[sel],
                           np.r_[0, np.cumsum(np.bincount(dom_event[sel], minlength=n_events))],
                           np.stack(seeds, 1), device=device)
    return direction


def angular_error(u, v):
    """Per-event angle in radians between directions u and v, (n, 3) each (normalised here)."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return np.arccos(np.clip(np.sum(u * v, axis=-1), -1.0, 1.0))
