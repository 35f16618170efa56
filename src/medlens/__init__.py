"""medlens: explained, measured predictions from medical images."""

__version__ = "0.1.0"
