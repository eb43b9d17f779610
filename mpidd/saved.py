"""Saved models: one self-describing file, model.pt, that predict and TwoLevelClassifier.load
read. No MPI.

    model.pt = {"format": "mpidd-model", "format_version": 1, "mpidd_version": ...,
                "image_shape": [C, H, W] or [C, D, H, W], "input_dtype": "uint8" | "float32",
                "input_scaling": how pixels become the networks' inputs,
                "grid": [...], "overlap": int, "num_classes": K, "classes": [K names],
                "cnn": {CNNConfig fields}, "width_factor": float,
                "coarse_hidden": [...], "coarse_dropout": float,
                "hyperparameters": {what trained it},
                "models": {"twolevel": {"local": {i: state_dict}, "dnn": state_dict},
                           "coherent_random" | "coherent_pretrained":
                               {"local": {...}, "dnn": ..., "exchange": "probabilities" | "logits"},
                           "global" | "recomposed": {"model": state_dict}}}   (whole-image CNNs)

Only tensors, numbers, strings, lists and dicts: it is loaded with torch.load(weights_only=True),
so no code in a foreign or tampered file can run.
"""

from __future__ import annotations

import os

import torch

from . import __version__
from .rundir import atomic_write

FORMAT, FORMAT_VERSION = "mpidd-model", 1
MODEL_FILE = "model.pt"
INPUT_SCALING = ("uint8 images are divided by 255; float32 images are used as they are; then, where cnn has "
                 "input_mean and input_std, each model normalises (x - mean) / std per channel")
REQUIRED = ("image_shape", "input_dtype", "grid", "overlap", "num_classes", "classes", "cnn", "width_factor",
            "coarse_hidden", "coarse_dropout", "models")


class ModelFileError(ValueError):
    """A missing, unreadable, foreign or incompatible model file (one line)."""


def model_path(path: str) -> str:
    """A run directory (or any directory holding model.pt), or the file itself."""
    return os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path


def save_model(path: str, manifest: dict, models: dict) -> str:
    """Write the model file atomically (temporary file + rename); returns its path."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, "mpidd_version": __version__,
             "input_scaling": INPUT_SCALING, **manifest, "models": models}
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"model file: missing {', '.join(missing)}")
    path = model_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))
    return path


def load_model(path: str) -> dict:
    """The model file's contents, checked; ModelFileError with one line otherwise."""
    file = model_path(path)
    if not os.path.exists(file):
        hint = " (a run writes it when it finishes; is the run complete?)" if os.path.isdir(path) else ""
        raise ModelFileError(f"no saved model at {file}{hint}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file: torch raises pickle, zip or EOF errors
        raise ModelFileError(f"cannot read {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                             f" (corrupt, or not an mpidd model file)") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelFileError(f"{file} is not an mpidd model file")
    if state.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{file} has model format version {state.get('format_version')}, this mpidd "
                             f"{__version__} reads version {FORMAT_VERSION}: use the mpidd version that wrote it "
                             f"({state.get('mpidd_version')})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ModelFileError(f"{file} lacks {', '.join(missing)}: not a complete mpidd model file")
    return state
