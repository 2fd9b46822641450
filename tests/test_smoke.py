import llmdiff_core.features


def test_pack_loads_and_aliases():
    import sys
    from conftest import PACK_MODULE
    assert sys.modules[PACK_MODULE + ".llmdiff_core.features"] is llmdiff_core.features
