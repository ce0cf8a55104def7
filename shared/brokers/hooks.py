"""Signals sent only to the middleware that implement them.

dramatiq's Broker calls every middleware's hook for every signal, and most are the base class's no-op:
with the fleet's sixteen middleware that is about a hundred calls per job. Calling only the middleware
that override a hook keeps the per-message cost of the brokers (enqueue, process, ack) low.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dramatiq.middleware import Middleware, MiddlewareError

if TYPE_CHECKING:  # a mixin for Broker subclasses: typed as one
    from dramatiq.broker import Broker as _MixinBase
else:
    _MixinBase = object


class ImplementedHooksOnly(_MixinBase):
    """A mixin for a dramatiq Broker subclass (listed before the Broker)."""

    def add_middleware(self, middleware, *, before=None, after=None) -> None:
        super().add_middleware(middleware, before=before, after=after)
        self._hooks: dict[str, list[Middleware]] = {}

    def _implementing(self, name: str) -> list:
        hooks = self.__dict__.setdefault("_hooks", {})
        if name not in hooks:
            base = getattr(Middleware, name, None)
            hooks[name] = [m for m in self.middleware if getattr(type(m), name, None) is not base]
        return hooks[name]

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        for middleware in self._implementing("before_" + signal):
            try:
                getattr(middleware, "before_" + signal)(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical("Unexpected failure in before_%s of %r.", signal, middleware, exc_info=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        for middleware in reversed(self._implementing("after_" + signal)):
            try:
                getattr(middleware, "after_" + signal)(self, *args, **kwargs)
            except Exception:
                self.logger.critical("Unexpected failure in after_%s of %r.", signal, middleware, exc_info=True)
