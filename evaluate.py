"""`python evaluate.py ...` in a checkout: the same as `segx-evaluate` (segx/cli/evaluate.py)."""

from segx.cli.evaluate import main

if __name__ == "__main__":
    main()
