"""Shared gRPC plumbing: servers refuse a taken port; tensors round-trip with shape checks."""

import numpy as np
import pytest

from expertplane.errors import FieldError
from expertplane.rpc.channels import bind, make_server
from expertplane.rpc.tensors import double_tensor, int64_tensor, to_numpy


def test_second_server_on_a_taken_port_fails():
    first = make_server()
    port = bind(first, "127.0.0.1:0")
    first.start()
    try:
        second = make_server()
        with pytest.raises(RuntimeError):
            bind(second, f"127.0.0.1:{port}")
    finally:
        first.stop(0)


def test_tensor_round_trip_and_errors_name_the_field():
    a = np.arange(12).reshape(3, 4)
    assert np.array_equal(to_numpy(int64_tensor(a), "x", shape=(3, None)), a)
    assert to_numpy(double_tensor(a * 0.5), "w").dtype == np.float64
    bad = int64_tensor(a)
    del bad.values[-1]
    with pytest.raises(FieldError, match="^x: has 11 values but shape"):
        to_numpy(bad, "x")
    with pytest.raises(FieldError, match="^phy2log: must have 3 dimensions"):
        to_numpy(int64_tensor(a), "phy2log", ndim=3)
    with pytest.raises(FieldError, match=r"^load: must have shape \[3, 5\]"):
        to_numpy(int64_tensor(a), "load", shape=(3, 5))
