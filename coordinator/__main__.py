import sys

from .coordinator import main

sys.exit(main())
