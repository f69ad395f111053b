"""A quiet console for the Hydra apps: this project's messages on screen, third-party notices in the log file.

Hydra gives each job a root logger with a console handler and a file handler (``<run dir>/<app>.log``).
transformers, diffusers and Ray print through handlers of their own, and Python warnings go straight to
stderr, so their notices (a torchvision fallback, Ray's token authentication, deprecations inside those
libraries) would fill the console of every run. ``quiet_console`` sends all of them to the root logger and
lets the console handler pass only this project's records, and anyone's errors; the file keeps everything.
"""

from __future__ import annotations

import importlib
import logging
import sys

OWN = ("pipelines", "spm_train", "__main__")  # top-level logger names shown on the console
# libraries that install a stream handler of their own on their top logger, with propagation off
LIBRARIES = ("transformers", "diffusers", "ray")


class OwnRecords(logging.Filter):
    """Passes this project's records and every error; the rest belongs in the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name.split(".", 1)[0] in OWN


def quiet_console(libraries: tuple[str, ...] = LIBRARIES) -> None:
    """Route third-party notices to the root logger's file handler only. Idempotent; call once per job."""
    logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings"
    for name in libraries:
        if name not in sys.modules:
            # importing first: a library adds its handler at import, which would undo the routing below
            importlib.import_module(name)
        top = logging.getLogger(name)
        for handler in list(top.handlers):
            if _is_console(handler):
                top.removeHandler(handler)
        top.propagate = True
    for handler in logging.getLogger().handlers:
        if _is_console(handler) and not any(isinstance(f, OwnRecords) for f in handler.filters):
            handler.addFilter(OwnRecords())


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
