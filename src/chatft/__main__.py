"""`python -m chatft` is the same as the `chatft` console script."""

from chatft.cli import main

main()
