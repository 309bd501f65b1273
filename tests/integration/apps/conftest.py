"""Fixtures for the end-to-end tests of the apps: the real services, and workers to run.

The services are the other integration directories' fixtures, imported here:
one Tansu Kafka broker (``kafka_bootstrap``, ``kafka_url``), one ``moto_server``
(``moto_server``, ``moto_endpoint``, ``aws``; ``aws_environment`` gives every
test dummy AWS credentials and region) and the SSE ``replay_server``.
``workers`` starts ``asyncflow worker module:app`` subprocesses, exactly as the
apps' docstrings say to run them, and kills whatever a test left running.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.apps.helpers import Workers
from tests.integration.aws.conftest import (  # noqa: F401 - fixtures, used by name
    aws,
    aws_environment,
)
from tests.integration.sse.conftest import replay_server  # noqa: F401


@pytest.fixture
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workers]:
    """Start app workers as subprocesses; any still running at the end is killed."""
    started = Workers(tmp_path_factory.mktemp("workers"))
    try:
        yield started
    finally:
        started.kill_all()
