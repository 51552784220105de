"""`python train.py ...` in a checkout: the same as `segx-train` (segx/cli/train.py)."""

from segx.cli.train import main

if __name__ == "__main__":
    main()
