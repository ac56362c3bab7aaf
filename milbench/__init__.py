"""milbench: a benchmarking suite for multiple-instance-learning survival models on WSI patch features."""

__version__ = "0.1.0"


class MilbenchError(Exception):
    """A user-facing error: bad input, named file or case, and the fix. The CLI prints it on one line, exit 2."""


def did_you_mean(word: str, choices: "list[str] | tuple[str, ...]") -> str:
    """``"did you mean 'x'? "`` for the closest of ``choices`` (difflib), or ``""``: every "unknown name" error uses
    it (models, cohorts, scenarios, --set keys)."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean '{close[0]}'? " if close else ""
