"""Which module is running: forward pre/post hooks that keep a stack of (qualified name, type)."""

from __future__ import annotations


class ModuleStack:
    """Install with :meth:`install` on a model; ``current`` is the innermost running module as
    ``(qualified_name, type_name)`` (the root is ``""``), or None outside any forward. Remove the
    hooks with :meth:`remove`. Modules reached through several paths get their first name."""

    def __init__(self, on_enter=None, on_exit=None) -> None:
        # on_enter / on_exit: called when the outermost hooked forward starts / ends
        self.stack: list[tuple[str, str]] = []
        self._handles: list = []
        self._on_enter = on_enter
        self._on_exit = on_exit

    def install(self, model) -> "ModuleStack":
        seen: set[int] = set()
        for name, module in model.named_modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            entry = (name, type(module).__name__)

            def pre(mod, args, _entry=entry):
                if not self.stack and self._on_enter is not None:
                    self._on_enter()
                self.stack.append(_entry)

            def post(mod, args, out, _entry=entry):
                # pop our own entry (a forward that raised may have left inner ones behind)
                while self.stack:
                    if self.stack.pop() == _entry:
                        break
                if not self.stack and self._on_exit is not None:
                    self._on_exit()

            self._handles.append(module.register_forward_pre_hook(pre))
            try:
                self._handles.append(module.register_forward_hook(post, always_call=True))
            except TypeError:  # torch < 2.0 has no always_call
                self._handles.append(module.register_forward_hook(post))
        return self

    @property
    def current(self) -> tuple[str, str] | None:
        return self.stack[-1] if self.stack else None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.stack.clear()
