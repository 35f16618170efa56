"""Jobs that use the layers below: train (the loop, then calibration, export, plots), cross-validate, tune,
export, evaluate, explain, predict, the demo. The CLI and the library call these."""
