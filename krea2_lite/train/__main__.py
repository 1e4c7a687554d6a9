"""`python -m krea2_lite.train`: the command line lives in krea2_lite/cli/train.py."""
import sys

from ..cli.train import main

if __name__ == "__main__":
    sys.exit(main())
