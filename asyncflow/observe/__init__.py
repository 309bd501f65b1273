"""Seeing a running worker: Prometheus metrics, a progress line, a live web page, traces.

* ``settings``: ``--web-port`` / ``ASYNCFLOW_WEB_PORT`` and ``--web-host`` / ``ASYNCFLOW_WEB_HOST``.
* ``status``: one JSON-able snapshot of a running worker (topology, partitions, totals).
* ``collector``: a Prometheus collector that reads the app's counters at scrape time.
* ``web``: the aiohttp server: ``/`` (the page), ``/api/status`` (JSON), ``/metrics``.
* ``progress``: the info line logged every few seconds.
* ``observer``: the task in the runtime's TaskGroup that samples, logs and serves.
* ``traces``: OpenTelemetry spans and ``traceparent`` headers, when a tracer is configured.
* ``terminal``: ``asyncflow status --web URL``.

Example:
    >>> from asyncflow.observe.settings import WebSettings
    >>> WebSettings(port=9100).url
    'http://127.0.0.1:9100/'
"""
