"""Name -> implementation registries (one per study axis), in the style of lm-eval's.

A lookup of an unknown name raises ``KeyError`` listing every valid name; registering a name
twice, or an object of the wrong kind, fails at import time.
"""
from __future__ import annotations


class Registry:
    def __init__(self, what: str, base: type | None = None):
        self.what, self.base, self._items = what, base, {}

    def register(self, *names: str):
        def deco(obj):
            if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
                raise TypeError(f"{self.what} {names}: {obj!r} is not a {self.base.__name__}")
            for name in names:
                if name in self._items:
                    raise ValueError(f"{self.what} {name!r} is already registered")
                self._items[name] = obj
            return obj
        return deco

    def get(self, name: str):
        if name not in self._items:
            raise KeyError(f"unknown {self.what} {name!r}; known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self):
        """The names in the order they were registered."""
        return iter(list(self._items))

    def __contains__(self, name: str) -> bool:
        return name in self._items
