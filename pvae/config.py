"""Modules that record their constructor's arguments: ``module.config`` (JSON-serializable) and
``cls.from_config(config)``, so run folders store a model's configuration instead of
re-listing architecture keys (diffusers' ``register_to_config``). Shared by the built-in
latent-variable models (:mod:`pvae.models`) and the deterministic autoencoders
(:mod:`pvae.autoencoders`)."""

from __future__ import annotations

import functools
import inspect
import numbers

__all__ = ["RecordsConfig"]


class RecordsConfig:
    """Mixin: every subclass records the arguments of its constructor (defaults filled in) as
    :attr:`config`, and :meth:`from_config` rebuilds an identical architecture from it."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            init(self, *args, **kw)
            bound = signature.bind(self, *args, **kw)
            bound.apply_defaults()
            # the outermost constructor finishes last and wins: config rebuilds type(self)
            self._config = {k: _jsonable(v) for k, v in list(bound.arguments.items())[1:]}

        cls.__init__ = recording_init

    @property
    def config(self) -> dict:
        """The constructor's arguments, JSON-serializable (tuples become lists)."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict):
        """A new instance built from :attr:`config` (fresh parameters: load a ``state_dict``
        for trained ones).

        :raises ValueError: a key that the constructor does not take.
        """
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = set(config) - allowed
        if unknown:
            raise ValueError(f"{cls.__name__} does not take {sorted(unknown)}; expected keys "
                             f"among {sorted(allowed)}")
        return cls(**config)


def _jsonable(value):
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)  # numpy integers
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return value
