"""medlens: explained, measured predictions from medical images."""

import os

if not os.environ.get("MEDLENS_NO_CPU_TUNING"):
    # Spinning OpenMP workers make small models up to hundreds of times slower on a busy or shared CPU;
    # passive waiting costs nothing measurable when the machine is idle. Only read before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
