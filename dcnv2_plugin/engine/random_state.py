"""The state of the random generators a training process draws from (Python's
`random`, NumPy's global generator, torch's CPU and CUDA generators), as
tensors and plain values that a weights-only checkpoint can hold."""

import contextlib
import random
from typing import Any, Dict, Iterator

import numpy as np
import torch


def capture_rng_states() -> Dict[str, Any]:
    """The current state of every generator (CUDA's only where CUDA is in use)."""
    version, internal, gauss_next = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Dict[str, Any]) -> None:
    """Puts every generator back in the state `capture_rng_states` returned."""
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss_next"]))
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


@contextlib.contextmanager
def seeded_cpu_rngs(*entropy: int) -> Iterator[None]:
    """Seeds Python's, NumPy's and torch's CPU generators from `entropy`
    (mixed by NumPy's SeedSequence) for the block, then puts back their
    previous states. CUDA's generators are left alone."""
    previous = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    words = np.random.SeedSequence(list(entropy)).generate_state(2, dtype=np.uint32)
    seed = int(words[0]) << 32 | int(words[1])
    random.seed(seed)
    np.random.seed(words)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(previous[0])
        np.random.set_state(previous[1])
        torch.set_rng_state(previous[2])
