"""Suite-wide settings: none that depend on the machine. The tests run as they are, serially or with
pytest-xdist (./test.sh), on whatever cores there are; a test that depends on the writer mode says
``writer=`` (``writer="auto"`` picks by the cores torch leaves free)."""
