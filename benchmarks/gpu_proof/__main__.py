import sys

from benchmarks.gpu_proof.runner import main

sys.exit(main())
