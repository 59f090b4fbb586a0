"""Integrations that route other libraries' hot paths through fastvq ops (``patch()`` / ``unpatch()`` / ``patched()``)."""
