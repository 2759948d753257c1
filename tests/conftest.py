"""Test-wide settings: never reach a hub, keep torch to the two cores we have."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (CI has it; a user's fresh clone may not)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tiny pipelines build into the session's temp dir (shared across modules), never ~/.cache."""
    root = tmp_path_factory.getbasetemp() / "catimage-cache"
    threads = torch.get_num_threads()
    # One torch thread: these models are tiny, and on a busy 2-core machine two OpenMP threads
    # that wait on each other made a 64x64 image 20-50x slower than one thread.
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CATIMAGE_CACHE", str(root))
            yield root
    finally:
        torch.set_num_threads(threads)
