"""tests/gpu_check.sh without a GPU: with no time budget every stage is skipped, so only its paths are run."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_relative_out_is_taken_from_where_the_script_is_run(tmp_path):
    # the script works from the repository root: OUT='my out' went inside the repository, not where it was asked
    env = dict(os.environ, OUT='my out', GPU_CHECK_BUDGET_S='0', GPU_CHECK_DEVICE='cpu', PYTHON=sys.executable)
    p = subprocess.run(['bash', f'{ROOT}/tests/gpu_check.sh'], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert 'train: skipped' in (tmp_path / 'my out' / 'summary.txt').read_text()
    assert not os.path.exists(f'{ROOT}/my out')
