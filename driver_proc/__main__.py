import sys

from driver_proc.main import main

sys.exit(main())
