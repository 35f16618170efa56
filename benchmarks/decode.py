"""What bounds checks cost the 8-bit greyscale PNG decoder, next to libpng (OpenCV) and PIL.

Every variant decodes the same real NIH films (1024 x 1024 greyscale PNG) from bytes in memory to uint8
pixels, in turns within one run (``common.alternate``, the order rotating), so a shared machine's load hits
them alike; each figure is a median over ``--repeats`` turns, in ms per film, wall-clock:

- ``opencv``: ``cv2.imdecode`` (libpng), which the reader falls back to; ``pil``: ``Image.open`` + load;
- ``checked``: :func:`medlens.data.png.decode_grey8` as shipped, its filter loop compiled with numba's
  ``boundscheck=True``; ``checked_overlap`` the same with ``overlap=True`` (the server's path);
- ``unchecked``, ``unchecked_overlap``: the same, the loop compiled from the same source with
  ``boundscheck=False`` (as it was: memory-safe only as long as its caller sizes the arrays right);
- ``loop_checked``, ``loop_unchecked``: the loop alone over rows already inflated: the checks' own cost.

The ratios and differences are taken turn by turn (checked over unchecked in the same turn), then their
median. Pixels of every variant are compared with libpng's first.

    .venv/bin/python benchmarks/decode.py [--images 64] [--repeats 15]

The last line is one JSON object: ``check_cost_ms``, ``check_cost_overlap_ms``, ``check_ratio``, ``<variant>_ms``.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from collections.abc import Callable

import common  # noqa: F401  (first, as in every script: medlens's process settings before anything loads)
import cv2
import numba
import numpy as np
from common import NIH_IMAGES, alternate, machine, spread
from isal import isal_zlib
from PIL import Image

from medlens.data import png

CHECKED = png._unfilter
UNCHECKED = numba.njit(nogil=True, boundscheck=False)(CHECKED.py_func)


def fast(datas: list[bytes], loop: Callable, overlap: bool) -> Callable[[], None]:
    """Decode every film with ``decode_grey8``, its filter loop swapped for ``loop`` meanwhile."""

    def run() -> None:
        png._unfilter = loop
        try:
            for data in datas:
                png.decode_grey8(data, overlap=overlap)
        finally:
            png._unfilter = CHECKED

    return run


def filters_only(inflated: list[tuple[np.ndarray, np.ndarray]], loop: Callable) -> Callable[[], None]:
    def run() -> None:
        for raw, pixels in inflated:
            loop(raw, pixels, 0, len(pixels))

    return run


def variants(datas: list[bytes]) -> dict[str, Callable[[], None]]:
    inflated = []
    for data in datas:
        width, height, stream = png._image_data(data)
        raw = np.frombuffer(isal_zlib.decompress(stream), np.uint8)
        inflated.append((raw, np.empty((height, width), np.uint8)))
    return {
        "opencv": lambda: [cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_UNCHANGED) for d in datas],
        "pil": lambda: [np.asarray(Image.open(io.BytesIO(d))) for d in datas],
        "checked": fast(datas, CHECKED, overlap=False),
        "unchecked": fast(datas, UNCHECKED, overlap=False),
        "checked_overlap": fast(datas, CHECKED, overlap=True),
        "unchecked_overlap": fast(datas, UNCHECKED, overlap=True),
        "loop_checked": filters_only(inflated, CHECKED),
        "loop_unchecked": filters_only(inflated, UNCHECKED),
    }


def same_pixels_as_libpng(datas: list[bytes]) -> None:
    for data in datas:
        libpng = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        for loop in (CHECKED, UNCHECKED):
            for overlap in (False, True):
                png._unfilter = loop
                try:
                    decoded = png.decode_grey8(data, overlap=overlap)
                finally:
                    png._unfilter = CHECKED
                if decoded is None or not np.array_equal(decoded, libpng):
                    raise SystemExit(f"a variant (overlap={overlap}) decoded a film unlike libpng")


def paired(ms: dict[str, list[float]], checked: str, unchecked: str) -> tuple[float, float]:
    """Median over turns of (checked - unchecked) ms and of checked / unchecked."""
    pairs = list(zip(ms[checked], ms[unchecked], strict=True))
    return statistics.median(c - u for c, u in pairs), statistics.median(c / u for c, u in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="how many of the NIH films (default 64)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    paths = sorted(NIH_IMAGES.glob("*.png"))[: args.images]
    if not paths:
        raise SystemExit(f"no PNGs in {NIH_IMAGES}: this benchmark needs ../shared/data")
    cv2.setNumThreads(1)
    png.compile_now()
    datas = [p.read_bytes() for p in paths]
    same_pixels_as_libpng(datas)
    print(machine() + f", numba {numba.__version__}")
    print(f"{len(datas)} NIH films, {args.repeats} alternating turns; ms per film, wall-clock, min/median/max\n")
    seconds = alternate(variants(datas), args.repeats)
    ms = {name: [1e3 * s / len(datas) for s in values] for name, values in seconds.items()}
    for name, values in ms.items():
        print(f"  {name:<18} {spread(values, 2)}")
    cost, ratio = paired(ms, "checked", "unchecked")
    cost_overlap, ratio_overlap = paired(ms, "checked_overlap", "unchecked_overlap")
    cost_loop, ratio_loop = paired(ms, "loop_checked", "loop_unchecked")
    median = {name: statistics.median(values) for name, values in ms.items()}
    print(
        f"\nbounds checks cost, per film (median of the turns' differences): {cost:+.2f} ms one thread "
        f"({ratio:.3f}x), {cost_overlap:+.2f} ms overlapped ({ratio_overlap:.3f}x), "
        f"{cost_loop:+.2f} ms in the filter loop alone ({ratio_loop:.3f}x)"
    )
    libpng = median["opencv"]
    print(
        f"checked decoder vs libpng: {libpng / median['checked']:.2f}x faster on one thread, "
        f"{libpng / median['checked_overlap']:.2f}x overlapped; PIL {median['pil'] / libpng:.2f}x libpng's time"
    )
    print(
        json.dumps(
            {
                "check_cost_ms": round(cost, 3),
                "check_cost_overlap_ms": round(cost_overlap, 3),
                "check_cost_filter_loop_ms": round(cost_loop, 3),
                "check_ratio": round(ratio, 3),
                "check_ratio_overlap": round(ratio_overlap, 3),
                **{f"{name}_ms": round(value, 3) for name, value in median.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
