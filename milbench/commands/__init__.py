"""Sub-command groups of the `milbench` CLI (each a Typer app that milbench/cli.py mounts)."""
