"""Saved models: one self-describing file, model.pt, that predict and TwoLevelClassifier.load
read. The command line (cli.phases.write_model_file), TwoLevelClassifier and WidthClassifier
write it with save_model and manifest, and TwoLevelClassifier.load reads it with load_model,
estimator_keywords and build_models. No MPI.

    model.pt = {"format": "mpidd-model", "format_version": 1, "mpidd_version": ...,
                "method": "width" (WidthClassifier's file only),
                "image_shape": [C, H, W] or [C, D, H, W], "input_dtype": "uint8" | "float32",
                "input_scaling": how pixels become the networks' inputs,
                "grid": [...], "overlap": int, "num_classes": K, "classes": [K names],
                "labels": [K label values] (an estimator's classes_, only where they are not 0..K-1),
                "cnn": {CNNConfig fields}, "width_factor": float,
                "coarse_hidden": [...], "coarse_dropout": float,
                "hyperparameters": {what trained it},
                "models": {"twolevel": {"local": {i: state_dict}, "dnn": state_dict, "exchange": "probabilities"},
                           "coherent_random" | "coherent_pretrained":
                               {"local": {...}, "dnn": ..., "exchange": "probabilities" | "logits"},
                           "global" | "recomposed": {"model": state_dict}}}   (whole-image CNNs)

Only tensors, numbers, strings, lists and dicts: it is loaded with torch.load(weights_only=True),
so no code in a foreign or tampered file can run.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from . import __version__
from .models import CNNConfig, CoarseDNN, build_cnn
from .rundir import MODEL_FILE, atomic_write

FORMAT, FORMAT_VERSION = "mpidd-model", 1
INPUT_SCALING = ("uint8 images are divided by 255; float32 images are used as they are; then, where cnn has "
                 "input_mean and input_std, each model normalises (x - mean) / std per channel")
REQUIRED = ("image_shape", "input_dtype", "grid", "overlap", "num_classes", "classes", "cnn", "width_factor",
            "coarse_hidden", "coarse_dropout", "models")
# the models predict names, and the parts of "models" they run on (part_of)
COMBINERS = ("cnn-dnn", "average", "vote")  # combine the local CNNs of a part with a coarse DNN
WHOLE_IMAGE = ("global", "recomposed")  # CNNs of the whole image: the global CNN, width's recomposed network
MODELS = COMBINERS + ("coherent",) + WHOLE_IMAGE


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


# --- the manifest: what a model file says of its models -------------------------------------------

def manifest(*, image_shape, input_dtype, grid, overlap, num_classes, classes, cnn: CNNConfig, width_factor,
             coarse_hidden, coarse_dropout, hyperparameters, method=None, labels=None) -> dict:
    """The model file's keys but "models" and those save_model adds: image_shape, grid,
    classes and coarse_hidden as lists, cnn as a dict, the rest as given. labels: the K label
    values the classes stand for (an estimator's classes_), where they are not 0..K-1."""
    head = {"method": method} if method is not None else {}
    if labels is not None and not np.array_equal(np.asarray(labels), np.arange(num_classes)):
        head["labels"] = np.asarray(labels).tolist()
    return {**head, "image_shape": list(image_shape), "input_dtype": input_dtype, "grid": list(grid),
            "overlap": overlap, "num_classes": num_classes, "classes": list(classes),
            "cnn": dataclasses.asdict(cnn), "width_factor": width_factor, "coarse_hidden": list(coarse_hidden),
            "coarse_dropout": coarse_dropout, "hyperparameters": hyperparameters}


def width_manifest(*, image_shape, input_dtype, num_classes, classes, cnn: CNNConfig, hyperparameters,
                   labels=None) -> dict:
    """The manifest of WidthClassifier's recomposed network: its decomposition is the whole
    image (grid 1x1 or 1x1x1, no overlap, width factor 1), and it has no coarse DNN."""
    return manifest(method="width", image_shape=image_shape, input_dtype=input_dtype,
                    grid=[1] * (len(image_shape) - 1), overlap=0, num_classes=num_classes, classes=classes, cnn=cnn,
                    width_factor=1.0, coarse_hidden=[], coarse_dropout=0.0, hyperparameters=hyperparameters,
                    labels=labels)


def recorded(params: dict) -> dict:
    """Hyperparameters as the command line and TwoLevelClassifier record them: tuples as lists."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}


def combined_part(local: dict, dnn, exchange: str) -> dict:
    """The "models" entry of a two-level or coherent model: {subdomain: local CNN weights},
    the coarse DNN's weights, and what the local CNNs hand it ("probabilities" or "logits")."""
    return {"local": local, "dnn": dnn, "exchange": exchange}


def whole_part(weights) -> dict:
    """The "models" entry of a CNN of the whole image (WHOLE_IMAGE)."""
    return {"model": weights}


def cpu_state(module) -> dict | None:
    """A module's weights as CPU tensors, to save (None for None)."""
    if module is None:
        return None
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def part_of(model: str, parts) -> str:
    """The part (of `parts`, the keys of "models") that predict's `model` runs on: "twolevel"
    for the combiners; for coherent, "coherent_pretrained" where there, else "coherent_random"."""
    if model in COMBINERS:
        return "twolevel"
    if model == "coherent":
        return next((k for k in ("coherent_pretrained", "coherent_random") if k in parts), "coherent")
    return model


# --- reading it back -----------------------------------------------------------------------------

def estimator_keywords(state: dict, known) -> dict:
    """TwoLevelClassifier's keywords for a loaded model file: the recorded hyperparameters that
    it knows (`known`), then what the manifest says of the models themselves."""
    cnn = state["cnn"]
    params = {k: v for k, v in state.get("hyperparameters", {}).items() if k in known}
    params.update({k: cnn[k] for k in ("arch", "width", "depth", "convs_per_block", "blocks_per_stage", "hidden",
                                       "head_pool", "dropout", "batchnorm")})
    params["dense_layers"] = tuple(cnn.get("dense_layers", CNNConfig.dense_layers))
    params.update(grid="x".join(map(str, state["grid"])), overlap=state["overlap"],
                  coarse_hidden=tuple(state["coarse_hidden"]), coarse_dropout=state["coarse_dropout"],
                  width_factor=state["width_factor"], class_names=state["classes"],
                  num_classes=None if "labels" in state else state["num_classes"],
                  normalization=(tuple(cnn["input_mean"]), tuple(cnn["input_std"])) if cnn.get("input_mean")
                  else None)
    return params


def load_weights(module, weights, path, what, device):
    """`module` with `weights`, on `device`, in eval mode; ModelFileError if they do not fit."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError, KeyError) as e:
        raise ModelFileError(f"{path}: the {what} does not fit its recorded configuration "
                             f"({str(e).splitlines()[0]})") from None
    return module.to(device).eval()


def build_models(state: dict, path, dec, cnn: CNNConfig, mine, master: bool, device) -> dict:
    """The models of a loaded model file as modules on `device`, part by part: the local CNNs
    of subdomains `mine` of the Decomposition `dec`; the coarse DNNs and the CNNs of the whole
    image where `master` (None elsewhere). ModelFileError (one line) for a part that lacks
    local CNNs or weights that do not fit the recorded configuration."""
    image_shape = tuple(int(s) for s in state["image_shape"])
    N, K, C = dec.num_subdomains, int(state["num_classes"]), image_shape[0]
    models = {}
    for kind, part in state["models"].items():
        if kind in WHOLE_IMAGE:
            if master and part.get("model") is not None:
                models[kind] = whole_part(load_weights(build_cnn(C, K, image_shape[1:], cnn), part["model"], path,
                                                       kind, device))
            elif part.get("model") is not None:
                models[kind] = whole_part(None)
            continue
        missing = sorted(set(range(N)) - set(part["local"]))
        if missing:
            raise ModelFileError(f"{path}: the {kind} model lacks the local CNNs of subdomains {missing} of its "
                                 f"{state['grid']} grid")
        local = {i: load_weights(build_cnn(C, K, dec.subimage_shape, cnn, state["width_factor"]), part["local"][i],
                                 path, f"{kind} local CNN {i}", device) for i in mine}
        dnn = None
        if master:
            dnn = load_weights(CoarseDNN(N * K, K, tuple(state["coarse_hidden"]), state["coarse_dropout"]),
                               part["dnn"], path, f"{kind} DNN", device)
        models[kind] = combined_part(local, dnn, part.get("exchange", "probabilities"))
    return models
