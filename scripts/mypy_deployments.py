"""A mypy plugin: a class under ``@serve.deployment`` has the attributes of a ``Deployment``.

mypy does not apply a class decorator's return type (python/mypy#3135), so without this it
reads ``Model.bind()`` as an error on ``type[Model]``. The plugin gives the decorated class each
public member of ``serve._deployment.Deployment`` with its declared type (``T`` being the class's
instances); any other attribute is still an error. Used by ``make lint`` (pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.expandtype import expand_type
from mypy.nodes import MDEF, Decorator, FuncDef, SymbolNode, SymbolTableNode, TypeInfo, Var
from mypy.plugin import ClassDefContext, Plugin
from mypy.typeops import bind_self
from mypy.types import AnyType, CallableType, Type, TypeOfAny, get_proper_type
from mypy.typevars import fill_typevars

DECORATOR = "serve._deployment.deployment"
DEPLOYMENT = "serve._deployment.Deployment"


def _member_type(node: SymbolNode | None) -> Type:
    """A property's value type, or a method's signature without ``self``."""
    func = node.func if isinstance(node, Decorator) else node
    if isinstance(func, FuncDef):
        signature = get_proper_type(func.type)
        if isinstance(signature, CallableType):
            return signature.ret_type if func.is_property else bind_self(signature)
    return AnyType(TypeOfAny.special_form)


def _add_deployment_members(ctx: ClassDefContext) -> None:
    found = ctx.api.lookup_fully_qualified_or_none(DEPLOYMENT)
    if found is None or not isinstance(found.node, TypeInfo):
        return
    info = ctx.cls.info
    # Deployment[T] of a class: T is the class's instances.
    instances = {v.id: fill_typevars(info) for v in found.node.defn.type_vars}
    for name, symbol in found.node.names.items():
        if name.startswith("_") or name in info.names:
            continue
        var = Var(name, expand_type(_member_type(symbol.node), instances))
        var.info = info
        var._fullname = f"{info.fullname}.{name}"
        var.is_classvar = True
        info.names[name] = SymbolTableNode(MDEF, var, plugin_generated=True)


class DeploymentPlugin(Plugin):
    def get_class_decorator_hook(self, fullname: str) -> Callable[[ClassDefContext], None] | None:
        return _add_deployment_members if fullname == DECORATOR else None


def plugin(version: str) -> type[Plugin]:
    return DeploymentPlugin
