import sys

from dictlens.cli import main

sys.exit(main())
