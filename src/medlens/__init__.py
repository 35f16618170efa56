"""medlens: explained, measured predictions from medical images.

Importing medlens changes nothing in the process; :func:`medlens.runtime.apply_cpu_defaults` is the one
call that tunes it for CPU work (the ``medlens`` command makes it first).
"""

__version__ = "0.1.0"
