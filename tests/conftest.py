import os

import pytest
import torch
from hypothesis import settings

# CI runs property tests derandomized, so a red build always reproduces; locally they explore.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
