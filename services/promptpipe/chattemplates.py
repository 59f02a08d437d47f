"""Chat templates as the stages render them: one Jinja environment for the assemble stage, which renders
them, and for the operator and `promptpipe validate`, which refuse one that does not parse."""

from __future__ import annotations

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise(message: str) -> None:
    raise ValueError(message)


def environment() -> jinja2.Environment:
    """Hugging Face renders chat templates with these settings, sandboxed."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env


def syntax_problem(source: str) -> str | None:
    """Why `source` is not a template the stage could render (line and Jinja's message), or None."""
    try:
        environment().parse(source)
    except jinja2.TemplateSyntaxError as err:
        return f"line {err.lineno}: {err.message}"
    return None
