"""``python -m peftkit.cli``: the same command line as the ``peftkit`` console script."""

from peftkit.cli import main

if __name__ == "__main__":
    main()
