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


def curated_phantom(root, n: int, seed: int, format: str = "derm7pt", size: int = 32, **cfg):
    "Write a phantom set under `root/raw` and curate it into `root/cur`; return the records.csv path"
    from lesiongen.data import curate
    from lesiongen.phantom import PhantomConfig, write_phantom
    write_phantom(root / "raw", PhantomConfig(n=n, size=size, seed=seed, format=format, **cfg), progress=False)
    curate(format, root / "raw", root / "cur")
    return root / "cur" / "records.csv"
