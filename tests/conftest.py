"""pytest fixtures. The Hub is always offline in tests: nothing is ever downloaded."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning (shared CPUs)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import SHARED_DATA, HFCache, patch_torchvision  # noqa: E402

patch_torchvision()
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty offline Hugging Face cache; hf_hub_download resolves repo ids from it."""
    import huggingface_hub.constants as c

    root = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return HFCache(root)


@pytest.fixture
def shared_data():
    """../shared/data (real CXRs with lung masks); tests using it skip cleanly in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
