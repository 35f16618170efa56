"""medlens: explained, measured predictions from medical images."""

import os

if not os.environ.get("MEDLENS_NO_CPU_TUNING") and "OMP_WAIT_POLICY" not in os.environ:
    # How long torch's idle OpenMP workers spin before they sleep; read only before torch loads, so
    # `import medlens` must come first. libgomp's default spins ~3 ms, which makes small models many times
    # slower on a busy CPU, yet falls to ~100 spins once a process holds more OpenMP threads than cores,
    # i.e. as soon as a second thread runs torch (the server's model thread); passive waiting (no spin)
    # made batch-1 ResNet-50 35% and DenseNet-121 1.7x slower. "ACTIVE" with an explicit count spins ~30 us
    # in every case (libgomp caps it at 1000 spins when oversubscribed); Intel's and LLVM's OpenMP would
    # spin forever under ACTIVE unless KMP_BLOCKTIME (ms) bounds it.
    os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")
    os.environ.setdefault("KMP_BLOCKTIME", "1")

__version__ = "0.1.0"
