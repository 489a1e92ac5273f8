"""Registry: duplicates and unknown names raise, and the error lists the known names."""

import pytest

from fedgan.registry import Registry


def test_registry() -> None:
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)

    @reg.register("b")
    def _b() -> int:
        return 2

    assert reg.get("a") == 1 and reg.names() == ["a", "b"] and "b" in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 3)
    with pytest.raises(KeyError, match="known: a, b"):
        reg.get("c")
