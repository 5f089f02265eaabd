"""Two JAX processes x two host CPU devices, joined by jax.distributed on 127.0.0.1 (gloo).

Each process runs tests/multihost_worker.py: jaxbn.batch_norm under shard_map over the mesh of
all 4 devices, with an uneven mask (one device fully masked). Statistics synchronized across
the processes must equal the float64 reference (tests/_reference.py) over the valid rows of
the whole global batch: outputs, running statistics and the gradients with respect to x,
scale and bias.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import _reference as ref
import multihost_worker as worker
import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)  # each worker sets its own 2 devices
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def _reference(problem: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float64 reference over the valid rows of the global batch, and the gradients of
    ``sum(y * cotangent)``."""
    return ref.train_step(
        problem["x"],
        problem["cotangent"],
        scale=problem["scale"],
        bias=problem["bias"],
        running_mean=problem["mean0"],
        running_var=problem["var0"],
        momentum=worker.MOMENTUM,
        mask=problem["valid"][:, None],
        eps=worker.EPSILON,
    )._asdict()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict[str, np.ndarray]]:
    """Runs both worker processes once and loads what each wrote."""
    out_dir = tmp_path_factory.mktemp("multihost")
    port = _free_port()
    outs = [out_dir / f"process{i}.npz" for i in range(worker.PROCESSES)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(TESTS / "multihost_worker.py"), str(port), str(i), str(out)],
            env=_worker_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, out in enumerate(outs)
    ]
    logs = []
    for i, proc in enumerate(procs):
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            stdout, stderr = proc.communicate()
            logs.append(f"process {i} timed out after {TIMEOUT_S} s\n{stdout}\n{stderr}")
            continue
        if proc.returncode != 0:
            logs.append(f"process {i} exited with {proc.returncode}\n{stdout}\n{stderr}")
    if logs:
        pytest.fail("\n\n".join(logs), pytrace=False)
    loaded = []
    for out in outs:
        with np.load(out) as data:
            loaded.append({key: data[key] for key in data.files})
    return loaded


@pytest.mark.slow
def test_each_process_reports_itself(results):
    assert [int(r["process_index"]) for r in results] == list(range(worker.PROCESSES))


@pytest.mark.slow
def test_outputs_and_input_gradient_match_reference_over_global_batch(results):
    """Each process holds half the rows; together they equal BN over the global batch."""
    ref = _reference(worker.make_problem())
    rows_per_process = worker.LOCAL_DEVICES * worker.ROWS
    for key in ("y", "dx"):
        combined = np.full_like(ref[key], np.nan)
        for r in results:
            held = ~np.isnan(r[key]).all(axis=1)
            assert held.sum() == rows_per_process, (key, int(held.sum()))
            assert np.isnan(combined[held]).all(), f"two processes hold the same {key} rows"
            combined[held] = r[key][held]
        assert not np.isnan(combined).any(), f"some {key} rows are held by no process"
        atol = 2e-5 if key == "y" else 1e-4
        np.testing.assert_allclose(combined, ref[key], atol=atol, rtol=0, err_msg=key)


@pytest.mark.slow
def test_running_statistics_and_param_gradients_match_reference(results):
    ref = _reference(worker.make_problem())
    for r in results:
        np.testing.assert_allclose(r["mean"], ref["mean"], atol=2e-5, rtol=0, err_msg="mean")
        np.testing.assert_allclose(r["var"], ref["var"], atol=2e-5, rtol=0, err_msg="var")
        assert int(r["count"]) == 1
        np.testing.assert_allclose(r["dscale"], ref["dscale"], atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(r["dbias"], ref["dbias"], atol=1e-4, rtol=1e-5)


def test_reference_is_not_per_process():
    """Guard: the problem is such that per-process statistics would differ from global ones."""
    problem = worker.make_problem()
    ref = _reference(problem)
    half = worker.LOCAL_DEVICES * worker.ROWS
    first = {k: v[:half] for k, v in problem.items() if k in ("x", "valid", "cotangent")}
    local = _reference({**problem, **first})
    assert np.max(np.abs(local["y"] - ref["y"][:half])) > 0.5
