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


def test_declared_names_are_listed_without_importing_and_checked_on_use() -> None:
    import sys

    reg: Registry[int] = Registry("widget")
    reg.declare("lazy", "fedgan_no_such_module_xyz")
    assert reg.names() == ["lazy"] and "lazy" in reg
    assert "fedgan_no_such_module_xyz" not in sys.modules
    with pytest.raises(ModuleNotFoundError):
        reg.get("lazy")
    reg.declare("json", "json")  # a module that imports fine but registers nothing
    with pytest.raises(KeyError, match="did not register it"):
        reg.get("json")
    with pytest.raises(ValueError, match="already registered"):
        reg.declare("lazy", "elsewhere")
    reg.add("now", 1)
    reg.remove("now")
    assert "now" not in reg
