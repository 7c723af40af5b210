"""The operator console, served by the headend at ``/`` and ``/console/...`` (issue 18)."""
