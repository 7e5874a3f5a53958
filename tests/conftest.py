"""Make `import minicca` work from the tests, whatever directory pytest is started in; run in-process torch on
one thread (tiny models run no faster on two, and a busy 2-core machine makes the thread pool's waits costly:
a tokenizer step took 440 ms instead of 15 ms, measured). Subprocesses get OMP_NUM_THREADS=1 for the same reason."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
