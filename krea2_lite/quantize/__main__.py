"""`python -m krea2_lite.quantize`: the command line lives in krea2_lite/cli/quantize.py."""
import sys

from ..cli.quantize import main

if __name__ == "__main__":
    sys.exit(main())
