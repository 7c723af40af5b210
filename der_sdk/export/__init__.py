"""Telemetry export: history from any storage backend to Parquet or CSV (docs/export.md).

Import from the modules; this package imports nothing itself, so the built-in exporter
plugin costs ``der`` and the headend nothing until an export runs:

* :mod:`der_sdk.export.schema`: the table (core fields, typed ``details`` columns);
* :mod:`der_sdk.export.files`: Parquet and CSV files by day and site, or one stream;
* :mod:`der_sdk.export.range`: :func:`~der_sdk.export.range.export_range`, a time range
  out of storage page by page (``der export``);
* :mod:`der_sdk.export.folder`: the ``parquet-folder`` continuous exporter
  (``der_exporters`` hook).
"""
