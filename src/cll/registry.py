"""One small name -> builder registry, used for architectures, losses and data sets.

Names are what tables print (``4C3F``, ``8C2F``) or what configs say (``cll``), so they are passed
explicitly rather than taken from function names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import ConfigError


class Registry:
    def __init__(self, kind: str):
        self.kind = kind  # "architecture", "loss", ... (used in error messages)
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._builders[name] = builder
            return builder

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            raise ConfigError(f"unknown {self.kind} {name!r}; allowed: {', '.join(self.names())}")
        return self._builders[name]

    def create(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return list(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders
