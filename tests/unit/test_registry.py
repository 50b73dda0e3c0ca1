from __future__ import annotations

import pytest

from l2vg_ray.registry import Registry


def test_register_get_and_error_lists_names():
    reg: Registry[int] = Registry("widget", hint="Add one with Registry.add.")
    reg.add("b", 2)

    @reg.register("a")
    def _a():
        return 1

    assert reg.get("b") == 2 and reg.get("a") is _a
    assert reg.names() == ["a", "b"] and "a" in reg and len(reg) == 2
    with pytest.raises(ValueError, match=r"Unknown widget 'c'\. Known: a, b\. Add one"):
        reg.get("c")
    with pytest.raises(ValueError, match="twice"):
        reg.add("a", 3)
