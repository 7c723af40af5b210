"""Test kit for der-sdk plugin authors (shipped as a pytest plugin)."""
