"""The two rich consoles: results to stdout, logs and progress to stderr."""

from __future__ import annotations

from rich.console import Console

stdout_console = Console()
stderr_console = Console(stderr=True)
