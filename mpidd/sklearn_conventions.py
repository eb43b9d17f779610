"""scikit-learn's estimator conventions for mpidd's estimators (get_params, set_params, clone,
tags, repr), on the rule that an estimator stores every keyword of its __init__ as given. No
MPI here and nothing collective: a clone runs on the same communicator as its original."""

from __future__ import annotations

import copy
import inspect


# The keywords of an estimator that say how it runs, not what it computes: not hyperparameters.
RUNTIME = ("comm", "device", "threads", "verbose")


def hyperparameters(init) -> tuple:
    """An estimator's hyperparameters (get_params, the model file's record, load's keywords):
    every keyword of its __init__, in order, but RUNTIME."""
    return tuple(k for k in inspect.signature(init).parameters if k != "self" and k not in RUNTIME)


class SklearnConventions:
    """What scikit-learn asks of an estimator. A subclass sets HYPERPARAMETERS =
    hyperparameters(__init__) and stores every keyword of its __init__ as an attribute."""

    HYPERPARAMETERS: tuple = ()

    @classmethod
    def _param_names(cls) -> tuple:
        return tuple(k for k in inspect.signature(cls.__init__).parameters if k != "self")

    def get_params(self, deep=True) -> dict:
        """Every keyword of the constructor, as set (scikit-learn's get_params; nothing nested,
        so `deep` changes nothing). Not collective."""
        return {k: getattr(self, k) for k in self._param_names()}

    def set_params(self, **params):
        """Set constructor keywords (scikit-learn's set_params); they apply from the next fit.
        Returns self. Not collective."""
        known = self._param_names()
        for k, v in params.items():
            if k not in known:
                raise ValueError(f"invalid parameter {k!r} for {type(self).__name__}: one of {', '.join(known)}")
            setattr(self, k, v)
        return self

    def hyperparameters(self) -> dict:
        """The keywords that say what the estimator computes (HYPERPARAMETERS: all but comm,
        device, threads, verbose): what the model file records."""
        return {k: getattr(self, k) for k in self.HYPERPARAMETERS}

    def __sklearn_clone__(self):
        """sklearn.base.clone: a new, unfitted estimator with copies of the hyperparameters and
        the same comm and device (a communicator cannot be copied; the clone runs on it too)."""
        runtime = {k: getattr(self, k) for k in RUNTIME}
        return type(self)(**copy.deepcopy(self.hyperparameters()), **runtime)

    _estimator_type = "classifier"  # what scikit-learn before 1.6 reads

    def __sklearn_tags__(self):
        """What scikit-learn (1.6 on) asks of an estimator: a classifier of image arrays that
        must be fitted before it predicts. Imports scikit-learn only when it asks."""
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags
        return Tags(estimator_type="classifier", target_tags=TargetTags(required=True),
                    classifier_tags=ClassifierTags(), input_tags=InputTags(two_d_array=False, three_d_array=True))

    def __repr__(self):
        """The constructor keywords that differ from their defaults, as scikit-learn prints them."""
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        changed = []
        for k in self._param_names():
            value = getattr(self, k)
            differs = value is not defaults[k] and (not _comparable(value) or value != defaults[k])
            if differs:
                changed.append(f"{k}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"


def _comparable(value) -> bool:
    """Whether == on `value` gives one bool (not numpy's elementwise answer, nor a communicator's)."""
    return isinstance(value, (type(None), bool, int, float, str, tuple, list, dict))
