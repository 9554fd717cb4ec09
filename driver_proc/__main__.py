import sys

from driver_proc.main import main
from shared import heap

heap.tune()

sys.exit(main())
