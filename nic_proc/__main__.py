"""``python -m nic_proc``: run the NIC process (see :mod:`nic_proc.main`)."""

from nic_proc.main import main
from shared import heap

heap.tune()

raise SystemExit(main())
