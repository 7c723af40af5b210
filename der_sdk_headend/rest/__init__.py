"""The REST API for operators and integrations (Litestar)."""

from der_sdk_headend.rest.app import create_app

__all__ = ["create_app"]
