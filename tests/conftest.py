import os

# Before torch is imported: with 2 cores shared, OpenMP's busy-waiting threads slow every
# step down ~20x when anything else runs; passive waiting avoids it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(2)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # shared helpers: micro.py, hand_tables.py


@pytest.fixture(scope="session")
def micro_assets(tmp_path_factory):
    """Tiny LLM, tokenizer and toy encoders for the end-to-end tests (built once per session)."""
    from micro import build_micro_assets

    return build_micro_assets(tmp_path_factory.mktemp("micro-assets"))
