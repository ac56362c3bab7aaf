"""`python -m milbench.cli`: the same as the `milbench` command."""

from milbench.cli import main

main()
