"""A module fixture running a test module's tests on one torch thread, giving the count back afterwards."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread is faster and steadier; the modules after get the count back unchanged."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
