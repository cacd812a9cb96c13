"""Workarounds for bugs of the torch version attnopt pins (2.13), each installed once and idempotent."""

from __future__ import annotations

import unittest.mock

_FIXED: list[bool] = []


def fix_flex_cpu_template_renaming() -> None:
    """Work around a torch 2.13 bug in the CPU Flex template (installed once, wraps the method).

    ``CppFlexAttentionTemplate.modification`` generates a mask_mod's / score_mod's C++ with its own
    kernel arguments, then renames the two tile-size symbols ("ks2", say) to ``cur_kvSplitSize`` by
    plain text replacement, which also rewrites any longer name they prefix: a table's size "ks22"
    becomes "cur_kvSplitSize2", a C++ compile error. Whether it hits depends on how many size symbols
    the graph has (any table read in a mask_mod or score_mod names one). While the method runs, size
    arguments it numbers itself get a trailing underscore ("ks2_"), which prefixes nothing. The wrapper
    stays for the process (users' own Flex CPU compiles get it too).
    """
    if _FIXED:
        return
    try:
        from torch._inductor.codegen import common
        from torch._inductor.codegen.cpp_flex_attention_template import CppFlexAttentionTemplate
    except ImportError:  # pragma: no cover - other torch versions
        _FIXED.append(False)
        return
    original = CppFlexAttentionTemplate.modification
    lookup = common.KernelArgs._lookup

    def unique_lookup(prefix, odict, name):
        if prefix != "ks" or name in odict:
            return lookup(prefix, odict, name)
        odict[name] = new = f"ks{len(odict)}_"
        return new

    def modification(self, *args, **kwargs):
        with unittest.mock.patch.object(common.KernelArgs, "_lookup", staticmethod(unique_lookup)):
            return original(self, *args, **kwargs)

    CppFlexAttentionTemplate.modification = modification
    _FIXED.append(True)
