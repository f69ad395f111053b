"""Pause points for crash tests: ``SPM_REGISTRY_PAUSE=<point>:<marker file>``.

When a writer reaches ``<point>`` it creates the marker file and sleeps, so a test can kill it at
exactly that moment (e.g. after a blob's temporary file is written, before the index commits).
Unset in normal use: then ``pause_point`` costs one environment lookup.
"""

from __future__ import annotations

import logging
import os
import time

logger = logging.getLogger(__name__)

ENV = "SPM_REGISTRY_PAUSE"


def pause_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, marker = spec.partition(":")
    if point != name:
        return
    logger.warning("pausing at registry point %r (%s is set)", name, ENV)
    with open(marker, "w") as fh:
        fh.write(str(os.getpid()))
    time.sleep(600)
