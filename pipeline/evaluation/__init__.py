"""Clinical-study evaluation: metrics with bootstrap CIs and operating points, calibration, classical baselines."""
