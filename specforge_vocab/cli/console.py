"""What the command line prints: a short human summary on stdout, logging on stderr (each message once)."""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger("specforge_vocab")


def say(args: argparse.Namespace, *lines: str) -> None:
    if not args.quiet:
        for line in lines:
            print(line)


class OncePerRun(logging.Filter):
    """Lets each distinct message through once (a warning repeated by a retry or a second pass is noise).

    >>> once = OncePerRun(); record = logging.makeLogRecord({"msg": "hi", "levelno": 30})
    >>> once.filter(record), once.filter(record)
    (True, False)
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def configure_logging(args: argparse.Namespace) -> None:
    """Warnings (errors with -q) on stderr, each once; -v adds this package's debug messages only
    (other libraries, matplotlib's font search for one, stay at warnings)."""
    root = logging.getLogger()
    fresh = not root.handlers
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    if fresh:  # our own handler (a host program's or pytest's handlers are left as they are)
        for handler in root.handlers:
            handler.addFilter(OncePerRun())
    logger.setLevel(logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING)
