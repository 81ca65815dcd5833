"""Run a callback right after a package is first imported, without importing it (used to register hf_vq with
transformers and timm on `import hf_vq` while importing neither)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["when_imported"]

logger = logging.getLogger(__name__)


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: runs `callback` right after the top-level package `name` is first imported.

    transformers and timm take seconds to import; `import hf_vq` should not pay that for users who never touch
    them, yet `from_pretrained` / `timm.create_model("hf-hub:...")` must find hf_vq whatever the import order. The
    hook wraps the package's loader and removes itself once the package has executed (not on a mere
    `importlib.util.find_spec` availability check, which transformers makes for timm).
    """

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname != self.name or self not in sys.meta_path:
            return None
        index = sys.meta_path.index(self)
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)  # the real spec, found by the other finders
        finally:
            sys.meta_path.insert(index, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThen(spec.loader, self, fullname)
        return spec

    def done(self) -> None:
        """The package executed: run the callback once and remove the hook."""
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.callback()


class _LoaderThen:
    """`loader`, then `callback()` once the module has executed (a failing callback is logged, not raised).

    After executing, the module's `__loader__` and `__spec__.loader` are the original loader again, so resource
    lookups (`importlib.resources`, `pkgutil.get_data`) never see this wrapper; until then it delegates to it."""

    def __init__(self, loader: Any, hook: _AfterImport, name: str) -> None:
        self.loader, self.hook, self.name = loader, hook, name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            self.hook.done()
        except Exception as err:  # noqa: BLE001 - an API change upstream must not break `import <package>`
            logger.warning("hf_vq could not register itself with %s (%s); %s will not load hf_vq checkpoints.",
                           self.name, err, self.name)


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Run `callback` now if package `name` is imported, else right after it is (once; idempotent per name)."""
    if name in sys.modules:
        callback()
    elif not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))  # without the package installed: never fires
