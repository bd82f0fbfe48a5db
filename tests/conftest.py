import pytest

from reference import tiny_reference_pipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """(reference pipeline, its folder in the published layout), built once per test run."""
    folder = tmp_path_factory.mktemp("blipdiffusion")
    return tiny_reference_pipeline(str(folder)), str(folder)
