import os
from pathlib import Path

import pytest

# Tests never touch the network: the hub and W&B stay offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory) -> Path:
    """Synthetic pretrain shards through the real pipeline, shared by every test file in the session."""
    from helpers import make_pretrain_data

    return make_pretrain_data(tmp_path_factory.mktemp("data") / "pretrain")
