"""A place for test policies to leave what they saw: policies are pickled by value (with their
module's globals copied), but this module travels by reference, so its list is the test's."""

from typing import Any

CONTEXTS: list[Any] = []
