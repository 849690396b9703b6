import os

# Before torch is imported: with 2 cores shared, OpenMP's busy-waiting threads slow every
# step down ~20x when anything else runs; passive waiting avoids it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

torch.set_num_threads(2)
