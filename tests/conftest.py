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


@pytest.fixture(scope="session")
def dpo_data(tmp_path_factory) -> Path:
    """The demo preference pairs (answers up to 100 characters) as DPO shards of 64-token rows, shared by every
    test file in the session."""
    from helpers import TOKENIZER

    import data_preparation_utils as dpu
    import demo_data
    import tokenizer
    from load_dpo_dataset import DPOEncoder

    tok = tokenizer.load_tokenizer(TOKENIZER)
    out = tmp_path_factory.mktemp("dpo") / "dpo"
    dpu.prepare("dpo", demo_data.demo_preference_set(max_chars=100), out, DPOEncoder(tok, "", 64),
                tokenizer_identity=tok.identity(), source="demo pairs", seed=0, val_fraction=0.0,
                shard_size=1 << 20, workers=1, progress=False)
    return out
