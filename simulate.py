"""
Toy IceCube simulation that writes a data set in the exact Kaggle "IceCube - Neutrinos in Deep Ice"
layout, so everything downstream runs unchanged on real and synthetic data.

    python simulate.py                                   # the default set in data/sim
    python simulate.py --out_dir=data/tiny --n_train_batches=2 --events_per_batch=200 --seed=1
    python simulate.py --geometry=path/to/sensor_geometry.csv   # any Kaggle-style geometry file
    python simulate.py --num_proc=16                     # batch files simulated in parallel (same output)

Outputs (in out_dir):
    sensor_geometry.csv            sensor_id,x,y,z (m); sensor_id = (string-1)*60 + (dom-1)
    train/batch_<N>.parquet        N = 1..n_train_batches; pandas index event_id (int64),
                                   sensor_id int16, time int64 (ns), charge float64 (pe), auxiliary bool;
                                   one event's rows contiguous and sorted by time, events by event_id
    test/batch_<N>.parquet         numbered after the train batches (as Kaggle's batch_661)
    train_meta.parquet             batch_id, event_id, first_pulse_index, last_pulse_index (inclusive row
                                   positions in the batch file), azimuth in [0, 2pi), zenith in [0, pi]
    test_meta.parquet              the same without azimuth and zenith
    sample_submission.csv          event_id,azimuth,zenith for the test events, filled with 1, 1
    train_truth.parquet,           what real data lacks, for breakdowns: event_id int64, batch_id int64,
    test_truth.parquet             energy float64 = the NEUTRINO energy in GeV (a cascade deposits all of it,
                                   a starting track splits it between the vertex cascade and the muon, a
                                   through-going muon carries only part of it), kind 'track' or 'cascade',
                                   vertex_x, vertex_y, vertex_z float64 (m): the interaction point, or for a
                                   through-going muon the point where it enters the simulated volume
    simulation.json                settings and physics constants used, and "complete": true once all is written.
                                   prepare.py uses it to tell synthetic data from real (its fit_ice 'auto').
Every file is written under a temporary name and renamed into place. Order: simulation.json (complete: false),
geometry, batch files, then test_truth, submission, test_meta, train_truth, train_meta and simulation.json (complete:
true), so a folder with train_meta.parquet has all the rest. Re-running with the same settings on a complete set skips
the work (prints "nothing to do"); an interrupted set with the same settings is regenerated (deterministic,
so identical); a set made with other settings, or a non-empty folder without simulation.json (real data,
say), is refused with an error.

The default set (10 train batches + 1 test batch of 20,000 events, ~32M pulses, 170 MB) takes ~1.3 minutes
on a 2-core machine (2 worker processes, each ~240k pulses/s and ~300 MB at peak; the output does not depend on
num_proc). On it: pulses per event median 65, mean 149, max ~51,000; 79% of hit DOMs have one pulse;
29% of pulses auxiliary; 28% tracks, 72% cascades; plain LineFit on non-auxiliary pulses has a mean angular
error of 1.19 rad (real data: ~1.21): tracks 15 deg (with >= 50 hit DOMs median 0.08 rad), cascades 89 deg
(no better than random: their earliest light comes from the cone in front of them, which pulls the line
backwards, while the brighter light ahead of them pulls it forwards).

Direction convention: the neutrino COMES FROM (azimuth, zenith), x = cos(az) sin(zen), y = sin(az) sin(zen),
z = cos(zen); the particle travels along minus that vector. Directions are isotropic.

Physics (a fast toy, vectorised over all DOMs and photons of a chunk of events):
  - Geometry: 78 strings on a triangular grid (125 m) plus 8 DeepCore strings near the centre, 60 DOMs each;
    or any sensor_geometry.csv (strings of 60 DOMs, sensor_id = 0..n-1).
  - Ice: our own smooth parametrisation of absorption and effective scattering vs depth, with the dust layer
    around z = -90 m. Light reaching a DOM through scattering ice is attenuated with the diffusive length
    sqrt(l_abs * l_scat / 3), averaged along the straight path (tabulated over pairs of depths).
  - Event mix: through-going muons, starting tracks (vertex cascade + muon of finite range) and cascades,
    neutrino energies E^-SPECTRAL_INDEX from E_MIN to E_MAX GeV, isotropic. The mix and light yields are
    tuned so that the triggered sample is as hard for LineFit as real data (mostly dim cascades).
  - Expected photoelectrons per DOM: tracks ~ (1 + E_mu/E_CRIT) exp(-r/l_att)/sqrt(r), cascades
    ~ E exp(-r/l_att)/r with a Cherenkov-peaked emission profile; times the downward-facing PMT's acceptance
    (0 for light travelling down, 0.26 sideways, 1 up), both washed out towards isotropy by scattering
    (weight exp(-r/l_scat)); DeepCore DOMs (strings 79-86) 1.35x. A cascade's scattered light does not forget
    where it was going: it spreads as from a source CASCADE_SHIFT scattering lengths ahead of the vertex (the
    mean cosine of the emission profile, 0.37, times the one scattering length its photons travel before their
    direction is lost), the far field of diffusion from a forward-emitting source, so DOMs ahead of a cascade
    see about twice the light of DOMs behind it at any distance.
  - Times: track t0 + (d_along + 0.9173 d_perp)/c, cascade t0 + n_g r/c; plus a Pandel delay per photon,
    Gamma(shape = d_eff/33.3 m, scale = 1/(1/556.7 ns + c_ice/98 m)), d_eff scaled by the local scattering;
    a cascade's light that must be turned by the angle delta from its Cherenkov cone to reach a DOM travels
    CASCADE_TURN * (1 - cos delta) scattering lengths more (up to 2.1 of them right behind it at the default
    1.2, which keeps plain LineFit as poor as on real data), so DOMs in front of a cascade see its light earlier
    as well as brighter;
    plus 2.5 ns jitter. A DOM with more than MAX_GROUPS photons draws MAX_GROUPS photon groups that share
    the charge, which bounds time and memory for the PeV events.
  - Pulses: photons of a DOM closer than MERGE_NS merge into one pulse; single-photon charges are a 1 pe
    Gaussian plus a low-charge tail; pulse charges are quantised to 0.025 pe, saturate at SATURATION_PE and
    are stored at float16 precision (as in Kaggle). Dark noise at DARK_RATE_HZ per DOM
    (DEEPCORE_DARK_RATE_HZ on DeepCore) over NOISE_WINDOW_NS.
  - auxiliary = False when another DOM on the same string within two positions fires within 1 us (local
    coincidence, HLC), else True.
  - Trigger: an event is kept when at least TRIGGER_HLC_DOMS DOMs have an HLC pulse (like IceCube's SMT8);
    candidates that fail are dropped (their event ids are skipped, so ids have gaps, as in Kaggle). Events
    thus have >= 8 non-auxiliary pulses and, with noise, ~20 pulses at least. (Shortcut: candidates with light
    in fewer than TRIGGER_HLC_DOMS/2 DOMs are dropped before noise is added; noise alone almost never
    makes the missing local coincidences.)
Each batch has its own random stream seeded by (seed, batch number), so output is deterministic.
"""

import glob
import json
import math
import os
import signal
import sys
import time as walltime

from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from multiprocessing import get_context

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from configurator import check_ranges, configure, setting_names

# -----------------------------------------------------------------------------
# settings
out_dir = 'data/sim'
n_train_batches = 10
n_test_batches = 1
events_per_batch = 20000
seed = 1337
geometry = ''  # '' = generate an IceCube-like geometry; else a path to a sensor_geometry.csv
num_proc = max(1, min(8, os.cpu_count() or 1))  # worker processes, one batch file each (~300 MB each)
# physics constants (also overridable, e.g. --DARK_RATE_HZ=0; recorded in simulation.json)
E_MIN, E_MAX, SPECTRAL_INDEX = 1e2, 1e8, 1.9  # neutrino energy spectrum, GeV
FRAC_THROUGH, FRAC_STARTING = 0.04, 0.08  # track fractions among generated candidates; the rest are cascades
GEN_RADIUS, GEN_HALF_HEIGHT = 620.0, 580.0  # vertex cylinder for starting tracks and cascades, m
THROUGH_RADIUS = 800.0  # impact disk of through-going muons, m
TRACK_NPE = 20.0  # track light scale: pe at r = 1 m for a minimum-ionising muon, before attenuation
CASCADE_NPE = 0.4  # cascade light scale: pe per GeV at r = 1 m, before attenuation
CASCADE_TURN = 1.2  # extra Pandel distance, in local scattering lengths, of cascade light turned by 90 deg
CASCADE_SHIFT = 0.37  # a cascade's scattered light spreads from this many local scattering lengths ahead of it
E_CRIT = 1000.0  # GeV; above it muon light grows in proportion to energy
DEEPCORE_EFF = 1.35
DARK_RATE_HZ, DEEPCORE_DARK_RATE_HZ = 560.0, 780.0
NOISE_WINDOW_NS = 10000.0
WINDOW_START_NS = 6000.0  # event readout starts here; interactions happen 1-3 us later
MERGE_NS = 6.0
JITTER_NS = 2.5
MAX_GROUPS = 64  # photon groups drawn per DOM at most
SATURATION_PE = 3000.0  # largest pulse charge (real data: max 2,762 pe)
MU_MIN = 0.03  # DOMs whose expected pe bound is below this are not simulated
TRIGGER_HLC_DOMS = 8
# -----------------------------------------------------------------------------

_C_VACUUM = 0.2998  # m/ns
_N_GROUP = 1.356
_C_ICE = _C_VACUUM / _N_GROUP  # 0.2210 m/ns
_COS_CHERENKOV = math.cos(math.radians(40.7))
_SIN_CHERENKOV = math.sin(math.radians(40.7))
_COT_CHERENKOV = _COS_CHERENKOV / _SIN_CHERENKOV
_TRACK_DELAY_FACTOR = 0.9173  # (n_g - cos theta_c) / sin theta_c: extra path of Cherenkov light per metre of d_perp
_PANDEL_LAMBDA, _PANDEL_TAU, _PANDEL_LAMBDA_A = 33.3, 556.7, 98.0
_PANDEL_SCALE = 1.0 / (1.0 / _PANDEL_TAU + _C_ICE / _PANDEL_LAMBDA_A)
_SCATTER_REF = 33.3  # m: scattering length at which d_eff = r
_DOMS_PER_STRING = 60
_N_ICECUBE_STRINGS = 78  # strings after these are DeepCore (high efficiency, higher dark rate)
_CHUNK = 1000  # candidate events simulated together; fixed, so output does not depend on memory
_FORMAT_VERSION = 1
_det = None  # the detector of the running simulate() call, for its worker processes


# -----------------------------------------------------------------------------
# detector and ice

def make_geometry():
    """IceCube-like detector: (5160, 3) DOM positions, index = sensor_id. Fixed (does not depend on seed)."""
    spacing = 125.0
    i, j = np.meshgrid(np.arange(-8, 9), np.arange(-8, 9), indexing='ij')
    lattice = np.stack([spacing * (i + j / 2), spacing * j * math.sqrt(3) / 2], -1).reshape(-1, 2)
    # the 78 lattice points nearest the centre; the slight stretch in y breaks distance ties deterministically
    order = np.argsort(np.hypot(lattice[:, 0], 1.03 * lattice[:, 1]), kind='stable')
    strings = lattice[order[:_N_ICECUBE_STRINGS]]
    strings = strings[np.lexsort((strings[:, 0], strings[:, 1]))]  # number along rows, like IceCube
    rng = np.random.default_rng(86)
    strings = strings + rng.uniform(-4, 4, strings.shape)  # real strings are a few metres off the grid
    # DeepCore: 6 strings at the triangle centres around the central string, 2 one ring further out
    angles = np.radians(30 + 60 * np.arange(6))
    deepcore = np.concatenate([72.2 * np.stack([np.cos(angles), np.sin(angles)], -1),
                               144.3 * np.array([[math.cos(math.radians(90)), math.sin(math.radians(90))],
                                                 [math.cos(math.radians(270)), math.sin(math.radians(270))]])])
    z_icecube = np.linspace(500, -500, _DOMS_PER_STRING)  # 16.95 m spacing
    z_deepcore = np.concatenate([188.0 - 10.0 * np.arange(10), -159.0 - 7.0 * np.arange(50)])
    z_offsets = rng.uniform(-5, 5, _N_ICECUBE_STRINGS + 8)
    xy = np.concatenate([strings, deepcore])
    z = np.concatenate([np.tile(z_icecube, (_N_ICECUBE_STRINGS, 1)), np.tile(z_deepcore, (8, 1))]) + z_offsets[:, None]
    pos = np.concatenate([np.repeat(xy, _DOMS_PER_STRING, axis=0), z.reshape(-1, 1)], axis=1)
    return np.round(pos, 2)


def read_geometry(path):
    """Any Kaggle-style sensor_geometry.csv -> (n, 3) positions indexed by sensor_id. Clear errors on bad files."""
    if not os.path.isfile(path):
        raise SystemExit(f"simulate: geometry file {path} does not exist")
    with open(path) as f:
        header = f.readline().strip().split(',')
    if header[:4] != ['sensor_id', 'x', 'y', 'z']:
        raise SystemExit(f"simulate: geometry file {path} must start with the header sensor_id,x,y,z, got {','.join(header)}")
    try:
        table = np.loadtxt(path, delimiter=',', skiprows=1, usecols=(0, 1, 2, 3), ndmin=2)
    except ValueError as e:
        raise SystemExit(f"simulate: geometry file {path} has a row that is not four numbers: {e}")
    if not np.all(np.isfinite(table)):
        bad = np.nonzero(~np.all(np.isfinite(table), axis=1))[0][0]
        raise SystemExit(f"simulate: geometry file {path} has NaN or inf in data row {bad + 1}")
    n = len(table)
    if n == 0 or n % _DOMS_PER_STRING or not np.array_equal(table[:, 0], np.arange(n)):
        raise SystemExit(f"simulate: geometry file {path} must list sensor_id 0..n-1 in order, "
                         f"n a multiple of {_DOMS_PER_STRING} (strings of {_DOMS_PER_STRING} DOMs); got {n} rows")
    return table[:, 1:4].astype(np.float64)


# our own smooth fit to the shape of IceCube's depth profile: ~110 m absorption in the upper detector,
# ~210 m in the clear deep ice, and the dust layer (absorption down to ~20 m) centred at z = -90 m
def absorption_length(z):
    clear = 110.0 + 100.0 / (1.0 + np.exp((z + 180.0) / 60.0))
    dust = 1.0 - 0.84 * np.exp(-0.5 * ((z + 90.0) / 28.0) ** 2)
    return clear * dust


def scattering_length(z):
    return absorption_length(z) / 3.2  # effective scattering follows absorption (same dust), ratio ~3


# Path averages of 1/attenuation length and 1/scattering length between any two depths, tabulated on a 5 m
# grid: along a straight path the average over the path is the average over z, an exact integral. One table
# lookup per (source, DOM) pair is much cheaper than evaluating the ice model on millions of pairs.
_ICE_Z0, _ICE_DZ, _ICE_N = -1500.0, 5.0, 601
_ice_z = _ICE_Z0 + _ICE_DZ * np.arange(_ICE_N)
_ice_inv = np.stack([1.0 / np.sqrt(absorption_length(_ice_z) * scattering_length(_ice_z) / 3.0),  # diffusive attenuation
                     1.0 / scattering_length(_ice_z)], -1)
_MAX_ATTENUATION_LENGTH = float(1.0 / _ice_inv[:, 0].min())
_cum = np.concatenate([np.zeros((1, 2)), np.cumsum(_ice_inv, 0)])  # _cum[k] = sum of the first k grid values
_lo, _hi = np.minimum.outer(np.arange(_ICE_N), np.arange(_ICE_N)), np.maximum.outer(np.arange(_ICE_N), np.arange(_ICE_N))
_PATH_TABLE = ((_cum[_hi + 1] - _cum[_lo]) / (_hi - _lo + 1)[..., None]).reshape(-1, 2).astype(np.float32)
del _cum, _lo, _hi


def path_ice(z_from, z_to):
    """Path-averaged 1/attenuation length and 1/scattering length (1/m) along straight paths z_from -> z_to."""
    def cell(z):
        return np.clip(((z - _ICE_Z0) * (1 / _ICE_DZ) + 0.5).astype(np.int32), 0, _ICE_N - 1)
    inv = _PATH_TABLE[cell(z_from) * _ICE_N + cell(z_to)]
    return inv[:, 0], inv[:, 1]


def pmt_acceptance(cos_up):
    # cos_up: z component of the photon's travel direction. Downward PMT: 0 for light going down, 0.26 sideways, 1 up
    return 0.26 + 0.5 * cos_up + 0.24 * cos_up ** 2


_ACCEPTANCE_ISOTROPIC = 0.26 + 0.24 / 3  # average over isotropic light


def cascade_profile(cos_eta):
    # light emitted by a cascade, vs the angle to the cascade axis: peaked at the Cherenkov angle (max 1.95)
    return 0.35 + 1.6 * np.exp(-0.5 * ((cos_eta - _COS_CHERENKOV) / 0.22) ** 2)


_CASCADE_PROFILE_MAX = 1.95


# -----------------------------------------------------------------------------
# events

def sample_candidates(rng, n):
    """Candidate interactions: kind code (0 through-going, 1 starting track, 2 cascade), energy, direction, vertex, t0."""
    kind = np.searchsorted(np.cumsum([FRAC_THROUGH, FRAC_STARTING]), rng.random(n), side='right')
    g = 1.0 - SPECTRAL_INDEX  # inverse-CDF sampling of E^-gamma between E_MIN and E_MAX
    energy = (E_MIN ** g + rng.random(n) * (E_MAX ** g - E_MIN ** g)) ** (1.0 / g)
    zenith = np.arccos(rng.uniform(-1, 1, n))
    azimuth = rng.uniform(0, 2 * np.pi, n)
    comes_from = np.stack([np.cos(azimuth) * np.sin(zenith), np.sin(azimuth) * np.sin(zenith), np.cos(zenith)], -1)
    u = -comes_from  # particle direction
    # contained vertices: uniform in a cylinder around the detector
    radius, phi = GEN_RADIUS * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
    vertex = np.stack([radius * np.cos(phi), radius * np.sin(phi), rng.uniform(-GEN_HALF_HEIGHT, GEN_HALF_HEIGHT, n)], -1)
    # through-going muons: uniform impact point on a disk across the direction, entering 1 km before it
    a = np.where(np.abs(u[:, 2:3]) < 0.9, [[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]])
    e1 = np.cross(u, a)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(u, e1)
    radius, phi = THROUGH_RADIUS * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)
    impact = radius[:, None] * (np.cos(phi)[:, None] * e1 + np.sin(phi)[:, None] * e2)
    vertex = np.where((kind == 0)[:, None], impact - 1000.0 * u, vertex)
    t0 = rng.uniform(WINDOW_START_NS + 1000, WINDOW_START_NS + 3000, n)
    inelasticity = rng.uniform(0.05, 0.6, n)  # share of a starting track's energy in its vertex cascade
    muon_energy = np.where(kind == 0, energy * rng.uniform(0.05, 0.8, n), energy * (1 - inelasticity))
    return dict(kind=kind, energy=energy, azimuth=azimuth, zenith=zenith, u=u, vertex=vertex, t0=t0,
                inelasticity=inelasticity, muon_energy=muon_energy)


def max_distance(light, power):
    # largest photon path r where light * exp(-r / l_att_max) / r^power can still exceed MU_MIN
    r = np.arange(1.0, 4000.0, 5.0)
    log_bound = np.log(light)[:, None] - r[None, :] / _MAX_ATTENUATION_LENGTH - power * np.log(r)[None, :]
    return r[np.minimum((log_bound >= np.log(MU_MIN)).sum(1), len(r) - 1)]


def near_pairs(det, vertex, u, r_max, is_track):
    """(source, string) pairs that can see light, from a cheap lower bound of the distance from each source to
    each string (a vertical segment). Returns source and string indices; the callers then work on all 60 DOMs
    of each pair's string at once, as (pairs, 60) arrays."""
    xy, zmin, zmax, margin = det['string_xy'], det['string_zmin'], det['string_zmax'], det['string_margin']
    a = np.concatenate([xy[None, :, :] - vertex[:, None, :2], np.broadcast_to(-vertex[:, None, 2:3], (len(vertex), len(xy), 1))], -1)
    if is_track:
        # squared distance from the track line to the string point at height z is A z^2 + B z + C
        au = (a * u[:, None, :]).sum(-1)
        uz = u[:, 2:3]
        A = 1.0 - uz ** 2
        B = 2.0 * (a[..., 2] - au * uz)
        C = (a * a).sum(-1) - au ** 2
        z_star = np.clip(-B / (2.0 * np.maximum(A, 1e-12)), zmin, zmax)
        ends = (np.broadcast_to(zmin, B.shape), np.broadcast_to(zmax, B.shape))
        f = np.minimum.reduce([A * zz ** 2 + B * zz + C for zz in ends + (z_star,)])
        lower = np.sqrt(np.maximum(f, 0.0)) / _SIN_CHERENKOV  # photon path is d_perp / sin(theta_c)
    else:
        dz = np.clip(vertex[:, None, 2], zmin, zmax) - vertex[:, None, 2]
        lower = np.sqrt((a[..., :2] ** 2).sum(-1) + dz ** 2)
    return np.nonzero(lower - margin[None, :] < r_max[:, None])


def string_doms(det, vertex, src, string):
    # DOM ids and DOM positions relative to the source vertex, as (pairs, 60) arrays
    dom = string[:, None] * _DOMS_PER_STRING + np.arange(_DOMS_PER_STRING)
    block = det['pos_by_string'][string]  # float32: plenty for metres and ns, and half the memory traffic
    vertex = vertex.astype(np.float32)
    return (dom,) + tuple(block[:, :, i] - vertex[src, i][:, None] for i in range(3))


def track_light(det, c, idx):
    """Expected pe per (track source, DOM) pair, with the direct arrival time and the Pandel distance d_eff.
    idx: indices into the candidates c of events with a muon. Returns event, dom, mu, t_geo, d_eff per pair."""
    vertex, u = c['vertex'][idx], c['u'][idx]
    light = TRACK_NPE * (1.0 + c['muon_energy'][idx] / E_CRIT)
    r_max = max_distance(light * DEEPCORE_EFF, 0.5)
    src, string = near_pairs(det, vertex, u, r_max, True)
    dom, x, y, z = string_doms(det, vertex, src, string)  # DOMs relative to the vertex
    ux, uy, uz = (u[src, i][:, None] for i in range(3))
    s = x * ux + y * uy + z * uz  # along the track from the vertex to the closest approach
    d = np.sqrt(np.maximum(x * x + y * y + z * z - s * s, 0.0))  # perpendicular distance
    r = np.maximum(d / _SIN_CHERENKOV, 1.0)  # photon path from the emission point
    s_emit = s - d * _COT_CHERENKOV  # where the Cherenkov photon that reaches the DOM was emitted
    # starting muons exist only for 0 <= s_emit <= range (R = (1/b) ln(1 + E b/a), with a/b ~ 700 GeV and 1/b ~ 3 km for ice);
    # through-going ones from their entry point on
    muon_range = np.where(c['kind'][idx] == 0, np.inf, 3000.0 * np.log1p(c['muon_energy'][idx] / 700.0))
    keep = (r < r_max[src, None]) & (s_emit >= 0) & (s_emit <= muon_range[src, None])
    src = np.broadcast_to(src[:, None], keep.shape)[keep]
    uz = np.broadcast_to(uz, keep.shape)[keep]
    dom, z, s, d, r, s_emit = (a[keep] for a in (dom, z, s, d, r, s_emit))
    z_dom = det['pos'][dom, 2]
    inv_att, inv_scat = path_ice(z_dom - z + s_emit * uz, z_dom)
    direct = np.exp(-r * inv_scat)  # share of the light that still remembers its direction
    acceptance = direct * pmt_acceptance((z - s_emit * uz) / r) + (1 - direct) * _ACCEPTANCE_ISOTROPIC
    mu = light[src] * np.exp(-r * inv_att) / np.sqrt(r) * acceptance * det['eff'][dom]
    t_geo = c['t0'][idx][src] + (s + d * _TRACK_DELAY_FACTOR) / _C_VACUUM
    return idx[src], dom, mu, t_geo, r * _SCATTER_REF * inv_scat


def cascade_light(det, c, idx, energy):
    """Like track_light, for point-like cascades with the given energies at the vertices of candidates idx."""
    vertex, u = c['vertex'][idx], c['u'][idx]
    light = CASCADE_NPE * energy
    r_max = max_distance(light * DEEPCORE_EFF * _CASCADE_PROFILE_MAX, 1.0)
    src, string = near_pairs(det, vertex, u, r_max, False)
    dom, x, y, z = string_doms(det, vertex, src, string)
    r = np.maximum(np.sqrt(x * x + y * y + z * z), 1.0)
    keep = r < r_max[src, None]
    src = np.broadcast_to(src[:, None], keep.shape)[keep]
    dom, x, y, z, r = (a[keep] for a in (dom, x, y, z, r))
    z_dom = det['pos'][dom, 2]
    inv_att, inv_scat = path_ice(z_dom - z, z_dom)
    direct = np.exp(-r * inv_scat)
    cos_eta = (x * u[src, 0] + y * u[src, 1] + z * u[src, 2]) / r  # angle to the cascade axis
    # scattered light spreads as from a source CASCADE_SHIFT scattering lengths ahead of the vertex, softened by that
    # length near it: DOMs ahead stay brighter than DOMs behind at any distance
    shift = CASCADE_SHIFT / inv_scat
    r_soft = np.sqrt(r * r + shift * shift)
    r_ahead = np.sqrt(r * r - 2 * shift * r * cos_eta + 2 * shift * shift)
    diffuse = r_soft / r_ahead * np.exp(-(r_ahead - r_soft) * inv_att)
    emission = direct * cascade_profile(cos_eta) + (1 - direct) * diffuse
    acceptance = direct * pmt_acceptance(z / r) + (1 - direct) * _ACCEPTANCE_ISOTROPIC
    mu = light[src] * np.exp(-r * inv_att) / r * emission * acceptance * det['eff'][dom]
    t_geo = c['t0'][idx][src] + _N_GROUP * r / _C_VACUUM
    # Light reaches a DOM off the Cherenkov cone only after scattering has turned it by the angle delta
    # between the DOM's direction and the cone, so it comes later: the Pandel distance grows by
    # CASCADE_TURN * (1 - cos delta) scattering lengths (1 - cos delta is 1.76 right behind the cascade). Close
    # DOMs (r of a few scattering lengths) thus see the cascade's direction in their first-hit times too.
    sin_eta = np.sqrt(np.maximum(1.0 - cos_eta * cos_eta, 0.0))
    cos_delta = cos_eta * _COS_CHERENKOV + sin_eta * _SIN_CHERENKOV
    d_eff = (r * inv_scat + CASCADE_TURN * (1.0 - cos_delta)) * _SCATTER_REF
    return idx[src], dom, mu, t_geo, d_eff


def spe_charge(rng, n):
    # single-photoelectron charges: a Gaussian peak at 1 pe plus a low-charge exponential tail (15%)
    return np.where(rng.random(n) < 0.15, rng.exponential(0.25, n), rng.normal(1.0, 0.3, n)).clip(0.025, None)


def photons(rng, event, dom, mu, t_geo, d_eff):
    """Poisson photons per (event, dom) pair, each with its own Pandel delay and jitter. Bright DOMs get at most
    MAX_GROUPS photon groups that share the charge. Returns event, dom, time, charge per photon (group)."""
    n = rng.poisson(mu)
    hit = n > 0
    event, dom, t_geo, d_eff, n = event[hit], dom[hit], t_geo[hit], d_eff[hit], n[hit]
    groups = np.minimum(n, MAX_GROUPS)
    weight = np.repeat(n / groups, groups)
    shape = np.repeat(np.maximum(d_eff / _PANDEL_LAMBDA, 1e-3), groups)
    t = np.repeat(t_geo, groups) + rng.gamma(shape, _PANDEL_SCALE) + rng.normal(0, JITTER_NS, len(shape))
    charge = np.where(weight > 1, weight * rng.normal(1.0, 0.35 / np.sqrt(weight)), spe_charge(rng, len(weight)))
    return np.repeat(event, groups), np.repeat(dom, groups), t, charge


def simulate_chunk(rng, det, n):
    """Simulate n candidate events. Returns the candidates, the trigger mask per candidate, and the triggered
    events' pulses (local event index, sensor, time, charge, auxiliary) sorted by (event, time)."""
    c = sample_candidates(rng, n)
    tracks = np.nonzero(c['kind'] < 2)[0]
    vertex_cascades = np.nonzero(c['kind'] > 0)[0]  # starting tracks and cascades light up at the vertex
    cascade_energy = np.where(c['kind'][vertex_cascades] == 1, c['inelasticity'][vertex_cascades], 1.0) * c['energy'][vertex_cascades]
    parts = [photons(rng, *track_light(det, c, tracks)),
             photons(rng, *cascade_light(det, c, vertex_cascades, cascade_energy))]
    event, dom, t, charge = (np.concatenate(x) for x in zip(*parts))
    # shortcut: a candidate with light in fewer than half the trigger's DOMs cannot trigger (noise alone makes
    # a local coincidence in ~1 event in 10), so it is dropped before the costly noise, merging and HLC steps
    lit_doms = np.unique(event.astype(np.int64) * len(det['pos']) + dom) // len(det['pos'])
    alive = np.bincount(lit_doms, minlength=n) >= TRIGGER_HLC_DOMS // 2
    keep = alive[event]
    event, dom, t, charge = event[keep], dom[keep], t[keep], charge[keep]
    # dark noise: a Poisson number of pulses per event on DOMs drawn by their dark rate, uniform in the window
    n_noise = rng.poisson(det['rate'].sum() * NOISE_WINDOW_NS * 1e-9, n) * alive
    noise_event = np.repeat(np.arange(n), n_noise)
    noise_dom = np.minimum(np.searchsorted(det['rate_cdf'], rng.random(len(noise_event))), len(det['rate']) - 1)
    noise_t = WINDOW_START_NS + rng.random(len(noise_event)) * NOISE_WINDOW_NS
    noise_charge = spe_charge(rng, len(noise_event))
    event, dom, t, charge = (np.concatenate(x) for x in ((event, noise_event), (dom, noise_dom), (t, noise_t), (charge, noise_charge)))

    # photons of one DOM closer than MERGE_NS in time form one pulse
    order = np.lexsort((t, dom, event))
    event, dom, t, charge = event[order], dom[order], t[order], charge[order]
    new_pulse = np.ones(len(t), bool)
    new_pulse[1:] = (event[1:] != event[:-1]) | (dom[1:] != dom[:-1]) | (t[1:] - t[:-1] > MERGE_NS)
    starts = np.nonzero(new_pulse)[0]
    charge = np.add.reduceat(charge, starts) if len(starts) else charge[:0]
    event, dom, t = event[starts], dom[starts], np.round(t[starts]).astype(np.int64)
    charge = np.clip(np.round(charge / 0.025), 1, SATURATION_PE / 0.025) * 0.025  # the PMT saturates
    charge = charge.astype(np.float16).astype(np.float64)

    # local coincidence: a pulse is HLC if a DOM 1 or 2 positions away on the same string fires within 1 us
    key = (event.astype(np.int64) * len(det['pos']) + dom) << 21 | t  # sorted, since t < 2^21 ns
    hlc = np.zeros(len(t), bool)
    for step in (-2, -1, 1, 2):
        other = dom + step
        same_string = (other >= 0) & (other // _DOMS_PER_STRING == dom // _DOMS_PER_STRING)
        base = (event.astype(np.int64) * len(det['pos']) + other) << 21
        found = np.searchsorted(key, base | (t + 1000), 'right') - np.searchsorted(key, base | np.maximum(t - 1000, 0), 'left')
        hlc |= same_string & (found > 0)

    # trigger: enough DOMs with an HLC pulse
    hlc_doms = np.unique(event[hlc].astype(np.int64) * len(det['pos']) + dom[hlc])
    triggered = np.bincount(hlc_doms // len(det['pos']), minlength=n) >= TRIGGER_HLC_DOMS

    keep = triggered[event]
    order = np.lexsort((dom[keep], t[keep], event[keep]))  # Kaggle order: by time within an event
    pulses = dict(event=event[keep][order], sensor_id=dom[keep][order].astype(np.int16), time=t[keep][order],
                  charge=charge[keep][order], auxiliary=~hlc[keep][order])
    return c, triggered, pulses


def max_candidates(n_events):
    # candidates simulated per batch at most (whole chunks); also the event-id stride between batches
    return _CHUNK * math.ceil(50 * n_events / _CHUNK)


def simulate_batch(rng, det, n_events, id_base):
    """Simulate candidates chunk by chunk until n_events trigger. Returns per-pulse columns and per-event labels."""
    chunks, labels, n_kept, n_candidates = [], [], 0, 0
    while n_kept < n_events:
        if n_candidates >= max_candidates(n_events):
            raise SystemExit("simulate: fewer than 2% of candidate events trigger; check the physics settings")
        c, triggered, pulses = simulate_chunk(rng, det, _CHUNK)
        kept = np.nonzero(triggered)[0][:n_events - n_kept]
        local = np.full(_CHUNK, -1)
        local[kept] = np.arange(len(kept)) + n_kept
        mask = local[pulses['event']] >= 0
        pulses = {k: v[mask] for k, v in pulses.items()}
        pulses['event'] = local[pulses['event']]
        chunks.append(pulses)
        labels.append(dict(event_id=id_base + n_candidates + kept, energy=c['energy'][kept],
                           kind=np.where(c['kind'][kept] < 2, 'track', 'cascade'), vertex=c['vertex'][kept],
                           azimuth=c['azimuth'][kept], zenith=c['zenith'][kept]))
        n_kept += len(kept)
        n_candidates += _CHUNK
    pulses = {k: np.concatenate([p[k] for p in chunks]) for k in chunks[0]}
    labels = {k: np.concatenate([l[k] for l in labels]) for k in labels[0]}
    return pulses, labels


# -----------------------------------------------------------------------------
# writing, atomically

def _atomic(path, write):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(text, path):
    def write(tmp):
        with open(tmp, 'w') as f:
            f.write(text)
    _atomic(path, write)


def _write_table(table, path):
    _atomic(path, lambda tmp: pq.write_table(table, tmp))


def batch_table(pulses, event_ids):
    """A batch file as pandas would write it: columns sensor_id, time, charge, auxiliary and the event_id index."""
    columns = {'sensor_id': pa.array(pulses['sensor_id'], pa.int16()), 'time': pa.array(pulses['time'], pa.int64()),
               'charge': pa.array(pulses['charge'], pa.float64()), 'auxiliary': pa.array(pulses['auxiliary'], pa.bool_()),
               'event_id': pa.array(event_ids[pulses['event']], pa.int64())}
    types = {'sensor_id': 'int16', 'time': 'int64', 'charge': 'float64', 'auxiliary': 'bool', 'event_id': 'int64'}
    pandas_meta = {
        'index_columns': ['event_id'],
        'column_indexes': [{'name': None, 'field_name': None, 'pandas_type': 'unicode', 'numpy_type': 'object',
                            'metadata': {'encoding': 'UTF-8'}}],
        'columns': [{'name': k, 'field_name': k, 'pandas_type': v, 'numpy_type': v, 'metadata': None} for k, v in types.items()],
        'creator': {'library': 'pyarrow', 'version': pa.__version__},
        'pandas_version': '1.5.3',
    }
    return pa.table(columns).replace_schema_metadata({b'pandas': json.dumps(pandas_meta).encode()})


def meta_table(batch_ids, labels, counts, with_angles):
    # rows of a batch file count from 0 in each file
    first_in_batch = np.zeros(len(counts), np.int64)
    for b in np.unique(batch_ids):
        m = batch_ids == b
        starts = np.concatenate([[0], np.cumsum(counts[m])[:-1]])
        first_in_batch[m] = starts
    last = first_in_batch + counts - 1
    cols = {'batch_id': pa.array(batch_ids, pa.int64()), 'event_id': pa.array(labels['event_id'], pa.int64()),
            'first_pulse_index': pa.array(first_in_batch, pa.int64()), 'last_pulse_index': pa.array(last, pa.int64())}
    if with_angles:
        cols['azimuth'] = pa.array(labels['azimuth'], pa.float64())
        cols['zenith'] = pa.array(labels['zenith'], pa.float64())
    return pa.table(cols)


def truth_table(batch_ids, labels):
    return pa.table({'event_id': pa.array(labels['event_id'], pa.int64()), 'batch_id': pa.array(batch_ids, pa.int64()),
                     'energy': pa.array(labels['energy'], pa.float64()), 'kind': pa.array(labels['kind'].tolist(), pa.string()),
                     'vertex_x': pa.array(labels['vertex'][:, 0]), 'vertex_y': pa.array(labels['vertex'][:, 1]),
                     'vertex_z': pa.array(labels['vertex'][:, 2])})


def physics_constants():
    # every upper-case setting, in the order defined: a constant added above is recorded in simulation.json too, so a
    # set made with another value of it is refused rather than mixed
    return {k: globals()[k] for k in setting_names(globals()) if k.isupper()}


def check_settings(g):
    """Settings and physics constants out of range are named in one line, before any work: a negative dark rate, say,
    would run on and write a data set of nonsense noise (its sampling table no longer increases)."""
    at_least = dict(n_train_batches=1, n_test_batches=0, events_per_batch=1, num_proc=1, MAX_GROUPS=1,
                    TRIGGER_HLC_DOMS=1, **{k: 0.0 for k in ['FRAC_THROUGH', 'FRAC_STARTING', 'TRACK_NPE', 'CASCADE_NPE',
                                                           'CASCADE_TURN', 'CASCADE_SHIFT', 'DEEPCORE_EFF', 'DARK_RATE_HZ',
                                                           'DEEPCORE_DARK_RATE_HZ', 'NOISE_WINDOW_NS', 'WINDOW_START_NS',
                                                           'MERGE_NS', 'JITTER_NS']})
    more = [f"E_MAX={g['E_MAX']!r} (above E_MIN={g['E_MIN']!r})"] if not g['E_MAX'] > g['E_MIN'] else []
    more += ["SPECTRAL_INDEX=1.0 (any other: the energies are drawn by E^(1 - index))"] if g['SPECTRAL_INDEX'] == 1 else []
    more += [f"FRAC_THROUGH + FRAC_STARTING = {g['FRAC_THROUGH'] + g['FRAC_STARTING']!r} (at most 1: the rest are "
             f"cascades)"] if g['FRAC_THROUGH'] + g['FRAC_STARTING'] > 1 else []
    check_ranges('simulate', g, at_least=at_least, more=more, above=dict.fromkeys(
        ['E_MIN', 'GEN_RADIUS', 'GEN_HALF_HEIGHT', 'THROUGH_RADIUS', 'E_CRIT', 'SATURATION_PE', 'MU_MIN'], 0))


def detector(pos):
    n_strings = len(pos) // _DOMS_PER_STRING
    by_string = pos.reshape(n_strings, _DOMS_PER_STRING, 3)
    string_xy = by_string[:, :, :2].mean(1)
    high_qe = np.arange(len(pos)) // _DOMS_PER_STRING >= _N_ICECUBE_STRINGS  # DeepCore strings 79-86
    rate = np.where(high_qe, DEEPCORE_DARK_RATE_HZ, DARK_RATE_HZ)
    return dict(pos=pos, pos_by_string=by_string.astype(np.float32), eff=np.where(high_qe, DEEPCORE_EFF, 1.0), rate=rate, rate_cdf=np.cumsum(rate) / rate.sum(),
                string_xy=string_xy, string_zmin=by_string[:, :, 2].min(1), string_zmax=by_string[:, :, 2].max(1),
                string_margin=np.linalg.norm(by_string[:, :, :2] - string_xy[:, None], axis=-1).max(1) + 1.0)


def worker_start(parent):
    """A pool worker's first step (prepare.py's workers take it too). It takes back SIGTERM's default action, which a
    parent's handler (stop, train.py's on_signal) replaced before the fork: a worker that kept it raised inside its
    task or ran on after the SIGTERM meant to end it. It ignores Ctrl-C, which reaches the whole process group: the
    parent stops its workers. And on Linux it is killed when its parent dies, so a SIGTERM to the main process alone (a
    scheduler's) or the out-of-memory killer, which no handler sees, leaves no worker running on, orphaned.
    parent: the parent's pid, read before the fork."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith('linux'):
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before that
            os._exit(1)


class Stopped(SystemExit):
    """A script stopped by a signal (stop); its code is the exit status, 128 + the signal number."""


def stop(signum, frame):
    """The handler of SIGTERM (a scheduler's stop) and Ctrl-C in simulate.py, prepare.py and bench.py: an exception
    that unwinds, so that the pools kill their workers (worker_pool) and temporary files go, and the script says so in
    one line."""
    signal.signal(signum, signal.SIG_IGN)  # once: a second signal would cut that clean-up short
    raise Stopped(128 + signum)


@contextmanager
def worker_pool(num_proc, initializer=worker_start):
    """A forked process pool (prepare.py's too) whose workers are killed, not waited for, when the run is interrupted
    (Ctrl-C, or SIGTERM through stop): the pool's own shutdown lets them finish every task already handed to them
    first (no public way before Python 3.14's kill_workers), up to 2 * num_proc batch files. A worker killed mid-task
    leaves its temporary file or folder, never an output that looks complete. On an error they still finish the tasks
    they are on; the queued ones are cancelled by the shutdown, in the pool's own thread (futures cancelled from this
    one while the killed workers made that thread fail them raised InvalidStateError there, Python 3.11)."""
    pool = ProcessPoolExecutor(num_proc, mp_context=get_context('fork'), initializer=initializer,
                               initargs=(os.getpid(),))
    try:
        yield pool
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            for p in list((pool._processes or {}).values()):
                p.kill()
        if sys.version_info < (3, 11):
            _end_task_pipe(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _end_task_pipe(pool):
    """On Python 3.10 the pool's shutdown waited forever once its workers were gone (killed by worker_pool, or one
    ended by the out-of-memory killer, after which the pool ends the others) while its queue's feeder thread was
    writing them a task, a batch file's meta and truth in prepare.py, more than a pipe holds: this process keeps the
    pipe's reading end, so the write never failed. 3.11 on close that end when a worker dies (CPython issue 94777).
    Closing it here raced with the feeder thread's own close of it (a file opened in between lost its descriptor: "Bad
    file descriptor"); /dev/null put in its place ends the pipe for the feeder just the same and keeps the descriptor
    for that one close. Live workers (an error's run) keep their own ends and finish their tasks."""
    try:
        fd = pool._call_queue._reader.fileno()
    except OSError:  # closed by the feeder thread already: it was not stuck
        return
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, fd)
    os.close(null)


def _simulate_batch_file(job):
    """Simulate one batch file and write it. Each batch has its own random stream seeded by (seed, batch
    number), so the output does not depend on which process runs it or in what order."""
    out_dir, split, batch_id, events_per_batch, seed = job
    t_start = walltime.time()
    rng = np.random.default_rng([seed, batch_id])
    id_stride = max_candidates(events_per_batch)  # candidate ids of different batches never overlap
    pulses, labels = simulate_batch(rng, _det, events_per_batch, (batch_id - 1) * id_stride + 1)
    _write_table(batch_table(pulses, labels['event_id']), os.path.join(out_dir, split, f'batch_{batch_id}.parquet'))
    counts = np.bincount(pulses['event'], minlength=events_per_batch)
    return split, batch_id, labels, counts, len(pulses['time']), walltime.time() - t_start


def simulate(out_dir=out_dir, n_train_batches=n_train_batches, n_test_batches=n_test_batches,
             events_per_batch=events_per_batch, seed=seed, geometry=geometry, num_proc=num_proc):
    """Write a synthetic Kaggle-layout data set to out_dir (see the module docstring). Returns out_dir."""
    check_settings(dict(physics_constants(), n_train_batches=n_train_batches, n_test_batches=n_test_batches,
                        events_per_batch=events_per_batch, num_proc=num_proc))
    settings = dict(n_train_batches=n_train_batches, n_test_batches=n_test_batches, events_per_batch=events_per_batch,
                    seed=seed, geometry=geometry)
    record = dict(generator='iceaggr simulate.py', format_version=_FORMAT_VERSION, settings=settings,
                  physics=physics_constants(), complete=False)
    info_path = os.path.join(out_dir, 'simulation.json')
    if os.path.exists(info_path):
        with open(info_path) as f:
            old = json.load(f)
        differ = [f"format_version {old.get('format_version')!r} (now {_FORMAT_VERSION!r}: an older simulate.py)"] \
            if old.get('format_version') != _FORMAT_VERSION else []
        for part in ('settings', 'physics'):
            was = old.get(part) or {}
            differ += [f"{k}={was.get(k)!r} (now {v!r})" for k, v in record[part].items() if was.get(k) != v]
            differ += [f"{k}={was[k]!r} (now none)" for k in was if k not in record[part]]
        if differ:
            raise SystemExit(f"simulate: {out_dir} already holds a synthetic data set made otherwise ({info_path}: "
                             f"{', '.join(differ)}); delete that folder to simulate it anew, or simulate into another one")
        if old.get('complete'):
            print(f"simulate: {out_dir} already holds this data set (complete, same settings); nothing to do")
            return out_dir
        print(f"simulate: {out_dir} holds an interrupted run with the same settings; regenerating it")
        for pattern in ('*.tmp*', os.path.join('*', '*.tmp*')):  # a killed worker's unfinished files (_atomic)
            for tmp in glob.glob(os.path.join(glob.escape(out_dir), pattern)):
                os.remove(tmp)
    elif os.path.isdir(out_dir) and os.listdir(out_dir):
        raise SystemExit(f"simulate: {out_dir} is not empty and has no simulation.json (real data, or files from "
                         f"something else); refusing to write into it")
    os.makedirs(os.path.join(out_dir, 'train'), exist_ok=True)
    os.makedirs(os.path.join(out_dir, 'test'), exist_ok=True)
    _write_text(json.dumps(record, indent=1) + '\n', info_path)

    pos = read_geometry(geometry) if geometry else make_geometry()
    det = detector(pos)
    lines = ['sensor_id,x,y,z'] + [f"{i},{x:.2f},{y:.2f},{z:.2f}" for i, (x, y, z) in enumerate(pos)]
    _write_text('\n'.join(lines) + '\n', os.path.join(out_dir, 'sensor_geometry.csv'))

    n_batches = n_train_batches + n_test_batches
    global _det
    _det = det  # forked workers inherit it
    jobs = [(out_dir, 'train' if b <= n_train_batches else 'test', b, events_per_batch, seed) for b in range(1, n_batches + 1)]
    per_split = {'train': ([], [], []), 'test': ([], [], [])}  # batch ids, labels, pulse counts
    workers = max(1, min(num_proc, n_batches))
    # num_proc = 1: no fork, in this process (easier to debug and profile)
    with worker_pool(workers) if workers > 1 else nullcontext() as pool:
        # in batch order, each future read in turn: pool.map's iterator, interrupted, cancels the queued futures
        # itself, which worker_pool leaves to the pool's shutdown
        done = map(_simulate_batch_file, jobs) if pool is None else (
            f.result() for f in [pool.submit(_simulate_batch_file, job) for job in jobs])
        for split, batch_id, labels, counts, n_pulses, dt in done:
            ids, labs, cnts = per_split[split]
            ids.append(np.full(events_per_batch, batch_id, np.int64))
            labs.append(labels)
            cnts.append(counts)
            print(f"batch {batch_id}/{n_batches} ({split}/batch_{batch_id}.parquet): {events_per_batch} events, "
                  f"{n_pulses} pulses, {n_pulses / dt:,.0f} pulses/s/process", flush=True)

    # the small files last, train_meta.parquet the very last but simulation.json: a reader that finds
    # train_meta.parquet finds everything else in place
    for split in ('test', 'train'):
        ids, labs, cnts = per_split[split]
        if not ids:
            # no test batches asked for: still write empty, well-typed meta and truth files
            labels = dict(event_id=np.zeros(0, np.int64), energy=np.zeros(0), kind=np.zeros(0, str),
                          vertex=np.zeros((0, 3)), azimuth=np.zeros(0), zenith=np.zeros(0))
            ids, labs, cnts = [np.zeros(0, np.int64)], [labels], [np.zeros(0, np.int64)]
        batch_ids, counts = np.concatenate(ids), np.concatenate(cnts)
        labels = {k: np.concatenate([l[k] for l in labs]) for k in labs[0]}
        _write_table(truth_table(batch_ids, labels), os.path.join(out_dir, f'{split}_truth.parquet'))
        if split == 'test':
            rows = ['event_id,azimuth,zenith'] + [f"{e},1,1" for e in labels['event_id']]
            _write_text('\n'.join(rows) + '\n', os.path.join(out_dir, 'sample_submission.csv'))
        _write_table(meta_table(batch_ids, labels, counts, split == 'train'), os.path.join(out_dir, f'{split}_meta.parquet'))
    record['complete'] = True
    _write_text(json.dumps(record, indent=1) + '\n', info_path)
    return out_dir


if __name__ == '__main__':
    configure(globals())
    t_start = walltime.time()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        simulate(out_dir=out_dir, n_train_batches=n_train_batches, n_test_batches=n_test_batches,
                 events_per_batch=events_per_batch, seed=seed, geometry=geometry, num_proc=num_proc)
    except Stopped as e:
        print(f"simulate: stopped by {signal.Signals(e.code - 128).name}; {out_dir} is not complete (simulation.json "
              f"says so), and the same command makes it anew", file=sys.stderr)
        raise
    print(f"simulate: {out_dir} ready ({walltime.time() - t_start:.0f} s)")
