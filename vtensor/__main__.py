import sys

from vtensor.cli import main

sys.exit(main())
