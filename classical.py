"""
Classical direction reconstruction: the baselines a learned model has to beat.

All functions work on a whole batch of events at once. Pulses of all events are concatenated;
event j owns pulses [event_offsets[j], event_offsets[j+1]). Directions are unit vectors of where the
neutrino COMES FROM (the Kaggle convention): x = cos(az) sin(zen), y = sin(az) sin(zen), z = cos(zen);
the particle itself travels along minus that vector.

    linefit           plain LineFit: least-squares line r(t) = r0 + v t through the pulses, closed form
    angles_to_vector  (azimuth, zenith) -> unit vectors
    vector_to_angles  unit vectors -> (azimuth in [0, 2pi), zenith in [0, pi])
    angular_error     angle between two sets of directions, radians (the Kaggle metric per event)
"""

import numpy as np


def _event_mean(values, event_offsets):
    # mean over each event's pulses; values (P,) or (P, k). reduceat needs non-empty events, checked by the caller
    sums = np.add.reduceat(values, event_offsets[:-1], axis=0)
    counts = np.diff(event_offsets).astype(np.float64)
    return sums / (counts[:, None] if sums.ndim == 2 else counts)


def linefit(pos, time, event_offsets):
    """Plain LineFit. pos (P, 3) metres, time (P,) ns, event_offsets (n_events + 1,) int64.
    Returns (n_events, 3) float64 unit vectors of the direction the neutrino comes from.
    The fitted velocity is v = (<r t> - <r><t>) / (<t^2> - <t>^2); the particle moves along v, so the
    neutrino comes from -v. Events whose pulses all share one time, or whose fit velocity is zero,
    get the finite fallback (0, 0, 1)."""
    pos = np.asarray(pos, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    event_offsets = np.asarray(event_offsets, dtype=np.int64)
    if pos.ndim != 2 or pos.shape[1] != 3 or len(pos) != len(time):
        raise ValueError(f"linefit: pos must be (P, 3) and time (P,), got {pos.shape} and {time.shape}")
    if event_offsets[0] != 0 or event_offsets[-1] != len(time) or np.any(np.diff(event_offsets) <= 0):
        raise ValueError("linefit: event_offsets must start at 0, end at the pulse count and give every event a pulse")
    n_pulses = np.diff(event_offsets)
    # centre times per event first: t is ~1e4 ns, so <t^2> - <t>^2 straight from raw times loses precision
    t = time - np.repeat(_event_mean(time, event_offsets), n_pulses)
    # with <t> = 0 the <r><t> term vanishes: v = <r t> / <t^2>
    mean_rt = _event_mean(pos * t[:, None], event_offsets)
    var_t = _event_mean(t * t, event_offsets)
    v = mean_rt / np.where(var_t > 0, var_t, 1.0)[:, None]
    v[var_t <= 0] = 0.0
    speed = np.linalg.norm(v, axis=1)
    direction = np.tile(np.array([0.0, 0.0, 1.0]), (len(v), 1))
    ok = speed > 0
    direction[ok] = -v[ok] / speed[ok, None]
    return direction


def angles_to_vector(azimuth, zenith):
    azimuth, zenith = np.asarray(azimuth, np.float64), np.asarray(zenith, np.float64)
    sin_zen = np.sin(zenith)
    return np.stack([np.cos(azimuth) * sin_zen, np.sin(azimuth) * sin_zen, np.cos(zenith)], axis=-1)


def vector_to_angles(v):
    """(n, 3) vectors (need not be unit length) -> azimuth in [0, 2pi), zenith in [0, pi]."""
    v = np.asarray(v, np.float64)
    norm = np.linalg.norm(v, axis=-1)
    zenith = np.arccos(np.clip(v[..., 2] / np.where(norm > 0, norm, 1.0), -1.0, 1.0))
    azimuth = np.mod(np.arctan2(v[..., 1], v[..., 0]), 2 * np.pi)
    azimuth = np.where(azimuth >= 2 * np.pi, 0.0, azimuth)  # mod can round up to exactly 2pi
    return azimuth, zenith


def angular_error(u, v):
    """Per-event angle in radians between directions u and v, (n, 3) each (normalised here)."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    u = u / np.linalg.norm(u, axis=-1, keepdims=True)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    return np.arccos(np.clip(np.sum(u * v, axis=-1), -1.0, 1.0))
