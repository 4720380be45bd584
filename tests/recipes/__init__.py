"""Tests of the training recipes; `one_thread` is their shared autouse fixture (imported by each module)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these tests run tiny models, for which thread start-up costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
