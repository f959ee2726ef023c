"""``python -m l2t_fast``: the ``l2t-fast`` command."""
import sys

from l2t_fast.cli import main

sys.exit(main())
