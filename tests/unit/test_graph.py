"""Bound application graphs: one deployment per bound node, handles in place of nodes."""

import dataclasses
from typing import Any

import pytest

import serve
from serve._deployment import build_application
from serve.handle import DeploymentHandle


@serve.deployment
class Leaf:
    pass


@serve.deployment
class Parent:
    def __init__(self, *children: Any, **named: Any) -> None:
        pass


def test_same_bound_node_twice_is_one_deployment() -> None:
    leaf = Leaf.bind()
    ingress, built = build_application(Parent.bind(leaf, leaf), "app", DeploymentHandle)
    assert ingress == "Parent"
    assert sorted(b.name for b in built) == ["Leaf", "Parent"]
    parent = next(b for b in built if b.name == "Parent")
    first, second = parent.init_args
    assert isinstance(first, DeploymentHandle)
    assert isinstance(second, DeploymentHandle)
    assert (first.deployment_name, first.app_name) == ("Leaf", "app")


def test_distinct_nodes_with_one_name_get_suffixes() -> None:
    _ingress, built = build_application(
        Parent.bind(Leaf.bind(), Leaf.bind()), "app", DeploymentHandle
    )
    assert sorted(b.name for b in built) == ["Leaf", "Leaf_1", "Parent"]


def test_nested_bound_nodes_become_handles() -> None:
    _, built = build_application(
        Parent.bind(models=[Leaf.bind()], by_name={"x": Leaf.options(name="X").bind()}),
        "app",
        DeploymentHandle,
    )
    parent = next(b for b in built if b.name == "Parent")
    assert isinstance(parent.init_kwargs["models"][0], DeploymentHandle)
    assert parent.init_kwargs["by_name"]["x"].deployment_name == "X"


def test_unbound_deployment_as_argument_is_refused() -> None:
    with pytest.raises(TypeError, match=r"without \.bind\(\)"):
        build_application(Parent.bind(Leaf), "app", DeploymentHandle)


def test_run_needs_an_application() -> None:
    with pytest.raises(TypeError, match=r"Did you forget to call \.bind"):
        build_application(Leaf, "app", DeploymentHandle)  # type: ignore[arg-type]


@dataclasses.dataclass
class Settings:
    """A user's own object carrying bound deployments (Ray finds them inside it too)."""

    label: str
    model: Any
    extras: list[Any]


def test_bound_nodes_inside_custom_objects_become_handles() -> None:
    settings = Settings("s", Leaf.bind(), [Leaf.options(name="Other").bind()])
    _, built = build_application(Parent.bind(settings), "app", DeploymentHandle)
    assert sorted(b.name for b in built) == ["Leaf", "Other", "Parent"]
    (replaced,) = next(b for b in built if b.name == "Parent").init_args
    assert isinstance(replaced, Settings)
    assert replaced.label == "s"
    assert isinstance(replaced.model, DeploymentHandle)
    assert replaced.extras[0].deployment_name == "Other"
    assert isinstance(settings.model, serve.Application)  # the user's object is left alone


def test_custom_objects_without_bound_nodes_are_passed_as_they_are() -> None:
    plain = Settings("plain", 1, [])
    _, built = build_application(Parent.bind(plain), "app", DeploymentHandle)
    assert next(b for b in built if b.name == "Parent").init_args[0] is plain
