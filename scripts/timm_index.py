"""Write src/medlens/models/timm_index.txt for the installed timm: run it after changing timm's pin.

    .venv/bin/python scripts/timm_index.py
"""

import importlib.metadata

from medlens.io import write_atomic
from medlens.models.registry import TIMM_INDEX, build_timm_index, format_timm_index

if __name__ == "__main__":
    version = importlib.metadata.version("timm")
    index = build_timm_index()
    write_atomic(TIMM_INDEX, format_timm_index(index, version))
    print(f"{TIMM_INDEX}: {len(index)} timm models, {sum(map(len, index.values()))} pretrained tags (timm {version})")
