import os
import sys

import numpy as np

# A process's first backward starts autograd's threads for every device it sees beside the CPU, after which no
# process it forks can run a backward ("Unable to handle autograd's threading in combination with fork-based
# multiprocessing"; torch's wiki page "Autograd and Fork"), and prepare's quick-fit workers, which many tests fork, do.
# So the suite runs on the CPU alone: on a machine with GPUs it hides them (set before torch reads it, and inherited
# by the scripts the tests start) unless ICEAGGR_CUDA_TESTS=1, which tests/gpu_check.sh sets for
# tests/test_model.py's CUDA tests (whose processes fork nothing). And it runs that first backward before any test:
# on PyPI's torch (the CUDA build, what pip gives Python 3.10 to 3.13 on Linux) a torch.compile before it made it see
# a device also with no GPU (test_bench's FlexAttention forward, compiled by torch also when called uncompiled, then
# its backward), and every later prepare.run failed in its forked workers (96 tests; the CPU wheel was not affected).
if os.environ.get('ICEAGGR_CUDA_TESTS') != '1':
    os.environ['CUDA_VISIBLE_DEVICES'] = ''

import torch  # noqa: E402

torch.ones(1, requires_grad=True).sum().backward()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import classical  # noqa: E402


def with_linefits(b):
    """The LineFit columns prepare.py stores with each event and pulse, computed on the batch's own pulses (in
    float32, as the model did before they were stored)."""
    n_p, n_d, n_e = b['n_pulses'], b['n_doms'], b['n_events']
    pdom = b['pulse_dom'][:n_p].astype(np.int64)
    v, u, direct = classical.linefit_seeds(*map(torch.from_numpy, (b['dom_pos'][pdom], b['pulse_time'][:n_p], b['pulse_aux'][:n_p],
                                                                   b['dom_event'][pdom].astype(np.int64), pdom, b['dom_pos'][:n_d])), n_e)
    E, P = len(b['event_index']), len(b['pulse_dom'])
    b = {**b, 'event_lf_v': np.zeros((E, 3), np.float32), 'event_ilf_dir': np.zeros((E, 3), np.float32),
         'pulse_direct': np.zeros(P, np.float32)}
    b['event_lf_v'][:n_e], b['event_ilf_dir'][:n_e], b['pulse_direct'][:n_p] = v.numpy(), u.numpy(), direct.numpy()
    return b
