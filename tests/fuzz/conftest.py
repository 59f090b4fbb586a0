"""Known open contract failures, tracked here so that CI stays green while they are open.

Each entry is a property that still fails on a minimal input the fuzz suite found. It is marked
``xfail`` (not skipped: it runs every time, and an ``XPASS`` in the report says the defect may be
gone, so the entry can be removed). Issue 9 stays open while this list is not empty.
"""

import pytest

KNOWN_OPEN = {
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = KNOWN_OPEN.get(item.nodeid)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=f"open defect {reason}", strict=False))
