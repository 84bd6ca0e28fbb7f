"""``python -m dictlens`` (and ``torchrun -m dictlens``): the command line."""

import os
import sys

from dictlens.cli import main

code = main()
if code == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker whose work is done (its files written, its process group destroyed) leaves
    # without the interpreter's teardown: there PyTorch's C++ threads race Python's shutdown and can
    # abort the process ("terminate called without an active exception", SIGABRT), which fails the
    # whole run after it succeeded. (A failing worker exits normally: leaving at once would let
    # torchrun stop the other ranks before they print their own error.)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
