"""Typed configuration: the run configuration and its recipes (:mod:`.run`), benchmark files (:mod:`.benchmark`)."""
