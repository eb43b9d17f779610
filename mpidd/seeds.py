"""Named seed streams: every random draw of mpidd comes from seed_for(seed, NAME, *keys), an
independent seed per model, batch order and hold-out. Pure numpy: no torch, no MPI.
"""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *keys: int) -> int:
    """Independent 63-bit seed for (seed, keys): e.g. (seed, 0, subdomain) for a local model."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0] >> 1)


# Named seed streams: every random draw of mpidd comes from seed_for(seed, NAME, *keys). The
# numbers are part of the results (changing one changes every run's numbers): never renumber.
SEED_STREAMS = {
    "local": (0,),             # local CNN of subdomain i: init and batch order (+ i)
    "coarse": (1,),            # coarse DNN init
    "coarse_order": (1, 1),    # coarse DNN batch order
    "global": (2,),            # global CNN: init and batch order
    "coherent_local": (3,),    # coherent model from random weights: local CNN i (+ i)
    "coherent_dnn": (4,),      # ... and its DNN
    "coherent_order": (5,),    # coherent model: batch order
    "subnet": (6,),            # width decomposition: sub-network m (+ m)
    "recompose": (7,),         # torch RNG when the recomposed network is built
    "recompose_noise": (8,),   # off-diagonal noise of the recomposition
    "recomposed_order": (9,),  # recomposed network: batch order
    "validation": (10,),       # API: validation samples held out of the training set
    "coherent_dropout": (11,), # coherent model: dropout of local CNN i (+ i) and of the DNN (+ N)
    "online": (12,),           # partial_fit call c: batch order of local CNN i (+ c, i)
    "online_coarse": (12, 1),  # partial_fit call c: the coarse DNN's batch order (+ c)
    "replay": (13,),           # partial_fit call c: which new samples enter the replay buffer (+ c)
}


def seed_for(seed: int, stream: str, *keys: int) -> int:
    """The seed of stream `stream` (see SEED_STREAMS), e.g. seed_for(seed, "local", i)."""
    return derive_seed(seed, *SEED_STREAMS[stream], *keys)
