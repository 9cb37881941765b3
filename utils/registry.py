"""Name -> part registries (models, criteria, samplers, datasets, optimizers, schedules).

One idiom for every kind of part::

    MODELS = Registry("model", "MODEL.NAME")

    @MODELS.register("cmfn")
    class CMFN(...): ...

    cls = MODELS.get(cfg.MODEL.NAME)   # ConfigError listing the known names if unknown

Registering a name twice raises (two parts silently shadowing each other is always a bug).
A registry may name modules that register their parts on import (``modules``); they are
imported on the first lookup, so light tools do not pay for importing every part.
"""
import difflib
import importlib

from utils.errors import ConfigError


class Registry:
    def __init__(self, kind, key, modules=()):
        self.kind = kind
        self.key = key
        self.modules = tuple(modules)
        self._parts = {}
        self._loaded = not self.modules

    def _load(self):
        if not self._loaded:
            self._loaded = True
            for module in self.modules:
                importlib.import_module(module)

    def register(self, name, part=None):
        """Register `part` under `name`; without `part`, a decorator."""

        def add(obj):
            if name in self._parts:
                raise ValueError("%s %r is already registered (%r)" % (self.kind, name, self._parts[name]))
            self._parts[name] = obj
            return obj

        return add if part is None else add(part)

    def get(self, name):
        """The part registered as `name`, or a ConfigError naming the config key and the known names."""
        self._load()
        if name not in self._parts:
            close = difflib.get_close_matches(str(name), list(self._parts), n=1)
            raise ConfigError("%s %r is not a registered %s (known: %s)%s" % (
                self.key, name, self.kind, ", ".join(sorted(self._parts)),
                "; did you mean %r?" % close[0] if close else ""))
        return self._parts[name]

    def names(self):
        self._load()
        return sorted(self._parts)

    def __contains__(self, name):
        self._load()
        return name in self._parts

    def items(self):
        self._load()
        return sorted(self._parts.items())
