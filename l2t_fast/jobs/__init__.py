"""What the command line runs: the option table (``options``), the source network
(``source``), the transfer comparison (``transfer``), sweeps of it on Ray (``sweep``) and
its table and figure (``report``)."""
