"""pytest configuration: `slow` and `gpu` tests are skipped unless RUN_SLOW=1 (and a GPU for `gpu`)."""
import os
import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a CPU; run with RUN_SLOW=1")
    config.addinivalue_line("markers", "gpu: needs CUDA")


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("RUN_SLOW") == "1"
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set RUN_SLOW=1"))
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="module")
def one_thread():
    "Run a module's tiny models on one torch thread: on a busy 2-core machine OpenMP synchronisation costs more than a second thread gains"
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
