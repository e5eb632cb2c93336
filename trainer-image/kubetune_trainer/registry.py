"""A registry of plug-ins by key: the tasks by spec.task (tasks/base.py), the causal-LM objectives by
spec.objective (objectives/base.py). A class registers itself with the decorator; the trainer looks it up."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Generic, TypeVar

C = TypeVar("C", bound=type)


class Registry(dict[Enum, C], Generic[C]):
    """{key: class}; `register(key)` is the class decorator that adds one, and names the class `key`."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, key: Enum) -> Callable[[C], C]:
        def add(cls: C) -> C:
            if key in self:
                raise ValueError(f"{self.what} {key.value} is registered twice: {self[key].__name__} and "
                                 f"{cls.__name__}")
            cls.name = key
            self[key] = cls
            return cls

        return add
