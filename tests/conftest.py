import os
import sys
from pathlib import Path

# Tests never touch the network: the hub and W&B stay offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


import pytest  # noqa: E402  (after the environment and sys.path set-up above)


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory) -> Path:
    """Synthetic pretrain shards through the real pipeline, shared by every test file in the session."""
    from helpers import make_pretrain_data

    return make_pretrain_data(tmp_path_factory.mktemp("data") / "pretrain")
