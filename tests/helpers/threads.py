"""One torch thread for a test module's tests (``from tests.helpers.threads import
one_thread``): small CPU forwards run no slower, and comparisons do not depend on how a
reduction was split over threads."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
