"""The command line: the composition root of the daemon (``run``) and the tools around it.

commands.py parses arguments, builds the config and the daemon, and maps every outcome to a
named exit code; render.py draws the terminal tables (rich, which the daemon never imports);
logs.py configures structlog once; demo.py and demo_app.py are ``celery-memguard demo``.
"""

from celery_memguard.cli.commands import main

__all__ = ["main"]
