import os

import pytest
import torch

from reference import tiny_reference_pipeline

# The test models are tiny: splitting each small op over several threads costs more than it saves
# (several times slower on a loaded 2-core machine). Subprocesses get the same setting.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """(reference pipeline, its folder in the published layout), built once per test run."""
    folder = tmp_path_factory.mktemp("blipdiffusion")
    return tiny_reference_pipeline(str(folder)), str(folder)
