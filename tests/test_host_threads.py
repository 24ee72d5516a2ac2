"""Host threads (atp.xp): threaded sparse products and maps give the serial results bit for
bit, and a forked child does not inherit the parent's pool threads."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp


def test_threaded_csr_is_bitwise_the_serial_product():
    from atp.xp import ThreadedCSR

    rng = np.random.default_rng(0)
    A = sp.random(3000, 700, density=0.2, format="csr", dtype=np.float32, random_state=1)
    x = rng.random(700).astype(np.float32)
    t = ThreadedCSR(A, threads=3)
    assert t.bounds is not None and len(t.bounds) == 3
    assert np.array_equal(t @ x, A @ x)
    X = rng.random((700, 2)).astype(np.float32)  # 2-D: the matrix itself
    assert np.array_equal(t @ X, A @ X)


def test_host_map_keeps_order(monkeypatch):
    from atp.xp import host_map

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert host_map(lambda i: i * i, range(10)) == [i * i for i in range(10)]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert host_map(lambda i: -i, range(3)) == [0, -1, -2]


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin",
                    reason="needs fork")
def test_a_forked_child_gets_fresh_pools(monkeypatch):
    from atp.xp import host_map

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert host_map(lambda i: i + 1, range(4)) == [1, 2, 3, 4]  # the parent's pool runs
    pid = os.fork()
    if pid == 0:  # child: a pool the parent started must not be reused (it would hang)
        import signal

        signal.alarm(30)  # a hang ends the child with SIGALRM: the test fails, not hangs
        ok = host_map(lambda i: i + 1, range(4)) == [1, 2, 3, 4]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
