"""``python -m launch`` is the ``zcrx`` command."""

from launch.cli import main

main()
